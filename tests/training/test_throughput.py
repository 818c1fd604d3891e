"""The throughput line's MFU peak: the device's own variant, looked up only after megatron has set
each rank's device (no CUDA query, hence no context on GPU 0, when the logger is installed)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_config

NAMES = {
    # what torch.cuda.get_device_name returns -> dense bf16 peak (TFLOP/s)
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA B200": 2250.0,
    # not listed: no MFU rather than a neighbour's peak
    "NVIDIA GB200": None,
    "NVIDIA H100": None,  # no variant in the name
    "NVIDIA H800": None,
    "NVIDIA L40S": None,
}


@pytest.mark.parametrize("name, peak", sorted(NAMES.items()))
def test_peak_is_the_variants(name, peak):
    from megatron_mesh.training.throughput import peak_tflops_of

    assert peak_tflops_of(name) == peak


class FakeCuda:
    """torch.cuda on a 4-GPU host as megatron's pretrain uses it: ``set_device`` picks this
    rank's device; every name query is recorded with the device it asked about."""

    def __init__(self):
        self.names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3",
                      "NVIDIA H100 PCIe"]  # device 3 differs, so the answer shows who was asked
        self.device, self.queries = 0, []

    def current_device(self):
        return self.device

    def get_device_name(self, device=None):
        device = self.device if device is None else device
        self.queries.append(device)
        return self.names[device]


@pytest.fixture
def installed(monkeypatch):
    """``throughput.install`` for a rank whose device megatron will set to 3, on a fake CUDA and
    a fake megatron ``training_log`` (both restored afterwards), with a clock of 1 s per call."""
    from megatron.training import training

    from megatron_mesh.training import throughput

    config = tiny_config()  # before CUDA looks available: MeshConfig reads it
    cuda = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", cuda.current_device)
    monkeypatch.setattr(torch.cuda, "get_device_name", cuda.get_device_name)
    monkeypatch.setattr(training, "training_log", lambda *args, **kwargs: None)
    monkeypatch.setattr(training, "num_floating_point_operations", training.num_floating_point_operations)
    monkeypatch.setattr(throughput, "peak_memory_over_ranks", lambda: (2**30, "fake"))
    monkeypatch.setattr(throughput, "time", SimpleNamespace(time=iter(range(100)).__next__))

    def install(peak_tflops=None):
        args = SimpleNamespace(seq_length=16, mesh_peak_tflops=peak_tflops, log_interval=10,
                               global_batch_size=4, world_size=1, consumed_train_samples=80,
                               train_iters=100)
        return throughput.install(config, args), training

    return install, cuda


def log(training, iteration):
    training.training_log({}, {}, 1e-3, iteration)


def test_device_peak_is_looked_up_after_megatron_sets_the_device(installed, capsys):
    install, cuda = installed
    logger, training = install()
    assert cuda.queries == []  # installed before pretrain: no CUDA query yet
    cuda.device = 3  # megatron's initialize: torch.cuda.set_device(local_rank)
    log(training, 10)  # the first call starts the clock
    assert cuda.queries == []
    log(training, 20)
    assert cuda.queries == [3] and logger.peak_tflops == 756.0
    assert "MFU:" in capsys.readouterr().out
    log(training, 30)
    assert cuda.queries == [3]  # looked up once


def test_a_given_peak_never_queries_the_device(installed, capsys):
    install, cuda = installed
    logger, training = install(peak_tflops=500.0)
    cuda.device = 3
    for iteration in (10, 20):
        log(training, iteration)
    assert cuda.queries == [] and logger.peak_tflops == 500.0
    assert "MFU:" in capsys.readouterr().out


def test_the_realized_depth_is_the_mean_of_the_forward_steps_draws():
    """Per micro-batch each element's own steps (not the micro-batch's deepest); a step whose
    draws were not recorded is an error, not a guess."""
    import numpy as np

    from megatron_mesh.model.stats import DepthCost
    from megatron_mesh.recurrence.loop_depth import LoopDraw
    from megatron_mesh.training.throughput import DepthTally, RealizedDepth

    tally = DepthTally()
    tally.add(6, LoopDraw(9, 9))  # a stale step
    tally.add(7, LoopDraw.of_elements(np.array([1, 3]), np.array([1, 2])))  # 2 and 1.5 per element
    tally.add(7, LoopDraw(4, 2))
    realized = RealizedDepth(tally, DepthCost(base=10.0, per_step=1.0, per_backprop_step=2.0))
    assert realized.loops(7) == pytest.approx((2 + 4) / 2)
    assert realized.flops_per_token(7) == pytest.approx(10 + 3 + 2 * (1.5 + 2) / 2)
    with pytest.raises(RuntimeError, match="no loop depth was drawn for iteration 8"):
        realized.loops(8)


def test_a_skipped_iteration_leaves_the_log_lines_depth_to_the_steps_that_ran():
    """megatron's --iterations-to-skip runs no forward step and counts no FLOPs for a step."""
    from megatron_mesh.model.stats import DepthCost
    from megatron_mesh.recurrence.loop_depth import LoopDraw
    from megatron_mesh.training.throughput import DepthTally, RealizedDepth, ThroughputLogger

    tally = DepthTally()
    realized = RealizedDepth(tally, DepthCost(base=10.0, per_step=1.0, per_backprop_step=0.0))
    logger = ThroughputLogger(10.0, peak_tflops=1.0, depth=realized)
    args = SimpleNamespace(global_batch_size=2, seq_length=4, world_size=1, train_iters=10,
                           consumed_train_samples=8, curr_iteration=0)
    logger.line(args, 0, now=0.0)
    for iteration, loops in ((0, 2), (2, 4)):  # iteration 1 skipped
        tally.add(iteration, LoopDraw(loops, loops))
        args.curr_iteration = iteration
        logger.num_floating_point_operations(args, 2)
    stats = logger.line(args, 3, now=3.0)
    assert stats["loop-depth"] == pytest.approx(3.0)
    assert stats["tflops-per-device"] == pytest.approx(8 / 1.0 * 13.0 / 1e12)


def test_a_depth_curriculum_is_counted_and_logged_at_each_steps_drawn_depth(monkeypatch, capsys):
    """Through the installed trainer hooks: each step's forward steps draw around the ramp's mean
    (MeshProviders.loop_draw), megatron's FLOP count of the step is the sum over its sequences
    of the FLOPs at the depth each ran, and the log line shows the depth run beside the mean of
    the schedule over the same steps."""
    from megatron.training import training

    from megatron_mesh.model.stats import train_flops_per_token
    from megatron_mesh.recurrence.loop_depth import LoopDepth, LoopDraw
    from megatron_mesh.training import providers, throughput
    from megatron_mesh.training.logs import parse_log

    config = tiny_config("1+2R2+1", "linear_injection", loop_depth="poisson", mean_loops=4.0,
                         max_loops=6, backprop_loops=2, loop_depth_per="sequence",
                         mean_loops_schedule="linear", mean_loops_ramp_iters=8)
    args = SimpleNamespace(seed=1234, seq_length=16, micro_batch_size=2, global_batch_size=4,
                           pipeline_model_parallel_size=1, world_size=1, mesh_peak_tflops=1.0,
                           log_interval=10, consumed_train_samples=40, train_iters=100,
                           curr_iteration=0)
    monkeypatch.setattr(providers, "get_args", lambda: args)
    monkeypatch.setattr(providers, "get_num_microbatches", lambda: 2)
    monkeypatch.setattr(providers.parallel_state, "get_data_parallel_world_size", lambda: 1)
    monkeypatch.setattr(providers.parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(training, "training_log", lambda *args, **kwargs: None)
    monkeypatch.setattr(training, "num_floating_point_operations", training.num_floating_point_operations)
    monkeypatch.setattr(throughput, "peak_memory_over_ranks", lambda: (2**30, "fake"))
    monkeypatch.setattr(throughput, "time", SimpleNamespace(time=iter(range(100)).__next__))
    mesh = providers.MeshProviders()
    mesh.depth = LoopDepth.of(config)
    throughput.install(config, args, mesh.depth_tally)

    log(training, 0)  # starts the clock
    counted, want, ran = [], [], []
    for iteration in range(10):
        args.curr_iteration = iteration
        for _ in range(2):  # the step's two micro-batches of two sequences each
            active = mesh.loop_draw(training=True)["step_mask"].numpy()  # [loop steps, b]
            steps, grad = active.sum(0), active[len(active) - 2:].sum(0)
            want += [args.seq_length * train_flops_per_token(config, args.seq_length, LoopDraw(n, k))
                     for n, k in zip(steps, grad)]
            ran += list(steps)
        counted.append(training.num_floating_point_operations(args, args.global_batch_size))
    log(training, 10)
    assert sum(counted) == pytest.approx(sum(want), rel=1e-12)
    (line,) = parse_log(capsys.readouterr().out).throughput
    assert line.loop_depth == pytest.approx(np.mean(ran), abs=0.005)
    # m(i) = 1 + 3 i / 8 for i < 8, then 4
    assert line.mean_loops == pytest.approx(np.mean([1 + 3 * i / 8 for i in range(8)] + [4, 4]), abs=0.005)
