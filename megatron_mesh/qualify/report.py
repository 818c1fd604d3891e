"""Check results, the one-line verdicts, and the JSON / markdown report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

PASS, FAIL, SKIP = "pass", "fail", "skip"


class SkipCheck(Exception):
    """Raised by a check that does not apply here; the message says why."""


@dataclass
class CheckResult:
    name: str
    status: str
    """pass, fail or skip."""
    summary: str
    """One line: the numbers behind the verdict, or what broke."""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    """Every number the check measured (JSON report)."""
    table: str = ""
    """A markdown table of the measurements, if the check has one."""

    def verdict(self) -> str:
        return f"[{self.status.upper():4}] {self.name:<12} {self.summary} ({self.seconds:.1f} s)"


@dataclass
class Report:
    profile: str
    started: float
    results: List[CheckResult] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    budget_s: Optional[float] = None

    @property
    def passed(self) -> bool:
        return all(r.status != FAIL for r in self.results)

    def as_dict(self) -> dict:
        return {"profile": self.profile, "passed": self.passed,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "seconds": round(time.time() - self.started, 1), "budget_s": self.budget_s,
                "environment": self.environment, "checks": [asdict(r) for r in self.results]}

    def markdown(self) -> str:
        """A block ready for docs/benchmarks.md."""
        env = self.environment
        lines = [f"### gpu_check ({self.profile}), {time.strftime('%Y-%m-%d', time.gmtime(self.started))}",
                 "", f"- device: {env.get('device', '?')}",
                 "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
                 *[f"- adapted: {line}" for line in env.get("adaptations", [])],
                 f"- command: `{env.get('command', 'tools/gpu_check.py')}`",
                 f"- total: {time.time() - self.started:.0f} s, "
                 + ("all checks passed" if self.passed else "FAILED"), "",
                 "| check | verdict | summary | seconds |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.name} | {r.status} | {r.summary.replace('|', '/')} | {r.seconds:.1f} |"
                  for r in self.results]
        for r in self.results:
            if r.table:
                lines += ["", f"**{r.name}**", "", r.table]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        (out / "report.md").write_text(self.markdown())


def markdown_table(header: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
