"""Reading Megatron's and megatron-mesh's log lines back (megatron_mesh.training.logs)."""

import math

import pytest

from megatron_mesh.training.logs import parse_log
from megatron_mesh.training.throughput import _format

MEGATRON = (" [2026-11-30 15:31:42.853382] iteration        5/      12 | consumed samples:           "
            "40 | elapsed time per iteration (ms): 170.2 | throughput per GPU (TFLOP/s/GPU): 0.0 | "
            "learning rate: 5.220915E-04 | global batch size:     8 | lm loss: 8.078106E+00 | loss "
            "scale: 1.0 | grad norm: 0.515 | number of skipped iterations:   0 | number of nan "
            "iterations:   {nan} |")


def test_megatron_iteration_line():
    log = parse_log("noise\n" + MEGATRON.format(nan=0) + "\nmore noise")
    line = log.iterations[5]
    assert (line.iteration, line.train_iters, line.lm_loss, line.grad_norm) == (5, 12, 8.078106, 0.515)
    assert (line.ms_per_iteration, line.skipped_iterations, line.nan_iterations) == (170.2, 0, 0)
    assert log.losses() == {5: 8.078106}
    assert parse_log(MEGATRON.format(nan=2)).iterations[5].nan_iterations == 2
    nan_loss = MEGATRON.format(nan=1).replace("8.078106E+00", "nan")
    assert math.isnan(parse_log(nan_loss).iterations[5].lm_loss)


def test_mesh_line_as_the_trainer_prints_it():
    stats = {"consumed-tokens": 6144, "tokens-per-sec": 12345.6, "tflops-per-device": 412.25,
             "eta-seconds": 3725, "mfu": 0.4168, "peak-memory-bytes": 3 * 2**30 + 2**29,
             "memory-kind": "cuda max allocated"}
    text = _format(12, stats)
    (line,) = parse_log(text).throughput
    assert line.iteration == 12 and line.tokens_per_s == 12346 and line.tflops_per_device == 412.25
    assert line.mfu == pytest.approx(0.417) and line.memory_kind == "cuda max allocated"
    assert abs(line.peak_memory_bytes - 3.5 * 2**30) < 2**30 / 1000  # printed in GiB, 3 decimals
    assert parse_log(text).iterations == {}  # a [mesh] line is not Megatron's iteration line
    without = {k: v for k, v in stats.items() if k not in ("mfu", "peak-memory-bytes")}
    (line,) = parse_log(_format(12, without)).throughput
    assert line.mfu is None and line.peak_memory_bytes is None


def test_mesh_line_with_a_curriculums_depth():
    """A varying depth adds the depth run; a depth curriculum the mean it was drawn around."""
    stats = {"consumed-tokens": 640, "tokens-per-sec": 100.0, "tflops-per-device": 1.5,
             "eta-seconds": 10, "loop-depth": 2.4567, "mean-loops": 2.125}
    (line,) = parse_log(_format(10, stats)).throughput
    assert (line.loop_depth, line.mean_loops) == (2.46, 2.12)  # printed with 2 decimals
    del stats["mean-loops"]
    (line,) = parse_log(_format(10, stats)).throughput
    assert (line.loop_depth, line.mean_loops) == (2.46, None)
