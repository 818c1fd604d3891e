#!/usr/bin/env python
"""Single-device training-step benchmark of one or more configs: time, throughput, MFU, memory.

    python tools/benchmark.py --config configs/bench-cpu.yml \
        --compare model.state_scheme=mesh --compare model.state_scheme=anchor --iters 10

Each run is ``--config`` with its ``--set`` overrides; every ``--compare KEY=VALUE`` adds a run
with that override on top (several space-separated overrides per ``--compare`` are allowed), and
the text output gives each run's step time and peak memory as a ratio of the first run's.
One process, one device (a GPU when torch sees one, else the CPU), no torchrun: the model is
megatron-mesh's ``MeshGPTModel`` at TP = PP = DP = 1 (TransformerEngine spec when TE imports,
else the local spec), trained on random tokens.

A step is forward (loss) + backward + optimizer: gradient-norm clipping at the config's
``optimizer.clip_grad`` (default 1.0, 0 = off), ``torch.optim.AdamW`` with the config's
lr/betas/eps/weight_decay on all parameters (fused on GPU), then ``zero_grad``. Each phase is
timed with ``torch.cuda.synchronize()`` before every clock read on a GPU, plain
``time.perf_counter()`` on the CPU. Reported per run, over ``--iters`` steps after ``--warmup``:

- step time: median (and min) over the steps; the forward / backward / optimizer columns are the
  medians of each phase, so they add up to the step time only approximately (exactly for 2 steps);
- tokens/s = batch x seq / median step time;
- TFLOP/s = tokens/s x training FLOPs per token / 1e12, with FLOPs per token from
  ``megatron_mesh.model.stats.train_flops_per_token`` at the benchmark's sequence length (the numbers
  ``tools/model_stats.py --seq-length`` prints), megatron-core's convention: training = 3 x
  forward (6 FLOPs per matmul weight per token, causal attention 6 * s * q per layer
  application, the LM head), **every application of the looped core counted** (N_compute
  layers), routers included, activation recompute *not* counted (model FLOPs);
- MFU = TFLOP/s / ``--peak-tflops`` (default on a GPU: the dense bf16 peak of
  ``megatron_mesh.training.throughput.PEAK_TFLOPS_BF16`` for bf16/fp16 runs; none on the CPU or
  for fp32 runs unless given);
- peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the timed and warm-up steps
  (model, gradients, AdamW state, activations); on the CPU the process's peak RSS
  (``resource.getrusage``, reset per run through ``/proc/self/clear_refs`` where the kernel
  allows it), which includes the Python interpreter and libraries; ``rss_at_start`` is the RSS
  when the run's measurement began;
- activations: the memory autograd holds for the backward pass after one forward (tensors saved
  for backward, each storage counted once, parameters excluded; under autocast the low-precision
  weight copies saved for backward count too): what activation recompute trades for time, e.g.

    python tools/benchmark.py --config configs/bench-cpu.yml --set model.state_scheme=mesh \
        --compare parallelism.recompute_granularity=full ...

  (recompute keys: parallelism.recompute_granularity, parallelism.recompute_method,
  parallelism.recompute_num_layers, mapped as the trainer maps them).

Precision: the config's ``precision.dtype`` (default bf16, as for the trainer) on a GPU, as
``torch.autocast`` over fp32 parameters with torch's AdamW. That is not the trainer's path:
Megatron keeps bf16 parameters (Float16Module) plus fp32 main parameters and gradients, sharded
by the distributed optimizer, so memory and optimizer time differ. This tool is the CPU and
quick-compare tool; the GPU numbers in docs/benchmarks.md come from ``tools/gpu_check.py``'s
throughput check, which reads the real trainer's ``[mesh]`` line. fp32 on the CPU. ``--dtype``
overrides it (bf16/fp16 only on a GPU: megatron-core runs autocast on CUDA only). ``--json``
prints one JSON object with every number.
"""

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import time

from _bootstrap import cli

FLOPS_CONVENTION = (
    "training FLOPs per token = 3 x forward (megatron_mesh.model.stats.train_flops_per_token at the "
    "benchmark seq length): every core application counted, routers included, recompute not counted"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="add a run with this extra override (repeatable)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", choices=("config", "fp32", "bf16", "fp16"), default="config",
                        help="autocast dtype; 'config': precision.dtype on a GPU, fp32 on the CPU")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of the device for MFU (default: the GPU's dense bf16 "
                             "peak from megatron_mesh.training.throughput for bf16/fp16 runs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def training_loss(output):
    """The mean token loss a training step backpropagates: the per-token loss [b, s], or with
    exit gates (model.exit_gate) the exit objective of the ExitLoss."""
    from megatron_mesh.recurrence.exit_gate import ExitLoss

    return (output.objective if isinstance(output, ExitLoss) else output).mean()


def saved_activation_bytes(model, tokens, positions, autocast=contextlib.nullcontext) -> int:
    """Bytes autograd keeps for backward after one forward (distinct storages, no parameters)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast():
            loss = training_loss(model(tokens, positions, labels=tokens))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


class Memory:
    """Peak memory of one run: CUDA allocator peak on a GPU, process peak RSS on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.kind = "cuda_max_memory_allocated" if cuda else "process_peak_rss"
        self.reset_ok = True
        self.at_start = None

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(Exception):  # give freed heap back, so runs start alike
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM, getrusage's ru_maxrss) to now
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            self.reset_ok = False
        with contextlib.suppress(OSError):
            self.at_start = self.rss_bytes()

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def optimizer_settings(tree) -> dict:
    opt = tree.get("optimizer") or {}
    betas = opt.get("betas", [0.9, 0.95])
    return dict(lr=float(opt.get("lr", 1e-4)), betas=(float(betas[0]), float(betas[1])),
                eps=float(opt.get("eps", 1e-8)), weight_decay=float(opt.get("weight_decay", 0.01)),
                clip_grad=float(opt.get("clip_grad", 1.0)))


def time_steps(cfg, opt_settings, *, batch, seq, iters, warmup, device, autocast_dtype):
    """Per-step phase times (s), peak memory (bytes), memory at start, saved-activation bytes."""
    import torch

    from megatron_mesh.model.gpt import MeshGPTModel

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = MeshGPTModel(cfg).to(device)
    settings = dict(opt_settings)
    clip = settings.pop("clip_grad")
    optimizer = torch.optim.AdamW(model.parameters(), **settings, **({"fused": True} if cuda else {}))
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    activations = saved_activation_bytes(model, tokens, positions, autocast)
    memory = Memory(cuda)
    memory.start()
    steps = []
    for i in range(warmup + iters):
        t0 = clock()
        with autocast():
            loss = training_loss(model(tokens, positions, labels=tokens))
        t1 = clock()
        loss.backward()
        t2 = clock()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        if i >= warmup:
            steps.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
    peak = memory.peak()
    del model, optimizer, params, loss
    return steps, peak, memory, activations


def model_with_recompute(config, overrides):
    """The config's tree and model, with its parallelism.recompute_* settings (the trainer's mapping)."""
    from megatron_mesh.config.yaml_file import load_config_tree, model_config

    tree, origins = load_config_tree(config, overrides)
    parallelism = tree.get("parallelism") or {}
    recompute = {k: parallelism[k] for k in ("recompute_granularity", "recompute_method",
                                             "recompute_num_layers") if k in parallelism}
    return tree, model_config(tree, origins, **recompute)


DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def run_dtype(choice, tree, cuda) -> str:
    if choice in ("bf16", "fp16") and not cuda:
        # megatron-core's linear layers wrap their autograd Functions in
        # torch.amp.custom_fwd/custom_bwd(device_type="cuda") (tensor_parallel/layers.py), so on
        # the CPU their backward runs outside autocast and fails on mixed dtypes.
        cli.fail(f"--dtype {choice} needs a GPU: megatron-core's linear layers "
                 "support autocast on CUDA only; use --dtype fp32 on the CPU")
    if choice != "config":
        return choice
    if not cuda:
        return "fp32"
    return (tree.get("precision") or {}).get("dtype", "bf16")  # the trainer's default


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def versions() -> dict:
    from importlib.metadata import version

    import torch

    # the distribution's version: megatron.core.package_info appends the `git rev-parse` of
    # whatever repository its install directory sits in (a venv inside a checkout: ours)
    return dict(python=platform.python_version(), torch=torch.__version__,
                megatron_core=version("megatron-core"))


def measure(args, name, overrides, device, peak_default):
    import torch

    from megatron_mesh.model.stats import train_flops_per_token

    tree, cfg = model_with_recompute(args.config, overrides)
    cuda = device.type == "cuda"
    dtype = run_dtype(args.dtype, tree, cuda)
    autocast_dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    steps, peak, memory, activations = time_steps(cfg, optimizer_settings(tree), batch=args.batch,
                                                  seq=args.seq_length, iters=args.iters,
                                                  warmup=args.warmup, device=device,
                                                  autocast_dtype=autocast_dtype)
    step, fwd, bwd, opt = (statistics.median(column) for column in zip(*steps))
    flops_per_token = train_flops_per_token(cfg, args.seq_length)
    tokens_per_s = args.batch * args.seq_length / step
    tflops = tokens_per_s * flops_per_token / 1e12
    peak_tflops = args.peak_tflops
    if peak_tflops is None and dtype in ("bf16", "fp16"):
        peak_tflops = peak_default
    result = dict(
        run=name, overrides=list(overrides), layout=str(cfg.parsed_layout), scheme=cfg.state_scheme,
        n_compute=cfg.num_layers, dtype=dtype,
        step_s=step, min_s=min(s[0] for s in steps), median_s=step,
        forward_s=fwd, backward_s=bwd, optimizer_s=opt,
        step_times_s=[s[0] for s in steps],
        flops_per_token=flops_per_token, tokens_per_s=tokens_per_s, tflops=tflops,
        peak_tflops=peak_tflops, mfu=tflops / peak_tflops if peak_tflops else None,
        peak_memory_bytes=peak, memory_kind=memory.kind,
        memory_at_start_bytes=memory.at_start, activation_bytes=activations,
    )
    if not cuda:
        result["peak_rss_reset_per_run"] = memory.reset_ok
    if cuda:
        torch.cuda.empty_cache()
    return result


def print_text(args, info, results):
    gpu = info["device"] == "cuda"
    mem_label = "peak alloc" if gpu else "peak RSS"
    print(f"device {info['device_name']} ({'GPU' if gpu else f'CPU, {args.threads} threads'}), "
          f"batch {args.batch} x seq {args.seq_length} = {args.batch * args.seq_length:,} tokens/step, "
          f"median of {args.iters} steps (forward + backward + clip + AdamW) "
          f"after {args.warmup} warm-up")
    print(f"FLOPs: {FLOPS_CONVENTION}")
    if gpu:
        print("memory: torch.cuda.max_memory_allocated over the run's steps")
    else:
        print("memory: process peak RSS (resource.getrusage; whole process, incl. interpreter and "
              "libraries" + ("" if all(r.get("peak_rss_reset_per_run") for r in results)
                             else "; NOT reset between runs: later runs include earlier peaks") + ")")
    header = (f"{'run':<28} {'layout':>10} {'scheme':<12} {'dtype':<5} {'step ms':>9} {'(min)':>9} "
              f"{'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
              f"{mem_label:>11} {'activ.':>9} {'x step':>7} {'x mem':>7}")
    print(header)
    for r in results:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6}"
        print(f"{r['run']:<28} {r['layout']:>10} {r['scheme']:<12} {r['dtype']:<5} "
              f"{r['step_s'] * 1e3:9.1f} {r['min_s'] * 1e3:9.1f} {r['forward_s'] * 1e3:8.1f} "
              f"{r['backward_s'] * 1e3:8.1f} {r['optimizer_s'] * 1e3:8.1f} {r['tokens_per_s']:10,.0f} "
              f"{r['tflops']:8.4f} {mfu} {r['peak_memory_bytes'] / 2**20:7.1f} MiB "
              f"{r['activation_bytes'] / 2**20:5.1f} MiB "
              f"x{r['step_ratio']:.3f} x{r['memory_ratio']:.3f}")
    print("flops/token: " + ", ".join(f"{r['run']} {r['flops_per_token']:.4e}" for r in results))


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    import torch

    from megatron_mesh.parallel.process_groups import initialize_single_process
    from megatron_mesh.training.throughput import default_peak_tflops

    torch.set_num_threads(args.threads)
    initialize_single_process()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    runs = [("(base config)", args.overrides)] + [(c, args.overrides + c.split()) for c in args.compare]
    peak_default = default_peak_tflops()
    results = [measure(args, name, overrides, device, peak_default) for name, overrides in runs]
    first = results[0]
    for r in results:
        r["step_ratio"] = r["step_s"] / first["step_s"]
        r["memory_ratio"] = r["peak_memory_bytes"] / first["peak_memory_bytes"]
    info = dict(
        device=device.type,
        device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
        threads=args.threads, batch=args.batch, seq_length=args.seq_length,
        tokens_per_step=args.batch * args.seq_length, iters=args.iters, warmup=args.warmup,
        flops_convention=FLOPS_CONVENTION, memory_kind=first["memory_kind"],
        versions=versions(), config=args.config,
    )
    if args.json:
        print(json.dumps(dict(info, runs=results)))
        return
    print_text(args, info, results)


if __name__ == "__main__":
    main()
