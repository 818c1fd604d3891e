"""Compatibility shims for running megatron-core where it was not designed to run.

Every shim, fix and private call in this package names the megatron-core line it was written
for, in one version: ``MEGATRON_CORE``. ``check_megatron_core`` (run at ``import
megatron_mesh``) refuses another version before anything is patched, and
``MEGATRON_INTERNALS`` lists the megatron attributes the package patches or calls privately
(``tests/compat/test_version.py`` checks each still exists).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from megatron_mesh.errors import MeshError

MEGATRON_CORE = "0.19.2"
"""The megatron-core version the shims target (requirements/megatron.txt pins the same)."""

MEGATRON_INTERNALS = (
    # training/megatron_fixes.py
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.state_dict",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._init_optimizer_states_with_dummy_values",
    "megatron.core.optimizer.distrib_optimizer.HAVE_APEX_OR_TE",
    "megatron.core.dist_checkpointing.load",
    "megatron.core.pipeline_parallel.p2p_communication.P2PCommunicator._communicate",
    "megatron.training.training.training_log",
    # training/save_guard.py, training/exit_status.py
    "megatron.core.dist_checkpointing.save",
    "megatron.training.training.save_checkpoint",
    "megatron.training.training.checkpoint_and_decide_exit",
    "megatron.training.global_vars.get_signal_handler",
    # compat/cpu.py
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.training.training.initialize_megatron",
    "megatron.training.training.build_train_valid_test_data_iterators",
    "megatron.training.arguments.get_device_arch_version",
    "megatron.training.initialize._warmup_jit_function",
    # compat/wheel.py
    "megatron.core.datasets.utils.compile_helpers",
    # layers.py: the parallel-residual layer reorders megatron's own halves
    "megatron.core.transformer.transformer_layer.TransformerLayer._forward_attention",
    "megatron.core.transformer.transformer_layer.TransformerLayer._forward_pre_mlp_layernorm",
    "megatron.core.transformer.transformer_layer.TransformerLayer._forward_post_mlp",
)
"""``module.attribute[.attribute]`` of every megatron object the package replaces, wraps or
calls although it is private."""


class MegatronVersionError(MeshError, ImportError):
    """The installed megatron-core is not the version the package's shims were written for."""


def check_megatron_core() -> None:
    """MegatronVersionError unless megatron-core ``MEGATRON_CORE`` is installed (read from the
    package metadata: nothing is imported)."""
    from importlib import metadata

    try:
        found = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        raise MegatronVersionError(
            f"megatron-core is not installed; megatron-mesh needs megatron-core=={MEGATRON_CORE} "
            f"(requirements/megatron.txt)") from None
    if found != MEGATRON_CORE:
        raise MegatronVersionError(
            f"megatron-core {found} is installed, but megatron-mesh's patches and private calls "
            f"into it (megatron_mesh/compat/) were written for {MEGATRON_CORE} exactly: install "
            f"megatron-core=={MEGATRON_CORE} (requirements/megatron.txt)")


KNOWN_MEGATRON_WARNINGS = (
    # what megatron-core says at import about the optional kernels it did not find; the trainer
    # prints its own [mesh] line for the choices that follow from them
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Only transformer-engine>=1\.7\.0 supports MoE experts",
    r"The following imports from `dynamic_context\.py` will be removed",
)
"""Messages of megatron-core's import-time warnings that say nothing a user can act on."""


def silence_known_megatron_warnings() -> None:
    """Ignore ``KNOWN_MEGATRON_WARNINGS`` from megatron's modules for the rest of the process.
    For entry points (tools/*.py) only: a library does not set a process's warning filters.
    Every other warning, megatron's included, still shows."""
    for message in KNOWN_MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=r"megatron\.")


KNOWN_IMPORT_LOG_LINES = {
    # torch's CUDA build on a machine without a GPU (a CPU node, or gpu_check --tiny hiding the
    # GPU), logged when megatron.core.tensor_parallel imports torch.utils.cpp_extension; the
    # package builds no extension
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
"""logger name -> start of a message it logs while megatron-core is imported, saying nothing a
user can act on."""


class _DropKnownLine(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextlib.contextmanager
def known_megatron_warnings_silenced():
    """``silence_known_megatron_warnings`` and ``KNOWN_IMPORT_LOG_LINES`` dropped for the
    duration of a block (the package's import)."""
    filters = [(logging.getLogger(name), _DropKnownLine(start))
               for name, start in KNOWN_IMPORT_LOG_LINES.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            silence_known_megatron_warnings()
            yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)
