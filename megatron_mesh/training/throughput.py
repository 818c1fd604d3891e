"""Throughput logging that counts every application of the looped core.

Megatron's ``num_floating_point_operations`` is replaced by ``megatron_mesh.model.stats`` (the same
numbers ``tools/model_stats.py`` prints), and every log interval adds one line:
consumed tokens, tokens/s, TFLOP/s per device, MFU, the loop depth run (a varying depth; under
a depth curriculum also the mean it was drawn around, ``mean loops``), peak memory (the largest
over all ranks: CUDA's max allocated on a GPU, the process's peak RSS on the CPU) and ETA, also
sent to TensorBoard / W&B. ``tools/gpu_check.py`` reads its throughput rows from this line.

MFU divides by ``logging.peak_tflops`` or else the datasheet peak of the device each rank runs
on (``PEAK_TFLOPS_BF16``), looked up at the first line: ``install`` runs before megatron's
``pretrain`` sets each rank's device, and a CUDA query then would open a context on GPU 0 in
every rank.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mesh.config.model import MeshConfig
from megatron_mesh.model.stats import DepthCost, train_flops_per_token
from megatron_mesh.recurrence.loop_depth import LoopDepth, LoopDraw, MeanDepth

PEAK_TFLOPS_BF16: Tuple[Tuple[str, float], ...] = (
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 80GB HBM3\b", 989.0),  # SXM5
    (r"\bH200 NVL\b", 835.0),
    (r"\bGH200\b", 989.0),  # Grace Hopper, 480GB and 144GB alike
    (r"\bH200\b", 989.0),  # SXM ("NVIDIA H200"); the NVL board matched above
    (r"\bA100\b", 312.0),  # SXM4 and PCIe, 40 and 80 GB alike
    (r"\bB200\b", 2250.0),  # HGX B200; not GB200 ("\b"), whose peak differs
)
"""Dense (non-sparse) bf16 tensor-core peak TFLOP/s of one device from NVIDIA's datasheets, by a
pattern searched in ``torch.cuda.get_device_name``; the first match wins, so the PCIe and NVL
boards (lower clocks and power than SXM under the same chip name) come before the SXM entries.
A device no entry matches gets no MFU rather than another variant's peak: set
logging.peak_tflops for it."""


def peak_tflops_of(name: str) -> Optional[float]:
    """``PEAK_TFLOPS_BF16`` of a device name, None when the variant is not listed."""
    return next((peak for pattern, peak in PEAK_TFLOPS_BF16 if re.search(pattern, name)), None)


def default_peak_tflops() -> Optional[float]:
    """Dense bf16 peak of the current CUDA device, None without CUDA or for an unknown device.
    Call only once the process's device is set: a query before creates a context on GPU 0."""
    if not torch.cuda.is_available():
        return None
    return peak_tflops_of(torch.cuda.get_device_name(torch.cuda.current_device()))


def rank_device():
    """This rank's device: the GPU megatron set for it, else the CPU (gloo)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def peak_memory() -> Tuple[int, str]:
    """(bytes, what was measured) of this process so far."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"  # KiB on Linux


def peak_memory_over_ranks() -> Tuple[int, str]:
    """``peak_memory`` maximised over every rank (a one-element all-reduce; call on all ranks)."""
    value, kind = peak_memory()
    if dist.is_initialized() and dist.get_world_size() > 1:
        peak = torch.tensor([value], dtype=torch.float64, device=rank_device())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        value = int(peak.item())
    return value, kind


@dataclass
class DepthTally:
    """The loop depth this rank's training micro-batches ran in one step: the draws forward_step
    made (``MeshProviders.loop_draw``), per element (sequence or token) where the depth is."""

    iteration: int = -1
    loops: float = 0.0
    backprop_loops: float = 0.0
    microbatches: int = 0

    def add(self, iteration: int, draw: LoopDraw) -> None:
        if iteration != self.iteration:
            self.iteration, self.loops, self.backprop_loops, self.microbatches = iteration, 0.0, 0.0, 0
        self.loops += draw.mean_loops
        self.backprop_loops += draw.mean_backprop_loops
        self.microbatches += 1

    def data_parallel_mean(self, iteration: int) -> MeanDepth:
        """The mean over every micro-batch of the step (all of equal size) on all data-parallel
        ranks: a three-number all-reduce; call on every rank."""
        if iteration != self.iteration or not self.microbatches:
            raise RuntimeError(f"no loop depth was drawn for iteration {iteration} (last drawn: "
                               f"{self.iteration}): the FLOP count needs the forward step's draw")
        sums = [self.loops, self.backprop_loops, float(self.microbatches)]
        if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
            summed = torch.tensor(sums, dtype=torch.float64, device=rank_device())
            dist.all_reduce(summed, group=parallel_state.get_data_parallel_group())
            sums = summed.tolist()
        return MeanDepth(sums[0] / sums[2], sums[1] / sums[2])


@dataclass
class RealizedDepth:
    """The loop depth each training step ran and the FLOPs per token it cost: per sequence or
    token each element's own steps, averaged over the global batch (steps a micro-batch runs
    for its deepest element are not counted for the others)."""

    tally: DepthTally
    cost: DepthCost
    sampler: Optional[LoopDepth] = None
    """What the steps drew from: under a depth curriculum its mean at each iteration is logged
    beside the depth drawn (a function of the iteration alone: no communication)."""
    _means: Dict[int, MeanDepth] = field(default_factory=dict, init=False, repr=False)
    """Per iteration: megatron counts a step's FLOPs once per step and again in its log line."""

    def ran(self, iteration: int) -> bool:
        """Whether the step ran and was counted (megatron's --iterations-to-skip skips both)."""
        return iteration in self._means

    def mean(self, iteration: int) -> MeanDepth:
        if iteration not in self._means:
            self._means[iteration] = self.tally.data_parallel_mean(iteration)
        return self._means[iteration]

    def loops(self, iteration: int) -> float:
        return self.mean(iteration).num_loops

    def flops_per_token(self, iteration: int) -> float:
        mean = self.mean(iteration)
        return self.cost.at(mean.num_loops, mean.backprop_loops)

    @property
    def ramps(self) -> bool:
        """Whether the steps drew around a depth curriculum's moving mean."""
        return self.sampler is not None and self.sampler.ramps

    def scheduled_mean(self, iteration: int) -> float:
        """The mean loop steps the draws of ``iteration`` were made around."""
        return self.sampler.mean_at(iteration)

    def forget_before(self, iteration: int) -> None:
        for old in [i for i in self._means if i < iteration]:
            del self._means[old]


class ThroughputLogger:
    """Wraps megatron.training.training.training_log to add the recursive-aware line."""

    def __init__(self, per_token: float, peak_tflops: Optional[float] = None,
                 depth: Optional[RealizedDepth] = None):
        self.per_token = per_token  # training FLOPs per token, megatron_mesh.model.stats
        self.depth = depth  # a sampled loop depth: FLOPs per token vary by iteration
        self._peak = peak_tflops  # TFLOP/s of one device; None: the device's, at the first line
        self._peak_known = peak_tflops is not None
        self.last: Optional[tuple] = None  # (wall time, iteration) of the previous log line

    @property
    def peak_tflops(self) -> Optional[float]:
        """The given peak, else the current device's, looked up on first use: that is in the
        first line, after megatron has set this rank's device (no CUDA query before)."""
        if not self._peak_known:
            self._peak, self._peak_known = default_peak_tflops(), True
        return self._peak

    def per_token_at(self, iteration: Optional[int]) -> float:
        """FLOPs per token of the training step run at ``iteration`` (args.curr_iteration)."""
        return self.per_token if self.depth is None else self.depth.flops_per_token(iteration)

    def num_floating_point_operations(self, args, batch_size, *_unused, **_kwargs) -> float:
        # args.curr_iteration exists only inside megatron's training loop: read it only then
        iteration = args.curr_iteration if self.depth is not None else None
        return float(batch_size * args.seq_length * self.per_token_at(iteration))

    def line(self, args, iteration: int, now: float) -> Optional[dict]:
        if self.last is None:
            self.last = (now, iteration)
            return None
        then, before = self.last
        self.last = (now, iteration)
        if iteration <= before:
            return None
        seconds_per_iter = (now - then) / (iteration - before)
        tokens_per_iter = args.global_batch_size * args.seq_length
        tokens_per_s = tokens_per_iter / seconds_per_iter
        # the curr_iteration of each step run since the last line
        steps = [i for i in range(before, iteration) if self.depth is None or self.depth.ran(i)]
        if not steps:
            return None
        per_token = sum(self.per_token_at(i) for i in steps) / len(steps)
        tflops = tokens_per_s * per_token / 1e12 / args.world_size
        stats = {
            "consumed-tokens": args.consumed_train_samples * args.seq_length,
            "tokens-per-sec": tokens_per_s,
            "tflops-per-device": tflops,
            "eta-seconds": (args.train_iters - iteration) * seconds_per_iter,
        }
        peak = self.peak_tflops
        if peak:
            stats["mfu"] = tflops / peak
        if self.depth is not None:
            stats["loop-depth"] = sum(self.depth.loops(i) for i in steps) / len(steps)
            if self.depth.ramps:  # averaged over the same steps as the depth, to compare
                stats["mean-loops"] = sum(self.depth.scheduled_mean(i) for i in steps) / len(steps)
            self.depth.forget_before(iteration)
        return stats


def _format(iteration: int, stats: dict) -> str:
    eta = stats["eta-seconds"]
    text = (f" [mesh] iteration {iteration:8d} | consumed tokens: {stats['consumed-tokens']:,} | "
            f"tokens/s: {stats['tokens-per-sec']:,.0f} | TFLOP/s/device: "
            f"{stats['tflops-per-device']:.3f} |")
    if "mfu" in stats:
        text += f" MFU: {100 * stats['mfu']:.1f}% |"
    if "loop-depth" in stats:
        text += f" loop depth: {stats['loop-depth']:.2f} |"
    if "mean-loops" in stats:
        text += f" mean loops: {stats['mean-loops']:.2f} |"
    if "peak-memory-bytes" in stats:
        text += f" peak memory: {stats['peak-memory-bytes'] / 2**30:.3f} GiB ({stats['memory-kind']}) |"
    return text + f" ETA: {int(eta // 3600):d}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"


def install(config: MeshConfig, args, tally: Optional[DepthTally] = None) -> ThroughputLogger:
    """Patch megatron.training's FLOP count and log function for this run; under a varying loop
    depth the forward steps record their draws in ``tally``."""
    from megatron.training import get_tensorboard_writer, get_wandb_writer
    from megatron.training import training
    from megatron.training.utils import print_rank_last

    depth = LoopDepth.of(config)
    realized = None
    if depth.varies:
        if tally is None:
            raise ValueError(f"{config.depth_setting()}: the throughput log needs the forward "
                             "steps' DepthTally")
        realized = RealizedDepth(tally, DepthCost.of(config, args.seq_length), depth)
    logger = ThroughputLogger(train_flops_per_token(config, args.seq_length), args.mesh_peak_tflops,
                              realized)
    training.num_floating_point_operations = logger.num_floating_point_operations
    original = training.training_log

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        result = original(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        if logger.last is None:  # first iteration of this run (or resume): start the clock
            logger.line(args, iteration, time.time())
        elif iteration % args.log_interval == 0:
            stats = logger.line(args, iteration, time.time())
            if stats:
                stats["peak-memory-bytes"], kind = peak_memory_over_ranks()
                print_rank_last(_format(iteration, dict(stats, **{"memory-kind": kind})))
                writer = get_tensorboard_writer()
                if writer:
                    for key, value in stats.items():
                        writer.add_scalar(f"mesh/{key}", value, iteration)
                wandb = get_wandb_writer()
                if wandb:
                    wandb.log({f"mesh/{k}": v for k, v in stats.items()}, iteration)
        return result

    training.training_log = training_log
    return logger
