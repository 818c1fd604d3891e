"""Packing the carry that crosses a pipeline boundary, and which stages hold which weights."""


import pytest
import torch

from conftest import tiny_config
from megatron_mesh.recurrence.schemes import carried_state
from registry import LOOPED, SUMS


def carry_at(model, tokens, positions, position):
    """Run the first ``position`` applications of a one-stage model and return its carry."""
    from megatron_mesh.recurrence.unrolled import stage_ops, unrolled_ops

    block = model.decoder
    h_emb = model.embedding(input_ids=tokens, position_ids=positions) * block.embedding_scale()
    rotary = model.rotary_pos_emb(tokens.shape[1])
    ops = stage_ops(unrolled_ops(block.config.parsed_layout), 0, position)
    saved, block.ops, block.stage = (block.ops, block.stage), ops, (0, position)
    try:
        return block(h_emb, None, rotary)
    finally:
        block.ops, block.stage = saved


# Every registered looped scheme and the '+'-sums, from the registry: a new scheme's carry is
# packed and unpacked without a test edit. That the fields it carries are the ones its steps
# read is tests/recurrence/test_carried_state.py.


@pytest.mark.parametrize("scheme", LOOPED + SUMS)
def test_pack_then_unpack_is_the_identity_at_every_boundary(megatron_world, scheme):
    """Each boundary carries h, h(t) and what the scheme's steps read (MeSH: (2 + B) h, not the
    (4 + B) h of h_emb and h(0) too), zero-padded to the run's one width."""
    import dataclasses

    from conftest import random_batch
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.parallel import carry as boundary
    from megatron_mesh.parallel.stages import boundary_phase

    config = tiny_config("1+2R2+1", scheme)
    model = MeshGPTModel(config)
    tokens, positions = random_batch(config)
    loop_fields = carried_state(scheme)
    buffer_slices = config.buffer_slots - 1 if "buffer" in loop_fields else 0  # one per slot
    slots = {"pre": 2, "loop": 2 + len(loop_fields) + buffer_slices, "post": 1}
    padded = dataclasses.replace(config, pipeline_carry_width=9 * config.hidden_size)
    for position in range(1, 6):
        carry = carry_at(model, tokens, positions, position)
        phase = boundary_phase(config, position)
        for cfg, width in ((config, slots[phase]), (padded, 9)):
            packed = boundary.pack(carry, phase, cfg)
            assert packed.shape[-1] == width * config.hidden_size
            back = boundary.unpack(packed, phase, cfg)
            assert torch.equal(back.h, carry.h)
            if phase == "pre":
                assert torch.equal(back.h_emb, carry.h_emb)
            if phase == "loop":
                assert torch.equal(back.h_loop, carry.h_loop)
                for name in loop_fields:
                    want, got = getattr(carry.state, name), getattr(back.state, name)
                    assert torch.equal(got, want), (scheme, position, name)


def test_carry_width_is_the_widest_boundary_of_the_split():
    from megatron_mesh.parallel.carry import carry_width

    def width(stages):
        return carry_width(tiny_config("1+2R2+1", "mesh", pipeline_stage_layers=stages,
                                       pipeline_model_parallel_size=len(stages),
                                       pipeline_dtype=torch.float32)) // 64

    assert width((1, 5)) == 2  # after the prelude: h, h_emb
    assert width((5, 1)) == 1  # in the coda: h
    assert width((2, 4)) == 2 + 5  # in the loop: h, h(t), B = 5 slots
    assert width((1, 4, 1)) == 2  # two boundaries, the wider wins


def test_weight_holders():
    from megatron_mesh.parallel.stages import weight_holders

    config = tiny_config("1+2R2+1", "mesh", pipeline_stage_layers=(2, 4),
                         pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    holders = weight_holders(config)
    assert holders["prelude.0"] == {0} and holders["coda.0"] == {1}
    assert holders["cores.0.0"] == {0, 1} and holders["cores.0.1"] == {1}
    assert holders["scheme"] == {0, 1}


def test_virtual_stages_interleave_over_ranks():
    """2 ranks x 2 virtual stages: chunk v of rank r runs stage 2v + r, so core layer 0 is held
    twice by rank 0 (stages 0 and 2) and core layer 1 by both ranks."""
    from megatron_mesh.parallel.stages import stage_index, stage_of, weight_holders

    config = tiny_config("1+2R2+1", "mesh", pipeline_stage_layers=(2, 1, 2, 1),
                         pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                         pipeline_dtype=torch.float32)
    stages = {(r, v): stage_index(config, r, v) for r in range(2) for v in range(2)}
    assert stages == {(0, 0): 0, (1, 0): 1, (0, 1): 2, (1, 1): 3}
    assert [stage_of(config, s) for s in range(4)] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    holders = weight_holders(config)
    assert holders["cores.0.0"] == {0, 2} and holders["cores.0.1"] == {1, 2}
    assert holders["scheme"] == {0, 1, 2} and holders["coda.0"] == {3}
