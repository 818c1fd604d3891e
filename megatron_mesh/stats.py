"""Parameter counts and training FLOPs of a built model (each core application counted).

FLOP convention (per token, training = forward + backward = 3 x forward), as in Megatron-LM's
classic formula and PaLM's MFU: every matmul weight applied in the unrolled graph contributes
6 FLOPs per token per weight (2 forward, 4 backward); attention adds 12 * s * h per layer
application (QK^T and AV, counted without the causal half); the LM head adds 6 * h * V. Router
matmuls are included; the buffer's element-wise write/read and norms are not (< 0.2%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from megatron_mesh.config import MeshConfig
from megatron_mesh.model import MeshGPTModel


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

    def as_dict(self) -> dict:
        return asdict(self)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matmul_weights(module: nn.Module) -> int:
    # linear-layer weights; not e.g. static_comb's [K, 3] coefficients, which multiply nothing
    return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and n.endswith("weight"))


def applied_matmul_weights(model: MeshGPTModel) -> int:
    """Matmul weights summed over every layer *application* of the unrolled graph."""
    block = model.decoder
    layout = model.config.parsed_layout
    total = sum(_matmul_weights(layer) for layer in (*block.prelude.values(), *block.coda.values()))
    total += sum(_matmul_weights(layer) for t in range(layout.num_loops) for layer in block.core_for_step(t))
    if block.scheme is not None:
        total += _matmul_weights(block.scheme)
    return total


def applied_matmul_weights_of_config(cfg: MeshConfig) -> int:
    """The same count from the config alone (no model: usable inside a parallel job, where a
    built model holds only this rank's shard)."""
    h, attn = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels
    qkv = h * (attn + 2 * cfg.num_query_groups * cfg.kv_channels)
    per_layer = qkv + attn * h + 2 * h * cfg.ffn_hidden_size
    scheme = 0
    if cfg.state_scheme == "mesh":
        scheme = (cfg.num_loops + 1) * 2 * h * cfg.buffer_slots
    elif cfg.state_scheme == "dynamic_comb":
        scheme = cfg.num_loops * 3 * h
    return cfg.num_layers * per_layer + scheme


def train_flops_per_token(cfg: MeshConfig, seq_length: int) -> float:
    """Training FLOPs per token (module docstring convention), every core application counted."""
    h = cfg.hidden_size
    matmuls = applied_matmul_weights_of_config(cfg)
    return float(6 * matmuls + 12 * cfg.num_layers * seq_length * h + 6 * h * cfg.vocab_size)


def model_stats(model: MeshGPTModel, seq_length: int) -> ModelStats:
    cfg = model.config
    embedding = _numel(model.embedding) + _numel(model.output_layer)
    total = _numel(model)
    flops = train_flops_per_token(cfg, seq_length)
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
    )
