"""One MeSH loop step (buffer write, then read) in as few passes over memory as possible.

The readable reference is ``buffer_write`` followed by ``buffer_read`` in ``mesh.py`` (still what
runs on CPU by default, see ``MeshConfig.cycle_impl``); ``mesh_cycle`` computes the same with a
hand-written backward. Shapes (Algorithm 2, one write/read cycle):

    M  buffer   [B, s, b, h]        x  h, the written state   [s, b, h]
    W  w_write  [s, b, B]           R  w_read                  [s, b, B]

    N = M + W^T (x) x               N[k] = M[k] + W[..., k] * x      new buffer  [B, s, b, h]
    y = sum_k N[k] * R[..., k]                                       read        [s, b, h]

Given gy = dL/dy [s, b, h] and gN = dL/dN [B, s, b, h] (None when the new buffer is unused, i.e.
after the last loop step: it counts as zero), the total gradient reaching N is
G[k] = gN[k] + R[..., k] * gy, and since M and x reach y only through N:

    dM         = G = gN + R^T (x) gy                                 [B, s, b, h]
    dx         = sum_k G[k] * W[..., k]  (= sum_k gN[k] W[..., k] + gy * <W, R>_B)   [s, b, h]
    dW[..., k] = <G[k], x>_h             (= <gN[k], x>_h + R[..., k] <gy, x>_h)      [s, b, B]
    dR[..., k] = <N[k], gy>_h                                        [s, b, B]

where <a, b>_h is the per-token dot product over the hidden dimension. dM is an output anyway, so
dx and dW reduce it instead of materialising anything else; N is saved for dR exactly as the eager
``buffer_read`` saves it, so the memory held for backward is the eager one.

Passes over [B, s, b, h] memory: the eager pair materialises W^T (x) x and N * R^T (forward: 3
buffer-sized writes and 4 reads; autograd's backward about 4 writes and 7 reads, with product
temporaries). Here the forward is one addcmul (read M, write N) and one reduction of N; the
backward one addcmul (read gN, write dM), two reductions of dM and one of N: 1 write and 2 or 4
reads, no [B, s, b, h] temporaries besides the outputs. Compiled, inductor folds the reductions
into the kernels that produce N and dM where it can (CPU inductor: one kernel per half; on CUDA
expect the forward in one kernel and the backward in two or three, the h-reductions apart).

Two spellings of each reduction: traced by torch.compile they are element-wise products summed in
fp32 (which inductor fuses); run eagerly they are batched GEMVs (bmm) on strided views, no copy.

Precision: every tensor stays in the activation dtype (a bf16 buffer on GPU), and so do all
outputs and gradients. For bf16/fp16 the slot reductions (y, dx) and the hidden reductions (dW,
dR) accumulate in fp32 (explicit casts when compiled, BLAS fp32 accumulation in bmm otherwise) and
round once; the buffer update is computed in fp32 per element and rounded once, as in the eager
pair (``mesh.py``, Precision). The backward rounds dM once where the eager pair's autograd
rounds the read's gradient and then its sum with gN; tests/recurrence/test_mesh_precision.py bounds both
against an fp64 evaluation.

On CUDA the two halves are compiled lazily, on first use, with ``torch.compile`` (inductor,
``dynamic=None``: the first shape compiles static, a second one recompiles once with symbolic
sizes instead of once per sequence length; see RECOMPILE_LIMIT); CPU never compiles, unless the
caller's ``CycleCompile(devices="all")`` asks (the tests use that to check the compiled graphs
with inductor's CPU backend). A compile failure raises CompileFailure: running uncompiled is a
throughput cliff nobody should find in a job's speed. ``CycleCompile(fallback=True)`` (from
MeshConfig.cycle_compile_fallback) runs the failed half uncompiled instead, with a warning;
``compile_failures()`` lists failures either way.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron_mesh.compat.torch_compile import TORCH_COMPILE, Backend, CompileFeatures, compile_region

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # inductor's CUDA code generator


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _slot_major(w: Tensor) -> Tensor:
    """[s, b, B] -> [B, s, b, 1] view, broadcast against the buffer."""
    return w.permute(2, 0, 1).unsqueeze(-1)


def _slot_sum(a: Tensor, w: Tensor) -> Tensor:
    """sum_k a[k] * w[..., k]: [B, s, b, h], [s, b, B] -> [s, b, h]."""
    if torch.compiler.is_compiling():  # product + reduction: inductor fuses it with a's producer
        acc = _acc_dtype(a.dtype)
        return (a.to(acc) * _slot_major(w).to(acc)).sum(0)
    slots, s, b, h = a.shape  # one batched GEMV per token, on strided views: no copy of a
    w = w.reshape(s * b, slots, 1).to(a.dtype)
    return torch.bmm(a.reshape(slots, s * b, h).permute(1, 2, 0), w).view(s, b, h)


def _hidden_dots(a: Tensor, v: Tensor) -> Tensor:
    """<a[k], v>_h for every slot: [B, s, b, h], [s, b, h] -> [s, b, B]."""
    if torch.compiler.is_compiling():
        acc = _acc_dtype(a.dtype)
        return (a.to(acc) * v.to(acc)).sum(-1).permute(1, 2, 0)
    slots, s, b, h = a.shape
    v = v.reshape(s * b, h, 1).to(a.dtype)
    return torch.bmm(a.reshape(slots, s * b, h).permute(1, 0, 2), v).view(s, b, slots)


def forward_impl(
    buffer: Tensor, h: Tensor, w_write: Tensor, w_read: Tensor
) -> Tuple[Tensor, Tensor]:
    """(read, new_buffer) of one cycle: N = M + W^T (x) x, y = sum_k N[k] R[..., k]."""
    new_buffer = torch.addcmul(buffer, _slot_major(w_write), h.unsqueeze(0))
    return _slot_sum(new_buffer, w_read).to(h.dtype), new_buffer


def backward_impl(
    g_read: Optional[Tensor],
    g_buffer: Optional[Tensor],
    new_buffer: Tensor,
    h: Tensor,
    w_write: Tensor,
    w_read: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_buffer, d_h, d_w_write, d_w_read); a None upstream gradient counts as zero."""
    if g_read is None:
        g_read = torch.zeros_like(h)
    wr = _slot_major(w_read)
    if g_buffer is None:  # the new buffer unused (last loop step): G = R^T (x) gy
        d_buffer = wr * g_read.unsqueeze(0)
    else:
        d_buffer = torch.addcmul(g_buffer, wr, g_read.unsqueeze(0))
    d_h = _slot_sum(d_buffer, w_write).to(h.dtype)
    d_w_write = _hidden_dots(d_buffer, h).to(w_write.dtype)
    d_w_read = _hidden_dots(new_buffer, g_read).to(w_read.dtype)
    return d_buffer, d_h, d_w_write, d_w_read


RECOMPILE_LIMIT = 16
"""Graphs each compiled half may collect; a call needing one more raises CompileFailure.

A half compiles once per guard set: the first shape static, then symbolic sizes from the first
new size on (``dynamic=None``), so more sequence lengths cost no more graphs; but dynamo
specialises sizes 1 (and the strides of size-1 dims), and there is a graph per dtype and, for
the backward, per missing upstream gradient (the last loop step's new buffer is unused). A fixed
training shape needs 1 forward and 2 backward graphs; training and evaluating at other lengths
and micro-batch sizes, size 1 included, took 7 and 10 on CPU, past dynamo's default limit of 8.
The limit is the region's own, on whichever thread compiles it (on CUDA the backward compiles on
autograd's device thread): ``compat/torch_compile.py`` passes it to ``torch.compile`` where that
takes it, and makes up for it where not (torch 2.11)."""

Compiler = Tuple[Backend, int, CompileFeatures]  # (torch.compile backend, limit, what torch takes)


class CompileFailure(RuntimeError):
    """torch.compile could not build or run a half of the MeSH cycle (the message says which,
    for which inputs, and how to run it uncompiled instead); the compiler's error is the cause."""


_compiled: Dict[Tuple[str, Compiler], Callable] = {}


def _compile(name: str, fn: Callable, compiler: Compiler) -> Callable:
    """torch.compile ``fn`` once per process and compiler, on first use (never at import): an
    isolated fullgraph region, so dynamo raises past its recompile limit instead of running the
    frame uncompiled, and counts only this region's graphs against it."""
    key = (name, compiler)
    if key not in _compiled:
        backend, limit, features = compiler
        _compiled[key] = compile_region(fn, name, backend, limit, features)
    return _compiled[key]


@dataclass(frozen=True)
class CycleCompile:
    """How ``mesh_cycle`` compiles its two halves; passed in by its caller (MeshScheme builds
    one from MeshConfig.cycle_compile_fallback), never set process-wide."""

    devices: str = "cuda"
    """'cuda': where the inputs are on CUDA (and triton, inductor's code generator, imports);
    'all': on every device too (tests, the GPU check's CPU stand-in); 'none': never."""
    backend: Backend = "inductor"
    """A torch.compile backend name or callable."""
    recompile_limit: int = RECOMPILE_LIMIT
    fallback: bool = False
    """On a compile failure: raise CompileFailure (False) or warn and run that half uncompiled
    from then on (True)."""
    features: CompileFeatures = TORCH_COMPILE
    """What this torch's torch.compile takes (detected at import; tests pass the other case)."""

    def compiler(self, like: Tensor) -> Optional[Compiler]:
        """How to compile a half whose inputs are on ``like``'s device; None: run it as is."""
        compiler = self.backend, self.recompile_limit, self.features
        if self.devices == "all":
            return compiler
        if self.devices == "cuda" and like.is_cuda and not torch.compiler.is_compiling() and _HAVE_TRITON:
            return compiler
        return None  # CPU, or inside a model that torch.compile traces already


_FAILED: Dict[Tuple[str, Compiler], str] = {}
"""(half, compiler) -> the error compiling it raised in this process: a record (and, with the
fallback, what now runs uncompiled), like the cache of compiled halves above."""


def _run(name: str, fn: Callable, like: Tensor, options: CycleCompile, *args):
    """``fn(*args)``, compiled where ``options`` says. A compiler failure raises CompileFailure
    or, with ``options.fallback``, warns and runs this half uncompiled from then on; running
    out of memory is no compiler failure and propagates as it is."""
    compiler, fallback = options.compiler(like), options.fallback
    if compiler is None or (fallback and (name, compiler) in _FAILED):
        return fn(*args)
    try:
        # detached: dynamo guards on requires_grad, which cannot matter here (autograd.Function
        # runs both halves without grad) but would double the graphs (training vs evaluation)
        return _compile(name, fn, compiler)(*(_detached(a) for a in args))
    except Exception as err:  # noqa: BLE001  (inductor/triton raise many types)
        oom = _out_of_memory(err)
        if oom is not None:
            raise oom from err
        _FAILED[name, compiler] = f"{type(err).__name__}: {err}"
        message = _failure_message(name, fn, compiler, args, err)
        if not fallback:
            raise CompileFailure(message) from err
        warnings.warn(f"{message}\nfallback=True: the {name} runs uncompiled from now on")
        return fn(*args)


def _detached(arg: Optional[Tensor]) -> Optional[Tensor]:
    return None if arg is None else arg.detach()


def _out_of_memory(err: BaseException) -> Optional[BaseException]:
    """The out-of-memory error ``err`` is or wraps, else None. A compiler can run out of memory
    too (inductor benchmarks kernels); dynamo keeps a backend's error in ``inner_exception``."""
    seen = []
    while err is not None and all(err is not e for e in seen):
        if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
            return err
        seen.append(err)
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


def _failure_message(name: str, fn: Callable, compiler: Compiler, args, err: Exception) -> str:
    from torch._dynamo.exc import FailOnRecompileLimitHit  # failures only: no dynamo at import

    backend, limit, _ = compiler
    names = inspect.signature(fn).parameters
    inputs = ", ".join(f"{arg} {_describe(t)}" for arg, t in zip(names, args))
    hint = ""
    if isinstance(err, FailOnRecompileLimitHit):
        hint = (f"\n  it needed more than recompile_limit={limit} graphs (one per dtype, size-1 "
                "dimension, missing gradient...: TORCH_LOGS=recompiles names each new guard)")
    return (f"torch.compile ({_backend_name(backend)}) of the MeSH cycle {name} failed: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:500]}\n  inputs: {inputs}{hint}\n"
            "  to run it uncompiled instead, set model.cycle_compile_fallback: true "
            "(CycleCompile(fallback=True) for mesh_cycle): the same math, but several more passes "
            "over the [B, s, b, h] buffer per loop step, a throughput loss on large jobs")


def _describe(t: Optional[Tensor]) -> str:
    return "None" if t is None else f"{list(t.shape)} {str(t.dtype)[6:]} {t.device}"


def _backend_name(backend: Backend) -> str:
    if isinstance(backend, str):
        return backend
    return getattr(backend, "__name__", type(backend).__name__)


def compile_failures() -> Dict[str, str]:
    """Compiled halves that failed in this process ('half:backend' -> error), whether that was
    raised or (fallback=True) the half now runs uncompiled."""
    return {f"{name}:{_backend_name(backend)}": error
            for (name, (backend, *_)), error in _FAILED.items()}


class MeshCycle(torch.autograd.Function):
    """autograd wrapper: forward_impl / backward_impl, saving N, x, W and R."""

    @staticmethod
    def forward(ctx, buffer, h, w_write, w_read, options):
        ctx.set_materialize_grads(False)
        ctx.options = options
        read, new_buffer = _run("forward", forward_impl, h, options,
                                buffer, h, w_write, w_read)
        ctx.save_for_backward(new_buffer, h, w_write, w_read)
        return read, new_buffer

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_read, g_buffer):
        if g_read is None and g_buffer is None:
            return None, None, None, None, None
        new_buffer, h, w_write, w_read = ctx.saved_tensors
        grads = _run("backward", backward_impl, h, ctx.options,
                     g_read, g_buffer, new_buffer, h, w_write, w_read)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def mesh_cycle(buffer: Tensor, h: Tensor, w_write: Tensor, w_read: Tensor, *,
               options: CycleCompile = CycleCompile()) -> Tuple[Tensor, Tensor]:
    """Fused ``buffer_write`` then ``buffer_read``: -> (read [s, b, h], new buffer [B, s, b, h]).

    Where a half compiles (CUDA) and torch.compile fails, this raises CompileFailure, or with
    ``options.fallback`` warns and runs that half uncompiled from then on."""
    return MeshCycle.apply(buffer, h, w_write, w_read, options)
