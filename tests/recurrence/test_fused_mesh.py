"""The fused MeSH cycle (fused_mesh.mesh_cycle) equals the eager buffer_write + buffer_read,
and a compiled cycle fails loudly instead of running uncompiled unasked.
(bf16: tests/recurrence/test_mesh_precision.py.)"""

import collections
import functools
import os
import shutil
import threading
import warnings

import pytest
import torch

from conftest import random_batch, tiny_config
from megatron_mesh.compat.torch_compile import TORCH_COMPILE, CompileFeatures
from megatron_mesh.qualify.cycle import eager_cycle
from megatron_mesh.recurrence import fused_mesh, mesh
from megatron_mesh.recurrence.fused_mesh import CycleCompile, mesh_cycle
from megatron_mesh.recurrence.mesh import MeshScheme


def cycle_inputs(slots=3, s=4, b=2, hidden=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(slots, s, b, hidden, generator=g, dtype=dtype)
    h = torch.randn(s, b, hidden, generator=g, dtype=dtype)
    w_write = torch.softmax(torch.randn(s, b, slots, generator=g, dtype=dtype), -1)
    w_read = torch.softmax(torch.randn(s, b, slots, generator=g, dtype=dtype), -1)
    return [t.requires_grad_() for t in (buffer, h, w_write, w_read)]


def values_and_grads(fn, inputs, use_buffer=True, seed=1, backward=torch.Tensor.backward):
    """fn's outputs and the input gradients for fixed random upstream gradients."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    read, new_buffer = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (read * torch.randn(read.shape, generator=g).to(read.dtype)).sum()
    if use_buffer:  # else: the last loop step, whose new buffer nobody reads
        loss = loss + (new_buffer * torch.randn(new_buffer.shape, generator=g).to(read.dtype)).sum()
    backward(loss)
    return [read.detach(), new_buffer.detach()] + [t.grad for t in inputs]


def test_gradcheck_float64():
    inputs = cycle_inputs()
    assert torch.autograd.gradcheck(mesh_cycle, inputs)
    # the new buffer unused (its gradient is None inside backward)
    assert torch.autograd.gradcheck(lambda *a: mesh_cycle(*a)[0], inputs)
    assert torch.autograd.gradcheck(lambda *a: mesh_cycle(*a)[1], inputs)


@pytest.mark.parametrize("use_buffer", [True, False])
def test_matches_eager_reference_fp32(use_buffer):
    inputs = cycle_inputs(slots=5, s=32, b=2, hidden=64, dtype=torch.float32)
    fused = values_and_grads(mesh_cycle, inputs, use_buffer)
    eager = values_and_grads(eager_cycle, inputs, use_buffer)
    names = ["read", "new_buffer", "d_buffer", "d_h", "d_w_write", "d_w_read"]
    for name, a, b in zip(names, fused, eager):
        # 1e-6 of the tensor's scale: the dots over h=64 sum in another order than eager's
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale, msg=lambda m, name=name: f"{name}: {m}")
        assert a.dtype == b.dtype and a.shape == b.shape


def counting(monkeypatch):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args[1].shape)
        return mesh_cycle(*args, **kwargs)

    monkeypatch.setattr(mesh, "mesh_cycle", wrapper)
    return calls


def test_switch_dispatch_on_cpu(monkeypatch):
    """auto = eager on CPU; the scheme's outputs agree whichever implementation runs."""
    torch.manual_seed(0)
    scheme = MeshScheme(8, num_loops=2, buffer_slots=4, init_method=torch.nn.init.normal_).double()
    h_emb, h_pre = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    calls = counting(monkeypatch)
    outputs = {}
    for mode in ("auto", "fused", "eager"):
        scheme.impl = mode
        before = len(calls)
        h, state = scheme.begin(h_emb, h_pre)
        for t in range(2):
            h, state = scheme.step(t, h, torch.tanh(h), state)
        outputs[mode] = (h, state.buffer)
        assert len(calls) - before == (3 if mode == "fused" else 0), mode
    for mode in ("fused", "eager"):
        for a, b in zip(outputs[mode], outputs["auto"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_loss_and_gradients_fused_on_off(megatron_world, monkeypatch):
    from megatron_mesh.model.gpt import MeshGPTModel

    cfg = tiny_config("1+2R2+1", "mesh")
    torch.manual_seed(0)
    model = MeshGPTModel(cfg)
    tokens, positions = random_batch(cfg)
    calls = counting(monkeypatch)
    results = {}
    for mode in ("fused", "eager"):
        model.decoder.scheme.impl = mode
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # the transitional cycle and two loop steps, fused only when "fused"
    torch.testing.assert_close(results["fused"][0], results["eager"][0], rtol=1e-6, atol=1e-6)
    grads_on, grads_off = results["fused"][1], results["eager"][1]
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        torch.testing.assert_close(
            grads_on[name], grads_off[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


SKIP = (
    "a cold inductor CPU compile of the two graphs (C++ build) takes ~30 s on the 2-core CI machine"
    "; set MEGATRON_MESH_TEST_INDUCTOR=1 to run it (needs a C++ compiler)"
)
RUN_INDUCTOR = os.environ.get("MEGATRON_MESH_TEST_INDUCTOR") == "1" and any(
    shutil.which(c) for c in ("g++", "c++", "clang++")
)
INDUCTOR = pytest.param("inductor", marks=pytest.mark.skipif(not RUN_INDUCTOR, reason=SKIP))


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_cycle_matches_eager(backend):
    """The graphs torch.compile gets on CUDA (the traced spellings), compiled here on CPU."""
    inputs = cycle_inputs(slots=4, s=8, b=2, hidden=32, dtype=torch.float32)
    cycle = functools.partial(mesh_cycle, options=CycleCompile(devices="all", backend=backend))
    compiled = values_and_grads(cycle, inputs)
    last_step = values_and_grads(cycle, inputs, use_buffer=False)
    keys = {(half, (backend, fused_mesh.RECOMPILE_LIMIT, TORCH_COMPILE)) for half in ("forward", "backward")}
    assert keys <= fused_mesh._compiled.keys()
    expected = values_and_grads(eager_cycle, inputs) + values_and_grads(eager_cycle, inputs, False)
    for a, b in zip(compiled + last_step, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


class CountingBackend:
    """A torch.compile backend that runs dynamo's graph as traced and counts, per half, the graphs
    it compiled and the calls that ran one: a call dynamo left uncompiled never reaches it.
    ``fail``: the halves whose compile raises, ``error`` what they raise, ``fail_when``
    'compile' (inside dynamo's backend call) or 'run' (inside the compiled call)."""

    def __init__(self, fail=(), error=None, fail_when="compile"):
        self.compiles, self.calls = collections.Counter(), collections.Counter()
        self.error = error or RuntimeError("triton: no kernel for this")
        self.fail, self.fail_when = fail, fail_when

    def __call__(self, gm, example_inputs):
        half = "forward" if len(gm.graph.output_node().args[0]) == 2 else "backward"
        if half in self.fail and self.fail_when == "compile":
            raise self.error
        self.compiles[half] += 1

        def run(*args):
            if half in self.fail:
                raise self.error
            self.calls[half] += 1
            return gm(*args)

        return run


NATIVE, EMULATED = CompileFeatures(True, True), CompileFeatures(False, False)
FEATURES = [  # torch.compile as torch 2.13 offers it, and as compat/torch_compile emulates it on 2.11
    pytest.param(NATIVE, id="native", marks=pytest.mark.skipif(
        TORCH_COMPILE != NATIVE, reason=f"torch {torch.__version__}'s torch.compile takes no "
                                        "recompile_limit or isolate_recompiles")),
    pytest.param(CompileFeatures(True, False), id="limit-only", marks=pytest.mark.skipif(  # 2.12
        not TORCH_COMPILE.recompile_limit, reason=f"torch {torch.__version__}'s torch.compile "
                                                  "takes no recompile_limit")),
    pytest.param(EMULATED, id="emulated"),
]


@pytest.fixture(params=FEATURES)
def compiling(monkeypatch, request):
    """``compiling(backend, **kw)``: the CycleCompile that compiles on every device with
    ``backend``, with this test's own failure record (compile_failures() is per process), once
    with each way of giving a region its own recompile limit."""
    monkeypatch.setattr(fused_mesh, "_FAILED", {})
    return functools.partial(CycleCompile, "all", features=request.param)


def in_thread(fn):
    """fn() on a new thread, as CUDA runs backward on autograd's device thread; its error raised
    here."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (handed to the calling thread)
            outcome["error"] = err

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def assert_matches_eager(got, inputs, use_buffer=True):
    expected = values_and_grads(eager_cycle, inputs, use_buffer)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def mesh_warnings(caught):
    return [w for w in caught if "MeSH cycle" in str(w.message)]


def test_compile_failure_raises_naming_half_inputs_and_fallback(compiling):
    options = compiling(CountingBackend(fail=("forward",)))
    with pytest.raises(fused_mesh.CompileFailure) as failure:
        mesh_cycle(*cycle_inputs(), options=options)
    message = str(failure.value)
    assert message.startswith("torch.compile (CountingBackend) of the MeSH cycle forward failed")
    assert "buffer [3, 4, 2, 5] float64 cpu, h [4, 2, 5] float64 cpu" in message
    assert "model.cycle_compile_fallback: true" in message
    assert "triton: no kernel for this" in str(failure.value.__cause__)  # the compiler's error
    assert list(fused_mesh.compile_failures()) == ["forward:CountingBackend"]


def test_backward_compile_failure_on_another_thread_raises(compiling):
    backend = CountingBackend(fail=("backward",))
    cycle = functools.partial(mesh_cycle, options=compiling(backend))
    inputs = cycle_inputs()
    with pytest.raises(fused_mesh.CompileFailure, match="MeSH cycle backward failed") as failure:
        values_and_grads(cycle, inputs, use_buffer=False,
                         backward=lambda loss: in_thread(loss.backward))
    assert "g_buffer None, new_buffer [3, 4, 2, 5] float64 cpu" in str(failure.value)
    assert backend.calls == {"forward": 1}  # the forward did compile
    assert list(fused_mesh.compile_failures()) == ["backward:CountingBackend"]


def test_compile_fallback_warns_once_and_runs_uncompiled(compiling):
    options = compiling(CountingBackend(fail=("forward", "backward")), fallback=True)
    inputs = cycle_inputs()
    cycle = functools.partial(mesh_cycle, options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_matches_eager(values_and_grads(cycle, inputs), inputs)
        assert len(mesh_warnings(caught)) == 2  # forward, then backward
        assert_matches_eager(values_and_grads(cycle, inputs), inputs)
    assert len(mesh_warnings(caught)) == 2  # once per half: then the half stays uncompiled
    assert "fallback=True: the backward runs uncompiled" in str(caught[-1].message)
    assert set(fused_mesh.compile_failures()) == {"forward:CountingBackend",
                                                  "backward:CountingBackend"}


@pytest.mark.parametrize("fallback", [False, True])
def test_scheme_passes_compile_fallback(compiling, fallback):
    options = compiling(CountingBackend(fail=("forward",)), fallback=fallback)
    torch.manual_seed(0)
    scheme = MeshScheme(5, num_loops=1, buffer_slots=3, init_method=torch.nn.init.normal_,
                        impl="fused", compile_options=options).double()
    h_emb, h_pre = torch.randn(2, 4, 2, 5, dtype=torch.float64)
    if not fallback:
        with pytest.raises(fused_mesh.CompileFailure):
            scheme.begin(h_emb, h_pre)
        return
    with pytest.warns(UserWarning, match="MeSH cycle forward failed"):
        h, state = scheme.begin(h_emb, h_pre)
    scheme.impl = "eager"
    expected = scheme.begin(h_emb, h_pre)
    torch.testing.assert_close(h, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.buffer, expected[1].buffer, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("fail_when", ["compile", "run"])
def test_out_of_memory_is_no_compile_failure(compiling, fail_when, fallback):
    """An OOM (here raised by the backend, or by the compiled call) reaches the caller as an OOM:
    neither a CompileFailure nor, with the fallback, an uncompiled retry."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    options = compiling(CountingBackend(fail=("forward",), error=oom, fail_when=fail_when),
                        fallback=fallback)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(torch.OutOfMemoryError):
        warnings.simplefilter("always")
        mesh_cycle(*cycle_inputs(), options=options)
    assert not mesh_warnings(caught) and not fused_mesh.compile_failures()


LENGTHS = (3, 5, 7, 9, 11, 13)  # more sequence lengths than the recompile limit below


def test_sequence_lengths_past_the_recompile_limit_stay_compiled(compiling):
    """dynamic=None: a static graph, then one with a symbolic length for every other length; every
    call must have run a compiled graph (CountingBackend counts them)."""
    backend = CountingBackend()
    cycle = functools.partial(mesh_cycle, options=compiling(backend, recompile_limit=2))
    for s in LENGTHS:
        inputs = cycle_inputs(s=s, dtype=torch.float32)
        assert_matches_eager(values_and_grads(cycle, inputs), inputs)
    assert backend.calls == {"forward": len(LENGTHS), "backward": len(LENGTHS)}
    # 2 each; 1 where an earlier test saw other lengths (dynamo keeps which sizes vary per function)
    assert set(backend.compiles) == {"forward", "backward"} and max(backend.compiles.values()) <= 2


@pytest.mark.parametrize("fallback", [False, True])
def test_hitting_the_recompile_limit_is_a_compile_failure(compiling, fallback):
    """fullgraph=True: past the limit dynamo raises rather than running the frame uncompiled, and
    that is a compile failure like any other. (A new dtype needs a new graph for sure; a new
    length may not, see above.)"""
    options = compiling(CountingBackend(), recompile_limit=1, fallback=fallback)
    cycle = functools.partial(mesh_cycle, options=options)
    first, second = cycle_inputs(), cycle_inputs(dtype=torch.float32)
    values_and_grads(cycle, first)
    if not fallback:
        with pytest.raises(fused_mesh.CompileFailure, match="recompile_limit=1") as failure:
            cycle(*second)
        assert type(failure.value.__cause__).__name__ == "FailOnRecompileLimitHit"
        return
    with pytest.warns(UserWarning, match="recompile_limit=1"):
        got = values_and_grads(cycle, second)
    assert_matches_eager(got, second)


def test_compiled_backward_on_another_thread_ignores_main_thread_dynamo_config(compiling):
    """On CUDA the backward runs (and first compiles) on autograd's device thread. dynamo's config
    overrides are per thread in torch 2.13 (ContextVars) and process-wide in 2.11: either way a
    limit the caller patched is not the cycle's, which compiles both halves alike on any thread
    under its own limit."""
    backend = CountingBackend()
    cycle = functools.partial(mesh_cycle, options=compiling(backend))
    backward = lambda loss: in_thread(loss.backward)  # noqa: E731

    # a limit of 1 would fail the forward's second length and the backward's
    with torch._dynamo.config.patch(recompile_limit=1):
        for s in LENGTHS[:3]:
            inputs = cycle_inputs(s=s, dtype=torch.float32)
            assert_matches_eager(values_and_grads(cycle, inputs, backward=backward), inputs)
        assert torch._dynamo.config.recompile_limit == 1  # the caller's patch stands
    assert backend.calls == {"forward": 3, "backward": 3}  # every call compiled, on both threads
    assert not fused_mesh.compile_failures()


def test_compile_fallback_is_a_model_key(megatron_world):
    """model.cycle_compile_fallback reaches the scheme the block builds (off by default)."""
    from megatron_mesh.model.gpt import MeshGPTModel

    assert MeshGPTModel(tiny_config()).decoder.scheme.compile_options.fallback is False
    assert MeshGPTModel(tiny_config(cycle_compile_fallback=True)).decoder.scheme.compile_options.fallback
