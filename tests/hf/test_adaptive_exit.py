"""Adaptive exit per token (modeling_megatron_mesh.ExitPolicy): where it must equal the fixed
depth it does bit for bit (torch.equal); per-token steps vary; the 'per_step' cache makes a cached
decode equal the full forward, and both equal the plain reference (exit_reference.py); the
'latest' cache equals the reference's 'latest' lookup in fixed memory; the gate follows Ouro's
CDF rule; generate() takes a policy; bad policies are named."""

import math

import pytest
import torch
from exit_reference import reference_exit
from transformers import DynamicCache

from conftest import SHARED
from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
from megatron_mesh.hf.modeling_megatron_mesh import ExitPolicy, MegatronMeshForCausalLM

K = 3  # the tiny models' trained loop steps: layout 1+2R3+1
TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, intermediate_size=96)
FAMILIES = {"gpt_neox": {}, "llama": dict(num_key_value_heads=2, qk_layernorm=True)}
SCHEMES = ["linear_injection", "mesh_shared", "mesh"]  # injection (tied), MeSH shared, MeSH per step
CRITERIA = ["entropy", "kl", "gate"]
NEVER = {"entropy": dict(threshold=-1.0), "kl": dict(threshold=-1.0), "gate": dict(threshold=1.0, min_steps=K)}
"""A policy per criterion that never exits before K (gate: a CDF lies in [0, 1], so min_steps = K)."""
NEVER_K = ExitPolicy("entropy", -1.0)
CLOSE = dict(rtol=1e-5, atol=5e-5)
"""The same model code cached or not, float32: on these models the fixed depth's own cached decode
differs from its uncached forward by up to 2e-5 (accumulation order), the adaptive one likewise."""
REFERENCE = dict(rtol=1e-4, atol=1e-4)  # against the hand-written attention of exit_reference.py

family_and_scheme = pytest.mark.parametrize("family, scheme", [(f, s) for f in FAMILIES for s in SCHEMES])


def tiny_model(family="gpt_neox", scheme="mesh", layout="1+2R3+1", **overrides):
    """Random weights far from their init (norm weights 1 +- 0.1, the rest 0.2 randn), so the
    readouts' entropies spread and every part of the scheme and the gates matters."""
    config = MegatronMeshConfig(**TINY, **FAMILIES[family], layer_family=family, layout=layout,
                                state_scheme=scheme, exit_gate=True, **overrides)
    torch.manual_seed(0)
    model = MegatronMeshForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith("norm.weight") or name.startswith("model.scheme.readout")
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm else 0.2 * torch.randn_like(p))
    return model


def tokens(batch=2, seq=12, seed=1):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs)


def log_probs(model, ids, loops):  # the fixed-depth readout after ``loops`` steps: [b, s, V]
    return torch.log_softmax(run(model, ids, num_loops=loops).logits.float(), dim=-1)


def lambdas(model, ids, loops):  # the gate of step ``loops`` on the fixed-depth readout: [b, s]
    with torch.no_grad():
        z = model.model(ids, num_loops=loops)[0]
        return model.model.exit_gate(loops, z)


def first_test(model, ids, criterion):
    """(the first step a token may exit at under min_steps 1, the criterion's values there [b, s]).
    Before it nobody has exited, so the values are the fixed depth's: 'entropy' and 'gate' at
    step 1 (the gate's CDF(1) = lambda(1)), 'kl' at step 2 (none at step 1)."""
    if criterion == "entropy":
        lp = log_probs(model, ids, 1)
        return 1, -(lp.exp() * lp).sum(-1)
    if criterion == "kl":
        now, before = log_probs(model, ids, 2), log_probs(model, ids, 1)
        return 2, (now.exp() * (now - before)).sum(-1)
    return 1, lambdas(model, ids, 1)


def median_policy(model, ids, criterion, **kwargs):
    """A threshold midway between the two middle values of the criterion at its first step (not on
    a token's value, where rounding would decide), so about half the tokens exit there."""
    _, values = first_test(model, ids, criterion)
    v = values.flatten().sort().values
    middle = float((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)
    return ExitPolicy(criterion, middle, **kwargs)


def decode(model, ids, policy, prefill=4):
    """A cached forward of the first ``prefill`` tokens, then one token at a time: (logits, steps, cache)."""
    cache, logits, steps = DynamicCache(), [], []
    for chunk in [ids[:, :prefill]] + list(ids[:, prefill:].split(1, dim=1)):
        with torch.no_grad():
            out = model(chunk, use_cache=True, past_key_values=cache, exit_policy=policy)
        logits.append(out.logits)
        steps.append(out.exit_steps)
    return torch.cat(logits, 1), torch.cat(steps, 1), cache


def assert_matches_reference(model, ids, logits, steps, policy):
    for row in range(ids.shape[0]):
        ref_logits, ref_steps = reference_exit(model, ids[row], policy.criterion, policy.threshold,
                                               policy.min_steps, policy.max_steps, policy.cache)
        assert steps[row].tolist() == ref_steps.tolist()
        torch.testing.assert_close(logits[row], ref_logits, **REFERENCE)


def greedy(model, prompt, new=6, **kwargs):
    return model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0,
                          eos_token_id=None, output_scores=True, return_dict_in_generate=True, **kwargs)


# --- where the exit must change nothing -------------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
@family_and_scheme
def test_a_threshold_that_never_fires_is_the_fixed_depth(family, scheme, criterion):
    """Bit for bit (torch.equal) the plain forward's logits with num_loops = max_steps, and cached
    greedy generation's tokens and scores (per_step cache)."""
    model, ids = tiny_model(family, scheme), tokens()
    never = ExitPolicy(criterion, **NEVER[criterion])
    out = run(model, ids, exit_policy=never)
    assert torch.equal(out.logits, run(model, ids).logits)
    assert out.exit_steps.eq(K).all() and run(model, ids).exit_steps is None
    shallower = ExitPolicy(criterion, **{**NEVER[criterion], "min_steps": 2 if criterion == "gate" else 1}, max_steps=2)
    assert torch.equal(run(model, ids, exit_policy=shallower).logits, run(model, ids, num_loops=2).logits)
    adaptive, plain = greedy(model, ids[:1, :5], exit_policy=never), greedy(model, ids[:1, :5])
    assert torch.equal(adaptive.sequences, plain.sequences)
    assert all(torch.equal(a, p) for a, p in zip(adaptive.scores, plain.scores))


@pytest.mark.parametrize("criterion, policy, loops", [
    ("entropy", dict(threshold=math.inf, min_steps=2), 2),
    ("kl", dict(threshold=math.inf, min_steps=1), 2),  # KL needs a step before: never at step 1
    ("gate", dict(threshold=0.0, min_steps=1), 1),
])
@family_and_scheme
def test_a_threshold_that_always_fires_is_the_depth_it_fires_at(family, scheme, criterion, policy, loops):
    model, ids = tiny_model(family, scheme), tokens()
    out = run(model, ids, exit_policy=ExitPolicy(criterion, **policy))
    assert out.exit_steps.eq(loops).all()
    assert torch.equal(out.logits, run(model, ids, num_loops=loops).logits)


# --- per-token steps, the 'per_step' cache ----------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
@family_and_scheme
def test_steps_vary_at_the_median_and_exit_where_the_criterion_says(family, scheme, criterion):
    """At the criterion's first step the tokens below the median threshold (gate: at or above)
    exit there, the others later."""
    model, ids = tiny_model(family, scheme), tokens()
    step, values = first_test(model, ids, criterion)
    policy = median_policy(model, ids, criterion)
    steps = run(model, ids, exit_policy=policy).exit_steps
    expected = values >= policy.threshold if criterion == "gate" else values < policy.threshold
    assert torch.equal(steps == step, expected)
    assert (steps > step).any() and (steps == step).any()


@pytest.mark.parametrize("criterion", CRITERIA)
@family_and_scheme
def test_per_step_cached_decode_equals_the_full_forward_and_the_reference(family, scheme, criterion):
    model, ids = tiny_model(family, scheme), tokens()
    policy = median_policy(model, ids, criterion)
    full = run(model, ids, exit_policy=policy)
    logits, steps, cache = decode(model, ids, policy)
    assert torch.equal(steps, full.exit_steps) and len(set(steps.flatten().tolist())) > 1
    torch.testing.assert_close(logits, full.logits, **CLOSE)
    assert_matches_reference(model, ids, full.logits, full.exit_steps, policy)
    used = [layer.get_seq_length() for layer in cache.layers if layer.get_seq_length()]
    assert used == [ids.shape[1]] * (1 + K * (2 + 1))  # prelude + K (core + coda): every slot, every token


def test_real_text_exits_at_varied_steps():
    """A sentence in the GPT-NeoX-20B tokenizer's ids (mod the tiny vocab): steps vary, and the
    cached decode still equals the full forward."""
    path = SHARED / "data" / "20B_tokenizer.json"
    if not path.exists():
        pytest.skip(f"{path} missing")
    from tokenizers import Tokenizer

    text = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest."
    ids = torch.tensor([Tokenizer.from_file(str(path)).encode(text).ids]) % TINY["vocab_size"]
    model = tiny_model("gpt_neox", "mesh")
    policy = median_policy(model, ids, "entropy")
    full = run(model, ids, exit_policy=policy)
    assert len(set(full.exit_steps.flatten().tolist())) > 1
    logits, steps, _ = decode(model, ids, policy)
    assert torch.equal(steps, full.exit_steps)
    torch.testing.assert_close(logits, full.logits, **CLOSE)


def test_left_padding_changes_nothing_of_the_real_tokens():
    """Padding exits after step 1 (nothing attends to it); the real tokens of a left-padded row
    compute what they do unpadded."""
    model, ids = tiny_model("llama", "mesh"), tokens(batch=1, seq=10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    policy = median_policy(model, ids, "entropy")
    alone = run(model, ids, exit_policy=policy)
    out = run(model, padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), exit_policy=policy)
    assert out.exit_steps[0, :3].eq(1).all() and torch.equal(out.exit_steps[:, 3:], alone.exit_steps)
    torch.testing.assert_close(out.logits[:, 3:], alone.logits, **CLOSE)


# --- the 'latest' cache -----------------------------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
@family_and_scheme
def test_latest_cached_decode_equals_the_reference_in_fixed_memory(family, scheme, criterion):
    model, ids = tiny_model(family, scheme), tokens()
    policy = median_policy(model, ids, criterion, cache="latest")
    logits, steps, cache = decode(model, ids, policy)
    assert len(set(steps.flatten().tolist())) > 1
    assert_matches_reference(model, ids, logits, steps, policy)
    full = run(model, ids, exit_policy=policy)  # uncached: the positions one at a time all the same
    assert torch.equal(full.exit_steps, steps)
    torch.testing.assert_close(full.logits, logits, **CLOSE)
    used = [layer.get_seq_length() for layer in cache.layers if layer.get_seq_length()]
    assert used == [ids.shape[1]] * (1 + 2 + 1)  # prelude + core + coda, whatever the steps


@family_and_scheme
def test_latest_without_exits_is_not_the_fixed_depth(family, scheme):
    """'latest' is no fixed-depth cache: with every token running all K steps a later token still
    sees the earlier ones at their final step, not at its own step t. The first token, which sees
    only itself, is the fixed depth's."""
    model, ids = tiny_model(family, scheme), tokens()
    policy = ExitPolicy("entropy", -1.0, cache="latest")
    out, plain = run(model, ids, exit_policy=policy), run(model, ids).logits
    assert out.exit_steps.eq(K).all()
    torch.testing.assert_close(out.logits[:, 0], plain[:, 0], **CLOSE)
    assert (out.logits[:, 1:] - plain[:, 1:]).abs().amax() > 1e-2
    assert_matches_reference(model, ids, out.logits, out.exit_steps, policy)


# --- the exit gate ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gate_follows_ouros_cdf_rule(family):
    """One-token sequences (nothing to attend to but themselves, so each step's readout is the
    fixed depth's): a token exits at the first t with sum_{j<=t} lambda(j) prod_{i<j} (1 -
    lambda(i)) >= threshold, else at K, with that depth's logits."""
    model, ids = tiny_model(family, "mesh"), tokens(batch=24, seq=1)
    lam = torch.stack([lambdas(model, ids, t) for t in range(1, K)])  # [K - 1, b, 1]
    survival = torch.cat([torch.ones_like(lam[:1]), torch.cumprod(1 - lam, 0)[:-1]])
    cdf = torch.cumsum(lam * survival, 0)  # [K - 1, b, 1]
    threshold = float(cdf[1].median())
    expected = torch.where(cdf[0] >= threshold, 1, torch.where(cdf[1] >= threshold, 2, K))
    out = run(model, ids, exit_policy=ExitPolicy("gate", threshold))
    assert torch.equal(out.exit_steps, expected) and len(set(expected.flatten().tolist())) == 3
    for t in range(1, K + 1):
        rows = expected[:, 0] == t
        torch.testing.assert_close(out.logits[rows], run(model, ids, num_loops=t).logits[rows], **CLOSE)
    names = {n for n in model.state_dict() if "exit_gate" in n}
    assert names == {f"model.exit_gate.gates.{i}.{p}" for i in range(K - 1) for p in ("weight", "bias")}


# --- generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["per_step", "latest"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_generate_takes_a_policy_and_records_the_steps(cache, criterion):
    """generate(exit_policy=...) equals greedy argmax of full uncached forwards under the same
    policy; its record gets each forward's exit_steps (the prompt's, then one per new token but
    the last), which for 'per_step' are the full forward's."""
    model, prompt, new = tiny_model("llama", "mesh_shared"), tokens(batch=1, seq=5), 8
    policy = median_policy(model, tokens(batch=1), criterion, cache=cache, record=[])
    generated = greedy(model, prompt, new, exit_policy=policy)
    seq = prompt
    for _ in range(new):
        seq = torch.cat([seq, run(model, seq, exit_policy=policy).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated.sequences, seq)
    recorded = policy.record[:new]  # generate's forwards; the uncached ones above appended theirs after
    assert [r.shape[1] for r in recorded] == [5] + [1] * (new - 1)
    steps = torch.cat(recorded, 1)
    unrecorded = ExitPolicy.of({**vars(policy), "record": None})
    assert torch.equal(steps, run(model, seq[:, :-1], exit_policy=unrecorded).exit_steps)


def test_generate_with_a_dict_policy_and_the_config_default():
    """A dict (as config.json holds it) works as a generate argument and as config.exit_policy,
    which a save keeps; an explicit num_loops then wins; num_loops and exit_policy together fail."""
    model, prompt = tiny_model("gpt_neox", "mesh"), tokens(batch=1, seq=5)
    policy = {"criterion": "entropy", "threshold": 4.0, "cache": "latest"}
    by_argument = greedy(model, prompt, exit_policy=policy).sequences
    model.config.exit_policy = policy
    assert torch.equal(greedy(model, prompt).sequences, by_argument)
    assert torch.equal(run(model, prompt).logits, run(model, prompt, exit_policy=policy).logits)
    plain = run(model, prompt, num_loops=K)
    assert plain.exit_steps is None and torch.equal(plain.logits, run(model, prompt, exit_policy=NEVER_K).logits)
    with pytest.raises(ValueError, match="num_loops=2 and exit_policy=.*: pass one"):
        run(model, prompt, num_loops=2, exit_policy=policy)
    with pytest.raises(ValueError, match="num_loops=2 and exit_policy=.*: set one"):
        MegatronMeshConfig(**TINY, layout="1+2R3+1", num_loops=2, exit_policy=policy)


def test_the_config_policy_survives_save_and_load(tmp_path):
    model, ids = tiny_model("gpt_neox", "mesh_shared", exit_policy={"criterion": "gate", "threshold": 0.5}), tokens()
    model.save_pretrained(tmp_path / "export")
    loaded = MegatronMeshForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert loaded.config.exit_policy == {"criterion": "gate", "threshold": 0.5} and loaded.config.exit_gate
    out = run(loaded, ids)
    assert out.exit_steps is not None and torch.equal(out.logits, run(model, ids).logits)


# --- what is refused, and looping past K ------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(criterion="halt", threshold=0.1),
     r"ExitPolicy.criterion='halt': expected one of \('kl', 'entropy', 'gate'\)"),
    (dict(criterion="kl", threshold="0.1"), "ExitPolicy.threshold='0.1': expected a number"),
    (dict(criterion="kl", threshold=math.nan), "ExitPolicy.threshold=nan: expected a number"),
    (dict(criterion="gate", threshold=2.0), "ExitPolicy.threshold=2.0: expected 0..1 for criterion 'gate'"),
    (dict(criterion="kl", threshold=0.1, min_steps=0), "ExitPolicy.min_steps=0: expected an int >= 1"),
    (dict(criterion="kl", threshold=0.1, min_steps=3, max_steps=2),
     "ExitPolicy.max_steps=2: expected None or an int >= min_steps=3"),
    (dict(criterion="kl", threshold=0.1, cache="ring"),
     r"ExitPolicy.cache='ring': expected one of \('per_step', 'latest'\)"),
    (dict(criterion="kl", threshold=0.1, steps=2), r"exit_policy: unknown field\(s\) \['steps'\]: expected some of"),
])
def test_a_bad_policy_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ExitPolicy.of(fields)


def test_a_policy_the_model_cannot_run_is_named():
    model, ids = tiny_model("gpt_neox", "mesh"), tokens()
    with pytest.raises(ValueError, match=r"ExitPolicy.max_steps=4: expected 1..3 for this layout .*\(per-step"):
        run(model, ids, exit_policy=ExitPolicy("entropy", 1.0, max_steps=4))
    with pytest.raises(ValueError, match=r"ExitPolicy.min_steps=4: expected <= max_steps=3 \(None: the trained K\)"):
        run(model, ids, exit_policy=ExitPolicy("entropy", 1.0, min_steps=4))
    ungated = MegatronMeshForCausalLM(MegatronMeshConfig(**TINY, layout="1+2R3+1")).eval()
    with pytest.raises(ValueError, match="ExitPolicy.criterion='gate': expected a model with exit gates"):
        run(ungated, ids, exit_policy=ExitPolicy("gate", 0.5))
    shared = tiny_model("gpt_neox", "mesh_shared")
    with pytest.raises(ValueError, match=r"ExitPolicy.max_steps=4: expected 1..3 .*\(K - 1 exit gates\)"):
        run(shared, ids, exit_policy=ExitPolicy("gate", 0.5, max_steps=4))
    vanilla = MegatronMeshForCausalLM(MegatronMeshConfig(**TINY, layout="2", state_scheme="vanilla")).eval()
    with pytest.raises(ValueError, match="exit_policy: expected a recursive layout, got layout='2'"):
        run(vanilla, ids, exit_policy=NEVER_K)
    with pytest.raises(ValueError, match="ExitPolicy.criterion='entropy': expected lm_head"):
        with torch.no_grad():
            model.model(ids, exit_policy=NEVER_K)
    with pytest.raises(ValueError, match="exit_gate=True: expected a recursive layout with K >= 2"):
        MegatronMeshForCausalLM(MegatronMeshConfig(**TINY, layout="1+2R1+1", exit_gate=True))
    with pytest.raises(ValueError, match="ExitPolicy.threshold=2.0: expected 0..1"):  # at load, not later
        MegatronMeshForCausalLM(MegatronMeshConfig(**TINY, layout="1+2R3+1", exit_gate=True,
                                                   exit_policy={"criterion": "gate", "threshold": 2.0}))
    with torch.no_grad():  # the gate alone needs no output layer
        assert model.model(ids, exit_policy=ExitPolicy("gate", 0.5))[2] is not None


@pytest.mark.parametrize("cache", ["per_step", "latest"])
def test_a_tied_injection_loops_past_k_where_mesh_cannot(cache):
    """max_steps > K for a scheme without per-step parameters: never exiting, it is the plain
    forward at num_loops = max_steps (per_step), and generate sizes the cache for it."""
    model, ids = tiny_model("llama", "linear_injection"), tokens()
    deeper = ExitPolicy("entropy", -1.0, max_steps=5, cache=cache)
    out = run(model, ids, exit_policy=deeper)
    assert out.exit_steps.eq(5).all()
    if cache == "per_step":
        assert torch.equal(out.logits, run(model, ids, num_loops=5).logits)
        assert torch.equal(greedy(model, ids[:1, :5], exit_policy=deeper).sequences,
                           greedy(model, ids[:1, :5], num_loops=5).sequences)
    else:
        assert_matches_reference(model, ids, out.logits, out.exit_steps, deeper)
        greedy(model, ids[:1, :5], exit_policy=deeper)
    with pytest.raises(ValueError, match="ExitPolicy.max_steps=5: expected 1..3"):
        run(tiny_model("llama", "mesh"), ids, exit_policy=deeper)
