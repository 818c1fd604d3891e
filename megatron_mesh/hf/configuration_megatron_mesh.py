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


HF_SETTINGS = ("num_loops", "exit_policy", "use_cache", "bos_token_id", "eos_token_id")
"""The parameters below that are Hugging Face settings, not the exported model's fields: every
other one (tie_word_embeddings included: MeshConfig.tie_embeddings) is a MeshConfig field under
its HF name (megatron_mesh.config.model.HF_NAMES, which the export writes in full;
tests/hf/test_mapping.py holds the two together)."""

LAYER_FAMILIES = {"gpt_neox": dict(rotary_pct=0.25, hidden_act="gelu_pytorch_tanh"),
                  "llama": dict(rotary_pct=1.0, hidden_act="silu")}
"""layer_family -> the defaults it gives rotary_pct and hidden_act when they are None."""


class MegatronMeshConfig(PretrainedConfig):
    """The export's model fields, with defaults for those modeling_megatron_mesh.py reads; the
    export writes every field (max_position_embeddings, ...), which PretrainedConfig keeps as
    attributes. num_key_value_heads, kv_channels, rotary_pct and hidden_act are stored filled in
    (None: all heads, hidden_size // num_attention_heads, the layer family's defaults)."""

    model_type = "megatron_mesh"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        *,
        vocab_size=50304,
        hidden_size=2048,
        num_attention_heads=16,
        num_key_value_heads=None,
        kv_channels=None,
        intermediate_size=8192,
        layer_family="gpt_neox",
        layout="4+8R2+4",
        state_scheme="mesh",
        buffer_slots=None,
        initial_state="zero",
        initial_state_std=0.0,
        scale_embeddings=True,
        rotary_pct=None,
        rotary_emb_base=10000,
        rope_scaling_factor=None,
        layer_norm_eps=1e-5,
        hidden_act=None,
        qk_layernorm=False,
        add_qkv_bias=False,
        initializer_range=0.02,
        exit_gate=False,
        num_loops=None,
        exit_policy=None,
        use_cache=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if layer_family not in LAYER_FAMILIES:
            raise ValueError(f"layer_family={layer_family!r}: expected one of {sorted(LAYER_FAMILIES)}")
        family = LAYER_FAMILIES[layer_family]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads  # megatron's num_query_groups
        self.kv_channels = kv_channels or hidden_size // num_attention_heads  # the head dim
        self.intermediate_size = intermediate_size
        self.layer_family = layer_family
        self.layout = str(layout)
        self.state_scheme = state_scheme
        self.buffer_slots = buffer_slots
        self.initial_state = initial_state  # injection schemes' x(0): "zero" or "random"
        self.initial_state_std = initial_state_std
        self.scale_embeddings = scale_embeddings
        self.rotary_pct = family["rotary_pct"] if rotary_pct is None else rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.rope_scaling_factor = rope_scaling_factor  # Llama-3 scaling of the rotary frequencies
        self.layer_norm_eps = layer_norm_eps  # LayerNorm's (gpt_neox) or RMSNorm's (llama) epsilon
        self.hidden_act = family["hidden_act"] if hidden_act is None else hidden_act
        self.qk_layernorm = qk_layernorm  # llama: per-head RMSNorm of queries and keys
        self.add_qkv_bias = add_qkv_bias  # llama: biases on the q, k, v projections (Qwen2)
        self.initializer_range = initializer_range
        self.exit_gate = exit_gate  # Ouro's learned exit: model.exit_gate.gates, one per loop step but the last
        self.num_loops = num_loops  # read out after fewer loop steps than trained (depth studies)
        self.exit_policy = exit_policy  # the forward's default ExitPolicy, as a dict of its fields
        self.use_cache = use_cache
        prelude, core, coda, _ = parse_layout(self.layout)
        self.num_hidden_layers = prelude + sum(core) + coda  # one cache slot per application
        self._check_attention()
        self._check_exit()
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check_attention(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads}: expected a divisor of "
                             f"num_attention_heads={self.num_attention_heads}")
        # (add_qkv_bias is megatron's "q/k/v have biases": true of GPT-NeoX, which has them all)
        llama_only = {"num_key_value_heads": self.num_key_value_heads != self.num_attention_heads,
                      "qk_layernorm": self.qk_layernorm}
        used = [name for name, on in llama_only.items() if on]
        if self.layer_family == "gpt_neox" and used:
            raise ValueError(f"{used[0]}={getattr(self, used[0])!r} needs layer_family='llama' "
                             f"(the GPT-NeoX layer has none)")

    def _check_exit(self):
        """exit_policy is kept as a plain dict so that config.json holds it (the model code reads
        it with ExitPolicy.of, which checks its fields); a fixed num_loops contradicts it."""
        if self.exit_policy is not None and not isinstance(self.exit_policy, dict):
            raise ValueError(f"exit_policy: expected a dict of ExitPolicy fields or None, "
                             f"got {type(self.exit_policy).__name__}")
        if self.exit_policy is not None and "record" in self.exit_policy:
            raise ValueError("exit_policy: 'record' is a list one call collects steps in, not a "
                             "setting a config.json can hold: pass ExitPolicy(record=...) to the call")
        if self.exit_policy is not None and self.num_loops is not None:
            raise ValueError(f"num_loops={self.num_loops} and exit_policy={self.exit_policy}: set one "
                             f"(a fixed depth or an adaptive exit)")
