"""The fused MeSH cycle (fused_mesh.mesh_cycle) equals the eager buffer_write + buffer_read.
(bf16: tests/test_mesh_precision.py.)"""

import os
import shutil

import pytest
import torch

from conftest import random_batch, tiny_config
from megatron_mesh import fused_mesh, mesh
from megatron_mesh.fused_mesh import mesh_cycle
from megatron_mesh.mesh import MeshScheme
from megatron_mesh.qualify.cycle import eager_cycle


def cycle_inputs(slots=3, s=4, b=2, hidden=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(slots, s, b, hidden, generator=g, dtype=dtype)
    h = torch.randn(s, b, hidden, generator=g, dtype=dtype)
    w_write = torch.softmax(torch.randn(s, b, slots, generator=g, dtype=dtype), -1)
    w_read = torch.softmax(torch.randn(s, b, slots, generator=g, dtype=dtype), -1)
    return [t.requires_grad_() for t in (buffer, h, w_write, w_read)]


def values_and_grads(fn, inputs, use_buffer=True, seed=1):
    """fn's outputs and the input gradients for fixed random upstream gradients."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    read, new_buffer = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (read * torch.randn(read.shape, generator=g).to(read.dtype)).sum()
    if use_buffer:  # else: the last loop step, whose new buffer nobody reads
        loss = loss + (new_buffer * torch.randn(new_buffer.shape, generator=g).to(read.dtype)).sum()
    loss.backward()
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
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")
        assert a.dtype == b.dtype and a.shape == b.shape


def counting(monkeypatch):
    calls = []

    def wrapper(*args):
        calls.append(args[1].shape)
        return mesh_cycle(*args)

    monkeypatch.setattr(mesh, "mesh_cycle", wrapper)
    return calls


def test_switch_dispatch_on_cpu(monkeypatch):
    """auto = eager on CPU, on = fused, off = eager; the scheme's outputs agree either way."""
    torch.manual_seed(0)
    scheme = MeshScheme(8, num_loops=2, num_slots=4, init_method=torch.nn.init.normal_).double()
    h_emb, h_pre = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    calls = counting(monkeypatch)
    outputs = {}
    for mode in ("auto", "on", "off"):
        monkeypatch.setattr(mesh, "FUSED", mode)
        before = len(calls)
        h, state = scheme.begin(h_emb, h_pre)
        for t in range(2):
            h, state = scheme.step(t, h, torch.tanh(h), state)
        outputs[mode] = (h, state.buffer)
        assert len(calls) - before == (3 if mode == "on" else 0), mode
    for mode in ("on", "off"):
        for a, b in zip(outputs[mode], outputs["auto"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_loss_and_gradients_fused_on_off(megatron_world, monkeypatch):
    from megatron_mesh.model import MeshGPTModel

    cfg = tiny_config("1+2R2+1", "mesh")
    torch.manual_seed(0)
    model = MeshGPTModel(cfg)
    tokens, positions = random_batch(cfg)
    calls = counting(monkeypatch)
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setattr(mesh, "FUSED", mode)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # the transitional cycle and two loop steps, fused only when "on"
    torch.testing.assert_close(results["on"][0], results["off"][0], rtol=1e-6, atol=1e-6)
    grads_on, grads_off = results["on"][1], results["off"][1]
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        torch.testing.assert_close(
            grads_on[name], grads_off[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}"
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
    fused_mesh.compile_for(True, backend)
    try:
        compiled = values_and_grads(mesh_cycle, inputs)
        last_step = values_and_grads(mesh_cycle, inputs, use_buffer=False)
    finally:
        fused_mesh.compile_for(False)
    assert {f"forward:{backend}", f"backward:{backend}"} <= fused_mesh._compiled.keys()
    expected = values_and_grads(eager_cycle, inputs) + values_and_grads(eager_cycle, inputs, False)
    for a, b in zip(compiled + last_step, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
