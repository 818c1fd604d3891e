"""The experiment YAML's sections as typed dataclasses: one field per key.

Each field holds a key's type (its annotation), default, allowed values, meaning and, where the
key maps one to one, the Megatron-LM flag it becomes. Everything else is derived from them: the
keys ``config.yaml_file`` accepts, the type/choice/required checks (``parse_experiment``), the
Megatron arguments (``training.arguments.megatron_argv``) and ``docs/configuration.md``
(``configuration_markdown``; ``tests/config/test_experiment.py`` fails when the file is stale). The
``model`` section is MeshConfig itself (``megatron_mesh.config.model``).
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from megatron_mesh.errors import ConfigError

REQUIRED = "required"  # doc marker for keys without a default
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Bounds:
    """The finite numbers a key allows: ``low``/``high`` (None: unbounded), excluded where
    ``*_open``. Checked with the key's type and choices (``parse_experiment``) and on the values
    of its Megatron flag after ``--`` (``training.arguments.check_passthrough``)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    """Why the bound is where it is, when that is not obvious (shown in the error)."""

    def holds(self, value: Any) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low = None if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
        high = None if self.high is None else f" {'<' if self.high_open else '<='} {self.high:g}"
        if low and high:
            return f"{low}value{high}"
        if low:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if high else "a finite number"


AT_LEAST_1 = Bounds(low=1)
AT_LEAST_0 = Bounds(low=0)
POSITIVE = Bounds(low=0, low_open=True)
FRACTION = Bounds(low=0, high=1)


def key(default: Any = None, doc: str = "", flag: Optional[str] = None,
        choices: Optional[Tuple[Any, ...]] = None, required: bool = False,
        bounds: Optional[Bounds] = None):
    """A config key: its default, meaning, Megatron flag (one-to-one keys) and allowed values
    (``choices``, or for numbers ``bounds``)."""
    meta = {"doc": doc, "flag": flag, "choices": choices, "required": required, "bounds": bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Data:
    format: str = key("gpt", "gpt: megatron-core GPTDataset blends of indexed datasets; "
                      "pythia_preshuffled: one merged file of Pythia's pre-shuffled rows, read in order",
                      "mesh-data-format", ("gpt", "pythia_preshuffled"))
    path: Optional[Union[str, List[Any]]] = key(None, "indexed dataset prefix, or a blend [weight, prefix, ...]")
    valid_path: Optional[Union[str, List[Any]]] = key(None, "separate validation blend (else data.split)")
    test_path: Optional[Union[str, List[Any]]] = key(None, "separate test blend (else data.split)")
    split: str = key("969,30,1", "train,valid,test proportions of data.path")
    mock: bool = key(False, "random tokens instead of data (smoke runs)", "mock-data")
    num_workers: int = key(2, "data loader worker processes per rank", "num-workers", bounds=AT_LEAST_0)
    cache_path: Optional[str] = key(None, "where megatron caches dataset indices", "data-cache-path")
    pythia_boundary: str = key("per_row", "how pythia_preshuffled rows become sequences",
                               "mesh-pythia-boundary", ("per_row", "contiguous", "contiguous_masked"))
    mask_eod_loss: bool = key(False, "no loss on end-of-document tokens", "eod-mask-loss")


@dataclass
class Tokenizer:
    type: str = key("HuggingFaceTokenizer", "megatron tokenizer type", "tokenizer-type")
    model: Optional[str] = key(None, "the tokenizer, by the rule every tool follows (megatron_mesh/data/"
                               "tokenizer.py): a tokenizer.json file (GPT-NeoX-20B's 20B_tokenizer.json), a "
                               "directory holding tokenizer.json (with or without tokenizer_config.json or "
                               "config.json), a Hugging Face tokenizer directory (tokenizer_config.json naming "
                               "its tokenizer_class) or a hub name (EleutherAI/gpt-neox-20b); a missing path "
                               "or one holding none of these stops the run before megatron starts",
                               "tokenizer-model")
    vocab_size: Optional[int] = key(None, "vocabulary size for tokenizers that need one", "vocab-size",
                                    bounds=AT_LEAST_1)


@dataclass
class Training:
    seq_length: int = key(None, "tokens per sequence", "seq-length", required=True, bounds=AT_LEAST_1)
    micro_batch_size: int = key(None, "sequences per rank per forward pass", "micro-batch-size", required=True,
                                bounds=AT_LEAST_1)
    global_batch_size: int = key(None, "sequences per optimizer step", "global-batch-size", required=True,
                                 bounds=AT_LEAST_1)
    train_iters: Optional[int] = key(None, "optimizer steps (exactly one of train_iters, train_tokens)",
                                     bounds=AT_LEAST_1)
    train_tokens: Optional[float] = key(None, "tokens to train on, rounded up to whole global batches",
                                        bounds=POSITIVE)
    seed: int = key(1234, "random seed (weights, dropout, data order)", "seed", bounds=AT_LEAST_0)
    eval_interval: int = key(1000, "iterations between validation runs", "eval-interval", bounds=AT_LEAST_1)
    eval_iters: int = key(0, "validation batches per validation run", "eval-iters", bounds=AT_LEAST_0)
    exit_interval: Optional[int] = key(None, "save and stop at the iterations divisible by it", "exit-interval",
                                       bounds=AT_LEAST_1)


@dataclass
class Optimizer:
    name: str = key("adamw", "AdamW (Megatron's adam, decoupled weight decay)", choices=("adamw",))
    lr: float = key(None, "peak learning rate", "lr", required=True,
                    bounds=Bounds(low=0, high=FLOAT32_MAX,
                                  why="megatron holds the learning rate in a float32 tensor"))
    betas: List[float] = key([0.9, 0.95], "[beta1, beta2]")
    eps: float = key(1e-8, "AdamW epsilon", "adam-eps", bounds=POSITIVE)
    weight_decay: float = key(0.01, "decoupled weight decay", "weight-decay", bounds=AT_LEAST_0)
    clip_grad: float = key(1.0, "gradient-norm clip (0: off)", "clip-grad", bounds=AT_LEAST_0)


@dataclass
class Schedule:
    style: str = key("cosine", "learning-rate decay", "lr-decay-style",
                     ("cosine", "linear", "constant", "inverse-square-root", "WSD"))
    warmup_fraction: float = key(0.01, "linear warmup over this fraction of the decay iterations",
                                 bounds=Bounds(low=0, high=1, high_open=True))
    warmup_iters: Optional[int] = key(None, "linear warmup iterations (instead of warmup_fraction)",
                                      bounds=AT_LEAST_0)
    min_lr_ratio: float = key(0.1, "final learning rate as a fraction of optimizer.lr", bounds=FRACTION)
    decay_iters: Optional[int] = key(None, "iterations of the decay (default: all of training)",
                                     bounds=AT_LEAST_1)
    wsd_decay_iters: Optional[int] = key(None, "style WSD (warmup-stable-decay): iterations of the final "
                                         "decay, the last of decay_iters (required for WSD)",
                                         "lr-wsd-decay-iters", bounds=AT_LEAST_1)
    wsd_decay_style: str = key("exponential", "style WSD: the shape of the final decay", "lr-wsd-decay-style",
                               ("exponential", "linear", "cosine", "minus_sqrt"))


@dataclass
class Precision:
    dtype: str = key("bf16", "parameter and compute precision", choices=("bf16", "fp16", "fp32"))


@dataclass
class Parallelism:
    tensor: int = key(1, "tensor-parallel size", "tensor-model-parallel-size", bounds=AT_LEAST_1)
    pipeline: int = key(1, "pipeline-parallel size", bounds=AT_LEAST_1)
    virtual_pipeline: Optional[int] = key(None, "virtual pipeline stages per pipeline rank", bounds=AT_LEAST_1)
    sequence_parallel: bool = key(False, "sequence parallelism (with tensor > 1)", "sequence-parallel")
    distributed_optimizer: bool = key(False, "shard the optimizer state over data-parallel ranks",
                                      "use-distributed-optimizer")
    overlap_grad_reduce: bool = key(False, "overlap the gradient reduction with the backward pass",
                                    "overlap-grad-reduce")
    overlap_param_gather: bool = key(False, "overlap the parameter all-gather with the forward pass",
                                     "overlap-param-gather")
    recompute_granularity: Optional[str] = key(None, "activation recompute", "recompute-granularity",
                                               ("full", "selective"))
    recompute_method: Optional[str] = key(None, "full recompute: which layer applications",
                                          "recompute-method", ("uniform", "block"))
    recompute_num_layers: Optional[int] = key(None, "layer applications per recompute chunk (uniform) "
                                              "or recomputed (block)", "recompute-num-layers",
                                              bounds=AT_LEAST_1)
    pipeline_stage_layers: Optional[List[int]] = key(None, "layer applications per pipeline stage "
                                                     "(virtual stages in order; default even)")
    transformer_impl: str = key("auto", "layer implementation (auto: TransformerEngine when a GPU "
                                "and TE are present)", choices=("auto", "local", "transformer_engine"))


@dataclass
class Checkpointing:
    save: Optional[str] = key(None, "save directory", "save")
    interval: Optional[int] = key(None, "iterations between saves (default: only at the end)",
                                  bounds=AT_LEAST_1)
    load: Optional[str] = key(None, "directory to resume from (default: save)")
    pretrained: Optional[str] = key(None, "weights to start from when load holds no checkpoint yet",
                                    "pretrained-checkpoint")
    format: str = key("torch_dist", "checkpoint format", "ckpt-format", ("torch_dist", "torch"))
    save_on_signal: bool = key(True, "save and stop on SIGTERM", "exit-signal-handler")
    async_save: bool = key(False, "write checkpoints in the background (megatron's persistent "
                           "async-save worker)")
    optimizer_reshardable: bool = key(False, "distributed-optimizer state loadable at any TP/PP "
                                      "(slower saves)", "dist-ckpt-optim-fully-reshardable")
    verify: bool = key(True, "resume only from a checkpoint whose files match its integrity manifest")


@dataclass
class Logging:
    interval: int = key(10, "iterations between log lines", "log-interval", bounds=AT_LEAST_1)
    tensorboard_dir: Optional[str] = key(None, "TensorBoard event files", "tensorboard-dir")
    wandb_project: Optional[str] = key(None, "Weights & Biases project (unset: no W&B)")
    wandb_entity: Optional[str] = key(None, "W&B entity", "wandb-entity")
    wandb_name: Optional[str] = key(None, "W&B run name", "wandb-exp-name")
    wandb_dir: Optional[str] = key(None, "W&B files", "wandb-save-dir")
    wandb_mode: Optional[str] = key(None, "W&B mode (offline needs no network)",
                                    choices=("online", "offline", "disabled"))
    throughput: bool = key(True, "tokens/s, TFLOP/s and MFU in the log", "log-throughput")
    peak_tflops: Optional[float] = key(None, "peak dense TFLOP/s of one device for MFU "
                                       "(default: known GPUs)", "mesh-peak-tflops", bounds=POSITIVE)
    router_metrics: bool = key(True, "MeSH router statistics in TensorBoard/W&B", "mesh-router-metrics")
    log_dir: Optional[str] = key(None, "where each rank appends its whole console output, rank-R.log "
                                 "(default: <checkpointing.save>/logs; the console itself is compact "
                                 "unless the trainer gets --full-console)")


SECTIONS: Dict[str, type] = {
    "data": Data, "tokenizer": Tokenizer, "training": Training, "optimizer": Optimizer,
    "schedule": Schedule, "precision": Precision, "parallelism": Parallelism,
    "checkpointing": Checkpointing, "logging": Logging,
}
"""Every section but ``model`` (MeshConfig), in the order docs/configuration.md lists them."""


@dataclass
class Experiment:
    """A whole experiment file, typed (``parse_experiment``)."""
    data: Data
    tokenizer: Tokenizer
    training: Training
    optimizer: Optimizer
    schedule: Schedule
    precision: Precision
    parallelism: Parallelism
    checkpointing: Checkpointing
    logging: Logging
    model: Dict[str, Any]
    """The model section as written (MeshConfig validates it; it travels as JSON to the model)."""


def section_keys(name: str) -> Tuple[str, ...]:
    return tuple(f.name for f in fields(SECTIONS[name]))


def parse_experiment(tree: Dict[str, Any], origins: Dict[str, str]) -> Experiment:
    """The typed experiment of a loaded tree (``config.yaml_file.load_config_tree``, keys already
    checked): every value's type and choices checked, defaults filled in."""
    sections = {name: _parse_section(name, cls, tree.get(name) or {}, origins)
                for name, cls in SECTIONS.items()}
    return Experiment(**sections, model=dict(tree.get("model") or {}))


def _parse_section(name: str, cls: type, values: Dict[str, Any], origins: Dict[str, str]):
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        where = origins.get(f"{name}.{f.name}", "?")
        if values.get(f.name) is None and f.metadata["required"]:
            raise ConfigError(f"missing required key '{name}.{f.name}'")
        if f.name not in values:
            continue
        value = values[f.name]
        if not type_ok(value, hints[f.name]):
            raise ConfigError(f"{where}: {name}.{f.name}={value!r} has type {type(value).__name__}, "
                              f"expected {type_name(hints[f.name])}")
        problem = value_problem(f, value)
        if problem:
            raise ConfigError(f"{where}: {name}.{f.name}={value!r}: {problem}")
    return cls(**values)


def value_problem(f, value: Any) -> Optional[str]:
    """What is wrong with a well-typed ``value`` of field ``f`` (its choices, its bounds), or None."""
    choices, bounds = f.metadata["choices"], f.metadata.get("bounds")
    if value is None:
        return None
    if choices and value not in choices:
        return f"expected one of {list(choices)}"
    if bounds and not bounds.holds(value):
        return f"expected {bounds}" + (f" ({bounds.why})" if bounds.why else "")
    return None


def type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, List):
        return isinstance(value, list)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, List):
        return "list"
    return getattr(hint, "__name__", str(hint))


def flag_args(section: Any) -> List[Tuple[str, Any]]:
    """(Megatron flag, value) of each one-to-one key of a parsed section."""
    return [(f.metadata["flag"], getattr(section, f.name)) for f in fields(section) if f.metadata["flag"]]


def configuration_markdown() -> str:
    """docs/configuration.md: every key of every section with its type, default and meaning."""
    lines = ["# Configuration keys", "",
             "Generated from `megatron_mesh/config/experiment.py` (and `megatron_mesh/config/model.py` for `model`) by",
             "`python -m megatron_mesh.config.experiment > docs/configuration.md`; `make test` fails when this",
             "file is stale. YAML files may `extends:` others; `--set section.key=value` overrides.",
             "Values outside a key's choices or bounds (below) stop the trainer before megatron starts,",
             "naming the key; the bounds also hold for its Megatron flag after `--`.", ""]
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines += [f"## {name}", "", "| key | type | default | meaning | Megatron flag |", "|---|---|---|---|---|"]
        for f in fields(cls):
            meaning = f.metadata["doc"] + (f"; one of {', '.join(map(str, f.metadata['choices']))}"
                                           if f.metadata["choices"] else "")
            meaning += f"; {f.metadata['bounds']}" if f.metadata["bounds"] else ""
            flag = f"`--{f.metadata['flag']}`" if f.metadata["flag"] else "(derived)"
            lines.append(f"| `{f.name}` | {type_name(hints[f.name])} | {_default_text(f)} | {meaning} | {flag} |")
        lines.append("")
    lines += _model_markdown()
    return "\n".join(lines)


def _default_text(f) -> str:
    """A field's default for the docs: 'required' for keys without one (MeshConfig's layout
    defaults to '')."""
    if f.metadata.get("required") or f.default == "" or (f.default is MISSING and f.default_factory is MISSING):
        return REQUIRED
    default = f.default_factory() if f.default is MISSING else f.default
    return "unset" if default is None else f"`{default}`"


def _model_markdown() -> List[str]:
    from megatron_mesh.config.model import MODEL_KEYS, ROLE, MeshConfig, field_docs

    docs, config_fields = field_docs(), {f.name: f for f in fields(MeshConfig)}
    lines = ["## model", "", "MeshConfig fields (`megatron_mesh/config/model.py`; the rest of a megatron-core",
             "TransformerConfig comes from the other sections).", "", "| key | default | meaning |", "|---|---|---|"]
    for name in MODEL_KEYS:
        choices = config_fields[name].metadata[ROLE].choices
        meaning = docs.get(name, "") + (f"; one of {', '.join(map(str, choices))}" if choices else "")
        lines.append(f"| `{name}` | {_default_text(config_fields[name])} | {meaning} |")
    return lines + [""]


if __name__ == "__main__":
    print(configuration_markdown(), end="")
