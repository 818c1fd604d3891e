"""The unrolled graph and its split into pipeline stages."""

import pytest

from megatron_mesh.recurrence.layout import parse_layout
from megatron_mesh.recurrence.unrolled import phase_before, stage_bounds, stage_ops, unrolled_ops


def names(ops):
    return [f"{op.segment}{op.index}" if op.kind == "layer"
            else f"{op.kind}{op.index if op.kind in ('inject', 'step') else ''}" for op in ops]


def test_ops_follow_algorithm_order():
    ops = unrolled_ops(parse_layout("1+2R2+1"))
    assert names(ops) == ["prelude0", "begin", "inject0", "core0", "core1", "step0",
                          "inject1", "core0", "core1", "step1", "end", "coda0"]
    assert [op.position for op in ops if op.kind == "layer"] == list(range(6))
    untied = unrolled_ops(parse_layout("1+1+2+1"))
    assert [op.module for op in untied if op.segment == "core"] == [0, 1, 1]
    assert names(unrolled_ops(parse_layout("3"))) == ["prelude0", "prelude1", "prelude2"]
    assert names(unrolled_ops(parse_layout("1+2R2+1"), num_loops=0)) == ["prelude0", "begin", "end", "coda0"]


def test_stage_ops_keep_scheme_steps_with_their_layers():
    ops = unrolled_ops(parse_layout("1+2R2+1"))
    first, second = (stage_ops(ops, *b) for b in stage_bounds(6, 2, [2, 4]))
    assert names(first) == ["prelude0", "begin", "inject0", "core0"]  # begin goes with core0
    assert names(second) == ["core1", "step0", "inject1", "core0", "core1", "step1", "end", "coda0"]
    # a boundary between two loop steps: the step with the layer before, inject with the one after
    third, fourth = (stage_ops(ops, *b) for b in stage_bounds(6, 2, [3, 3]))
    assert names(third)[-2:] == ["core1", "step0"] and names(fourth)[:2] == ["inject1", "core0"]
    assert names(stage_ops(ops, 0, 1)) == ["prelude0"]


def test_phase_at_each_boundary():
    ops = unrolled_ops(parse_layout("1+2R2+1"))
    # step 1 runs with the last core layer (position 4): only the coda is left after it
    assert [phase_before(ops, q) for q in range(7)] == ["pre", "pre", "loop", "loop", "loop", "post", "post"]


def test_stage_bounds():
    assert stage_bounds(24, 4) == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert stage_bounds(6, 2, [5, 1]) == [(0, 5), (5, 6)]
    with pytest.raises(ValueError, match="do not split evenly over 4 pipeline stages.*\\[1, 1, 2, 2\\]"):
        stage_bounds(6, 4)
    with pytest.raises(ValueError, match="expected 2 positive counts summing to N_compute=6"):
        stage_bounds(6, 2, [6, 0])
