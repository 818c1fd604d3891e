"""An independent plain-PyTorch reference of the paper's Algorithms 1 and 2 (Appendix C).

Written from the paper's equations, in [batch, seq, hidden] layout, with Hugging Face
``GPTNeoXLayer`` as the transformer layer: nothing here imports megatron or megatron_mesh.
Weights come in as a plain dict of tensors named like megatron-mesh's state dict.
"""

import math

import torch
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

HF_LAYER = {  # megatron-mesh layer suffix -> GPTNeoXLayer suffix
    "input_layernorm": "input_layernorm",
    "self_attention.linear_qkv": "attention.query_key_value",
    "self_attention.linear_proj": "attention.dense",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "mlp.linear_fc1": "mlp.dense_h_to_4h",
    "mlp.linear_fc2": "mlp.dense_4h_to_h",
}


def hf_config(hidden, heads, vocab, gelu="gelu_pytorch_tanh", num_layers=1):
    return GPTNeoXConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        vocab_size=vocab,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        hidden_act=gelu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attn_implementation="eager",
    )


class Stack:
    """A list of GPTNeoXLayers loaded from ``weights[prefix.i.*]``: f_pre, f_core or f_coda."""

    def __init__(self, config, weights, prefix, num_layers):
        self.layers = []
        for i in range(num_layers):
            layer = GPTNeoXLayer(config, layer_idx=i).eval()
            state = {}
            for ours, theirs in HF_LAYER.items():
                for kind in ("weight", "bias"):
                    state[f"{theirs}.{kind}"] = weights[f"{prefix}.{i}.{ours}.{kind}"]
            layer.load_state_dict(state)
            self.layers.append(layer)
        self.rotary = GPTNeoXRotaryEmbedding(config=config)

    def __call__(self, h):  # [b, s, d]
        b, s, _ = h.shape
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        cos_sin = self.rotary(h, positions)
        causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
        for layer in self.layers:
            out = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        return h


def linear(weights, prefix, h):
    return h @ weights[f"{prefix}.weight"].T + weights[f"{prefix}.bias"]


def router_weights(weights, step, h):
    """Eq. 3 for step index ``step`` (0 = the transitional t=-1 pair): softmax over slots."""
    p = f"decoder.scheme.routers.{step}"
    w_write = torch.softmax(linear(weights, f"{p}.write.linear", h), dim=-1)
    w_read = torch.softmax(linear(weights, f"{p}.read.linear", h), dim=-1)
    return w_write, w_read


SUPPLEMENTS = ("residual", "anchor", "anchor_star")  # Eq. 1: + h(t), + h(0), + h_emb
INJECTIONS = ("additive_injection", "linear_injection", "diagonal_injection")


def algorithm_1(h_emb, f_pre, f_cores, f_coda, variant):
    """Algorithm 1; ``variant`` is a '+'-joined set of residual/anchor/anchor_star or 'base'."""
    parts = [] if variant == "base" else variant.split("+")
    if any(p not in SUPPLEMENTS for p in parts):
        # refused, not run as 'base': a scheme the reference lacks must fail its comparison
        raise NotImplementedError(f"the reference has no state scheme {variant!r}")
    h = f_pre(h_emb)
    h0 = h
    for f_core in f_cores:
        h_sup = torch.zeros_like(h)
        if "residual" in parts:
            h_sup = h_sup + h
        if "anchor" in parts:
            h_sup = h_sup + h0
        if "anchor_star" in parts:
            h_sup = h_sup + h_emb
        h = f_core(h) + h_sup
    return f_coda(h)


def algorithm_2(h_emb, f_pre, f_cores, f_coda, weights, buffer_slots, shared=False):
    """Algorithm 2, line by line (``shared``: every loop step routes with pair 1)."""
    M = [h_emb] + [torch.zeros_like(h_emb) for _ in range(buffer_slots - 1)]  # lines 7-8
    h_m = f_pre(h_emb)  # line 11
    w_write, w_read = router_weights(weights, 0, h_m)  # line 12
    for b in range(buffer_slots):  # lines 13-15
        M[b] = M[b] + h_m * w_write[..., b : b + 1]
    h = sum(M[b] * w_read[..., b : b + 1] for b in range(buffer_slots))  # line 16
    for t, f_core in enumerate(f_cores):  # line 19
        h_m = f_core(h)  # line 20
        w_write, w_read = router_weights(weights, 1 if shared else t + 1, h)  # line 21: read h(t)
        M = [M[b] + h_m * w_write[..., b : b + 1] for b in range(buffer_slots)]  # lines 22-25
        h = sum(M[b] * w_read[..., b : b + 1] for b in range(buffer_slots))  # line 26
    return f_coda(h)  # line 30


def combination(h_emb, f_pre, f_cores, f_coda, weights, dynamic):
    """Appendix E.2: h(t+1) = a1 f_core(h(t)) + a2 h(0) + a3 h_emb; a static or Linear_t(h(t))."""
    h = f_pre(h_emb)
    h0 = h
    for t, f_core in enumerate(f_cores):
        if dynamic:
            a = linear(weights, f"decoder.scheme.coefficient_proj.{t}", h)  # [b, s, 3]
            a1, a2, a3 = a[..., 0:1], a[..., 1:2], a[..., 2:3]
        else:
            a1, a2, a3 = weights["decoder.scheme.coefficients"][t]
        h = a1 * f_core(h) + a2 * h0 + a3 * h_emb
    return f_coda(h)


def input_injection(h_emb, f_pre, f_cores, f_coda, weights, kind, x0=None):
    """Huginn (recpre/raven_modeling_minimal.py) and Parcae (parcae_lm/modules/injection.py):
    e = f_pre(h_emb); x(t+1) = f_core(inject(x(t), e)) from x(0) = x0 (zeros if None); the coda
    reads x(K) through Huginn's norm or Parcae's C."""
    if kind not in INJECTIONS:  # refused: a scheme the reference lacks must fail its comparison
        raise NotImplementedError(f"the reference has no state scheme {kind!r}")
    p = "decoder.scheme"
    e = f_pre(h_emb)
    x = torch.zeros_like(e) if x0 is None else x0
    for f_core in f_cores:
        if kind == "additive_injection":
            u = x + e
        elif kind == "linear_injection":  # adapter(cat([x, e])), no bias
            u = torch.cat([x, e], dim=-1) @ weights[f"{p}.injection.adapter.weight"].T
        else:  # diagonal: exp(-dt A) x + dt B e, A = exp(A_log), dt = softplus(dt_bias)
            dt = torch.nn.functional.softplus(weights[f"{p}.injection.dt_bias"])
            decay = torch.exp(-dt * torch.exp(weights[f"{p}.injection.A_log"]))
            u = decay * x + dt * (e @ weights[f"{p}.injection.B"].T)
        x = f_core(u)
    if kind == "linear_injection":
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], weights[f"{p}.readout.weight"],
                                           weights[f"{p}.readout.bias"], eps=1e-5)
    elif kind == "diagonal_injection":
        x = x @ weights[f"{p}.readout.weight"].T
    return f_coda(x)


def reference_logits(weights, tokens, layout, scheme, hidden, heads, vocab, buffer_slots=None, x0=None):
    """Logits [b, s, V] of a Prelude-Recurrent-Coda model, computed from the paper (and, for the
    input injection schemes, from Huginn's and Parcae's code; ``x0`` their starting state)."""
    config = hf_config(hidden, heads, vocab)
    f_pre = Stack(config, weights, "decoder.prelude", layout["prelude"])
    cores = [Stack(config, weights, f"decoder.cores.{c}", n) for c, n in enumerate(layout["cores"])]
    f_cores = [cores[0 if layout["tied"] else t] for t in range(layout["loops"])]
    f_coda = Stack(config, weights, "decoder.coda", layout["coda"])
    h_emb = weights["embedding.word_embeddings.weight"][tokens] * math.sqrt(hidden)
    if scheme in ("mesh", "mesh_shared"):
        h = algorithm_2(h_emb, f_pre, f_cores, f_coda, weights, buffer_slots, scheme == "mesh_shared")
    elif scheme in ("static_comb", "dynamic_comb"):
        h = combination(h_emb, f_pre, f_cores, f_coda, weights, scheme == "dynamic_comb")
    elif scheme == "vanilla":
        h = f_coda(f_pre(h_emb))
    elif scheme.endswith("_injection"):
        h = input_injection(h_emb, f_pre, f_cores, f_coda, weights, scheme, x0)
    else:
        h = algorithm_1(h_emb, f_pre, f_cores, f_coda, scheme)
    h = torch.nn.functional.layer_norm(
        h,
        (hidden,),
        weights["decoder.final_layernorm.weight"],
        weights["decoder.final_layernorm.bias"],
        eps=1e-5,
    )
    return h @ weights["output_layer.weight"].T
