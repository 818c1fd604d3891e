"""Reading a trainer log back: Megatron's iteration lines and megatron-mesh's ``[mesh]`` lines.

For tools that run ``tools/pretrain_mesh.py`` and judge the run from what it printed
(``tools/gpu_check.py``, the study runner's progress). Megatron prints, every log interval,

    iteration  12/  30 | consumed samples: 96 | elapsed time per iteration (ms): 170.2 | ...
        | lm loss: 8.078106E+00 | loss scale: 1.0 | grad norm: 0.515 |
        | number of skipped iterations: 0 | number of nan iterations: 0 |

(``lm loss`` is the mean over the interval), and ``training.throughput`` adds

    [mesh] iteration 12 | consumed tokens: 6,144 | tokens/s: 758 | TFLOP/s/device: 0.003 |
        MFU: 41.0% | loop depth: 2.50 | mean loops: 2.31 | peak memory: 0.352 GiB (peak RSS) |
        ETA: 0:00:02

(``loop depth`` under a varying loop depth, ``mean loops`` under a depth curriculum.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_MESH = re.compile(r"\[mesh\] iteration\s+(\d+) \|(.*)$")
_FIELD = re.compile(r"\s*([^|:]+?):\s*([^|]+?)\s*(?:\||$)")


def _fields(text: str) -> Dict[str, str]:
    return {key.strip(): value.strip() for key, value in _FIELD.findall(text)}


def _number(text: Optional[str]) -> Optional[float]:
    """'8.07E+00', '6,144', '41.0%' (-> 0.41), 'nan' -> float; None stays None."""
    if text is None:
        return None
    text = text.replace(",", "").strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class IterationLine:
    """One of Megatron's training log lines."""

    iteration: int
    train_iters: int
    lm_loss: Optional[float]
    grad_norm: Optional[float]
    ms_per_iteration: Optional[float]
    skipped_iterations: int
    nan_iterations: int


@dataclass
class ThroughputLine:
    """One ``[mesh]`` line: throughput over the log interval that ends at ``iteration``."""

    iteration: int
    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    peak_memory_bytes: Optional[float]
    memory_kind: Optional[str]
    loop_depth: Optional[float] = None
    """Loop steps the interval's training steps ran, per element (a varying loop depth)."""
    mean_loops: Optional[float] = None
    """The mean those steps were drawn around (a depth curriculum, ``mean_loops_schedule``)."""


@dataclass
class TrainerLog:
    iterations: Dict[int, IterationLine] = field(default_factory=dict)
    throughput: List[ThroughputLine] = field(default_factory=list)

    def losses(self) -> Dict[int, float]:
        return {i: line.lm_loss for i, line in sorted(self.iterations.items())
                if line.lm_loss is not None}


def parse_iteration(line: str) -> Optional[IterationLine]:
    match = _ITERATION.search(line)
    if not match or "[mesh]" in line:
        return None
    f = _fields(match[3])
    return IterationLine(
        iteration=int(match[1]), train_iters=int(match[2]), lm_loss=_number(f.get("lm loss")),
        grad_norm=_number(f.get("grad norm")),
        ms_per_iteration=_number(f.get("elapsed time per iteration (ms)")),
        skipped_iterations=int(_number(f.get("number of skipped iterations")) or 0),
        nan_iterations=int(_number(f.get("number of nan iterations")) or 0))


def parse_throughput(line: str) -> Optional[ThroughputLine]:
    match = _MESH.search(line)
    if not match:
        return None
    f = _fields(match[2])
    memory, kind = None, None
    if "peak memory" in f:  # '0.352 GiB (peak RSS)'
        amount, _, rest = f["peak memory"].partition(" GiB")
        memory, kind = float(amount) * 2**30, rest.strip(" ()") or None
    return ThroughputLine(iteration=int(match[1]), tokens_per_s=_number(f["tokens/s"]),
                          tflops_per_device=_number(f["TFLOP/s/device"]), mfu=_number(f.get("MFU")),
                          peak_memory_bytes=memory, memory_kind=kind,
                          loop_depth=_number(f.get("loop depth")),
                          mean_loops=_number(f.get("mean loops")))


def parse_log(text: str) -> TrainerLog:
    log = TrainerLog()
    for line in text.splitlines():
        record = parse_iteration(line)
        if record is not None:
            log.iterations[record.iteration] = record
            continue
        throughput = parse_throughput(line)
        if throughput is not None:
            log.throughput.append(throughput)
    return log
