"""compat/torch_compile: a compiled region's own recompile limit and isolation, detected per torch
(the MeSH cycle's use of it: tests/recurrence/test_fused_mesh.py, run with both ways)."""

import inspect
import logging

import pytest
import torch

from megatron_mesh.compat import torch_compile
from megatron_mesh.compat.torch_compile import TORCH_COMPILE, CompileFeatures, compile_region

EMULATED = CompileFeatures(recompile_limit=False, isolate_recompiles=False)


def double(x):
    return x * 2


def test_detection_reads_torch_compile_signature():
    taken = inspect.signature(torch.compile).parameters
    assert TORCH_COMPILE.recompile_limit == ("recompile_limit" in taken)  # torch 2.12 on
    assert TORCH_COMPILE.isolate_recompiles == ("isolate_recompiles" in taken)  # torch 2.13 on
    assert len(TORCH_COMPILE.adaptations()) == 2 - len({"recompile_limit", "isolate_recompiles"} & taken.keys())


def test_emulation_logs_one_line_per_process(caplog):
    torch_compile._log_adaptations.cache_clear()  # as in a new process
    with caplog.at_level(logging.WARNING, logger=torch_compile.__name__):
        compile_region(double, "a", "eager", 2, EMULATED)
        compile_region(double, "b", "aot_eager", 2, EMULATED)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"megatron-mesh adapted to {line}" for line in EMULATED.adaptations()]
    assert lines[0].startswith(f"megatron-mesh adapted to torch {torch.__version__}: torch.compile "
                               "takes no recompile_limit")


def test_emulated_region_fails_past_exactly_its_limit_and_counts_only_its_graphs():
    """Another region of the same function filling dynamo's cache does not count against this
    one's, and past its own limit the region raises instead of running eagerly."""
    dynamo_default = torch._dynamo.config.recompile_limit
    other = compile_region(double, "other", "eager", 4, EMULATED)
    for dtype in (torch.bfloat16, torch.float16, torch.int32):
        other(torch.ones(2, dtype=dtype))
    region = compile_region(double, "region", "eager", 2, EMULATED)
    region(torch.ones(2, dtype=torch.float64))
    region(torch.ones(2, dtype=torch.float32))  # graph 2 of 2
    with pytest.raises(Exception) as failure:
        region(torch.ones(2, dtype=torch.float16))  # graph 3
    assert type(failure.value).__name__ == "FailOnRecompileLimitHit"
    assert torch._dynamo.config.recompile_limit == dynamo_default  # left as it was
