"""qualify/attention: the verdict on which SDPA kernel ran (the profiled forward itself runs in
tests/tools/test_gpu_check.py)."""

import pytest


@pytest.mark.parametrize("calls, passed", [
    ({"flash": 6}, True), ({"cudnn": 6}, True), ({"memory-efficient": 6}, True),
    ({"flash": 3, "math": 3}, False), ({"math": 6}, False), ({}, False)])
def test_attention_accepts_any_fused_kernel_on_a_gpu_and_names_it(calls, passed):
    from megatron_mesh.qualify.attention import verdict

    result = verdict(calls, must_be_fused=True)
    assert (result.status == "pass") == passed, result.summary
    assert all(f"{kernel} x{n}" in result.summary for kernel, n in calls.items())
    assert result.details["kernels"] == sorted(calls)
    assert verdict({"math": 6}, must_be_fused=False).status == "pass"  # the CPU stand-in reports
