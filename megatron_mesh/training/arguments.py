"""The experiment YAML (typed by ``megatron_mesh.config.experiment``) as Megatron-LM arguments.

``megatron_argv`` is the one place where configuration becomes Megatron's arguments. The model
section also travels whole, as JSON in ``--mesh-model``, so the model provider (and every
checkpoint's saved args) can rebuild the exact ``MeshConfig``.
"""

from __future__ import annotations

import importlib.util
import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_mesh.config.model import MeshConfig, section_json
from megatron_mesh.data.tokenizer import EXPECTED, TokenizerSpecError, tokenizer_source
from megatron_mesh.config.experiment import (SECTIONS, Data, Experiment, Logging, Parallelism, Tokenizer, Training,
                                             flag_args, parse_experiment, type_ok, value_problem)
from megatron_mesh.config.yaml_file import model_config
from megatron_mesh.errors import ConfigError
from megatron_mesh.recurrence.loop_depth import LoopDepth
from megatron_mesh.recurrence.unrolled import stage_bounds


def _parsed(tree: dict, origins: Dict[str, str]) -> Tuple[Experiment, MeshConfig]:
    """The typed experiment and model config, with the checks no single key can make."""
    exp = parse_experiment(tree, origins)
    cfg = model_config(tree, origins, use_cpu_initialization=True)  # validates the section
    _check_pipeline(exp, cfg, origins)
    _check_loop_depth(exp, cfg, origins)
    _check_exit_gate(exp, cfg, origins)
    if (exp.training.train_iters is None) == (exp.training.train_tokens is None):
        raise ConfigError("set exactly one of 'training.train_iters' and 'training.train_tokens'")
    _check_wandb(exp.logging, origins)
    betas = exp.optimizer.betas
    if len(betas) != 2 or not all(type_ok(b, float) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"{origins.get('optimizer.betas', '?')}: optimizer.betas={betas!r}: "
                          f"expected [beta1, beta2], each 0 <= beta < 1")
    _check_schedule(exp, origins)
    return exp, cfg


def _check_schedule(exp: Experiment, origins: Dict[str, str]) -> None:
    """What megatron's scheduler asserts (optimizer_param_scheduler.py): warmup < decay steps
    (:160), WSD given its decay steps (:164)."""
    warmup, decay = exp.schedule.warmup_iters, exp.schedule.decay_iters or train_iters(exp.training)
    if warmup is not None and warmup >= decay:
        raise ConfigError(f"{origins.get('schedule.warmup_iters', '?')}: schedule.warmup_iters={warmup}: "
                          f"expected fewer than the {decay} decay iterations (schedule.decay_iters, "
                          f"default training.train_iters)")
    wsd = exp.schedule.wsd_decay_iters
    where = origins.get("schedule.wsd_decay_iters", origins.get("schedule.style", "?"))
    if exp.schedule.style == "WSD" and wsd is None:  # megatron's scheduler asserts it (:164)
        raise ConfigError(f"{where}: schedule.style=WSD needs schedule.wsd_decay_iters, the "
                          f"iterations of its final decay (e.g. a fifth of the {decay})")
    if exp.schedule.style == "WSD" and wsd > decay:
        raise ConfigError(f"{where}: schedule.wsd_decay_iters={wsd}: expected at most the {decay} "
                          f"decay iterations (schedule.decay_iters, default training.train_iters)")


HF_TOKENIZER = "HuggingFaceTokenizer"
FILE_TOKENIZERS = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer")


def check_tokenizer(tok: Tokenizer, origins: Dict[str, str]) -> None:
    """tokenizer.model by the one tokenizer rule (megatron_mesh.data.tokenizer) before megatron
    starts: megatron would otherwise fail ~25 s later inside transformers' hub-name check."""
    where = origins.get("tokenizer.model", origins.get("tokenizer.type", "?"))
    if tok.type == HF_TOKENIZER:
        if not tok.model:
            raise ConfigError(f"{where}: tokenizer.model is unset: tokenizer.type={HF_TOKENIZER} needs "
                              f"{EXPECTED} (mock data needs none: tokenizer.type: NullTokenizer with "
                              f"tokenizer.vocab_size)")
        try:
            source = tokenizer_source(tok.model, "tokenizer.model")
        except TokenizerSpecError as err:
            raise ConfigError(f"{where}: {err}") from None
        if source.kind == "sentencepiece":
            raise ConfigError(f"{where}: tokenizer.model={tok.model!r} is a SentencePiece model: set "
                              f"tokenizer.type: SentencePieceTokenizer")
    elif tok.type in FILE_TOKENIZERS and not (tok.model and Path(tok.model).expanduser().is_file()):
        raise ConfigError(f"{where}: tokenizer.model={tok.model!r}: tokenizer.type={tok.type} needs "
                          f"the path of an existing tokenizer model file")


def _check_pipeline(exp: Experiment, cfg: MeshConfig, origins: Dict[str, str]) -> None:
    """The stage split is valid, and no setting the replicated core weights cannot follow."""
    par = exp.parallelism
    ranks, virtual, split = par.pipeline, par.virtual_pipeline or 1, par.pipeline_stage_layers
    where = origins.get("parallelism.pipeline", "?")
    if virtual > 1 and ranks < 2:
        raise ConfigError(f"{origins.get('parallelism.virtual_pipeline', where)}: "
                          f"parallelism.virtual_pipeline={virtual} needs pipeline >= 2 (got {ranks})")
    if ranks > 1 and par.overlap_grad_reduce:
        raise ConfigError(
            f"{where}: parallelism.overlap_grad_reduce with pipeline={ranks} is not supported: "
            "core weights held by several stages sum their gradients over those stages before "
            "the data-parallel reduction, which overlap would start during the backward pass")
    if ranks * virtual > 1 or split is not None:
        try:
            stage_bounds(cfg.num_layers, ranks * virtual, split)
        except ValueError as err:
            raise ConfigError(f"{origins.get('parallelism.pipeline_stage_layers', where)}: {err}") from None
    if virtual == 1 and ranks > 2 and split is not None and sum(split[1:-1]) % (ranks - 2):
        raise ConfigError(
            f"{origins.get('parallelism.pipeline_stage_layers', where)}: pipeline_stage_layers="
            f"{list(split)}: megatron's validate_args needs the middle stages' {sum(split[1:-1])} "
            f"layer applications divisible by {ranks - 2} stages (the model itself builds any split)")


def _check_loop_depth(exp: Experiment, cfg: MeshConfig, origins: Dict[str, str]) -> None:
    """A sampled depth (or truncated backprop) and the parallel settings it cannot follow."""
    par = exp.parallelism
    where = origins.get("model.loop_depth", origins.get("model.backprop_loops", "?"))
    depth = LoopDepth.of(cfg)
    if depth.varies and par.pipeline > 1:
        problem = cfg.pipeline_depth_problem(par.pipeline * (par.virtual_pipeline or 1),
                                             par.pipeline_stage_layers)
        if problem:
            raise ConfigError(f"{where}: {problem}")
    if par.overlap_grad_reduce and par.recompute_granularity == "full" and depth.grad_steps_vary:
        raise ConfigError(
            f"{where}: model.loop_depth={cfg.loop_depth!r} with backprop_loops="
            f"{cfg.backprop_loops} varies the loop steps that get gradients, which full recompute "
            "turns into a varying number of gradient hooks per core parameter; megatron-core's "
            "DDP with parallelism.overlap_grad_reduce reduces a bucket only when every parameter's "
            "hook fired as often as in the first step (param_and_grad_buffer.py, "
            "golden_per_param_grad_ready_counts) and fails otherwise. Set model.backprop_loops: 1 "
            "(always one step with gradients), or drop overlap_grad_reduce or the recompute")


def _check_exit_gate(exp: Experiment, cfg: MeshConfig, origins: Dict[str, str]) -> None:
    """Exit gates under pipeline parallelism: refused before launch, naming the keys."""
    problem = cfg.exit_gate_pipeline_problem(exp.parallelism.pipeline)
    if problem:
        where = origins.get("model.exit_gate", "?")
        raise ConfigError(f"{where} with {origins.get('parallelism.pipeline', '?')}: {problem}")


def _check_wandb(log: Logging, origins: Dict[str, str]) -> None:
    """W&B asked for where wandb is not installed (the lent GPU image has none): refused here,
    naming the key, rather than as megatron's ImportError once every rank has started."""
    if log.wandb_project and log.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{origins.get('logging.wandb_project', '?')}: logging.wandb_project="
                          f"{log.wandb_project!r} logs to Weights & Biases, but the wandb package is "
                          "not installed: pip install wandb, or set logging.wandb_mode: disabled")


def _pipeline_args(par: Parallelism) -> List[str]:
    """Pipeline flags. megatron's validate_args wants N_compute divisible by the stage count
    unless first/last stage sizes are given; the model builds its stages itself, so an uneven
    split passes its first and last counts (the middle ones must then sum to a multiple of
    their number, which _check_pipeline checks). With virtual stages megatron checks no layer
    counts (given --num-virtual-stages-per-pipeline-rank), so only the split itself is passed."""
    ranks, split, virtual = par.pipeline, par.pipeline_stage_layers, par.virtual_pipeline or 1
    args = [*_flag("pipeline-model-parallel-size", ranks)]
    if virtual > 1:
        args += [*_flag("num-virtual-stages-per-pipeline-rank", virtual)]
    if ranks > 1 and split is not None:
        args += [*_flag("mesh-pipeline-stage-layers", split)]
        if virtual == 1 and len(set(split)) > 1:
            args += [*_flag("decoder-first-pipeline-num-layers", split[0]),
                     *_flag("decoder-last-pipeline-num-layers", split[-1])]
    return args


def train_iters(training: Training) -> int:
    """training.train_iters, or training.train_tokens rounded up to whole global batches."""
    if training.train_iters is not None:
        return int(training.train_iters)
    return math.ceil(training.train_tokens / (training.global_batch_size * training.seq_length))


def _flag(name: str, value: Any) -> List[str]:
    """--name value; booleans are bare flags (False: omitted); lists expand."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{name}"]
    if isinstance(value, list):
        return [f"--{name}", *[str(v) for v in value]]
    return [f"--{name}", str(value)]


def _one_to_one_args(exp: Experiment) -> List[str]:
    """Every key whose field names a Megatron flag (megatron_mesh.config.experiment), as that flag."""
    return [arg for name in SECTIONS for flag, value in flag_args(getattr(exp, name))
            for arg in _flag(flag, value)]


def _model_args(cfg: MeshConfig, given: dict) -> List[str]:
    """The model's Megatron flags, and ``--mesh-model``: the YAML model section ``given``, as
    written rather than ``cfg.model_section()``, so a key it leaves unset still follows a
    Megatron flag given after ``--`` (e.g. ``-- --hidden-dropout 0.1``), as it always has."""
    return [
        *_flag("num-layers", cfg.num_layers),  # N_compute: every core application
        *_flag("hidden-size", cfg.hidden_size),
        *_flag("ffn-hidden-size", cfg.ffn_hidden_size),
        *_flag("num-attention-heads", cfg.num_attention_heads),
        *_flag("kv-channels", cfg.kv_channels),
        *_flag("max-position-embeddings", cfg.max_sequence_length),
        *_flag("position-embedding-type", "rope"),
        *_flag("rotary-percent", cfg.rotary_percent),
        # megatron's flag takes an int; the model reads MeshConfig.rotary_base (--mesh-model)
        *_flag("rotary-base", int(cfg.rotary_base)),
        *_flag("normalization", cfg.normalization),
        *_flag("swiglu", cfg.gated_linear_unit),
        *_flag("disable-bias-linear", not cfg.add_bias_linear),
        *_flag("add-qkv-bias", cfg.add_qkv_bias),
        *_flag("qk-layernorm", cfg.qk_layernorm),
        *_gqa_args(cfg),
        *_flag("use-rope-scaling", cfg.rope_scaling_factor is not None),
        *_flag("rope-scaling-factor", cfg.rope_scaling_factor),
        *_flag("norm-epsilon", cfg.layernorm_epsilon),
        *_flag("init-method-std", cfg.init_method_std),
        *_flag("hidden-dropout", cfg.hidden_dropout),
        *_flag("attention-dropout", cfg.attention_dropout),
        *_flag("untie-embeddings-and-output-weights", not cfg.tie_embeddings),
        *_flag("padded-vocab-size", cfg.vocab_size),
        *_flag("mesh-model", section_json(given)),
    ]


def _gqa_args(cfg: MeshConfig) -> List[str]:
    if cfg.num_query_groups == cfg.num_attention_heads:
        return []
    return ["--group-query-attention", *_flag("num-query-groups", cfg.num_query_groups)]


def _as_list(value):
    return [value] if isinstance(value, str) else value


def _data_args(data: Data) -> List[str]:
    """The derived data flags: one blend split by data.split, or separate train/valid/test blends."""
    if not data.mock and not data.path:
        raise ConfigError("no training data: set 'data.path' (indexed dataset prefixes) or 'data.mock: true'")
    if data.format == "pythia_preshuffled" and (data.mock or len(_as_list(data.path)) != 1):
        raise ConfigError("data.format=pythia_preshuffled reads exactly one merged file: "
                          f"expected one data.path prefix, got {data.path!r}")
    if not data.path:
        paths = []
    elif data.valid_path or data.test_path:
        paths = [*_flag("train-data-path", _as_list(data.path)),
                 *_flag("valid-data-path", _as_list(data.valid_path)),
                 *_flag("test-data-path", _as_list(data.test_path))]
    else:
        paths = [*_flag("data-path", _as_list(data.path)), *_flag("split", data.split)]
    return [*paths, *_flag("no-create-attention-mask-in-dataloader", True)]  # causal mask in attention


def _training_args(exp: Experiment) -> List[str]:
    """The derived training, optimizer and schedule flags."""
    opt, sch = exp.optimizer, exp.schedule
    iters = train_iters(exp.training)
    warmup = (_flag("lr-warmup-iters", sch.warmup_iters) if sch.warmup_iters is not None
              else _flag("lr-warmup-fraction", sch.warmup_fraction))
    return [
        *_flag("train-iters", iters),
        *_flag("optimizer", "adam"),  # Megatron's adam is AdamW (decoupled weight decay)
        *_flag("min-lr", opt.lr * sch.min_lr_ratio),
        *_flag("adam-beta1", opt.betas[0]),
        *_flag("adam-beta2", opt.betas[1]),
        *_flag("lr-decay-iters", sch.decay_iters or iters),
        *warmup,
    ]


def _system_args(exp: Experiment) -> List[str]:
    """The derived precision, parallelism, checkpointing and logging flags."""
    par, ckpt, log = exp.parallelism, exp.checkpointing, exp.logging
    impl = _transformer_impl(par.transformer_impl)
    return [
        *_flag("bf16", exp.precision.dtype == "bf16"),
        *_flag("fp16", exp.precision.dtype == "fp16"),
        *_pipeline_args(par),
        *_flag("transformer-impl", impl),
        *_gradient_accumulation_fusion_args(),
        # the local spec's torch LayerNorm refuses apex's persistent-LN flag (torch_norm.py:48)
        *_flag("no-persist-layer-norm", impl == "local"),
        # Megatron requires an interval with --save; by default save only at the end
        *_flag("save-interval", ckpt.interval or (train_iters(exp.training) if ckpt.save else None)),
        *_flag("load", ckpt.load or ckpt.save),
        # megatron drops --async-save without its persistent worker, with a warning (arguments.py:1741);
        # mcore's writer whatever is installed: its helper processes survive a stop signal
        # (training.stop_signals), nvidia-resiliency-ext's would not
        *_flag("async-save", ckpt.async_save),
        *_flag("use-persistent-ckpt-worker", ckpt.async_save),
        *_flag("async-strategy", "mcore" if ckpt.async_save else None),
        # resume only from a checkpoint whose files match their integrity manifest's hashes
        *_flag("mesh-skip-checkpoint-verification", not ckpt.verify),
        *_flag("log-timers-to-tensorboard", bool(log.tensorboard_dir)),
        *_flag("log-validation-ppl-to-tensorboard", bool(log.tensorboard_dir)),
        *_flag("wandb-project", log.wandb_project if log.wandb_mode != "disabled" else None),
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

    from megatron_mesh.model.layers import transformer_engine_available

    return "transformer_engine" if torch.cuda.is_available() and transformer_engine_available() else "local"


def megatron_argv(tree: dict, origins: Dict[str, str], check_paths: bool = True) -> List[str]:
    """Megatron-LM arguments for a loaded experiment tree (``config.yaml_file.load_config_tree``):
    the one-to-one keys by their fields' flags, then the derived ones. ``check_paths``: also
    check that the files the config names exist and can serve (the tokenizer); off only for
    listing what a config maps to on a machine without its files."""
    exp, cfg = _parsed(tree, origins)
    if check_paths:
        check_tokenizer(exp.tokenizer, origins)
    return (_model_args(cfg, tree["model"]) + _one_to_one_args(exp) + _data_args(exp.data)
            + _training_args(exp) + _system_args(exp))


def check_passthrough(argv: Sequence[str]) -> None:
    """The numbers given after `--` to the flags of bounded keys, checked against those bounds:
    Megatron takes these flags unchecked, and `-- --lr 1e39` would stop ~25 s later as torch's
    overflow in megatron's scheduler; it gets the sentence `--set optimizer.lr=1e39` gets. A
    value that is no number is left to Megatron's parser (which names flag and value)."""
    bounded = {f.metadata["flag"]: (name, f, typing.get_type_hints(cls)[f.name])
               for name, cls in SECTIONS.items() for f in fields(cls)
               if f.metadata["flag"] and f.metadata["bounds"]}
    for i, item in enumerate(argv):
        flag, sep, text = item.partition("=")
        if not flag.startswith("--") or flag[2:] not in bounded:
            continue
        text = text if sep else (argv[i + 1] if i + 1 < len(argv) else "")
        name, f, hint = bounded[flag[2:]]
        number = _number(text, int if int in (hint, *typing.get_args(hint)) else float)
        problem = None if number is None else value_problem(f, number)
        if problem:
            raise ConfigError(f"-- {flag} {text} (the flag of {name}.{f.name}): {problem}")


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        return None


def console_log_dir(tree: dict, origins: Dict[str, str]) -> Optional[Path]:
    """Where each rank appends its whole console output (training.console): logging.log_dir,
    else the save directory's logs/, else nowhere."""
    exp, _ = _parsed(tree, origins)
    directory = exp.logging.log_dir or (exp.checkpointing.save and Path(exp.checkpointing.save) / "logs")
    return Path(directory) if directory else None


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
