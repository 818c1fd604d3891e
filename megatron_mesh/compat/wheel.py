"""Shims for how megatron-core 0.19.2 is packaged, needed on every machine where they apply.

Unlike ``compat/cpu.py`` these do not depend on CUDA: each is conditional on the exact
condition it fixes (Python version, a missing build file) and does nothing otherwise.
"""

from __future__ import annotations

import sys
import typing


def _typing_override() -> None:
    # megatron/training/models/hybrid.py:5 does `from typing import override` (Python >= 3.12);
    # the cp311 wheel runs on 3.11 otherwise. PEP 698's override is an identity decorator.
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):

        def override(func):
            try:
                func.__override__ = True
            except (AttributeError, TypeError):
                pass
            return func

        typing.override = override


def _prebuilt_dataset_helpers() -> None:
    # megatron/training/initialize.py:178 runs `make` in megatron/core/datasets to build
    # helpers_cpp; the wheel ships the compiled extension but not the Makefile, so `make` fails
    # and the trainer exits. Keep compile_helpers for source checkouts without the extension.
    import importlib.util

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        return
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: None


def apply() -> None:
    """Import-free shims, installed with the package (before anything imports megatron)."""
    _typing_override()


def apply_trainer() -> None:
    """Shims for megatron.training.pretrain (imports megatron.core); call before pretrain."""
    _prebuilt_dataset_helpers()
