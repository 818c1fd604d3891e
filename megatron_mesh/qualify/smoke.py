"""Check ``trainer``: the real trainer trains, saves, resumes and exports, in bf16.

``tools/pretrain_mesh.py`` under torchrun (bf16, the distributed optimizer, mock data) trains
each smoke model: every iteration logged, no NaN, the loss falls, a checkpoint saved at the
end. The last model is stopped at ``smoke_resume_at`` (``training.exit_interval``, which saves)
and started again: it must resume there and finish. Each final checkpoint is exported to
Hugging Face, and the export's logits must equal the Megatron model's (fp32, same weights).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List

import torch

from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.launch import TrainerRun, run_trainer
from megatron_mesh.qualify.profiles import Profile, TrainerModel
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult, markdown_table

EXPORT_TOLERANCE = 1e-4
"""Max |HF logit - Megatron logit| / max |logit|, both fp32 from the same weights."""


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")


def run_overrides(profile: Profile, save: Path) -> List[str]:
    return [*profile.smoke_overrides, f"training.train_iters={profile.smoke_iters}",
            "logging.interval=1", f"checkpointing.save={save}",
            f"checkpointing.interval={profile.smoke_iters}"]


def train(ctx: Context, model: TrainerModel, resume: bool) -> List[TrainerRun]:
    profile, name = ctx.profile, slug(model.label)
    overrides = run_overrides(profile, ctx.out / "scratch" / name / "checkpoints")
    logs = ctx.out / "logs"
    if not resume:
        return [run_trainer(profile, model, overrides, logs / f"trainer-{name}.log", ctx.deadline)]
    stop = [f"training.exit_interval={profile.smoke_resume_at}"]
    first = run_trainer(profile, model, overrides + stop, logs / f"trainer-{name}-1.log", ctx.deadline)
    second = run_trainer(profile, model, overrides, logs / f"trainer-{name}-2.log", ctx.deadline)
    return [first, second]


def judge(ctx: Context, runs: List[TrainerRun], resume: bool) -> List[str]:
    """What is wrong with these runs of one model (empty: nothing)."""
    n, problems = ctx.profile.smoke_iters, []
    logged = [sorted(run.log.iterations) for run in runs]
    want = ([list(range(1, ctx.profile.smoke_resume_at + 1)),
             list(range(ctx.profile.smoke_resume_at + 1, n + 1))] if resume else [list(range(1, n + 1))])
    if logged != want:
        problems.append(f"logged iterations {[(i[0], i[-1]) if i else () for i in logged]}, "
                        f"expected {[(w[0], w[-1]) for w in want]}")
        return problems
    lines = {i: line for run in runs for i, line in run.log.iterations.items()}
    losses = [lines[i].lm_loss for i in range(1, n + 1)]
    if any(line.nan_iterations for line in lines.values()) or not all(map(math.isfinite, losses)):
        problems.append("NaN/Inf loss")
    k = max(1, n // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    if not last < 0.99 * first:
        problems.append(f"loss did not fall: first {k} mean {first:.3f}, last {k} mean {last:.3f}")
    if resume and "loading" not in runs[1].text.lower():
        problems.append("the second run did not load the checkpoint")
    return problems


def export_error(ctx: Context, save: Path, out: Path) -> float:
    """Export the latest checkpoint to HF; max |HF - Megatron| / max |logit| on a random batch."""
    from transformers import AutoModelForCausalLM

    from megatron_mesh.evaluation.loading import load_model
    from megatron_mesh.hf.export import export

    export(str(save), str(out), dtype="fp32", force=True)
    loaded = load_model(save, device=str(ctx.device))
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).to(ctx.device).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, loaded.model.config.vocab_size, (2, 64), generator=g).to(ctx.device)
    positions = torch.arange(64, device=ctx.device).unsqueeze(0).expand(2, 64)
    with torch.no_grad():
        ours, theirs = loaded.model(tokens, positions).float(), hf(tokens).logits.float()
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def one_model(ctx: Context, model: TrainerModel, resume: bool):
    """(details, table row, problems) of training, resuming and exporting one model."""
    runs = train(ctx, model, resume)
    problems = judge(ctx, runs, resume)
    scratch = ctx.out / "scratch" / slug(model.label)
    error = None if problems else export_error(ctx, scratch / "checkpoints", scratch / "hf")
    if error is not None and error > EXPORT_TOLERANCE:
        problems.append(f"HF export logits off by {error:.1e} of max (allowed {EXPORT_TOLERANCE:g})")
    losses = {i: line.lm_loss for run in runs for i, line in run.log.iterations.items()}
    details = {"losses": losses, "export_error": error, "problems": problems,
               "seconds": [round(r.seconds, 1) for r in runs]}
    row = [model.label, f"{losses.get(1, math.nan):.3f}", f"{losses.get(ctx.profile.smoke_iters, math.nan):.3f}",
           "yes" if resume else "-", "-" if error is None else f"{error:.1e}",
           " + ".join(f"{r.seconds:.0f}" for r in runs)]
    return details, row, problems


def check(ctx: Context) -> CheckResult:
    rows, problems, details = [], [], {}
    for index, model in enumerate(ctx.profile.smoke):
        details[model.label], row, found = one_model(ctx, model, index == len(ctx.profile.smoke) - 1)
        rows.append(row)
        problems += [f"{model.label}: {p}" for p in found]
    table = markdown_table(["model", "loss it. 1", f"loss it. {ctx.profile.smoke_iters}",
                            "stopped + resumed", "export logit diff", "trainer s"], rows)
    if problems:
        return CheckResult("trainer", FAIL, "; ".join(problems), details=details, table=table)
    summary = "; ".join(f"{r[0]}: loss {r[1]} -> {r[2]}" for r in rows)
    summary += f"; saved, resumed at {ctx.profile.smoke_resume_at}, exported (logits within {EXPORT_TOLERANCE:g})"
    return CheckResult("trainer", PASS, summary, details=details, table=table)
