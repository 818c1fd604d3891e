"""Typed model configuration: megatron-core's TransformerConfig plus the recursive layout.

``num_layers`` is the depth of the *unrolled* graph (N_compute). megatron-core derives its
output-projection init from it (``scaled_init_method_normal(std, num_layers)``, i.e.
std / sqrt(2 * N_compute)), which is exactly the paper's depth-aware initialisation (App. B).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import textwrap
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mesh.errors import ConfigError
from megatron_mesh.recurrence.exit_gate import EXIT_TRAININGS
from megatron_mesh.recurrence.injection import INITIAL_STATES, InjectionScheme
from megatron_mesh.recurrence.layout import Layout, parse_layout
from megatron_mesh.recurrence.loop_depth import (
    DEPTH_SAMPLERS, DEPTH_UNITS, MEAN_SCHEDULES, LoopDepth, mean_schedule_problem,
)
from megatron_mesh.recurrence.mesh import CYCLE_IMPLEMENTATIONS
from megatron_mesh.recurrence.schemes import (
    carried_state, has_per_step_parameters, normalize_scheme, scheme_class,
)
from megatron_mesh.recurrence.unrolled import loop_step_cut_at, stage_bounds, unrolled_ops

GELU_APPROXIMATIONS = ("none", "tanh")
LAYER_FAMILIES = ("gpt_neox", "llama")

ROLE = "megatron_mesh"
"""The dataclass-metadata key under which a MeshConfig field carries its ``Role``."""


@dataclass(frozen=True)
class Role:
    """What a MeshConfig field is to megatron-mesh, declared once on the field (``metadata``);
    the experiment's model keys, the resume architecture check and the fields taken from
    megatron's arguments are all read from it (``fields_where``)."""

    model_key: bool = True
    """An experiment's ``model:`` section sets it (the rest of the TransformerConfig comes from
    the other sections, i.e. megatron's arguments)."""
    architecture: bool = False
    """It changes the function the weights compute: a resume from a checkpoint whose value
    differs is refused (training/resume.py)."""
    derived_from: str = ""
    """MeshConfig sets it from this other field, so megatron's argument-built value is not
    copied (training/providers.py)."""
    choices: Tuple[Any, ...] = ()
    """The values it may take (checked by MeshConfig, listed in docs/configuration.md)."""
    hf_name: Optional[str] = None
    """Its name in the Hugging Face config.json of an export, which hf/mapping.py writes and
    reads back (``HF_NAMES``). None: an architecture field keeps its own name there (the HF
    model needs every one), any other field is left out (training settings)."""

    def hf_key(self, name: str) -> Optional[str]:
        """The Hugging Face name of the field ``name`` with this role, or None if not exported."""
        return self.hf_name or (name if self.architecture else None)


MODEL = Role()
ARCHITECTURE = Role(architecture=True)
TRAINER = Role(model_key=False)
"""Set by the trainer from the parallel layout, not by the experiment's model section."""


def mesh_field(role: Role, default: Any = MISSING, choices: Tuple[Any, ...] = (),
               hf_name: Optional[str] = None) -> Any:
    role = dataclasses.replace(role, choices=choices, hf_name=hf_name)
    return field(default=default, metadata={ROLE: role})


def inherited(name: str, role: Role, default: Any = MISSING, hf_name: Optional[str] = None) -> Any:
    """megatron-core's TransformerConfig field ``name`` re-declared with a role (and, if given,
    another default and Hugging Face name); its type position, metadata and docstring stay
    megatron's."""
    base = TransformerConfig.__dataclass_fields__[name]
    metadata = {**base.metadata, ROLE: dataclasses.replace(role, hf_name=hf_name)}
    if default is MISSING and base.default_factory is not MISSING:
        return field(default_factory=base.default_factory, metadata=metadata)
    return field(default=base.default if default is MISSING else default, metadata=metadata)


def refuse_unsupported(settings: Dict[str, Tuple[Any, Any]], owner: str) -> None:
    """ConfigError for the first ``name: (value, supported_value)`` whose value is not supported."""
    for name, (value, supported) in settings.items():
        if value != supported:
            raise ConfigError(f"{name}={value!r} is not supported by {owner} (expected {supported!r})")


def section_json(section: Mapping[str, Any]) -> str:
    """A model section as a checkpoint saves it (``args.mesh_model``): JSON, keys sorted."""
    return json.dumps(dict(section), sort_keys=True)


@dataclass
class MeshConfig(TransformerConfig):
    """A Prelude-Recurrent-Coda GPT-NeoX model. Defaults follow Pythia (GPT-NeoX) and the paper."""

    layout: str = mesh_field(ARCHITECTURE, "")
    """'N' (vanilla), 'P+CRK+D' (tied core looped K times) or 'P+C1+...+CK+D' (untied cores)."""

    state_scheme: str = mesh_field(ARCHITECTURE, "mesh")
    """How state passes between loop steps (schemes.SCHEME_NAMES): vanilla, base, residual,
    anchor, anchor_star, mesh, static_comb, dynamic_comb, a '+'-sum of residual/anchor/anchor_star;
    beyond the paper mesh_shared (one router pair for all loop steps) and the input injection of
    Huginn / Parcae: additive_injection, linear_injection, diagonal_injection."""

    buffer_slots: Optional[int] = mesh_field(ARCHITECTURE, None)
    """MeSH buffer length B; default K + 3 (paper App. E.1). Only for mesh and mesh_shared."""

    cycle_impl: str = mesh_field(MODEL, "auto", CYCLE_IMPLEMENTATIONS)
    """MeSH cycle implementation: 'auto' (the fused, compiled cycle of fused_mesh.py on CUDA,
    the eager one on CPU), 'fused' or 'eager' everywhere. Same math."""

    cycle_compile_fallback: bool = mesh_field(MODEL, False)
    """Where the fused MeSH cycle is compiled (CUDA) and torch.compile fails: stop with
    fused_mesh.CompileFailure (False) or warn and run it uncompiled (True): the same math with
    several more passes over the [B, s, b, h] buffer per loop step, a throughput loss a large job
    should choose rather than meet."""

    initial_state: str = mesh_field(ARCHITECTURE, "zero", INITIAL_STATES)
    """Input injection schemes (injection.py): the loop's starting state x(0), 'zero' or
    'random' (truncated normal, drawn on every forward, as Huginn and Parcae)."""

    initial_state_std: float = mesh_field(ARCHITECTURE, math.sqrt(2 / 5))
    """Standard deviation of a random x(0), cut at 3 std. Default Huginn's sqrt(2/5) (its
    sqrt(2/(5h)) times its sqrt(h) embedding scale); Parcae's is sqrt(2/(5h))."""

    loop_depth: str = mesh_field(MODEL, "fixed", DEPTH_SAMPLERS)
    """Loop steps per training step (loop_depth.py): 'fixed' (mean_loops, default the layout's K),
    'poisson_lognormal' (Huginn: Poisson(LogNormal around mean_loops) + 1) or 'poisson'
    (Parcae: max(Poisson(mean_loops), 1)); one draw per step (or per sequence or token:
    loop_depth_per), the same on every rank; the mean may ramp over training
    (mean_loops_schedule). Needs a tied core and a scheme without per-step parameters; under
    pipeline parallelism max_loops <= K and stage boundaries between loop steps (every draw is
    masked into the layout's K-step graph)."""

    mean_loops: Optional[float] = mesh_field(MODEL, None)
    """Mean loop steps of the depth sampler; default the layout's K. Under a ramping
    mean_loops_schedule, the mean it ramps up to and then keeps."""

    mean_loops_schedule: str = mesh_field(MODEL, "constant", MEAN_SCHEDULES)
    """A depth curriculum: iteration i draws around m(i) = s + (M - s) f(min(i / R, 1)), s =
    mean_loops_start, M = mean_loops, R = mean_loops_ramp_iters, f(p) = p ('linear') or
    1 - sqrt(1 - p) ('one_minus_sqrt'); 'constant' (default): m(i) = M. 'one_minus_sqrt' rises
    slowly at first (fewer loop steps, less compute). From McLeish et al. 2025 (Retrofitted
    Recurrence; their train.py mean_recurrence_schedule, 'linear' and '1-sqrt': the warmup
    factors of transformers' warmup_stable_decay scheduler), who round m(i) up to an integer;
    here it stays real and a 'fixed' loop_depth runs round(m(i)) steps. Any loop_depth; a draw
    stays a function of the seed and the iteration, so a resumed run draws what the
    uninterrupted one did."""

    mean_loops_start: Optional[float] = mesh_field(MODEL, None)
    """A ramping mean_loops_schedule's mean at iteration 0: >= 1 and <= mean_loops; default 1
    (McLeish et al. ramp from 0, which their sampler lifts to 1)."""

    mean_loops_ramp_iters: Optional[int] = mesh_field(MODEL, None)
    """Training iterations a ramping mean_loops_schedule takes from mean_loops_start to
    mean_loops (required for one; McLeish et al. give it as a fraction of the run, e.g. 0.5);
    from this iteration on the draws are those of a constant mean_loops."""

    max_loops: Optional[int] = mesh_field(MODEL, None)
    """Cap on a sampled depth (bounds activation memory); default none. Required for a depth per
    sequence or token (a micro-batch runs its deepest element's draw) and, <= K, under pipeline
    parallelism."""

    backprop_loops: Optional[int] = mesh_field(MODEL, None)
    """Truncated backprop: only the last this many loop steps carry gradients, the others run
    without an autograd graph (Huginn, Parcae); default all."""

    loop_depth_per: str = mesh_field(MODEL, "batch", DEPTH_UNITS)
    """What one draw of a sampled loop_depth covers: the global 'batch' of a training step, each
    'sequence' or each 'token' (Parcae's recurrent_iteration_method). Per sequence or token a
    micro-batch runs the steps its deepest element needs and the others keep their state
    (loop_depth.py); the FLOPs and the logged depth count each element's own steps."""

    exit_gate: bool = mesh_field(ARCHITECTURE, False)
    """A learned exit (Ouro, arXiv 2510.25741; recurrence/exit_gate.py): a Linear(h -> 1) gate
    per loop step but the last reads the output layer's input after that step, z(t) =
    final_norm(coda(end(h(t)))), and gives the chance of exiting there. Training then runs the
    coda, final norm and output layer after every loop step and trains on exit_training's
    objective; the log shows 'exit step' and 'exit entropy'. An export's adaptive exit reads
    the gates (ExitPolicy criterion 'gate'). Needs a recursive layout with K >= 2, the fixed
    depth (no sampled loop_depth, no backprop_loops) and no pipeline parallelism (the coda and
    output layer, on the last stage, are needed after every loop step)."""

    exit_training: str = mesh_field(MODEL, "expected_loss", EXIT_TRAININGS)
    """With exit_gate, what trains: 'expected_loss' (Ouro's stage I) the whole model on
    sum_t p(t) L(t) - exit_entropy_weight * H(p) per token (a uniform prior over exit steps);
    'gate_only' (stage II) the gates alone, every other weight frozen, on a binary cross-entropy
    towards continuing where the next step lowers the loss by more than exit_gate_margin
    (start it from a stage-I checkpoint: checkpointing.pretrained)."""

    exit_entropy_weight: float = mesh_field(MODEL, 0.1)
    """beta of exit_training 'expected_loss': the weight of the exit distribution's entropy."""

    exit_gate_sharpness: float = mesh_field(MODEL, 50.0)
    """k of exit_training 'gate_only': the target P(continue) is sigmoid(k (I - gamma)), I the
    loss improvement of the next step (Ouro's k = 50)."""

    exit_gate_margin: float = mesh_field(MODEL, 0.005)
    """gamma of exit_training 'gate_only': the improvement (nats per token) at which continuing
    and exiting are equally right (Ouro's 0.005)."""

    layer_family: str = mesh_field(ARCHITECTURE, "gpt_neox", LAYER_FAMILIES)
    """The transformer layer of prelude, core and coda. 'gpt_neox' (Pythia, the paper's):
    parallel residual x + attn(ln1(x)) + mlp(ln2(x)), LayerNorm, GELU MLP, biases, 25% rotary.
    'llama' (Llama, TinyLlama, Qwen2, Huginn's and Parcae's decoders): megatron-core's standard
    sequential-residual layer, RMSNorm, SwiGLU MLP, no biases (add_qkv_bias: on q, k and v,
    as Qwen2), full rotary; only it takes grouped-query attention, qk_layernorm, rope_scaling_factor and
    tie_embeddings."""

    scale_embeddings: bool = mesh_field(ARCHITECTURE, True)
    """Multiply the input embeddings by sqrt(hidden_size) before the first layer (App. B)."""

    vocab_size: int = mesh_field(ARCHITECTURE, 50304)
    """Padded vocabulary size (GPT-NeoX-20B tokenizer: 50277 ids padded to 50304)."""

    max_sequence_length: int = mesh_field(MODEL, 4096, hf_name="max_position_embeddings")
    """Longest sequence the rotary tables are built for."""

    rotary_percent: Optional[float] = mesh_field(ARCHITECTURE, None, hf_name="rotary_pct")
    """Fraction of each attention head that gets rotary embeddings; default the layer family's
    (gpt_neox: 25%, llama: 100%)."""

    rotary_base: float = mesh_field(ARCHITECTURE, 10000, hf_name="rotary_emb_base")
    """Rotary embedding base period (HF ``rope_theta``; Llama-3: 500000)."""

    rope_scaling_factor: Optional[float] = mesh_field(ARCHITECTURE, None)
    """Llama-3's rotary scaling (HF ``rope_scaling`` of type 'llama3' with low_freq_factor 1,
    high_freq_factor 4, original_max_position_embeddings 8192, megatron-core's): its factor
    (Llama-3.1: 8, Llama-3.2: 32); None: unscaled. llama family only."""

    tie_embeddings: bool = mesh_field(ARCHITECTURE, False, hf_name="tie_word_embeddings")
    """The output layer is the input embedding table (Llama-3.2-1B: tied; TinyLlama: untied);
    llama family only. Under pipeline parallelism megatron keeps the two stages' copies equal."""

    gelu_approximation: Optional[str] = mesh_field(ARCHITECTURE, None, GELU_APPROXIMATIONS,
                                                   hf_name="hidden_act")
    """gpt_neox family: 'tanh' (the default: what GPT-NeoX trained Pythia with, and megatron's
    fused bias-GELU) or 'none' (erf); the Hugging Face export declares the same activation. The
    llama family's SwiGLU has none."""

    pipeline_carry_width: Optional[int] = mesh_field(TRAINER, None)
    """Last dimension of the one tensor every pipeline boundary sends (the widest carry of the
    split; parallel/carry.py). Set by the trainer when pipelining (training/providers.py), so
    megatron-core's schedules send fixed shapes; None: carries are sent at their own width."""

    pipeline_stage_layers: Optional[Tuple[int, ...]] = mesh_field(TRAINER, None)
    """Layer applications of the unrolled graph per pipeline stage (one count per stage, summing
    to N_compute; with virtual pipelining one per virtual stage, in execution order: chunk v of
    rank r is stage v * pipeline_size + r); default an even split. Lets the embedding and
    LM-head stages take fewer."""

    # megatron-core's fields, with their role here; Pythia / GPT-NeoX values where megatron-core
    # defaults differently (dropout, epsilon).
    num_layers: int = inherited("num_layers", Role(derived_from="layout"))
    hidden_size: int = inherited("hidden_size", ARCHITECTURE)
    num_attention_heads: int = inherited("num_attention_heads", ARCHITECTURE)
    num_query_groups: Optional[int] = inherited("num_query_groups", ARCHITECTURE,
                                                hf_name="num_key_value_heads")
    qk_layernorm: bool = inherited("qk_layernorm", ARCHITECTURE)
    add_qkv_bias: bool = inherited("add_qkv_bias", ARCHITECTURE)
    ffn_hidden_size: Optional[int] = inherited("ffn_hidden_size", ARCHITECTURE,
                                               hf_name="intermediate_size")
    kv_channels: Optional[int] = inherited("kv_channels", ARCHITECTURE)
    init_method_std: float = inherited("init_method_std", MODEL, hf_name="initializer_range")
    layernorm_epsilon: float = inherited("layernorm_epsilon", ARCHITECTURE, 1e-5,
                                         hf_name="layer_norm_eps")
    hidden_dropout: float = inherited("hidden_dropout", MODEL, 0.0)
    attention_dropout: float = inherited("attention_dropout", MODEL, 0.0)
    activation_func: Callable = inherited(
        "activation_func", Role(model_key=False, derived_from="layer_family"))
    normalization: str = inherited("normalization", Role(model_key=False, derived_from="layer_family"))
    gated_linear_unit: bool = inherited("gated_linear_unit",
                                        Role(model_key=False, derived_from="layer_family"))
    add_bias_linear: bool = inherited("add_bias_linear", Role(model_key=False, derived_from="layer_family"))
    init_method: Optional[Callable] = inherited(
        "init_method", Role(model_key=False, derived_from="init_method_std"))
    output_layer_init_method: Optional[Callable] = inherited(
        "output_layer_init_method", Role(model_key=False, derived_from="init_method_std"))
    embedding_init_method: Optional[Callable] = inherited(
        "embedding_init_method", Role(model_key=False, derived_from="init_method_std"))
    # megatron-core 0.19.2 defaults this to "full" and then warns that "full" is deprecated
    # (transformer_config.py:2415) for every config; [] is the same whole-layer coverage.
    cuda_graph_modules: list = field(default_factory=list)

    def __post_init__(self):
        # model_section() leaves these out: MeshConfig or megatron fill them from other fields
        # (buffer_slots, mean_loops, ffn_hidden_size, kv_channels), so a section rebuilt with
        # another layout or width fills them anew instead of keeping stale values
        self._unset_model_keys = frozenset(k for k in SECTION_KEYS if getattr(self, k) is None)
        self.parsed_layout: Optional[Layout] = None
        if self.layout not in ("", None):
            try:
                self.parsed_layout = parse_layout(self.layout)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            self.layout = str(self.parsed_layout)  # one spelling: '4+8r2+4' is '4+8R2+4'
        self._validate_mesh_fields()
        self.num_layers = self.parsed_layout.n_compute
        self._set_layer_family()
        if not torch.cuda.is_available():
            # megatron allocates parameters on the current CUDA device unless told otherwise
            self.use_cpu_initialization = True
        super().__post_init__()

    def _set_layer_family(self) -> None:
        """megatron-core's settings of the layer family: its norm, MLP and biases."""
        llama = self.layer_family == "llama"
        if self.rotary_percent is None:
            self.rotary_percent = 1.0 if llama else 0.25
        self.normalization = "RMSNorm" if llama else "LayerNorm"
        self.gated_linear_unit = llama
        self.add_bias_linear = not llama
        if llama:
            self.activation_func = F.silu  # SwiGLU: megatron's gated MLP, fused bias-SwiGLU when fused
            return
        if self.gelu_approximation is None:
            self.gelu_approximation = "tanh"
        self._set_activation()

    def _set_activation(self) -> None:
        # megatron's fused bias-GELU (fusions/fused_bias_gelu.py: bias_gelu) computes exactly the
        # tanh form, but its MLP takes the fused path only for activation_func is F.gelu
        # (transformer/mlp.py), which unfused is the erf form. So tanh is F.gelu when fused and
        # spelled out when not; erf never fuses (no erf kernel).
        if self.gelu_approximation == "tanh":
            self.activation_func = (F.gelu if self.bias_activation_fusion
                                    else functools.partial(F.gelu, approximate="tanh"))
        else:
            self.activation_func = F.gelu
            self.bias_activation_fusion = False

    @classmethod
    def from_section(cls, section: Mapping[str, Any], **runtime: Any) -> "MeshConfig":
        """The one way a model section (the YAML ``model:`` keys, or a checkpoint's saved ones)
        becomes a MeshConfig. ``runtime``: the rest of the TransformerConfig (megatron's
        arguments, use_cpu_initialization, pipeline_stage_layers, ...); where one is also a
        model key (megatron's arguments hold hidden_size too), the section's value wins."""
        unknown = [k for k in section if k not in MODEL_KEYS]
        if unknown:
            raise ConfigError(_unknown_model_key(unknown[0]))
        return cls(**{**runtime, **section})

    @classmethod
    def from_json(cls, text: str, **runtime: Any) -> "MeshConfig":
        """``from_section`` of a saved ``mesh_model`` JSON (``section_json``, ``to_json``)."""
        try:
            section = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ConfigError(f"mesh_model={text!r:.80}: not a model section in JSON ({err})") from None
        if not isinstance(section, dict):
            raise ConfigError(f"mesh_model={text!r:.80}: expected a JSON object of model keys, "
                              f"got {type(section).__name__}")
        return cls.from_section(section, **runtime)

    def model_section(self) -> Dict[str, Any]:
        """The model keys as a plain dict, JSON- and YAML-ready: what ``from_section`` rebuilds
        this config from. Every model key but those MeshConfig derives (num_layers) and those
        left unset (None), which it fills from the others again (buffer_slots: K + 3, ...)."""
        return {k: getattr(self, k) for k in SECTION_KEYS if k not in self._unset_model_keys}

    def to_json(self) -> str:
        """``model_section`` as a checkpoint saves it (``section_json``); ``from_json`` reads it."""
        return section_json(self.model_section())

    @property
    def num_loops(self) -> int:
        return self.parsed_layout.num_loops

    def _validate_mesh_fields(self) -> None:
        if self.parsed_layout is None:
            raise ConfigError("layout is required: expected e.g. '24', '4+8R2+4' or '4+8+8+4'")
        layout = self.parsed_layout
        try:
            self.state_scheme = normalize_scheme(self.state_scheme)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._check_choices()
        if layout.recursive == (self.state_scheme == "vanilla"):
            allowed = "'vanilla'" if not layout.recursive else "any scheme but 'vanilla'"
            raise ConfigError(
                f"state_scheme={self.state_scheme!r} does not fit layout={self.layout!r}: "
                f"expected {allowed}"
            )
        if self.num_layers and self.num_layers != layout.n_compute:
            raise ConfigError(
                f"num_layers={self.num_layers} disagrees with layout={self.layout!r}, whose "
                f"unrolled depth N_compute is {layout.n_compute}: drop num_layers or set it to "
                f"{layout.n_compute}"
            )
        self._validate_slots()
        self._validate_depth()
        self._validate_exit_gate()
        self._refuse_low_bit_formats()
        if self.hidden_size <= 0 or self.num_attention_heads <= 0:
            raise ConfigError(
                f"hidden_size={self.hidden_size}, num_attention_heads={self.num_attention_heads}: "
                "both must be positive"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: expected a multiple of the head count, e.g. "
                f"{self.num_attention_heads * max(1, self.hidden_size // self.num_attention_heads)}"
            )
        if self.initial_state != "zero" and not issubclass(
                scheme_class(self.state_scheme) or type, InjectionScheme):
            raise ConfigError(f"initial_state={self.initial_state!r} is only used by the input "
                              f"injection schemes, not {self.state_scheme!r}: remove it")
        if self.rotary_percent is not None and not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"rotary_percent={self.rotary_percent}: expected 0 < value <= 1")
        self._validate_layer_family()

    def _validate_layer_family(self) -> None:
        if self.layer_family == "llama":
            if self.gelu_approximation is not None:
                raise ConfigError(f"gelu_approximation={self.gelu_approximation!r}: the llama layer "
                                  f"family's MLP is SwiGLU, without a GELU: remove it")
        else:
            llama_only = {"num_query_groups": (self.num_query_groups, (None, self.num_attention_heads)),
                          "qk_layernorm": (self.qk_layernorm, (False,)),
                          "rope_scaling_factor": (self.rope_scaling_factor, (None,)),
                          "tie_embeddings": (self.tie_embeddings, (False,))}
            for name, (value, plain) in llama_only.items():
                if value not in plain:
                    raise ConfigError(f"{name}={value!r} needs layer_family: llama (the GPT-NeoX "
                                      f"layer of layer_family={self.layer_family!r} has none)")
        groups = self.num_query_groups
        if groups is not None and (groups < 1 or self.num_attention_heads % groups):
            raise ConfigError(f"num_query_groups={groups}: expected a divisor of "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise ConfigError(f"rope_scaling_factor={self.rope_scaling_factor}: expected a positive factor")

    def _validate_depth(self) -> None:
        for name in ("mean_loops", "mean_loops_start", "max_loops", "backprop_loops"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: expected a value >= 1")
        if self.mean_loops is None:
            self.mean_loops = float(self.parsed_layout.num_loops)
        problem = mean_schedule_problem(self.mean_loops_schedule, self.mean_loops_start,
                                        self.mean_loops_ramp_iters)
        if problem:
            raise ConfigError(problem)
        if self.mean_loops_start is None and self.mean_loops_schedule != "constant":
            self.mean_loops_start = 1.0
        if self.loop_depth_per != "batch" and self.loop_depth == "fixed":
            raise ConfigError(f"loop_depth_per={self.loop_depth_per!r} draws a depth per "
                              f"{self.loop_depth_per}: it needs a sampled loop_depth "
                              f"('poisson' or 'poisson_lognormal'), not 'fixed'")
        if self.loop_depth_per != "batch" and self.max_loops is None:
            raise ConfigError(f"loop_depth_per={self.loop_depth_per!r}: a micro-batch runs the steps "
                              f"its deepest {self.loop_depth_per} draws, the maximum of many draws: "
                              f"set max_loops to bound its memory and time")
        if not LoopDepth.of(self).varies:
            return
        setting = self.depth_setting()
        if not self.parsed_layout.tied or not self.parsed_layout.recursive:
            raise ConfigError(f"{setting} needs a tied looped core ('P+CRK+D'), not layout={self.layout!r}")
        if has_per_step_parameters(self.state_scheme):
            raise ConfigError(
                f"{setting}: state_scheme={self.state_scheme!r} has parameters per loop step, so it "
                "runs exactly its K steps, all with gradients; use mesh_shared or an injection scheme")
        if self.mean_loops_schedule != "constant" and self.mean_loops_start > self.mean_loops:
            # a ramp up to mean_loops: the deepest draw (max_loops, the pipeline's K) bounds it
            raise ConfigError(f"{setting}: mean_loops_start={self.mean_loops_start} > mean_loops="
                              f"{self.mean_loops}: a mean_loops_schedule ramps the mean up to "
                              f"mean_loops, expected mean_loops_start <= mean_loops")
        if self.pipeline_model_parallel_size > 1:
            stages = self.pipeline_model_parallel_size * (self.virtual_pipeline_model_parallel_size or 1)
            problem = self.pipeline_depth_problem(stages, self.pipeline_stage_layers)
            if problem:
                raise ConfigError(problem)

    def _validate_exit_gate(self) -> None:
        if not self.exit_gate:
            return
        if not self.parsed_layout.recursive or self.parsed_layout.num_loops < 2:
            raise ConfigError(f"exit_gate: true chooses among loop steps: it needs a recursive "
                              f"layout with K >= 2, not layout={self.layout!r}")
        if LoopDepth.of(self).varies:
            raise ConfigError(f"exit_gate: true trains every exit of the layout's K loop steps, "
                              f"all with gradients: it does not combine with {self.depth_setting()}")
        if self.exit_entropy_weight < 0 or self.exit_gate_sharpness <= 0:
            raise ConfigError(f"exit_entropy_weight={self.exit_entropy_weight}, exit_gate_sharpness="
                              f"{self.exit_gate_sharpness}: expected >= 0 and > 0")
        problem = self.exit_gate_pipeline_problem(self.pipeline_model_parallel_size)
        if problem:
            raise ConfigError(problem)

    def exit_gate_pipeline_problem(self, pipeline: int) -> Optional[str]:
        """Why exit gates cannot train on ``pipeline`` stages, or None (checked before launch
        by the trainer and where the model is built)."""
        if not self.exit_gate or pipeline == 1:
            return None
        return (f"exit_gate: true under pipeline parallelism ({pipeline} stages) is not "
                f"supported: every loop step's exit needs the coda, final norm and output layer, "
                f"which the last stage holds, while the loop steps run on earlier stages; train "
                f"the exit gates with tensor and data parallelism (parallelism.pipeline: 1)")

    def depth_setting(self) -> str:
        per = f" per {self.loop_depth_per}" if self.loop_depth_per != "batch" else ""
        ramp = (f" ({self.mean_loops_schedule!r} from {self.mean_loops_start} over "
                f"{self.mean_loops_ramp_iters} iterations)" if self.mean_loops_schedule != "constant"
                else "")
        return (f"loop_depth={self.loop_depth!r}{per}, mean_loops={self.mean_loops}{ramp}, "
                f"backprop_loops={self.backprop_loops}")

    def deepest_draw(self) -> Optional[int]:
        """The most loop steps a training step may draw (None: unbounded)."""
        if self.loop_depth == "fixed":
            steps = round(self.mean_loops)
            return steps if self.max_loops is None else min(steps, self.max_loops)
        return self.max_loops

    def pipeline_depth_problem(self, stages: int,
                               stage_layers: Optional[Tuple[int, ...]] = None) -> Optional[str]:
        """Why this varying depth cannot run on ``stages`` pipeline stages (virtual ones
        included), or None. The stages hold slices of the layout's fixed K-step graph and every
        draw is masked into it (loop_depth.LoopDepth.graph_steps), so the draw must fit in K
        steps and a stage boundary must not cut a loop step (whose step mask needs the state the
        step started from). Both checked before launch (trainer) and where the model is built."""
        layout, where = self.parsed_layout, f"{self.depth_setting()} under {stages} pipeline stages"
        deepest = self.deepest_draw()
        if deepest is None or deepest > layout.num_loops:
            return (f"{where}: the stages hold a fixed graph of the layout's K={layout.num_loops} "
                    f"loop steps and mask each draw into it, so a draw must fit: set max_loops <= "
                    f"{layout.num_loops} (got {self.max_loops}), or a layout with K = max_loops")
        ops = unrolled_ops(layout)
        for start, _ in stage_bounds(layout.n_compute, stages, stage_layers)[1:]:
            step = loop_step_cut_at(ops, start)
            if step is not None:
                return (f"{where}: a stage starts at layer application {start}, inside loop step "
                        f"{step}; set pipeline_stage_layers so that every stage boundary falls "
                        f"between loop steps or outside the loop")
        return None

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata[ROLE].choices if ROLE in f.metadata else ()
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and _optional(f)):
                raise ConfigError(f"{f.name}={value!r}: expected one of {list(choices)}")

    def _refuse_low_bit_formats(self) -> None:
        # TransformerEngine keeps fp8/fp4 scaling state (amax history, scales) per module and
        # megatron enters its autocast per layer in TransformerBlock.forward, which this block
        # replaces; a weight-shared core applied K times would also need one state per
        # application, not one per module. Until that exists, refuse rather than train in bf16
        # while the run says fp8.
        for name in ("fp8", "fp4"):
            if getattr(self, name, None):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r}: {name} training is not supported by the "
                    f"recursive block (no per-application {name} state for the looped core); "
                    f"remove --{name}-format and train in bf16 (precision.dtype: bf16)")

    def _validate_slots(self) -> None:
        if "buffer" not in carried_state(self.state_scheme):
            if self.buffer_slots is not None:
                raise ConfigError(
                    f"buffer_slots={self.buffer_slots} is only used by the MeSH schemes, "
                    f"not {self.state_scheme!r}: remove it"
                )
            return
        if self.buffer_slots is None:
            self.buffer_slots = self.num_loops + 3
        if not isinstance(self.buffer_slots, int) or self.buffer_slots < 2:
            raise ConfigError(
                f"buffer_slots={self.buffer_slots!r} is invalid: expected an integer >= 2 "
                f"(default K+3 = {self.num_loops + 3})"
            )



def fields_where(predicate: Callable[[Role], bool]) -> Tuple[str, ...]:
    """Names of the MeshConfig fields whose role satisfies ``predicate``, in declaration order
    (megatron-core's position for the ones it declares)."""
    return tuple(f.name for f in dataclasses.fields(MeshConfig)
                 if ROLE in f.metadata and predicate(f.metadata[ROLE]))


MODEL_KEYS = fields_where(lambda role: role.model_key)
"""The experiment's ``model:`` section."""
SECTION_KEYS = fields_where(lambda role: role.model_key and not role.derived_from)
"""The model keys ``MeshConfig.model_section`` holds (num_layers follows from the layout)."""
ARCHITECTURE_FIELDS = fields_where(lambda role: role.architecture)
"""What a resumed checkpoint must agree on."""
DERIVED_FIELDS = fields_where(lambda role: bool(role.derived_from))
"""TransformerConfig fields MeshConfig sets itself."""
HF_NAMES: Dict[str, str] = {
    f.name: f.metadata[ROLE].hf_key(f.name) for f in dataclasses.fields(MeshConfig)
    if ROLE in f.metadata and f.metadata[ROLE].hf_key(f.name)}
"""MeshConfig field -> its name in an export's Hugging Face config (``Role.hf_name``): what
hf/mapping.py writes and reads back."""


def _optional(f: dataclasses.Field) -> bool:
    """An Optional field, whose None means "the default of the other fields"."""
    return f.default is None


def _unknown_model_key(key: str) -> str:
    close = difflib.get_close_matches(key, MODEL_KEYS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of {', '.join(MODEL_KEYS)}"
    return f"model section: unknown key '{key}': {hint}"


def field_docs() -> Dict[str, str]:
    """name -> docstring (shortened) of every MeshConfig field that has one: the attribute
    docstrings of this class and of megatron-core's TransformerConfig / ModelParallelConfig,
    read from their sources (docs/configuration.md is generated from them)."""
    import ast
    import inspect

    docs: Dict[str, str] = {}
    for cls in reversed(MeshConfig.__mro__):
        if cls is object or not dataclasses.is_dataclass(cls):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = _shortened(after.value.value)
    return docs


def _shortened(text: str, limit: int = 240) -> str:
    """One line; past ``limit`` characters, up to the last sentence end before it."""
    flat = " ".join(text.split()).replace("|", "/")
    if len(flat) <= limit:
        return flat
    end = flat.rfind(". ", 0, limit)
    return flat[:end + 1] if end > 0 else flat[:limit] + "..."

