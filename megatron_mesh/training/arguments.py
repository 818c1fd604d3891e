"""The experiment YAML (see ``yaml_config.SCHEMA``) as Megatron-LM command-line arguments.

``megatron_argv`` is the one place where configuration becomes Megatron's arguments. The model
section also travels whole, as JSON in ``--mesh-model``, so the model provider (and every
checkpoint's saved args) can rebuild the exact ``MeshConfig``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from typing import Any, Dict, List

from megatron_mesh.unrolled import stage_bounds
from megatron_mesh.yaml_config import ConfigError, model_config

CHOICES = {
    ("precision", "dtype"): ("bf16", "fp16", "fp32"),
    ("schedule", "style"): ("cosine", "linear", "constant", "inverse-square-root", "WSD"),
    ("optimizer", "name"): ("adamw",),
    ("checkpointing", "format"): ("torch_dist", "torch"),
    ("logging", "wandb_mode"): ("online", "offline", "disabled"),
    ("parallelism", "transformer_impl"): ("auto", "local", "transformer_engine"),
    ("parallelism", "recompute_granularity"): ("full", "selective"),
    ("parallelism", "recompute_method"): ("uniform", "block"),
    ("data", "format"): ("gpt", "pythia_preshuffled"),
    ("data", "pythia_boundary"): ("per_row", "contiguous", "contiguous_masked"),
}

INT, FLOAT, BOOL = int, float, bool
TYPES = {
    "training": dict(seq_length=INT, micro_batch_size=INT, global_batch_size=INT, train_iters=INT,
                     train_tokens=FLOAT, seed=INT, eval_interval=INT, eval_iters=INT, exit_interval=INT),
    "optimizer": dict(lr=FLOAT, eps=FLOAT, weight_decay=FLOAT, clip_grad=FLOAT),
    "schedule": dict(warmup_fraction=FLOAT, warmup_iters=INT, min_lr_ratio=FLOAT, decay_iters=INT),
    "parallelism": dict(tensor=INT, pipeline=INT, virtual_pipeline=INT, sequence_parallel=BOOL,
                        distributed_optimizer=BOOL,
                        overlap_grad_reduce=BOOL, overlap_param_gather=BOOL, recompute_num_layers=INT),
    "data": dict(mock=BOOL, mask_eod_loss=BOOL, num_workers=INT),
    "tokenizer": dict(vocab_size=INT),
    "checkpointing": dict(interval=INT, save_on_signal=BOOL, async_save=BOOL, optimizer_reshardable=BOOL,
                          verify=BOOL),
    "logging": dict(interval=INT, throughput=BOOL, peak_tflops=FLOAT, router_metrics=BOOL),
}
"""Value types of non-model keys (the model section is typed by MeshConfig)."""

REQUIRED = (
    ("training", "seq_length"),
    ("training", "micro_batch_size"),
    ("training", "global_batch_size"),
    ("optimizer", "lr"),
)


def _get(tree: dict, section: str, key: str, default: Any = None) -> Any:
    return (tree.get(section) or {}).get(key, default)


def _type_ok(value: Any, expected: type) -> bool:
    if value is None or expected is BOOL:
        return value is None or isinstance(value, bool)
    if expected is FLOAT:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)


def _check_types(tree: dict, origins: Dict[str, str]) -> None:
    for section, types in TYPES.items():
        for key, expected in types.items():
            value = _get(tree, section, key)
            if not _type_ok(value, expected):
                raise ConfigError(
                    f"{origins.get(f'{section}.{key}', '?')}: {section}.{key}={value!r} has type "
                    f"{type(value).__name__}, expected {expected.__name__}")


def _check_pipeline(tree: dict, origins: Dict[str, str]) -> None:
    """The stage split is valid, and no setting the replicated core weights cannot follow."""
    par = tree.get("parallelism") or {}
    ranks, virtual = par.get("pipeline", 1), par.get("virtual_pipeline") or 1
    stages, split = ranks * virtual, par.get("pipeline_stage_layers")
    where = origins.get("parallelism.pipeline", "?")
    if virtual > 1 and ranks < 2:
        raise ConfigError(f"{origins.get('parallelism.virtual_pipeline', where)}: "
                          f"parallelism.virtual_pipeline={virtual} needs pipeline >= 2 (got {ranks})")
    if ranks > 1 and par.get("overlap_grad_reduce"):
        raise ConfigError(
            f"{where}: parallelism.overlap_grad_reduce with pipeline={ranks} is not supported: "
            "core weights held by several stages sum their gradients over those stages before "
            "the data-parallel reduction, which overlap would start during the backward pass")
    if stages > 1 or split is not None:
        try:
            stage_bounds(model_config(tree, origins, use_cpu_initialization=True).num_layers,
                         stages, split)
        except ValueError as err:
            raise ConfigError(f"{origins.get('parallelism.pipeline_stage_layers', where)}: {err}") from None
    if virtual == 1 and ranks > 2 and split is not None and sum(split[1:-1]) % (ranks - 2):
        raise ConfigError(
            f"{origins.get('parallelism.pipeline_stage_layers', where)}: pipeline_stage_layers="
            f"{list(split)}: megatron's validate_args needs the middle stages' {sum(split[1:-1])} "
            f"layer applications divisible by {ranks - 2} stages (the model itself builds any split)")


def _pipeline_args(par: dict) -> List[str]:
    """Pipeline flags. megatron's validate_args wants N_compute divisible by the stage count
    unless first/last stage sizes are given; the model builds its stages itself, so an uneven
    split passes its first and last counts (the middle ones must then sum to a multiple of
    their number, which _check_pipeline checks). With virtual stages megatron checks no layer
    counts (given --num-virtual-stages-per-pipeline-rank), so only the split itself is passed."""
    ranks, split = par.get("pipeline", 1), par.get("pipeline_stage_layers")
    virtual = par.get("virtual_pipeline") or 1
    args = [*_flag("pipeline-model-parallel-size", ranks)]
    if virtual > 1:
        args += [*_flag("num-virtual-stages-per-pipeline-rank", virtual)]
    if ranks > 1 and split is not None:
        args += [*_flag("mesh-pipeline-stage-layers", split)]
        if virtual == 1 and len(set(split)) > 1:
            args += [*_flag("decoder-first-pipeline-num-layers", split[0]),
                     *_flag("decoder-last-pipeline-num-layers", split[-1])]
    return args


def _check(tree: dict, origins: Dict[str, str]) -> None:
    _check_types(tree, origins)
    _check_pipeline(tree, origins)
    for section, key in REQUIRED:
        if _get(tree, section, key) is None:
            raise ConfigError(f"missing required key '{section}.{key}'")
    for (section, key), allowed in CHOICES.items():
        value = _get(tree, section, key)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"{origins.get(f'{section}.{key}', '?')}: {section}.{key}={value!r}: "
                f"expected one of {list(allowed)}"
            )
    training = tree["training"]
    if (training.get("train_iters") is None) == (training.get("train_tokens") is None):
        raise ConfigError("set exactly one of 'training.train_iters' and 'training.train_tokens'")
    betas = _get(tree, "optimizer", "betas", [0.9, 0.95])
    if not (isinstance(betas, list) and len(betas) == 2):
        raise ConfigError(
            f"{origins.get('optimizer.betas', '?')}: optimizer.betas={betas!r}: expected [beta1, beta2]"
        )


def train_iters(tree: dict) -> int:
    """training.train_iters, or training.train_tokens rounded up to whole global batches."""
    training = tree["training"]
    if training.get("train_iters") is not None:
        return int(training["train_iters"])
    tokens_per_iter = training["global_batch_size"] * training["seq_length"]
    return math.ceil(training["train_tokens"] / tokens_per_iter)


def _flag(name: str, value: Any) -> List[str]:
    """--name value; booleans are bare flags (False: omitted); lists expand."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{name}"]
    if isinstance(value, list):
        return [f"--{name}", *[str(v) for v in value]]
    return [f"--{name}", str(value)]


def _model_args(tree: dict, origins: Dict[str, str]) -> List[str]:
    cfg = model_config(tree, origins, use_cpu_initialization=True)  # validates the section
    model = tree["model"]
    return [
        *_flag("num-layers", cfg.num_layers),  # N_compute: every core application
        *_flag("hidden-size", cfg.hidden_size),
        *_flag("ffn-hidden-size", cfg.ffn_hidden_size),
        *_flag("num-attention-heads", cfg.num_attention_heads),
        *_flag("kv-channels", cfg.kv_channels),
        *_flag("max-position-embeddings", cfg.max_sequence_length),
        *_flag("position-embedding-type", "rope"),
        *_flag("rotary-percent", cfg.rotary_percent),
        *_flag("rotary-base", cfg.rotary_base),
        *_flag("normalization", "LayerNorm"),
        *_flag("norm-epsilon", cfg.layernorm_epsilon),
        *_flag("init-method-std", cfg.init_method_std),
        *_flag("hidden-dropout", cfg.hidden_dropout),
        *_flag("attention-dropout", cfg.attention_dropout),
        *_flag("untie-embeddings-and-output-weights", True),
        *_flag("padded-vocab-size", cfg.vocab_size),
        *_flag("mesh-model", json.dumps(model, sort_keys=True)),
    ]


def _as_list(value):
    return [value] if isinstance(value, str) else value


def _data_paths(data: dict) -> List[str]:
    """One blend split by data.split, or separate train/valid/test blends."""
    if data.get("valid_path") or data.get("test_path"):
        return [*_flag("train-data-path", _as_list(data["path"])),
                *_flag("valid-data-path", _as_list(data.get("valid_path"))),
                *_flag("test-data-path", _as_list(data.get("test_path")))]
    return [*_flag("data-path", _as_list(data.get("path"))), *_flag("split", data.get("split", "969,30,1"))]


def _data_args(tree: dict) -> List[str]:
    data = tree.get("data") or {}
    tok = tree.get("tokenizer") or {}
    if not data.get("mock") and not data.get("path"):
        raise ConfigError("no training data: set 'data.path' (indexed dataset prefixes) or 'data.mock: true'")
    fmt = data.get("format", "gpt")
    if fmt == "pythia_preshuffled" and (data.get("mock") or len(_as_list(data["path"])) != 1):
        raise ConfigError("data.format=pythia_preshuffled reads exactly one merged file: "
                          f"expected one data.path prefix, got {data.get('path')!r}")
    return [
        *_flag("mock-data", bool(data.get("mock"))),
        *(_data_paths(data) if data.get("path") else []),
        *_flag("mesh-data-format", fmt),
        *_flag("mesh-pythia-boundary", data.get("pythia_boundary", "per_row")),
        *_flag("eod-mask-loss", data.get("mask_eod_loss", False)),
        *_flag("num-workers", data.get("num_workers", 2)),
        *_flag("data-cache-path", data.get("cache_path")),
        *_flag("tokenizer-type", tok.get("type", "HuggingFaceTokenizer")),
        *_flag("tokenizer-model", tok.get("model")),
        *_flag("vocab-size", tok.get("vocab_size")),
        *_flag("no-create-attention-mask-in-dataloader", True),  # causal mask made in attention
    ]


def _training_args(tree: dict) -> List[str]:
    t, opt, sch = tree["training"], tree.get("optimizer") or {}, tree.get("schedule") or {}
    beta1, beta2 = opt.get("betas", [0.9, 0.95])
    iters = train_iters(tree)
    warmup = (
        _flag("lr-warmup-iters", sch["warmup_iters"])
        if "warmup_iters" in sch
        else _flag("lr-warmup-fraction", sch.get("warmup_fraction", 0.01))
    )
    return [
        *_flag("seq-length", t["seq_length"]),
        *_flag("micro-batch-size", t["micro_batch_size"]),
        *_flag("global-batch-size", t["global_batch_size"]),
        *_flag("train-iters", iters),
        *_flag("seed", t.get("seed", 1234)),
        *_flag("eval-interval", t.get("eval_interval", 1000)),
        *_flag("eval-iters", t.get("eval_iters", 0)),
        *_flag("exit-interval", t.get("exit_interval")),
        *_flag("optimizer", "adam"),  # Megatron's adam is AdamW (decoupled weight decay)
        *_flag("lr", opt["lr"]),
        *_flag("min-lr", opt["lr"] * sch.get("min_lr_ratio", 0.1)),
        *_flag("adam-beta1", beta1),
        *_flag("adam-beta2", beta2),
        *_flag("adam-eps", opt.get("eps", 1e-8)),
        *_flag("weight-decay", opt.get("weight_decay", 0.01)),
        *_flag("clip-grad", opt.get("clip_grad", 1.0)),
        *_flag("lr-decay-style", sch.get("style", "cosine")),
        *_flag("lr-decay-iters", sch.get("decay_iters", iters)),
        *warmup,
    ]


def _system_args(tree: dict) -> List[str]:
    par, ckpt, log = (tree.get(s) or {} for s in ("parallelism", "checkpointing", "logging"))
    dtype = _get(tree, "precision", "dtype", "bf16")
    impl = _transformer_impl(par.get("transformer_impl", "auto"))
    return [
        *_flag("bf16", dtype == "bf16"),
        *_flag("fp16", dtype == "fp16"),
        *_flag("tensor-model-parallel-size", par.get("tensor", 1)),
        *_pipeline_args(par),
        *_flag("sequence-parallel", par.get("sequence_parallel", False)),
        *_flag("use-distributed-optimizer", par.get("distributed_optimizer", False)),
        *_flag("overlap-grad-reduce", par.get("overlap_grad_reduce", False)),
        *_flag("overlap-param-gather", par.get("overlap_param_gather", False)),
        *_flag("recompute-granularity", par.get("recompute_granularity")),
        *_flag("recompute-method", par.get("recompute_method")),
        *_flag("recompute-num-layers", par.get("recompute_num_layers")),
        *_flag("transformer-impl", impl),
        *_gradient_accumulation_fusion_args(),
        # the local spec's torch LayerNorm refuses apex's persistent-LN flag (torch_norm.py:48)
        *_flag("no-persist-layer-norm", impl == "local"),
        *_flag("save", ckpt.get("save")),
        # Megatron requires an interval with --save; by default save only at the end
        *_flag("save-interval", ckpt.get("interval") or (train_iters(tree) if ckpt.get("save") else None)),
        *_flag("load", ckpt.get("load", ckpt.get("save"))),
        # weights to start from when `load` holds no checkpoint yet (a converted model)
        *_flag("pretrained-checkpoint", ckpt.get("pretrained")),
        *_flag("ckpt-format", ckpt.get("format", "torch_dist")),
        *_flag("exit-signal-handler", ckpt.get("save_on_signal", True)),
        *_flag("async-save", ckpt.get("async_save", False)),
        # the distributed optimizer's state in a layout any TP/PP can load (slower saves);
        # megatron's default layout resumes at another DP size only
        *_flag("dist-ckpt-optim-fully-reshardable", ckpt.get("optimizer_reshardable", False)),
        # resume only from a checkpoint whose files match their integrity manifest's hashes
        *_flag("mesh-skip-checkpoint-verification", not ckpt.get("verify", True)),
        *_flag("log-interval", log.get("interval", 10)),
        *_flag("tensorboard-dir", log.get("tensorboard_dir")),
        *_flag("log-timers-to-tensorboard", bool(log.get("tensorboard_dir"))),
        *_flag("log-validation-ppl-to-tensorboard", bool(log.get("tensorboard_dir"))),
        *_flag("wandb-project", log.get("wandb_project") if log.get("wandb_mode") != "disabled" else None),
        *_flag("wandb-entity", log.get("wandb_entity")),
        *_flag("wandb-exp-name", log.get("wandb_name")),
        *_flag("wandb-save-dir", log.get("wandb_dir")),
        *_flag("log-throughput", log.get("throughput", True)),
        *_flag("mesh-peak-tflops", log.get("peak_tflops")),
        *_flag("mesh-router-metrics", log.get("router_metrics", True)),
    ]


def _gradient_accumulation_fusion_args() -> List[str]:
    """Off unless apex's CUDA extension is importable: megatron's ColumnParallelLinear (our LM
    head) raises at model build when the fusion is on without ``fused_weight_gradient_mlp_cuda``
    (tensor_parallel/layers.py:1070), and NGC images ship apex only in some releases. The
    trainer logs the choice."""
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None:
        return []
    return _flag("no-gradient-accumulation-fusion", True)


def _transformer_impl(choice: str) -> str:
    """'auto': TransformerEngine when a GPU and TE are present, else the local spec."""
    if choice != "auto":
        return choice
    import torch

    from megatron_mesh.layers import transformer_engine_available

    return "transformer_engine" if torch.cuda.is_available() and transformer_engine_available() else "local"


def megatron_argv(tree: dict, origins: Dict[str, str]) -> List[str]:
    """Megatron-LM arguments for a loaded experiment tree (``yaml_config.load_config_tree``)."""
    _check(tree, origins)
    return _model_args(tree, origins) + _data_args(tree) + _training_args(tree) + _system_args(tree)


def add_mesh_arguments(parser):
    """Megatron ``extra_args_provider``: the flags megatron-mesh adds to Megatron's parser."""
    group = parser.add_argument_group("megatron-mesh")
    group.add_argument("--mesh-pipeline-stage-layers", type=int, nargs="+", default=None,
                       help="layer applications per pipeline stage, virtual stages in order (default: even split)")
    group.add_argument("--mesh-model", type=str, required=True,
                       help="JSON of the YAML model section (layout, state_scheme, ...)")
    group.add_argument("--mesh-config-file", type=str, default=None,
                       help="the experiment YAML this run was started from (for the record)")
    group.add_argument("--mesh-data-format", choices=["gpt", "pythia_preshuffled"], default="gpt",
                       help="gpt: megatron-core GPTDataset blends; pythia_preshuffled: rows in order")
    group.add_argument("--mesh-pythia-boundary", default="per_row",
                       choices=["per_row", "contiguous", "contiguous_masked"])
    group.add_argument("--mesh-router-metrics", action="store_true",
                       help="log MeSH router statistics to TensorBoard/W&B every log interval")
    group.add_argument("--mesh-skip-checkpoint-verification", action="store_true",
                       help="resume without checking the checkpoint's files against the hashes of "
                            "its integrity manifest (sizes are still checked)")
    group.add_argument("--mesh-peak-tflops", type=float, default=None,
                       help="peak dense TFLOP/s of one device for MFU (default: known GPUs)")
    return parser
