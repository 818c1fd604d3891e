"""Pipeline stages over the unrolled graph: which layer applications each stage runs.

Stage s runs layer applications [start, end) of ``megatron_mesh.recurrence.unrolled`` (an even split or
``pipeline_stage_layers``). With virtual pipelining (megatron-core's interleaved schedule) each
rank runs several stages, one model chunk each: chunk v of rank r runs stage v * pp + r.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple

from megatron_mesh.recurrence.unrolled import phase_before, stage_bounds, stage_ops, unrolled_ops


def num_stages(config) -> int:
    """Pipeline stages of the unrolled graph: ranks x virtual stages (model chunks) per rank."""
    return config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)


def stage_index(config, pp_rank: int, vp_stage: Optional[int]) -> int:
    """megatron-core's interleaved order: model chunk v of rank r runs stage v * pp + r."""
    return (vp_stage or 0) * config.pipeline_model_parallel_size + pp_rank


def stage_of(config, stage: int) -> Tuple[int, int]:
    n = config.parsed_layout.n_compute
    return stage_bounds(n, num_stages(config), config.pipeline_stage_layers)[stage]


def weight_holders(config) -> Dict[str, FrozenSet[int]]:
    """Module path (within the block) -> the stages that build it, for every layer and the
    scheme; replicated weights are those with more than one holder."""
    layout = config.parsed_layout
    ops = unrolled_ops(layout)
    holders: Dict[str, set] = {}
    for stage, (start, end) in enumerate(stage_bounds(layout.n_compute, num_stages(config),
                                                      config.pipeline_stage_layers)):
        for op in stage_ops(ops, start, end):
            if op.kind == "layer":
                path = (f"cores.{op.module}.{op.index}" if op.segment == "core"
                        else f"{op.segment}.{op.index}")
            else:
                path = "scheme"
            holders.setdefault(path, set()).add(stage)
    return {path: frozenset(stages) for path, stages in holders.items()}


def boundary_phase(config, position: int) -> str:
    """'pre', 'loop' or 'post': where in the unrolled graph a stage boundary at ``position`` falls."""
    return phase_before(unrolled_ops(config.parsed_layout), position)
