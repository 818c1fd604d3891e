"""The retrofitted-recurrence recipes (configs/retrofit/, McLeish et al. 2025): each source config
is the published Hugging Face model (its config.json read by the importer, its parameter count),
each retrofit keeps exactly the layers its layout names, and every file becomes Megatron
arguments. Models are built on the meta device: no memory for weights."""


import pytest
import torch

from conftest import REPO, megatron_args

RETROFIT = REPO / "configs" / "retrofit"

# The published config.json of each source model (the keys the importer reads):
# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T and meta-llama/Llama-3.2-1B.
TINYLLAMA_HF = {
    "model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "pretraining_tp": 1, "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "initializer_range": 0.02,
}
LLAMA_3_2_1B_HF = {
    "model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "pretraining_tp": 1, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "initializer_range": 0.02,
}

# (config, its config.json, the published parameter count)
SOURCES = [
    ("tinyllama-1.1b.yml", TINYLLAMA_HF, 1_100_048_384),
    ("llama-3.2-1b.yml", LLAMA_3_2_1B_HF, 1_235_814_400),
]

# (config, its source, the layout, the source layers it keeps: prelude, core, coda)
RETROFITS = [
    # the paper's TinyLlama layers (their convert_llama.py)
    ("tinyllama-1.1b-4+8+4.yml", "tinyllama-1.1b.yml", "4+8R4+4",
     (range(0, 4), range(10, 18), range(18, 22))),
    # their "last 4 layers" run: [0,1],[10,11,12,13],[14,15] (paper_plots/plot.py)
    ("llama-3.2-1b-2+4+2.yml", "llama-3.2-1b.yml", "2+4R32+2",
     (range(0, 2), range(10, 14), range(14, 16))),
    # the same rule: first 4, last 4, the 6 before those
    ("llama-3.2-1b-4+6+4.yml", "llama-3.2-1b.yml", "4+6R4+4",
     (range(0, 4), range(6, 12), range(12, 16))),
]

HF_OF = {name: hf for name, hf, _ in SOURCES}
PUBLISHED = {name: count for name, _, count in SOURCES}


def layer_params(hf: dict) -> int:
    """One Llama decoder layer: q, k, v, o projections, SwiGLU's gate, up and down, two RMSNorms."""
    h, ffn = hf["hidden_size"], hf["intermediate_size"]
    head = h // hf["num_attention_heads"]
    q = o = h * h
    k = v = h * hf["num_key_value_heads"] * head
    gate = up = down = h * ffn
    norms = 2 * h
    return q + k + v + o + gate + up + down + norms


def llama_params(hf: dict, layers: int) -> int:
    """Embedding table + the layers + final norm + output layer (unless tied to the table)."""
    table = hf["vocab_size"] * hf["hidden_size"]
    head = 0 if hf["tie_word_embeddings"] else table
    return table + layers * layer_params(hf) + hf["hidden_size"] + head


def load(name, overrides=()):
    from megatron_mesh.config.yaml_file import load_model_config

    return load_model_config(RETROFIT / name, overrides, perform_initialization=False,
                             use_cpu_initialization=True)


def built_params(name) -> int:
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec

    with torch.device("meta"):
        model = MeshGPTModel(load(name), spec=local_block_spec())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, hf, published", SOURCES, ids=[s[0] for s in SOURCES])
def test_the_plain_formula_gives_the_published_count(name, hf, published):
    assert llama_params(hf, hf["num_hidden_layers"]) == published


@pytest.mark.parametrize("name, hf, published", SOURCES, ids=[s[0] for s in SOURCES])
def test_a_source_config_is_what_the_importer_reads_from_its_config_json(name, hf, published):
    """The retrofit checkpoint (convert.py hf-to-megatron) carries the importer's model section;
    the trainer refuses a config whose architecture differs from it."""
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.hf.importer import model_section_from_hf

    imported = MeshConfig.from_section(model_section_from_hf(hf), use_cpu_initialization=True)
    assert load(name).model_section() == imported.model_section()


@pytest.mark.parametrize("name, hf, published", SOURCES, ids=[s[0] for s in SOURCES])
def test_a_source_model_has_the_published_parameter_count(megatron_world, name, hf, published):
    assert built_params(name) == published


@pytest.mark.parametrize("name, source, layout, kept", RETROFITS, ids=[r[0] for r in RETROFITS])
def test_a_retrofit_drops_exactly_the_layers_it_does_not_keep(megatron_world, name, source,
                                                              layout, kept):
    from megatron_mesh.hf.retrofit import LayerSelection

    hf = HF_OF[source]
    cfg = load(name)
    assert cfg.layout == layout and cfg.state_scheme == "additive_injection"
    # the converter's default layer choice is the recipe's
    selection = LayerSelection.default(cfg.parsed_layout, hf["num_hidden_layers"])
    assert (selection.prelude, selection.core, selection.coda) == tuple(tuple(r) for r in kept)
    dropped = hf["num_hidden_layers"] - sum(len(r) for r in kept)
    expected = PUBLISHED[source] - dropped * layer_params(hf)
    assert expected == llama_params(hf, hf["num_hidden_layers"] - dropped)
    assert built_params(name) == expected  # additive injection has no parameters
    # the rest of the model is the source's
    section, plain = cfg.model_section(), load(source).model_section()
    loop_keys = {"layout", "state_scheme", "initial_state", "loop_depth", "mean_loops",
                 "backprop_loops", "mean_loops_schedule", "mean_loops_start",
                 "mean_loops_ramp_iters", "buffer_slots"}
    assert {k: v for k, v in section.items() if k not in loop_keys} == \
        {k: v for k, v in plain.items() if k not in loop_keys}


@pytest.mark.parametrize("name, source, layout, kept", RETROFITS, ids=[r[0] for r in RETROFITS])
def test_a_retrofits_depth_curriculum_ends_at_its_training_depth(name, source, layout, kept):
    from megatron_mesh.config.yaml_file import load_config_tree
    from megatron_mesh.recurrence.loop_depth import LoopDepth

    cfg = load(name)
    depth = LoopDepth.of(cfg)
    assert depth.mean == cfg.num_loops and depth.ramps
    assert depth.mean_at(0) == 1 and depth.mean_at(cfg.mean_loops_ramp_iters) == cfg.num_loops
    # their ramp is a fraction of the run (0.75 or 0.125): it moves with train_iters
    iters = load_config_tree(RETROFIT / name)[0]["training"]["train_iters"]
    assert cfg.mean_loops_ramp_iters / iters in (0.75, 0.125)


@pytest.mark.parametrize("path", sorted(RETROFIT.glob("*.yml")), ids=lambda p: p.name)
def test_every_recipe_becomes_megatron_arguments(path):
    args = megatron_args(path)
    assert args.seq_length == 1024 and args.micro_batch_size == 8 and args.lr == 5e-5
    assert args.global_batch_size * args.seq_length in (2 ** 20, 2 ** 19)


def test_the_documented_overrides_give_the_papers_other_schedules():
    """The comments' ways to their WSD cooldown and to the Figure 2 run parse and validate."""
    wsd = ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "30000", "--lr-wsd-decay-style", "cosine"]
    args = megatron_args(RETROFIT / "tinyllama-1.1b-4+8+4.yml", passthrough=wsd)
    assert (args.lr_decay_style, args.lr_wsd_decay_iters, args.lr_warmup_iters) == ("WSD", 30000, 125)
    figure_2 = ["model.mean_loops_schedule=constant", "model.mean_loops_start=null",
                "model.mean_loops_ramp_iters=null", "training.global_batch_size=4096",
                "training.train_iters=null", "training.train_tokens=250e9", "schedule.warmup_iters=77"]
    args = megatron_args(RETROFIT / "llama-3.2-1b-2+4+2.yml", figure_2)
    assert args.train_iters * args.global_batch_size * args.seq_length >= 250e9
    assert load("llama-3.2-1b-2+4+2.yml", figure_2).mean_loops_schedule == "constant"
    deeper = load("tinyllama-1.1b-4+8+4.yml", ["model.layout=4+8R16+4", "model.backprop_loops=8"])
    assert (deeper.mean_loops, deeper.backprop_loops, deeper.num_layers) == (16, 8, 4 + 8 * 16 + 4)
