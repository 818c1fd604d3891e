"""Check ``throughput``: tokens/s, TFLOP/s, MFU, step time and peak memory of the real trainer.

Each model trains ``throughput_iters`` iterations through ``tools/pretrain_mesh.py`` (bf16
parameters with fp32 main parameters, the distributed optimizer, no checkpoint), and the numbers
are the trainer's own: the last ``[mesh]`` line (tokens/s, TFLOP/s per device counting every
core application, MFU, peak memory over ranks) and Megatron's elapsed time per iteration, both
over the last log interval, so the first (compiling, allocating) iterations are not in them.
Ratios compare each model with the ``base`` scheme of the same size and layout.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.launch import run_trainer
from megatron_mesh.qualify.profiles import Profile, TrainerModel
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult, markdown_table
from megatron_mesh.qualify.smoke import slug


def run_overrides(profile: Profile) -> List[str]:
    return [*profile.throughput_overrides, f"training.train_iters={profile.throughput_iters}",
            f"logging.interval={profile.throughput_log_interval}", "checkpointing.save=null"]


def measure(ctx: Context, model: TrainerModel) -> Dict[str, Optional[float]]:
    log = ctx.out / "logs" / f"throughput-{slug(model.label)}.log"
    run = run_trainer(ctx.profile, model, run_overrides(ctx.profile), log, ctx.deadline)
    if not run.log.throughput:
        raise AssertionError(f"{model.label}: no [mesh] throughput line in {run.log_path}")
    line, last = run.log.throughput[-1], run.log.iterations[max(run.log.iterations)]
    return {"tokens_per_s": line.tokens_per_s, "tflops_per_device": line.tflops_per_device,
            "mfu": line.mfu, "step_ms": last.ms_per_iteration, "peak_memory_gib":
            line.peak_memory_bytes / 2**30 if line.peak_memory_bytes is not None else None,
            "memory_kind": line.memory_kind, "seconds": run.seconds}


def base_of(label: str) -> str:
    """'1.4b 4+8R2+4 mesh' -> '1.4b 4+8R2+4 base'."""
    return " ".join(label.split()[:-1] + ["base"])


def _ratio(value, base) -> str:
    return f"x{value / base:.3f}" if value is not None and base else "-"


def check(ctx: Context) -> CheckResult:
    results = {model.label: measure(ctx, model) for model in ctx.profile.throughput}
    rows: List[list] = []
    for label, r in results.items():
        base = results.get(base_of(label))
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "-"
        rows.append([label, f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_device']:.1f}", mfu,
                     f"{r['step_ms']:.1f}", memory,
                     _ratio(r["step_ms"], base and base["step_ms"]),
                     _ratio(r["peak_memory_gib"], base and base["peak_memory_gib"])])
    table = markdown_table(["model", "tokens/s", "TFLOP/s/GPU", "MFU", "step ms", "peak memory",
                            "step vs base", "memory vs base"], rows)
    missing = [label for label, r in results.items() if r["peak_memory_gib"] is None
               or not r["tokens_per_s"] or not r["step_ms"]]
    summary = "; ".join(f"{row[0]}: {row[1]} tok/s, MFU {row[3]}, {row[4]} ms, {row[5]}"
                        f"{'' if row[6] == '-' else f', step {row[6]} / memory {row[7]} of base'}"
                        for row in rows)
    if missing:
        return CheckResult("throughput", FAIL, f"incomplete numbers for {missing}: {summary}",
                           details=results, table=table)
    return CheckResult("throughput", PASS, summary, details=results, table=table)
