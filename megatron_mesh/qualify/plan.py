"""How long a qualification should take, from the model FLOPs of every trainer run.

Trainer time = launches x start-up + model FLOPs / (peak x assumed MFU) + checkpoint traffic;
in-process checks are fixed allowances. The FLOPs are ``megatron_mesh.model.stats`` (every core
application counted) at each run's sequence length and batch; the constants are assumptions,
stated where they are defined, to be replaced by the measured per-check seconds of a real run
(``report.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from megatron_mesh.qualify.launch import REPO
from megatron_mesh.qualify.profiles import Profile, TrainerModel
from megatron_mesh.training.throughput import peak_tflops_of

STARTUP_S = 30.0
"""Per torchrun launch on a GPU node: Python + megatron-core + TransformerEngine imports (~8 s
here on 2 CPU cores; less on a 16-core GPU host), NCCL and CUDA context, model build,
distributed optimizer, megatron's fused-kernel warm-up and torch.compile of the MeSH cycle
from inductor's on-disk cache after the first launch (cold: +15-20 s once)."""
MFU = 0.35
"""Assumed for the estimate (Megatron reports ~41% for a 1.7B GPT on H100; small models and
short runs do worse)."""
PEAK_TFLOPS = peak_tflops_of("NVIDIA H100 80GB HBM3")
"""H100 SXM dense bf16 (the trainer's MFU table)."""
SAVE_GBPS = 1.0
"""Checkpoint write and read speed assumed for local NVMe."""
IN_PROCESS_S = {"versions": 2, "specs": 15, "attention": 5, "cycle": 40}
"""Allowances: TE import and two small models per scheme; one profiled forward; two inductor
compiles of the cycle at (5, 4096, 4, 2048) and 2 x 22 timed steps."""
EXPORT_S = 10.0
"""Per export of a 160M checkpoint: read, write 0.65 GB of safetensors, reload, one forward."""


@dataclass
class Line:
    check: str
    what: str
    seconds: float


def _flops_per_iteration(model: TrainerModel, overrides: Sequence[str]) -> tuple:
    """(training FLOPs of one iteration, bytes of a full checkpoint) of a run."""
    from megatron_mesh.config.yaml_file import load_config_tree, model_config
    from megatron_mesh.model.stats import applied_matmul_weights_of_config, train_flops_per_token

    tree, origins = load_config_tree(REPO / model.config, [*model.overrides, *overrides])
    config = model_config(tree, origins, use_cpu_initialization=True)
    training = tree["training"]
    tokens = training["global_batch_size"] * training["seq_length"]
    per_token = train_flops_per_token(config, training["seq_length"])
    layers = applied_matmul_weights_of_config(config) * config.parsed_layout.unique_layers / config.num_layers
    params = layers + 2 * config.hidden_size * config.vocab_size  # weights stored once; embeddings
    checkpoint_bytes = params * (2 + 4 + 4 + 4)  # bf16 weights, fp32 main copy, Adam moments
    return tokens * per_token, checkpoint_bytes


def _compute_s(flops: float) -> float:
    return flops / (PEAK_TFLOPS * 1e12 * MFU)


def estimate(profile: Profile) -> List[Line]:
    lines = [Line(name, "in-process", s) for name, s in IN_PROCESS_S.items()]
    for index, model in enumerate(profile.smoke):
        flops, ckpt = _flops_per_iteration(model, profile.smoke_overrides)
        launches = 2 if index == len(profile.smoke) - 1 else 1
        seconds = (launches * STARTUP_S + profile.smoke_iters * _compute_s(flops)
                   + launches * 2 * ckpt / (SAVE_GBPS * 1e9) + EXPORT_S)
        lines.append(Line("trainer", f"{model.label}: {launches} launch(es), "
                                     f"{profile.smoke_iters} it. x {flops / 1e12:.0f} TFLOP", seconds))
    for model in profile.throughput:
        flops, _ = _flops_per_iteration(model, profile.throughput_overrides)
        seconds = STARTUP_S + profile.throughput_iters * _compute_s(flops)
        lines.append(Line("throughput", f"{model.label}: {profile.throughput_iters} it. x "
                                        f"{flops / 1e12:.0f} TFLOP", seconds))
    return lines


def describe(profile: Profile) -> str:
    lines = estimate(profile)
    total = sum(line.seconds for line in lines)
    text = [f"expected on one H100 (start-up {STARTUP_S:.0f} s per launch, MFU {MFU:.0%} of "
            f"{PEAK_TFLOPS:.0f} TFLOP/s, checkpoints at {SAVE_GBPS:g} GB/s; parity skipped on "
            f"one GPU):"]
    text += [f"  {line.check:<11} {line.seconds:6.1f} s  {line.what}" for line in lines]
    text.append(f"  {'total':<11} {total:6.1f} s of the {profile.budget_s:.0f} s budget")
    return "\n".join(text)
