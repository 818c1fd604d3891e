"""Progress lines for long evaluations, like Megatron's and Hugging Face's tools print them.

A library function that runs for minutes (perplexity, the depth study, the probes) takes a
reporter as an argument and tells it what it has done; it never prints itself. ``SILENT`` (the
default) reports nothing; ``ProgressLines`` writes one line per ``interval`` seconds to a stream
(the tools: stderr, so a table or JSON on stdout stays intact), plus the first update and the
end::

    [ppl] demo on valid_text_document: 120/500 documents (24%), 61,440 tokens, 2,345 tokens/s, 26 s, ETA 1m22s

Each reporter carries its own clock and task state; nothing here is process-wide.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO


class Progress:
    """What a long task tells its reporter; this base reports nothing (``SILENT``)."""

    def note(self, message: str) -> None:
        """A one-off line (e.g. 'loading MODEL') before a task starts."""

    def start(self, task: str, total: Optional[int] = None, unit: str = "documents") -> None:
        """A task of ``total`` ``unit`` (None: unknown) begins."""

    def update(self, done: int, tokens: int = 0) -> None:
        """``done`` units and ``tokens`` tokens of the current task are finished."""

    def finish(self, done: int, tokens: int = 0) -> None:
        """The current task is complete."""


SILENT = Progress()
"""The reporter that reports nothing (stateless)."""


def duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Task:
    name: str
    total: Optional[int]
    unit: str
    started: float
    printed: Optional[float] = None


@dataclass
class ProgressLines(Progress):
    """Lines on ``stream`` (default: stderr at the time of writing): the first update, then at
    most one per ``interval`` seconds, and the end; ``prefix`` tags them (e.g. '[ppl]')."""

    prefix: str = ""
    interval: float = 10.0
    stream: Optional[TextIO] = None
    clock: Callable[[], float] = time.monotonic
    _task: Optional[_Task] = field(default=None, init=False, repr=False)

    def note(self, message: str) -> None:
        self._write(message)

    def start(self, task: str, total: Optional[int] = None, unit: str = "documents") -> None:
        self._task = _Task(task, total, unit, self.clock())

    def update(self, done: int, tokens: int = 0) -> None:
        task, now = self._task, self.clock()
        if task is None or (task.printed is not None and now - task.printed < self.interval):
            return
        task.printed = now
        self._write(f"{task.name}: {self._counts(task, done, tokens, now)}")

    def finish(self, done: int, tokens: int = 0) -> None:
        task = self._task
        if task is None:
            return
        elapsed = self.clock() - task.started
        rate = f" ({tokens / elapsed:,.0f} tokens/s)" if tokens and elapsed > 0 else ""
        counted = f"{done:,} {task.unit}" + (f", {tokens:,} tokens" if tokens else "")
        self._write(f"{task.name}: done, {counted} in {duration(elapsed)}{rate}")
        self._task = None

    @staticmethod
    def _counts(task: _Task, done: int, tokens: int, now: float) -> str:
        elapsed = now - task.started
        parts = [f"{done:,}/{task.total:,} {task.unit} ({done / task.total:.0%})"
                 if task.total else f"{done:,} {task.unit}"]
        if tokens:
            parts.append(f"{tokens:,} tokens")
            if elapsed > 0:
                parts.append(f"{tokens / elapsed:,.0f} tokens/s")
        parts.append(duration(elapsed))
        if task.total and 0 < done < task.total:
            parts.append(f"ETA {duration(elapsed * (task.total - done) / done)}")
        return ", ".join(parts)

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"{self.prefix} {line}\n" if self.prefix else f"{line}\n")
        stream.flush()
