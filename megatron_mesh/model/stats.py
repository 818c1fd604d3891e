"""Parameter counts and training FLOPs of a built model (each core application counted).

FLOP convention: megatron-core's (``megatron.training.training.num_floating_point_operations``,
its ``transformer_flops``), applied to the unrolled graph, so that the TFLOP/s and MFU the
trainer logs read as Megatron-LM would report them. Per token, training = 3 x forward (forward,
weight gradient, data gradient), 2 FLOPs per multiply-add:

- matmuls: 6 FLOPs per weight applied, summed over every layer *application* (N_compute =
  ``cfg.num_layers``: each of the K loop steps counts the core again) plus the state scheme's
  matmuls (its ``applied_matmul_weights``: MeSH routers, dynamic_comb, injection adapters);
- a training step of sampled depth (loop_depth.py) counts its loop steps: those without gradients
  (truncated backprop) forward only, 1x instead of 3x; ``model_stats`` reports the mean over
  the depth distribution;
- core attention (QK^T and softmax(QK^T) V): 6 * s * q per layer application, q =
  kv_channels * num_attention_heads (the query projection width, not hidden_size): 12 * s * q
  for the full s x s scores, halved for the causal mask;
- LM head: 6 * h * V, V the padded vocabulary (``cfg.vocab_size``);
- not counted: embedding lookup, norms, biases, softmax, activations, the MeSH buffer's
  element-wise writes and reads (< 0.2%), and activation recompute (model FLOPs).

For a vanilla layout this equals megatron-core's ``num_floating_point_operations(args, batch)
/ (batch * seq_length)`` for full-length (BSHD) sequences exactly (tests/model/test_stats.py checks it
on Megatron's parsed arguments); a looped layout counts that of a vanilla model of N_compute
layers plus its routers. PaLM's MFU (and this module before) counts attention without the causal
half (12 * s * q): 13% (1B, 1.4B) to 23% (160M) more FLOPs for the Pythia shapes at seq 4096.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from megatron_mesh.config.model import MeshConfig
from megatron_mesh.model.gpt import MeshGPTModel
from megatron_mesh.recurrence.loop_depth import LoopDepth, LoopDraw, MeanDepth
from megatron_mesh.recurrence.mesh import SchemeOptions, StateScheme, matmul_weights
from megatron_mesh.recurrence.schemes import build_scheme


@dataclass
class ModelStats:
    layout: str
    state_scheme: str
    n_compute: int
    unique_layers: int
    total_params: int
    embedding_params: int
    non_embedding_params: int
    router_params: int
    seq_length: int
    train_flops_per_token: float
    """The mean over the loop-depth distribution where the depth varies (``loop_depth``)."""
    loop_depth: Optional[MeanDepth] = None
    """The expected training depth (``expected_depth``); None: the layout's K, all with gradients."""

    def as_dict(self) -> dict:
        return asdict(self)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def applied_matmul_weights(model: MeshGPTModel) -> int:
    """Matmul weights summed over every layer *application* of the unrolled graph."""
    block = model.decoder
    layout = model.config.parsed_layout
    total = sum(matmul_weights(layer) for layer in (*block.prelude.values(), *block.coda.values()))
    total += sum(matmul_weights(layer) for t in range(layout.num_loops) for layer in block.core_for_step(t))
    if block.scheme is not None:
        total += block.scheme.applied_matmul_weights(layout.num_loops)
    return total


def _layer_matmul_weights(cfg: MeshConfig) -> int:
    h, attn = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels
    qkv = h * (attn + 2 * cfg.num_query_groups * cfg.kv_channels)
    mlp = (3 if cfg.gated_linear_unit else 2) * h * cfg.ffn_hidden_size  # SwiGLU: gate, up, down
    return qkv + attn * h + mlp


def _scheme_of_config(cfg: MeshConfig) -> Optional[StateScheme]:
    """The config's scheme module, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build_scheme(cfg.state_scheme, SchemeOptions.of(cfg))


def applied_matmul_weights_of_config(cfg: MeshConfig) -> int:
    """The same count from the config alone (no model: usable inside a parallel job, where a
    built model holds only this rank's shard)."""
    scheme = _scheme_of_config(cfg)
    routing = scheme.applied_matmul_weights(cfg.num_loops) if scheme is not None else 0
    return cfg.num_layers * _layer_matmul_weights(cfg) + routing


def train_flops_per_token(cfg: MeshConfig, seq_length: int, draw: Optional[LoopDraw] = None) -> float:
    """Training FLOPs per token in megatron-core's convention (module docstring), every core
    application counted: what the trainer's TFLOP/s and MFU are computed from. ``draw``: a
    step of another depth (loop_depth.py); its loop steps without gradients count forward only."""
    query = cfg.kv_channels * cfg.num_attention_heads  # width of Q and of the attention output
    # forward FLOPs of one layer application: its matmuls, and QK^T and AV (2 x 2 * s * q over
    # the full scores, / 2 causal)
    layer = 2 * _layer_matmul_weights(cfg) + 2 * seq_length * query
    logits = 2 * cfg.hidden_size * cfg.vocab_size
    scheme = _scheme_of_config(cfg)
    layout = cfg.parsed_layout
    if draw is None:  # the layout's own K steps, all with gradients
        routing = scheme.applied_matmul_weights(layout.num_loops) if scheme is not None else 0
        forward = cfg.num_layers * layer + 2 * routing + logits
        if cfg.exit_gate:
            return float(_with_exit_readouts(cfg, forward, layout.coda * layer + logits))
        return float(3 * forward)
    once, per_step = scheme.applied_matmul_weights(0), scheme.applied_matmul_weights(1)
    per_step -= once
    step = layout.core[0] * layer + 2 * per_step  # one loop step (a tied core), forward
    outside = (layout.prelude + layout.coda) * layer + 2 * once + logits
    frozen = draw.num_loops - draw.backprop_loops
    return float(3 * (outside + draw.backprop_loops * step) + frozen * step)


def _with_exit_readouts(cfg: MeshConfig, forward: float, readout: float) -> float:
    """Training FLOPs with exit gates: the readouts (coda, output layer) after loop steps
    1..K-1 and the K-1 gates on top of ``forward``; 'gate_only' runs everything forward only
    and the gates' weight gradients (the frozen model needs no backward pass, the gates' inputs
    no gradient)."""
    gates = 2 * cfg.hidden_size * (cfg.num_loops - 1)
    forward += (cfg.num_loops - 1) * readout + gates
    if cfg.exit_training == "gate_only":
        return forward + gates
    return 3 * forward


@dataclass(frozen=True)
class DepthCost:
    """``train_flops_per_token`` of a step as a function of its depth, which it is linear in:
    base + per_step * loop steps + per_backprop_step * loop steps with gradients (computed once, so
    the trainer's per-step FLOP count builds nothing)."""

    base: float
    per_step: float
    per_backprop_step: float

    @classmethod
    def of(cls, cfg: MeshConfig, seq_length: int) -> "DepthCost":
        base = train_flops_per_token(cfg, seq_length, LoopDraw(0, 0))
        frozen = train_flops_per_token(cfg, seq_length, LoopDraw(1, 0))
        with_grad = train_flops_per_token(cfg, seq_length, LoopDraw(1, 1))
        return cls(base, frozen - base, with_grad - frozen)

    def at(self, num_loops: float, backprop_loops: float) -> float:
        return self.base + num_loops * self.per_step + backprop_loops * self.per_backprop_step


def expected_depth(cfg: MeshConfig) -> Optional[MeanDepth]:
    """The mean training depth over the config's loop-depth distribution (under a depth
    curriculum, the one its ramp ends in); None where it is the layout's K every step, all with
    gradients."""
    depth = LoopDepth.of(cfg)
    return depth.expected() if depth.varies else None


def expected_train_flops_per_token(cfg: MeshConfig, seq_length: int,
                                   mean: Optional[MeanDepth]) -> float:
    """``train_flops_per_token`` averaged over the loop-depth distribution whose mean is ``mean``
    (``expected_depth``): linear in the depth and the gradient depth, so their means give it."""
    if mean is None:
        return train_flops_per_token(cfg, seq_length)
    return DepthCost.of(cfg, seq_length).at(mean.num_loops, mean.backprop_loops)


def model_stats(model: MeshGPTModel, seq_length: int) -> ModelStats:
    cfg = model.config
    embedding = _numel(model.embedding) + _numel(model.output_layer)
    total = _numel(model)
    mean = expected_depth(cfg)
    flops = expected_train_flops_per_token(cfg, seq_length, mean)
    return ModelStats(
        layout=str(cfg.parsed_layout),
        state_scheme=cfg.state_scheme,
        n_compute=cfg.num_layers,
        unique_layers=cfg.parsed_layout.unique_layers,
        total_params=total,
        embedding_params=embedding,
        non_embedding_params=total - embedding,
        router_params=_numel(model.decoder.scheme) if model.decoder.scheme is not None else 0,
        seq_length=seq_length,
        train_flops_per_token=flops,
        loop_depth=mean,
    )
