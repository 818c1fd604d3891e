"""Gradients under tensor (and sequence) parallelism equal the single-process gradients.

Two real torchrun ranks (gloo) build the model at TP=2 from a checkpoint written at TP=1; each
saves its gradient shards. Reassembled along megatron-core's partition_dim they must equal the
gradients of the unparallelized model on the same batch, and every replicated parameter
(layer norms, row-parallel biases, MeSH routers, combination weights) must hold the same
gradient on both ranks: under sequence parallelism that needs the all-reduce megatron-core
applies to parameters flagged ``sequence_parallel``, which the block sets on its state-scheme
parameters. Tolerance: fp32 partial sums in another order (~1e-7 relative).
"""

import os
import subprocess
import sys

import pytest
import torch

from batch import fixed_batch, tiny_section
from conftest import REPO

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them


def reference_grads(section, checkpoint):
    from megatron_mesh.checkpoint.reader import load_checkpoint
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.model.gpt import MeshGPTModel

    config = MeshConfig.from_section(section, use_cpu_initialization=True)
    model = MeshGPTModel(config)
    state, _ = load_checkpoint(str(checkpoint))
    model.load_state_dict(state, strict=False)
    tokens, positions = fixed_batch(config)
    loss = model(tokens, positions, labels=tokens).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def run_workers(tmp_path, scheme, *flags):
    """torchrun tp_worker.py on 2 ranks from a fresh release checkpoint; returns the section."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig

    section = tiny_section(scheme)
    config = MeshConfig.from_section(section, use_cpu_initialization=True)
    start = save_release_checkpoint(build_model(config, {}, ("",), seed=3),
                                    checkpoint_args(config, None), tmp_path / "start")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "tests/parallel/tp_worker.py"), str(start / "release"), str(tmp_path), scheme,
         *flags],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return section, start


@pytest.mark.parametrize("scheme, sequence_parallel", [
    ("mesh", False), ("mesh", True), ("anchor", True), ("dynamic_comb", True)])
def test_tp2_gradients_equal_single_process(tmp_path, megatron_world, scheme, sequence_parallel):
    section, start = run_workers(tmp_path, scheme, *(["--sequence-parallel"] if sequence_parallel else []))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loss, want = reference_grads(section, start)
    assert ranks[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert ranks[0]["grads"].keys() == want.keys()
    for name, expected in want.items():
        (g0, split, dim), (g1, _, _) = ranks[0]["grads"][name], ranks[1]["grads"][name]
        if split:
            got = torch.cat([g0, g1], dim=dim)
        else:
            torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7, msg=f"{name}: ranks differ")
            got = g0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_sequence_parallel_dropout_masks_differ_across_tp_ranks(tmp_path, megatron_world):
    """Under SP each TP rank holds other tokens, so its hidden-dropout masks must be its own
    draws: megatron-core runs the block under the tensor-parallel RNG tracker's fork (seeded per
    TP rank). Without the fork both ranks draw the same mask (agreement 1.0); independent
    Bernoulli(0.5) masks agree on about half the elements."""
    run_workers(tmp_path, "mesh", "--sequence-parallel", "--dropout-masks")
    masks = [torch.load(tmp_path / f"masks{r}.pt") for r in range(2)]
    # embedding + 2 per layer application (attention, MLP) of 1+2R2+1
    assert len(masks[0]) == len(masks[1]) == 1 + 2 * 6
    for call, (m0, m1) in enumerate(zip(*masks)):
        assert m0.shape == m1.shape == (16, 2, 64), call  # [s/tp, b, h]
        assert 0.45 < m0.float().mean() < 0.55, call
        agreement = (m0 == m1).float().mean().item()
        assert agreement < 0.6, f"dropout call {call}: TP ranks share {agreement:.0%} of their mask"
