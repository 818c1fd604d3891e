"""Running the checks in order within the budget: a verdict line each, then the report."""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from megatron_mesh.qualify import attention, cycle, environment, parity, smoke, specs, throughput
from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.profiles import Profile
from megatron_mesh.qualify.report import FAIL, SKIP, CheckResult, Report, SkipCheck

CHECKS: Dict[str, Callable[[Context], CheckResult]] = {
    "versions": environment.check,
    "specs": specs.check,
    "attention": attention.check,
    "cycle": cycle.check,
    "trainer": smoke.check,
    "throughput": throughput.check,
    "parity": parity.check,
}
"""Every check, in the order they run (cheap in-process checks first)."""


def run_one(name: str, ctx: Context) -> CheckResult:
    """A check's result; an exception is a failure naming it (traceback in logs/<name>.txt)."""
    start = time.time()
    if ctx.remaining() <= 0:
        return CheckResult(name, FAIL, f"not run: the {ctx.profile.budget_s:.0f} s budget is spent")
    try:
        result = CHECKS[name](ctx)
    except SkipCheck as reason:
        result = CheckResult(name, SKIP, str(reason))
    except Exception as err:  # noqa: BLE001  (any error is this check's failure, reported)
        (ctx.out / "logs").mkdir(parents=True, exist_ok=True)
        (ctx.out / "logs" / f"{name}.txt").write_text(traceback.format_exc())
        first_line = (str(err).strip().splitlines() or [""])[0]
        result = CheckResult(name, FAIL, f"{type(err).__name__}: {first_line[:300]} "
                                         f"(logs/{name}.txt)")
    result.seconds = time.time() - start
    return result


def qualify(profile: Profile, out: Path, names: Iterable[str], command: str, *,
            budget_s: Optional[float] = None, echo: Callable[[str], None] = print) -> Report:
    budget = profile.budget_s if budget_s is None else budget_s
    report = Report(profile.name, time.time(), budget_s=budget)
    report.environment = {**environment.describe(), "command": command}
    ctx = Context(profile, Path(out), report.started + budget)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for stale in ("logs", "scratch"):  # nothing of an earlier run mixes into this one
        shutil.rmtree(ctx.out / stale, ignore_errors=True)
    for name in names:
        result = run_one(name, ctx)
        report.results.append(result)
        echo(result.verdict())
        report.write(ctx.out)  # a report that exists is always the latest, even if killed
    skipped = sum(r.status == SKIP for r in report.results)
    echo(f"{'PASSED' if report.passed else 'FAILED'}: {len(report.results)} checks"
         f"{f', {skipped} skipped' if skipped else ''}, {time.time() - report.started:.0f} s "
         f"of {budget:.0f}; report {ctx.out / 'report.json'}, {ctx.out / 'report.md'}")
    return report
