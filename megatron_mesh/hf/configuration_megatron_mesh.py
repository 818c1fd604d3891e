"""Hugging Face configuration of a megatron-mesh (Prelude-Recurrent-Coda, MeSH) model.

Self-contained (transformers only): exported next to the weights and loaded with
``trust_remote_code=True`` where megatron-mesh is not installed.
"""

import re

from transformers import PretrainedConfig


def parse_layout(layout):
    """(prelude, core layers per step, coda, tied) from '24', 'P+CRK+D' or 'P+C1+...+CK+D'."""
    spec = str(layout).replace(" ", "")
    if spec.isdigit():
        return int(spec), [], 0, True
    tied = re.fullmatch(r"(\d+)\+(\d+)[Rr](\d+)\+(\d+)", spec)
    if tied:
        p, c, k, d = map(int, tied.groups())
        return p, [c] * k, d, True
    parts = [int(x) for x in spec.split("+")]
    if len(parts) < 3:
        raise ValueError(f"layout={layout!r}: expected 'N', 'P+CRK+D' or 'P+C1+...+CK+D'")
    return parts[0], parts[1:-1], parts[-1], False


HF_SETTINGS = ("num_loops", "use_cache", "bos_token_id", "eos_token_id", "tie_word_embeddings")
"""The parameters below that are Hugging Face settings, not the exported model's fields: every
other one is a MeshConfig field under its HF name (megatron_mesh.config.model.HF_NAMES, which
the export writes in full; tests/hf/test_mapping.py holds the two together)."""


class MegatronMeshConfig(PretrainedConfig):
    """The export's model fields, with defaults for those modeling_megatron_mesh.py reads; the
    export writes every field (max_position_embeddings, kv_channels, ...), which
    PretrainedConfig keeps as attributes."""

    model_type = "megatron_mesh"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        *,
        vocab_size=50304,
        hidden_size=2048,
        num_attention_heads=16,
        intermediate_size=8192,
        layout="4+8R2+4",
        state_scheme="mesh",
        buffer_slots=None,
        initial_state="zero",
        initial_state_std=0.0,
        scale_embeddings=True,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        layer_norm_eps=1e-5,
        hidden_act="gelu_pytorch_tanh",
        initializer_range=0.02,
        num_loops=None,
        use_cache=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layout = str(layout)
        self.state_scheme = state_scheme
        self.buffer_slots = buffer_slots
        self.initial_state = initial_state  # injection schemes' x(0): "zero" or "random"
        self.initial_state_std = initial_state_std
        self.scale_embeddings = scale_embeddings
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.num_loops = num_loops  # read out after fewer loop steps than trained (depth studies)
        self.use_cache = use_cache
        prelude, core, coda, _ = parse_layout(self.layout)
        self.num_hidden_layers = prelude + sum(core) + coda  # one cache slot per application
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
