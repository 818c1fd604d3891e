"""``carried_state(name)``, what a pipeline boundary inside the loop carries for a scheme, is
what the scheme's loop steps read: a LoopState of those fields alone (the rest None, as
LoopState.from_slices delivers it on the next stage) gives the same step, and each field
carried changes the step when it changes. Checked for every registered scheme, so the pipeline
of a new scheme neither misses a field nor sends one it does not need, without a test edit."""

import dataclasses

import pytest
import torch

from conftest import tiny_config
from megatron_mesh.recurrence.mesh import LoopState
from megatron_mesh.recurrence.schemes import carried_state
from registry import LOOPED, SUMS


def core(u):
    """A stand-in for f_core: nonlinear, so no field's effect cancels by linearity."""
    return torch.tanh(1.5 * u) + 0.1 * u.roll(1, dims=0)


def step(scheme, t, h, state):
    """Loop step t as the block runs it: the core reads the injected input."""
    u = scheme.inject(t, h, state)
    return scheme(t, u, core(u), state)


def state_after_one_step(name):
    """(scheme, h(1), state): one step in, so the buffer and the history are not their start."""
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    cfg = tiny_config("1+2R2+1", name)
    scheme = MeshGPTModel(cfg).decoder.scheme.eval()
    for p in scheme.parameters():  # every parameter far from its (often neutral) init
        p.data.normal_(0.0, 0.5)
    h_emb, h_pre = torch.randn(2, 6, 3, cfg.hidden_size).unbind(0)  # [s, b, h] each
    h, state = scheme.begin(h_emb, h_pre)
    h, state = step(scheme, 0, h, state)
    return scheme, h, state


@pytest.mark.parametrize("scheme_name", LOOPED + SUMS)
def test_the_carried_fields_suffice_and_each_matters(megatron_world, scheme_name):
    fields = carried_state(scheme_name)
    with torch.no_grad():
        scheme, h, state = state_after_one_step(scheme_name)
        want, _ = step(scheme, 1, h, state)
        delivered = LoopState.from_slices(fields, state.slices(fields))
        got, _ = step(scheme, 1, h, delivered)
        assert torch.equal(got, want)
        for name in fields:
            moved = dataclasses.replace(state, **{name: getattr(state, name) + 1.0})
            changed, _ = step(scheme, 1, h, moved)
            assert (changed - want).abs().max() > 1e-3, f"{scheme_name} carries {name} but does not read it"
