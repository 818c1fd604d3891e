"""megatron-core shims for machines without CUDA (CPU tests, laptops, CI).

Written against megatron-core 0.19.2 and torch 2.13 (CPU build). Every shim names the
megatron-core line it works around. ``apply()`` does nothing when CUDA is available, so none of
this can change behaviour on a GPU. Import order matters: ``apply()`` must run before
``megatron.core`` is imported (``megatron_mesh/__init__.py`` does that).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch

_APPLIED = False


def _stub_paged_stash() -> None:
    # megatron/core/transformer/moe/ops/paged_stash.py:4 does `import triton` at import time, and
    # pipeline_parallel/schedules.py:27 imports it via moe/paged_stash.py:12, so `import
    # megatron.core` fails without triton (which has no CPU wheel). MoE paged stashing is
    # CUDA-only; the stub raises if anything ever calls it.
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    stub = types.ModuleType(name)

    def _unavailable(*_args, **_kwargs):
        raise RuntimeError("MoE paged stash kernels need CUDA and triton")

    stub.GLOBAL_BLOCK_SIZE = 0
    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[name] = stub


def _cpu_current_device() -> None:
    # models/common/embeddings/rotary_pos_embedding.py:162 moves inv_freq to
    # `torch.cuda.current_device()`, and pipeline_parallel/p2p_communication.py allocates its
    # receive buffers there. On a CPU machine the current device is the CPU.
    torch.cuda.current_device = lambda: "cpu"


def _cpu_rng_tracker() -> None:
    # tensor_parallel/random.py:303-308 (CudaRNGStatesTracker.add) calls torch.cuda.get_rng_state
    # and torch.cuda.manual_seed, and random.py:135 (_set_cuda_rng_state) / _get_cuda_rng_state
    # drive the CUDA default generator. The tracker is entered by attention even with dropout 0
    # (transformer/dot_product_attention.py). On CPU the device generator *is* the CPU
    # generator, so map the CUDA RNG calls onto it; forks then give reproducible dropout masks.
    # Consequence: model_parallel_cuda_manual_seed (random.py:490) also reseeds the CPU RNG.
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(*_args, **_kwargs):
        return torch.get_rng_state()

    def set_state(new_state, *_args, **_kwargs):
        torch.set_rng_state(new_state)

    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state


def _cpu_synchronize() -> None:
    # optimizer/, distributed/ and training/ call torch.cuda.synchronize() and use
    # torch.cuda.Stream / stream contexts for overlap; on CPU there is nothing to synchronise.
    # training/training.py:1876 (get_model) and distributed/distributed_data_parallel.py:297
    # create side streams; param_and_grad_buffer.py:632-814 waits on them.
    torch.cuda.synchronize = lambda *_args, **_kwargs: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *_args, **_kwargs: _NullStream()
    torch.cuda.stream = lambda *_args, **_kwargs: contextlib.nullcontext()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Maps ``device="cuda"`` (factory kwargs, ``.to(...)``, ``.cuda()``) to the CPU.

    Entered only around the megatron-core functions listed in ``_CUDA_LITERAL_SITES``: a
    process-wide mode would add Python dispatch to every tensor op (about 2x on small ops).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # optimizer/clip_grads.py:174, optimizer/optimizer.py:1009-1028 and
            # distrib_optimizer.py:401-466, :758 dispatch on 'torch.cuda.FloatTensor' etc.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


_CUDA_LITERAL_SITES = [
    # (module, function, other modules that imported the function by name)
    # transformer/utils.py:39 and :44 allocate the default causal / sliding-window masks with a
    # literal device="cuda"; fusions/fused_softmax.py:8 imports both by name.
    ("megatron.core.transformer.utils", "get_default_causal_mask", ["megatron.core.fusions.fused_softmax"]),
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask", ["megatron.core.fusions.fused_softmax"]),
    # tensor_parallel/data.py:37 (broadcast_data) sizes its metadata with device='cuda'
    ("megatron.core.tensor_parallel.data", "_build_key_size_numel_dictionaries", []),
]


def _scope_cuda_literals_to_cpu() -> None:
    for module_name, attr, importers in _CUDA_LITERAL_SITES:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)

        @functools.wraps(original)
        def on_cpu(*args, _original=original, **kwargs):
            with _CudaToCpuMode():
                return _original(*args, **kwargs)

        for name in (module_name, *importers):
            setattr(importlib.import_module(name), attr, on_cpu)


class _NullStream:
    """Stands in for torch.cuda.Stream on CPU: every operation completes immediately."""

    def __init__(self, *_args, **_kwargs):
        pass

    def wait_event(self, _event):
        return None

    def wait_stream(self, _other):
        return None

    def synchronize(self):
        return None

    def record_event(self, *_args, **_kwargs):
        return None


class _NullEvent:
    """Stands in for torch.cuda.Event on CPU."""

    def __init__(self, *_args, **_kwargs):
        pass

    def record(self, *_args, **_kwargs):
        return None

    def wait(self, *_args, **_kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply() -> bool:
    """Install the shims once when CUDA is absent. Returns True when shims are active."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    _stub_paged_stash()
    _cpu_current_device()
    _scope_cuda_literals_to_cpu()
    _cpu_synchronize()
    _cpu_rng_tracker()
    _APPLIED = True
    return True


# ---------------------------------------------------------------------------------------------
# megatron.training (the Megatron-LM trainer shipped in the wheel)
# ---------------------------------------------------------------------------------------------

CPU_TRAINER_ARGS = [
    # training/arguments.py: --distributed-backend defaults to nccl, which needs CUDA
    "--distributed-backend", "gloo",
    # gradient_accumulation_fusion (tensor_parallel/layers.py) needs the fused CUDA wgrad kernel
    "--no-gradient-accumulation-fusion",
    # fused softmax / bias-GELU / bias-dropout / rope kernels are CUDA (or TE) only
    "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    # without CUDA megatron would allocate parameters on `cuda.current_device()`
    "--use-cpu-initialization",
]


def trainer_args() -> list:
    """Megatron flags a run without CUDA needs (empty with CUDA)."""
    return [] if cuda_available() else list(CPU_TRAINER_ARGS)


@contextlib.contextmanager
def _one_pretend_device():
    saved = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *_args, **_kwargs: None
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = saved


def async_save_worker_context():
    """For megatron's persistent async-save worker process, which picks a CUDA device first
    (dist_checkpointing/strategies/async_utils.py:565, ``rank % torch.cuda.device_count()``):
    one pretend device without CUDA, nothing with it."""
    return contextlib.nullcontext() if cuda_available() else _one_pretend_device()


def _trainer_initialize_without_cuda() -> None:
    # training/initialize.py:66 asserts CUDA unless allow_no_cuda=True, which training.py:1091
    # (pretrain) does not pass. Inside initialize_megatron, model-parallel groups
    # (initialize.py:354) and the model-parallel RNG tracker seed (initialize.py:447) are only
    # set up when torch.cuda.device_count() > 0: report one device there (and make
    # torch.cuda.set_device, initialize.py:282, a no-op), so both happen as on a GPU.
    from megatron.training import initialize, training

    original = initialize.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        with _one_pretend_device():
            return original(*args, **kwargs)

    training.initialize_megatron = initialize_megatron


def _trainer_rng_neutral_data_iterators() -> None:
    # training.py:1362 builds the data iterators after load_checkpoint restored the RNG states.
    # Creating a DataLoader iterator draws its base seed from torch's default generator
    # (torch/utils/data/dataloader.py, _BaseDataLoaderIter). On a GPU that generator is not the
    # one dropout uses; on CPU it is the same one, so the draw would shift every dropout mask of
    # a resumed run. Keep the draw out of the dropout stream, as on a GPU.
    from megatron.training import training

    original = training.build_train_valid_test_data_iterators

    @functools.wraps(original)
    def build_train_valid_test_data_iterators(*args, **kwargs):
        state = torch.get_rng_state()
        try:
            return original(*args, **kwargs)
        finally:
            torch.set_rng_state(state)

    training.build_train_valid_test_data_iterators = build_train_valid_test_data_iterators


def _trainer_no_device_arch() -> None:
    # training/arguments.py:1414 (validate_args) asks get_device_arch_version() (a CUDA device
    # query) whenever tensor or context parallelism is on, then asserts
    # CUDA_DEVICE_MAX_CONNECTIONS=1 (a CUDA kernel-ordering setting). Without CUDA there is no
    # architecture and no kernel queue: report a pre-Blackwell one and satisfy the assertion.
    import os

    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _trainer_no_fusion_warmup() -> None:
    # training/initialize.py:494 (set_jit_fusion_options) always warms up the fused bias-GELU
    # and bias-dropout-add kernels (_warmup_jit_function, :497), which torch.compile's inductor
    # builds with a C++ compiler on CPU: ~5 s per process. CPU runs turn both fusions off
    # (CPU_TRAINER_ARGS), so the compiled kernels would never run.
    from megatron.training import initialize

    initialize._warmup_jit_function = lambda *_args, **_kwargs: None


def apply_trainer() -> bool:
    """Shims for megatron.training; call after ``apply()`` and before ``pretrain``."""
    if cuda_available():
        return False
    _trainer_initialize_without_cuda()
    _trainer_rng_neutral_data_iterators()
    _trainer_no_device_arch()
    _trainer_no_fusion_warmup()
    return True


def trainer_context():
    """Context for running megatron.training on CPU: maps its literal device="cuda" allocations
    (training.py:1128 start-time tensors, schedules.py:749, the optimizer and DDP buffers, ...)
    to the CPU. Nothing (a null context) with CUDA."""
    return contextlib.nullcontext() if cuda_available() else _CudaToCpuMode()
