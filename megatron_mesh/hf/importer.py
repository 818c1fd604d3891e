"""Hugging Face directory -> a torch_dist checkpoint that ``tools/pretrain_mesh.py`` starts from.

Sources: megatron-mesh exports (``model_type: megatron_mesh``), GPT-NeoX models such as
Pythia (``model_type: gpt_neox``) and Llama-style ones (``llama``: Llama 2 and 3, TinyLlama;
``qwen2``; hf/llama.py). The checkpoint is a Megatron *release* checkpoint
(``latest_checkpointed_iteration.txt`` says ``release``): the trainer loads its weights and
starts at iteration 0 with a fresh optimizer and schedule. torch_dist stores every tensor whole,
so the same checkpoint loads at any tensor/pipeline-parallel size.

A vanilla GPT-NeoX model can seed a recursive layout of the same compute depth
(``recursive_from_vanilla``): the prelude takes the first P layers, the coda the last D, and
core layer j takes, by ``core_init``,
  - ``average``: the mean of the K layers it replaces in the unrolled order, P + k*C + j;
  - ``lower``: layer P + j (the first loop's layers);
  - ``stepwise``: layer P + j*K (every K-th layer of the middle section).
(The Average / Lower / Stepwise rules of Bae et al., 2024, "Relaxed Recursive Transformers".)
Untied layouts take every layer exactly. State-scheme parameters (routers, coefficients) start
from the config's initialisation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mesh.errors import CheckpointError, ConfigError
from megatron_mesh.checkpoint.reader import build_model, parameter_shapes
from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
from megatron_mesh.config.model import MeshConfig
from megatron_mesh.data.tokenizer import TokenizerSource, TokenizerSpecError, tokenizer_source
from megatron_mesh.fs import check_writable
from megatron_mesh.hf import llama
from megatron_mesh.hf.retrofit import RETROFIT_SCHEME, LayerSelection, retrofit_state
from megatron_mesh.hf.mapping import gpt_neox_to_megatron, hf_activation, hf_mesh_section, hf_mesh_to_megatron
from megatron_mesh.recurrence.layout import Layout, parse_layout

CORE_INIT_RULES = ("average", "lower", "stepwise")


def read_hf_directory(path) -> Tuple[dict, Dict[str, Tensor]]:
    """config.json and every weight of an HF model directory (safetensors or .bin, sharded or not)."""
    return read_hf_config(path), _read_weights(Path(path))


def read_hf_config(path) -> dict:
    """An HF model directory's config.json."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
    return _read_json(config_file)


def hf_model_config(path, config: dict) -> MeshConfig:
    """The MeshConfig of an HF model directory's ``config`` (``model_section_from_hf``), its
    errors naming the directory's config.json."""
    try:
        return MeshConfig.from_section(model_section_from_hf(config), use_cpu_initialization=True)
    except (CheckpointError, ConfigError) as err:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {str(err).removeprefix('config.json: ')}") from None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err


def _read_weight_file(file: Path) -> Dict[str, Tensor]:
    """One weight file; a truncated or corrupt one is named (safetensors and torch.load say
    only what failed, not where)."""
    from safetensors.torch import load_file

    try:
        if file.name.endswith(".safetensors"):
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{file}: listed in the index but missing") from err
    except Exception as err:  # noqa: BLE001  (safetensors and pickle raise many types)
        raise CheckpointError(f"{file}: unreadable, truncated or corrupt "
                              f"({type(err).__name__}: {err})") from err


def _read_weights(path: Path) -> Dict[str, Tensor]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        files = (sorted(set(_read_json(index)["weight_map"].values()))
                 if index.is_file() else [single] if (path / single).is_file() else [])
        if not files:
            continue
        state: Dict[str, Tensor] = {}
        for name in files:
            state.update(_read_weight_file(path / name))
        return state
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or their index files")


def model_section_from_hf(config: dict) -> dict:
    """The YAML ``model:`` section (MeshConfig fields) of an HF config: a megatron-mesh export's
    read back by the fields' HF names (``mapping.hf_mesh_section``), a GPT-NeoX model's from
    GPT-NeoX's own keys."""
    kind = config.get("model_type")
    if kind == "megatron_mesh":
        return hf_mesh_section(config)
    if kind == "gpt_neox":
        return _from_gpt_neox_config(config)
    if kind in llama.MODEL_TYPES:
        return llama.section_from_hf(config, _required)
    raise CheckpointError(f"config.json: model_type={kind!r}: expected one of "
                          f"{['gpt_neox', *llama.MODEL_TYPES, 'megatron_mesh']}")


def _required(config: dict, key: str, kind: type = int):
    """config[key], which a megatron-mesh model cannot do without: a CheckpointError naming the
    key and what was expected when it is missing or of another type."""
    if key not in config:
        raise CheckpointError(f"config.json: no '{key}': a {config.get('model_type')} model needs it "
                              f"(expected {kind.__name__})")
    value = config[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"config.json: {key}={value!r}: expected {kind.__name__}, got "
                              f"{type(value).__name__}")
    return value


def _from_gpt_neox_config(config: dict) -> dict:
    # megatron-mesh's GPT-NeoX is Pythia's: parallel residual, untied output layer, biases,
    # unscaled rotary; anything else would load but compute something different.
    expected = {"use_parallel_residual": True, "tie_word_embeddings": False,
                "attention_bias": True, "rope_scaling": None}
    for key, want in expected.items():
        if config.get(key, want) != want:
            raise CheckpointError(f"config.json: {key}={config[key]!r}: megatron-mesh supports {want!r}")
    return dict(
        layout=str(_required(config, "num_hidden_layers")), state_scheme="vanilla",
        scale_embeddings=False,
        hidden_size=_required(config, "hidden_size"),
        num_attention_heads=_required(config, "num_attention_heads"),
        ffn_hidden_size=_required(config, "intermediate_size"),
        vocab_size=_required(config, "vocab_size"),
        max_sequence_length=_required(config, "max_position_embeddings"),
        rotary_percent=config.get("rotary_pct", 0.25),
        rotary_base=config.get("rotary_emb_base", 10000),
        layernorm_epsilon=config.get("layer_norm_eps", 1e-5),
        init_method_std=config.get("initializer_range", 0.02),
        gelu_approximation=hf_activation(config.get("hidden_act", "gelu")),  # GPTNeoXConfig's default
    )


def megatron_state_from_hf(hf_config: dict, hf_state: Dict[str, Tensor],
                           config: MeshConfig) -> Dict[str, Tensor]:
    """The HF weights (of ``hf_config``, whose MeshConfig is ``config``) under MeshGPTModel
    state-dict names."""
    try:
        if hf_config["model_type"] == "gpt_neox":
            return gpt_neox_to_megatron(hf_state, config.parsed_layout)
        if hf_config["model_type"] in llama.MODEL_TYPES:
            return llama.from_hf_state(hf_state, config)
        return hf_mesh_to_megatron(hf_state, list(parameter_shapes(config)), config)
    except KeyError as err:
        raise CheckpointError(f"config.json and the weights disagree: {err.args[0]}") from None


def recursive_from_vanilla(state: Dict[str, Tensor], vanilla: Layout, target: Layout,
                           core_init: str = "average") -> Dict[str, Tensor]:
    """A vanilla model's layers arranged into ``target`` (same depth); see the module docstring."""
    if core_init not in CORE_INIT_RULES:
        raise CheckpointError(f"core_init={core_init!r}: expected one of {CORE_INIT_RULES}")
    if target.n_compute != vanilla.n_compute:
        raise CheckpointError(f"layout={target}: N_compute {target.n_compute} differs from the source "
                           f"model's {vanilla.n_compute} layers")
    out = {k: v for k, v in state.items() if not k.startswith("decoder.prelude.")}

    def copy(dst: str, sources: List[int]) -> None:
        for src_name, tensor in state.items():
            if src_name.startswith(f"decoder.prelude.{sources[0]}."):
                suffix = src_name[len(f"decoder.prelude.{sources[0]}."):]
                stack = [state[f"decoder.prelude.{i}.{suffix}"] for i in sources]
                out[f"{dst}.{suffix}"] = torch.stack(stack).mean(0) if len(stack) > 1 else tensor

    P, K = target.prelude, target.num_loops
    for j in range(P):
        copy(f"decoder.prelude.{j}", [j])
    for j in range(target.coda):
        copy(f"decoder.coda.{j}", [vanilla.n_compute - target.coda + j])
    if target.tied:
        C = target.core[0]
        rule = {"average": lambda j: [P + k * C + j for k in range(K)],
                "lower": lambda j: [P + j], "stepwise": lambda j: [P + j * K]}[core_init]
        for j in range(C):
            copy(f"decoder.cores.0.{j}", rule(j))
    else:
        start = P
        for c, layers in enumerate(target.core):
            for j in range(layers):
                copy(f"decoder.cores.{c}.{j}", [start + j])
            start += layers
    return out


def hf_to_megatron(source, output, *, layout: Optional[str] = None, state_scheme: Optional[str] = None,
                   core_init: str = "average", buffer_slots: Optional[int] = None,
                   scale_embeddings: Optional[bool] = None, tokenizer: Optional[str] = None,
                   force: bool = False, seed: int = 1234) -> Path:
    """Convert an HF directory; ``layout``/``state_scheme`` re-shape a vanilla source (module doc)."""
    hf_config, config, tokenizer = _open_source(source, output, tokenizer, force)
    state = megatron_state_from_hf(hf_config, _read_weights(Path(source)), config)
    fresh: Tuple[str, ...] = ()
    if layout is not None or state_scheme is not None:
        config, state = _reshape(config, state, layout=layout, state_scheme=state_scheme,
                                 core_init=core_init, buffer_slots=buffer_slots)
        fresh = ("decoder.scheme.",)
    if scale_embeddings is not None and scale_embeddings != config.scale_embeddings:
        config, state = _rescale_embeddings(config, state, scale_embeddings)
    model = build_model(config, state, fresh, seed)
    return save_release_checkpoint(model, checkpoint_args(config, tokenizer), output, force)


@dataclass(frozen=True)
class Retrofitted:
    """What ``retrofit`` wrote."""

    path: Path
    selection: LayerSelection
    dropped: Tuple[int, ...]
    """The source layers the retrofitted model does without."""
    exact: bool
    """Whether at one loop step it computes the source without ``dropped``, exactly (its
    state scheme starts as a plain layer stack)."""


def retrofit(source, output, *, layout: str, layers: Optional[str] = None,
             state_scheme: str = RETROFIT_SCHEME, buffer_slots: Optional[int] = None,
             tokenizer: Optional[str] = None, force: bool = False, seed: int = 1234) -> Retrofitted:
    """A vanilla HF model's layers as the tied layout ``layout`` (hf/retrofit.py): ``layers``
    chooses them ('0-3,10-17,18-21'), by default the paper's rule (LayerSelection.default)."""
    hf_config, config, tokenizer = _open_source(source, output, tokenizer, force)
    if config.state_scheme != "vanilla":
        raise CheckpointError(f"{source}: --retrofit takes a vanilla model; this one is "
                              f"layout={config.layout!r} state_scheme={config.state_scheme!r}")
    target = _tied_layout(layout)
    selection = LayerSelection.parse(layers) if layers else LayerSelection.default(target, config.num_layers)
    selection.check(target, config.num_layers)
    state = retrofit_state(megatron_state_from_hf(hf_config, _read_weights(Path(source)), config), selection)
    changes = dict(layout=str(target), state_scheme=state_scheme)
    if buffer_slots is not None:
        changes["buffer_slots"] = buffer_slots
    retrofitted = _rebuilt(config, **changes)
    model = build_model(retrofitted, state, ("decoder.scheme.",), seed)
    exact = model.decoder.scheme.init_as_layer_stack()
    path = save_release_checkpoint(model, checkpoint_args(retrofitted, tokenizer), output, force)
    return Retrofitted(path, selection, selection.dropped(config.num_layers), exact)


def _tied_layout(layout: str) -> Layout:
    try:
        target = parse_layout(layout)
    except ValueError as err:
        raise ConfigError(f"--layout: {err}") from None
    if not (target.recursive and target.tied):
        raise ConfigError(f"--layout {layout}: a retrofit makes a tied looped model, expected "
                          f"'P+CRK+D' such as 4+8R4+4")
    return target


def _open_source(source, output, tokenizer: Optional[str], force: bool) -> Tuple[dict, MeshConfig, Optional[str]]:
    """(config.json, its MeshConfig, the tokenizer to record) of an HF directory, checked
    before the (slow) read of its weights; ``output`` checked writable first."""
    check_writable(Path(output), force)
    if tokenizer:
        tokenizer = _local_paths_absolute(tokenizer_source(tokenizer, "--tokenizer"))
    hf_config = read_hf_config(source)
    return hf_config, hf_model_config(source, hf_config), tokenizer or _tokenizer_of(source)


def _rescale_embeddings(config: MeshConfig, state: Dict[str, Tensor],
                        scale_embeddings: bool) -> Tuple[MeshConfig, Dict[str, Tensor]]:
    """The same h_emb either way: the table absorbs the sqrt(d) factor the model now applies
    (or no longer does)."""
    factor = math.sqrt(config.hidden_size)
    table = state["embedding.word_embeddings.weight"]
    state = dict(state, **{"embedding.word_embeddings.weight":
                           table / factor if scale_embeddings else table * factor})
    return _rebuilt(config, scale_embeddings=scale_embeddings), state


def _rebuilt(config: MeshConfig, **changes) -> MeshConfig:
    """``config`` with some model keys changed, the unset ones filled anew (e.g. buffer_slots
    for another K)."""
    return MeshConfig.from_section({**config.model_section(), **changes}, use_cpu_initialization=True)


def _tokenizer_of(source) -> Optional[str]:
    """The HF directory itself where it holds a tokenizer by the one tokenizer rule."""
    try:
        return _local_paths_absolute(tokenizer_source(str(source)))
    except TokenizerSpecError:
        return None


def _local_paths_absolute(source: TokenizerSource) -> str:
    """What the checkpoint records: local paths absolute, so an export from elsewhere finds them."""
    return source.spec if source.kind == "hub_name" else str(Path(source.spec).expanduser().resolve())


def _reshape(config: MeshConfig, state: Dict[str, Tensor], *, layout: Optional[str],
             state_scheme: Optional[str], core_init: str,
             buffer_slots: Optional[int]) -> Tuple[MeshConfig, Dict[str, Tensor]]:
    if config.state_scheme != "vanilla":
        raise CheckpointError(f"--layout/--state-scheme re-shape vanilla models only; the source is "
                              f"layout={config.layout!r} state_scheme={config.state_scheme!r}")
    target = parse_layout(layout or config.layout)
    scheme = state_scheme or ("base" if target.recursive else "vanilla")
    state = recursive_from_vanilla(state, config.parsed_layout, target, core_init)
    changes = {"layout": str(target), "state_scheme": scheme}
    if buffer_slots is not None:
        changes["buffer_slots"] = buffer_slots
    return _rebuilt(config, **changes), state
