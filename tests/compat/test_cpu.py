"""The CPU shims are active here and change nothing when CUDA is available."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO


def test_shims_active_without_cuda():
    from megatron_mesh.compat import cpu

    assert not torch.cuda.is_available()
    assert cpu.apply() is True
    assert torch.cuda.current_device() == "cpu"
    # megatron's literal device="cuda" allocations land on the CPU ...
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]
    assert utils.get_default_causal_mask is fused_softmax.get_default_causal_mask
    # ... without a process-wide mode that would slow every op or rewrite user code
    assert torch.overrides._get_current_function_mode_stack() == []


def test_rng_tracker_forks_are_reproducible(megatron_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(4)
    outside = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the tracked stream advanced
    assert not torch.equal(a, outside)


PRETEND_CUDA = """
import torch
torch.cuda.is_available = lambda: True
before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
          torch.cuda.manual_seed)
import megatron_mesh
from megatron_mesh.compat import cpu
after = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
         torch.cuda.manual_seed)
assert cpu.apply() is False
assert before == after, "a shim was installed although CUDA is available"
assert not cpu._APPLIED
assert torch.overrides._get_current_function_mode_stack() == []
print("untouched")
"""


@pytest.mark.slow
def test_shims_are_noops_when_cuda_is_available():
    out = subprocess.run([sys.executable, "-c", PRETEND_CUDA], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout
