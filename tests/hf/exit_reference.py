"""A plain reference of the adaptive exit of modeling_megatron_mesh.py (ExitPolicy), for the tests.

One sequence, one position at a time, nothing batched and no transformers Cache: every K and V a
position leaves for the later ones is a tensor in a dict, per layer and (for 'per_step') per loop
step, and the attention is written out by hand. Only the model's modules are reused: embedding,
projections, norms, MLPs, the scheme (begin / inject / step / end), the exit gates, embed_out.

What a later position sees of an earlier one j that exited after step e_j:
  'latest'    its final K/V (those of step e_j), in every core and coda layer, at every step;
  'per_step'  at step t its K/V of step min(t, e_j): its own step-t ones while it still looped.
"""

import math

import torch
import torch.nn.functional as F


def rotate(x, cos, sin, r: int):  # x [heads, hd]; cos, sin [r]: rotate_half on the first r dims
    x1, x2 = x[..., : r // 2], x[..., r // 2: r]
    turned = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x[..., :r] * cos + turned * sin, x[..., r:]], dim=-1)


def project(family: str, attn, x, cos, sin):  # x [1, 1, h] -> q [nh, hd], k and v [nkv, hd]
    if family == "gpt_neox":  # fused, per head [q, k, v]
        q, k, v = attn.query_key_value(x).view(attn.heads, 3 * attn.head_dim).split(attn.head_dim, dim=-1)
    else:
        q = attn.q_norm(attn.q_proj(x).view(attn.heads, attn.head_dim))
        k = attn.k_norm(attn.k_proj(x).view(attn.kv_heads, attn.head_dim))
        v = attn.v_proj(x).view(attn.kv_heads, attn.head_dim)
    return rotate(q, cos, sin, attn.rot), rotate(k, cos, sin, attn.rot), v


def attend(family: str, attn, q, keys, values):  # q [nh, hd]; keys, values: lists of [nkv, hd]
    k, v = torch.stack(keys, dim=1), torch.stack(values, dim=1)  # [nkv, n, hd]
    groups = q.shape[0] // k.shape[0]  # query head i reads K/V head i // groups
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)  # [nh, n, hd]
    scores = (k @ q[:, :, None]).squeeze(-1) / math.sqrt(q.shape[-1])  # [nh, n]
    out = (torch.softmax(scores, dim=-1)[:, None, :] @ v).reshape(1, 1, -1)  # [1, 1, nh * hd]
    return (attn.dense if family == "gpt_neox" else attn.o_proj)(out)


def layer_step(family: str, layer, x, cos, sin, seen):
    """One layer for one position x [1, 1, h] that attends to ``seen`` (keys, values of the
    earlier positions) and to itself: (output [1, 1, h], its own (k, v))."""
    if family == "gpt_neox":  # parallel residual
        attn = layer.attention
        q, k, v = project(family, attn, layer.input_layernorm(x), cos, sin)
        out = attend(family, attn, q, seen[0] + [k], seen[1] + [v])
        return x + out + layer.mlp(layer.post_attention_layernorm(x)), (k, v)
    attn = layer.self_attn  # llama: sequential residual
    q, k, v = project(family, attn, layer.input_layernorm(x), cos, sin)
    h = x + attend(family, attn, q, seen[0] + [k], seen[1] + [v])
    return h + layer.mlp(layer.post_attention_layernorm(h)), (k, v)


def passes(criterion: str, threshold: float, log_p, before, cdf):
    """The exit test of one step (log_p [V] this step's, before the last step's or None, cdf the
    gate's exit CDF so far)."""
    if criterion == "entropy":
        return bool(-(log_p.exp() * log_p).sum() < threshold)
    if criterion == "kl":
        return before is not None and bool((log_p.exp() * (log_p - before)).sum() < threshold)
    return bool(cdf >= threshold)


def seen_by(left: dict, cache: str, kind: str, index: int, t: int):
    """(keys, values) of the earlier positions that layer (kind, index) attends to at step t."""
    key = "final" if kind != "prelude" and cache == "latest" else t
    earlier = left.get((kind, index, key), [])
    return [k for k, _ in earlier], [v for _, v in earlier]


def run_layers(model, kind: str, layers, x, t: int, rotary, left: dict, cache: str, own: dict):
    """The layers in turn for one position at step t (prelude: 0); own gets their (k, v)."""
    for index, layer in enumerate(layers):
        seen = seen_by(left, cache, kind, index, t)
        x, own[(kind, index, t)] = layer_step(model.config.layer_family, layer, x, *rotary, seen)
    return x


def leave(left: dict, own: dict, exit_step: int, steps: int) -> None:
    """What the later positions will see of this one: its K/V per step, its final ones, and for
    'per_step' its final ones again at the steps it did not run."""
    for (kind, index, step), kv in own.items():
        if kind == "prelude" or step < exit_step:
            left.setdefault((kind, index, step), []).append(kv)
            continue
        left.setdefault((kind, index, "final"), []).append(kv)
        for later in range(exit_step, steps + 1):
            left.setdefault((kind, index, later), []).append(kv)


def reference_exit(model, tokens, criterion: str, threshold: float, min_steps: int = 1, max_steps=None,
                   cache: str = "latest"):
    """(logits [s, V], exit_steps [s]) of one sequence ``tokens`` [s] of a MegatronMeshForCausalLM
    under ExitPolicy(criterion, threshold, min_steps, max_steps, cache)."""
    m = model.model
    steps = max_steps or m.loops
    scale = math.sqrt(model.config.hidden_size) if model.config.scale_embeddings else 1.0
    left = {}  # (kind, layer, step or 'final') -> [(k, v) of positions 0, 1, ...]
    all_logits, exit_steps = [], []
    for i, token in enumerate(tokens.tolist()):
        rotary = tuple(c[0, 0, 0] for c in m.rotary(torch.tensor([[i]])))  # cos, sin [r]
        own = {}  # (kind, layer, step) -> this position's (k, v) at that step (prelude: 0)
        h_emb = m.embed_in.weight[token].view(1, 1, -1) * scale
        h, state = m.scheme.begin(h_emb, run_layers(model, "prelude", m.prelude, h_emb, 0, rotary, left, cache, own))
        before, cdf, survival = None, 0.0, 1.0
        for t in range(1, steps + 1):
            u = m.scheme.inject(h, state)
            core = run_layers(model, "core", m.cores[0 if m.tied else t - 1], u, t, rotary, left, cache, own)
            h = m.scheme.step(t - 1, u, core, state)
            y = run_layers(model, "coda", m.coda, m.scheme.end(h), t, rotary, left, cache, own)
            z = m.final_layer_norm(y)  # [1, 1, h]
            logits = model.embed_out(z).reshape(-1)
            log_p = F.log_softmax(logits.float(), dim=-1)
            if criterion == "gate" and t < steps:
                lam = torch.sigmoid(m.exit_gate.gates[t - 1](z).float()).reshape(())
                cdf, survival = cdf + lam * survival, survival * (1 - lam)
            done = t >= min_steps and passes(criterion, threshold, log_p, before, cdf)
            before = log_p
            if done or t == steps:
                break
        all_logits.append(logits)
        exit_steps.append(t)
        leave(left, own, t, steps)
    return torch.stack(all_logits), torch.tensor(exit_steps)
