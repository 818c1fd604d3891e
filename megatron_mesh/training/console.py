"""The trainer's console: what a person reads, with everything kept in the run's log file.

Megatron prints ~800 lines of arguments, a parameter list per gradient bucket, memory reports
and a dozen harmless warnings before the first iteration. A compact console (the default)
shows the lines that say how the run goes: megatron's iteration line (without its TFLOP/s
field, which the ``[mesh]`` line measures), the ``[mesh]`` lines, checkpoint saves and loads,
validation losses (labelled), warnings and errors not known to be harmless (each once), and
every traceback. Each rank appends its whole output to ``LOG_DIR/rank-R.log``
(``logging.log_dir``, default ``<checkpointing.save>/logs``); ``--full-console`` shows it all.

Python-level output only: the process's ``sys.stdout``/``sys.stderr`` (megatron's logging
handler writes to the ``sys.stdout`` it finds when megatron.training is imported, so the
console is installed before that). C++ messages written to the file descriptors pass as they are.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, TextIO

# megatron's lines a person reads; everything else on stdout goes to the log file only
SHOWN = [re.compile(p) for p in (
    r"^\s*\[mesh\]",
    r"^\s*\[[^]]+\] iteration\s+\d+/",  # megatron's iteration line
    r"successfully (saved|loaded) checkpoint|scheduled an async checkpoint save",
    r"^\s*loading (release )?(distributed )?checkpoint from",
    r"validation(\s\S+)? loss at ",
    r"^(WARNING|ERROR|CRITICAL)[: ]",
    r"^error:",
)]

# Harmless messages a compact console drops (the log file keeps them), and why they are harmless
KNOWN_HARMLESS = [re.compile(p) for p in (
    r"one_logger package is required",  # NVIDIA-internal telemetry
    r"MCore's async save is deprecated",  # chosen: its helper processes survive signals (stop_signals)
    r"'pin_memory' argument is set as true but no accelerator",  # CPU runs
    r"Unable to save MockGPTDataset indexes",  # mock data has no cache
    r"MimoModelConfig is experimental",  # an import-time note of a model megatron-mesh does not use
    r"all_gather_into_tensor` is deprecated",  # megatron's call, torch's rename
    # megatron's default mode, and its switch around each validation
    r"RerunStateMachine initialized in mode|Result validation enabled|Setting RerunStateMachine mode",
    r"Setting logging level to",
)]

NO_CHECKPOINT = re.compile(r"WARNING: could not find the metadata file (\S+)latest_checkpointed_iteration\.txt")
MEGATRON_TFLOPS = re.compile(r" throughput per GPU \(TFLOP/s/GPU\): [0-9.]+ \|")
VALIDATION = re.compile(r"(validation(?:\s\S+)? loss at iteration \d+)( on (?:validation|test) set)? \|")


def compact_line(line: str) -> Optional[str]:
    """The line as the compact console shows it, or None (log file only)."""
    if any(p.search(line) for p in KNOWN_HARMLESS):
        return None
    fresh = NO_CHECKPOINT.search(line)
    if fresh:
        return f"[mesh] no checkpoint in {fresh.group(1).rstrip('/')} yet: training from iteration 0"
    if not any(p.search(line) for p in SHOWN):
        return None
    line = MEGATRON_TFLOPS.sub("", line)
    return VALIDATION.sub(_labelled_validation, line)


def _labelled_validation(match: re.Match) -> str:
    when = ("after training, on the next batches of the split" if match.group(2)
            else "during training")
    return f"{match.group(1)}{match.group(2) or ''} ({when}) |"


class Console:
    """This process's console and log file. ``full``: the console shows every line."""

    def __init__(self, full: bool):
        self.full = full
        self.log: Optional[TextIO] = None
        self._early: Optional[List[str]] = []  # lines before the log file is known (None: decided)
        self._warned: set = set()

    def install(self) -> None:
        """Route ``sys.stdout``/``sys.stderr`` through the console; warnings on one line."""
        sys.stdout = _LineStream(self, sys.stdout, errors=False)
        sys.stderr = _LineStream(self, sys.stderr, errors=True)
        warnings.formatwarning = _one_line_warning

    def keep_log_in(self, log_dir: Optional[Path], rank: int) -> Optional[Path]:
        """Append every line from now on (and those so far) to ``log_dir/rank-R.log``."""
        if log_dir is None:
            self._early = None  # no log file: nothing to keep (a long run would grow this list)
            return None
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"rank-{rank}.log"
        self.log = open(path, "a", buffering=1)
        self.log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} {' '.join(sys.argv)}\n")
        self.log.writelines(self._early or [])
        self._early = None
        return path

    def line(self, line: str, terminal: TextIO, errors: bool) -> None:
        if self.log is not None:
            self.log.write(line)
        elif self._early is not None:
            self._early.append(line)
        shown = line if self.full else self._compact(line, errors)
        if shown is not None:
            terminal.write(shown if shown.endswith("\n") else shown + "\n")

    def _compact(self, line: str, errors: bool) -> Optional[str]:
        """stdout: only the lines a person reads; stderr (warnings, tracebacks, errors): all but
        the known harmless, each warning once."""
        if not errors:
            return compact_line(line)
        if any(p.search(line) for p in KNOWN_HARMLESS):
            return None
        if "Warning: " in line:
            if line in self._warned:
                return None
            self._warned.add(line)
        return line


class _LineStream:
    """A text stream handing whole lines to the console; anything else (encoding, fileno,
    isatty, ...) is the terminal's."""

    def __init__(self, console: Console, terminal: TextIO, errors: bool):
        self._console, self._terminal, self._errors = console, terminal, errors
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._console.line(line + "\n", self._terminal, self._errors)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._console.line(self._partial, self._terminal, self._errors)
            self._partial = ""
        self._terminal.flush()
        if self._console.log is not None:
            self._console.log.flush()

    def __getattr__(self, name):
        return getattr(self._terminal, name)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{filename}:{lineno}: {category.__name__}: {str(message).strip()}\n"
