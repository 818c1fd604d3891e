"""Throughput logging that counts every application of the looped core.

Megatron's ``num_floating_point_operations`` is replaced by ``megatron_mesh.stats`` (the same
numbers ``tools/model_stats.py`` prints), and every log interval adds one line:
consumed tokens, tokens/s, TFLOP/s per device, MFU, peak memory (the largest over all ranks:
CUDA's max allocated on a GPU, the process's peak RSS on the CPU) and ETA, also sent to
TensorBoard / W&B. ``tools/gpu_check.py`` reads its throughput rows from this line.
"""

from __future__ import annotations

import resource
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_mesh.config import MeshConfig
from megatron_mesh.stats import train_flops_per_token

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
"""Dense bf16 peak per device, by GPU name, for MFU when logging.peak_tflops is not given."""


def default_peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS_BF16.items() if key in name), None)


def peak_memory() -> Tuple[int, str]:
    """(bytes, what was measured) of this process so far."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"  # KiB on Linux


def peak_memory_over_ranks() -> Tuple[int, str]:
    """``peak_memory`` maximised over every rank (a one-element all-reduce; call on all ranks)."""
    value, kind = peak_memory()
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        peak = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        value = int(peak.item())
    return value, kind


class ThroughputLogger:
    """Wraps megatron.training.training.training_log to add the recursive-aware line."""

    def __init__(self, per_token: float, peak_tflops: Optional[float]):
        self.per_token = per_token  # training FLOPs per token, megatron_mesh.stats
        self.peak_tflops = peak_tflops
        self.last: Optional[tuple] = None  # (wall time, iteration) of the previous log line

    def num_floating_point_operations(self, args, batch_size, *_unused, **_kwargs) -> float:
        return float(batch_size * args.seq_length * self.per_token)

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
        tflops = tokens_per_s * self.per_token / 1e12 / args.world_size
        stats = {
            "consumed-tokens": args.consumed_train_samples * args.seq_length,
            "tokens-per-sec": tokens_per_s,
            "tflops-per-device": tflops,
            "eta-seconds": (args.train_iters - iteration) * seconds_per_iter,
        }
        if self.peak_tflops:
            stats["mfu"] = tflops / self.peak_tflops
        return stats


def _format(iteration: int, stats: dict) -> str:
    eta = stats["eta-seconds"]
    text = (f" [mesh] iteration {iteration:8d} | consumed tokens: {stats['consumed-tokens']:,} | "
            f"tokens/s: {stats['tokens-per-sec']:,.0f} | TFLOP/s/device: "
            f"{stats['tflops-per-device']:.3f} |")
    if "mfu" in stats:
        text += f" MFU: {100 * stats['mfu']:.1f}% |"
    if "peak-memory-bytes" in stats:
        text += f" peak memory: {stats['peak-memory-bytes'] / 2**30:.3f} GiB ({stats['memory-kind']}) |"
    return text + f" ETA: {int(eta // 3600):d}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"


def install(config: MeshConfig, args) -> ThroughputLogger:
    """Patch megatron.training's FLOP count and log function for this run."""
    from megatron.training import get_tensorboard_writer, get_wandb_writer
    from megatron.training import training
    from megatron.training.utils import print_rank_last

    logger = ThroughputLogger(train_flops_per_token(config, args.seq_length),
                              args.mesh_peak_tflops or default_peak_tflops())
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
