"""bf16 precision of the MeSH routers and buffer (the policy in megatron_mesh/recurrence/mesh.py, Precision).

The cycle's bounds are worst-case rounding bounds, not fitted tolerances: their derivation is
in megatron_mesh/qualify/cycle.py (which the GPU check uses too); u = 2^-8.
"""

import contextlib
import functools

import pytest
import torch

from megatron_mesh.recurrence import fused_mesh
from megatron_mesh.recurrence.fused_mesh import mesh_cycle
from megatron_mesh.recurrence.mesh import MeshScheme, Router, buffer_write
from megatron_mesh.qualify.cycle import (SLACK, U, bound_ratios, cycle_inputs, eager_cycle, outputs,
                                         rounding_bounds)

SHAPE = (5, 16, 2, 64)  # B, s, b, h


@contextlib.contextmanager
def no_compile_failure():
    yield
    assert not fused_mesh.compile_failures()  # no silent fallback to the uncompiled path


# fused-compiled: mesh_cycle's forward and backward through torch.compile's traced spellings (the
# aot_eager backend: the graphs CUDA compiles, without inductor's C++ build in CI)
IMPLEMENTATIONS = {"eager": (eager_cycle, contextlib.nullcontext),
                   "fused": (mesh_cycle, contextlib.nullcontext),
                   "fused-compiled": (functools.partial(mesh_cycle, options=fused_mesh.CycleCompile(
                       devices="all", backend="aot_eager")), no_compile_failure)}


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_bf16_cycle_within_rounding_bounds_of_fp32(name):
    inputs, upstream = cycle_inputs(SHAPE)
    reference = outputs(eager_cycle, inputs, upstream, torch.float32)
    cycle, context = IMPLEMENTATIONS[name]
    with context():
        got = outputs(cycle, inputs, upstream, torch.bfloat16)
    assert all(value.dtype == torch.bfloat16 for value in got.values())  # outputs and gradients
    ratios = bound_ratios(got, reference, rounding_bounds(inputs, upstream, reference))
    assert max(ratios.values()) <= 1.0, ratios
    for key, value in got.items():
        assert not torch.equal(value.float(), reference[key]), f"{key}: exact, so not computed in bf16"


def test_fused_and_eager_bf16_forward_round_at_the_same_points():
    """Same fp32 value before one rounding: outputs differ by at most one bf16 ulp (2u)."""
    inputs, upstream = cycle_inputs(SHAPE, seed=3)
    fused = outputs(mesh_cycle, inputs, upstream, torch.bfloat16)
    eager = outputs(eager_cycle, inputs, upstream, torch.bfloat16)
    for key in ("read", "new_buffer"):
        a, b = fused[key].float(), eager[key].float()
        assert ((a - b).abs() <= 2 * U * torch.maximum(a.abs(), b.abs())).all(), key


def test_double_rounding_write_breaks_the_bound():
    """The bound tells one rounding from two (W x rounded, then the sum: the eager write before
    it computed in fp32)."""
    (buffer, h, w_write, _), _ = cycle_inputs(SHAPE, seed=1)
    W = w_write.permute(2, 0, 1).unsqueeze(-1)
    exact = buffer.float() + W.float() * h.float()
    twice = buffer + W * h  # bf16 ops: W * h rounded, then the sum rounded
    once = buffer_write(buffer, h, w_write)
    assert ((once.float() - exact).abs() <= U * exact.abs()).all()
    assert ((twice.float() - exact).abs() > U * exact.abs()).any()


def test_router_softmax_in_fp32_rounded_once():
    torch.manual_seed(0)
    router = Router(64, 5, torch.nn.init.normal_).bfloat16()
    h = torch.randn(8, 2, 64).bfloat16()
    weights = router(h)
    logits = router.linear(h)
    assert logits.dtype == weights.dtype == torch.bfloat16
    assert torch.equal(weights, torch.softmax(logits.float(), dim=-1).bfloat16())
    # each of the B weights within u of its fp32 value: the sum within B u of 1
    assert ((weights.float().sum(-1) - 1).abs() <= 5 * U).all()


def test_buffer_is_bf16_across_k_plus_one_writes_with_k_plus_one_roundings():
    """A bf16 MeshScheme keeps its buffer in bf16 through the transitional write and K loop
    writes; each slot is off the fp32 recurrence (same weights, same written states) by at most
    u per write times the slot's magnitude after it: sum_j u |m_j| <= (K+1) u max_j |m_j|."""
    K, B, shape = 4, 7, (16, 2, 32)
    torch.manual_seed(0)
    scheme = MeshScheme(shape[-1], num_loops=K, buffer_slots=B,
                        init_method=lambda w: torch.nn.init.normal_(w, std=0.5)).bfloat16()
    h_emb, h_pre, *cores = (torch.randn(*shape).bfloat16() for _ in range(K + 2))
    h, state = scheme.begin(h_emb, h_pre)
    written, weights, buffers = [h_pre], [scheme.routers[0].write(h_pre)], [state.buffer]
    for t in range(K):
        written.append(cores[t])
        weights.append(scheme.routers[t + 1].write(h))
        h, state = scheme.step(t, h, cores[t], state)
        buffers.append(state.buffer)
    assert all(b.dtype == torch.bfloat16 for b in buffers) and h.dtype == torch.bfloat16

    exact = torch.cat([h_emb.float().unsqueeze(0), torch.zeros(B - 1, *shape)])
    magnitude_sum = torch.zeros_like(exact)
    for x, w, held in zip(written, weights, buffers):
        exact = exact + w.float().permute(2, 0, 1).unsqueeze(-1) * x.float()
        magnitude_sum += exact.abs()
        assert ((held.float() - exact).abs() <= U * magnitude_sum * (1 + SLACK) + 1e-30).all()
    assert (buffers[-1].float() - exact).abs().max() > 0
