"""YAML -> Megatron arguments: every config maps, the paper configs hold the paper's numbers."""

import argparse
import json

import pytest

from conftest import REPO, model_configs

from megatron_mesh.config.yaml_file import load_config_tree
from megatron_mesh.errors import ConfigError


def megatron_parser():
    from megatron.training.arguments import add_megatron_arguments

    from megatron_mesh.training.arguments import add_mesh_arguments

    return add_mesh_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))


def parsed(path, overrides=()):
    from megatron_mesh.training.arguments import megatron_argv

    return megatron_parser().parse_args(megatron_argv(*load_config_tree(path, overrides)))


def training_configs():
    return [p for p in model_configs() if "training" in load_config_tree(p)[0]]


def test_every_training_config_maps_to_megatron_arguments():
    from megatron_mesh.training.arguments import megatron_argv

    parser = megatron_parser()
    files = training_configs()
    assert len(files) > 30
    for path in files:  # the files a config names (demo-cpu.yml's runs/demo/tokenizer) may not exist yet
        args = parser.parse_args(megatron_argv(*load_config_tree(path), check_paths=False))
        assert json.loads(args.mesh_model)["layout"]


def test_paper_1_4b_mesh_has_the_papers_numbers():
    args = parsed(REPO / "configs/pythia-1.4b-4+8R2+4-mesh.yml")
    assert args.train_iters * args.global_batch_size * args.seq_length == 120_818 * 512 * 4096
    assert 120_818 * 512 * 4096 == 253_373_710_336
    assert (args.seq_length, args.global_batch_size) == (4096, 512)
    assert args.lr == 2e-4 and args.min_lr == pytest.approx(2e-5)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.95, 1e-8)
    assert args.weight_decay == 0.01 and args.clip_grad == 1.0
    assert args.lr_decay_style == "cosine" and args.lr_warmup_fraction == 0.01
    assert args.bf16 and not args.fp16
    assert args.num_layers == 24 and args.hidden_size == 2048 and args.num_attention_heads == 16
    assert args.untie_embeddings_and_output_weights and args.rotary_percent == 0.25
    assert args.padded_vocab_size == 50304 and args.ckpt_format == "torch_dist"
    assert json.loads(args.mesh_model)["state_scheme"] == "mesh"


@pytest.mark.parametrize("size, lr", [("160m", 6e-4), ("410m", 3e-4), ("1b", 2.5e-4), ("1.4b", 2e-4)])
def test_peak_learning_rate_per_size(size, lr):
    path = next((REPO / "configs").glob(f"pythia-{size}-*-mesh.yml"))
    assert parsed(path).lr == lr


def test_train_tokens_round_up_to_whole_batches():
    args = parsed(
        REPO / "configs/tiny-cpu.yml", ["training.train_iters=null", "training.train_tokens=10000"]
    )
    assert args.train_iters == 20  # ceil(10000 / (8 * 64))


def test_passthrough_wins_and_yaml_floats_are_numbers(tmp_path):
    from megatron_mesh.training.arguments import megatron_argv

    argv = megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", ["optimizer.lr=6e-4"]))
    args = megatron_parser().parse_args(argv + ["--lr", "1e-3"])
    assert args.lr == 1e-3
    assert megatron_parser().parse_args(argv).lr == 6e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("precision.dtype=bf8", "precision.dtype='bf8': expected one of ['bf16', 'fp16', 'fp32']"),
        ("schedule.style=cosin", "schedule.style='cosin': expected one of"),
        ("optimizer.lr=null", "missing required key 'optimizer.lr'"),
        ("training.train_tokens=1000", "exactly one of 'training.train_iters' and 'training.train_tokens'"),
        ("optimizer.betas=[0.9]", "optimizer.betas=[0.9]: expected [beta1, beta2]"),
        ("data.mock=false", "no training data"),
        ("logging.wandb_mod=offline", "unknown key 'logging.wandb_mod'; did you mean 'logging.wandb_mode'"),
        ("model.layout=4+8R0+4", "K must be >= 1"),
        ('optimizer.lr="6e-4"', "optimizer.lr='6e-4' has type str, expected float"),
        ("data.mask_eod_loss=maybe", "data.mask_eod_loss='maybe' has type str, expected bool"),
        ("training.micro_batch_size=2.5", "training.micro_batch_size=2.5 has type float, expected int"),
        ("parallelism.pipeline=4", "N_compute=6 layer applications do not split evenly over 4 "
                                   "pipeline stages: set pipeline_stage_layers, e.g. [1, 1, 2, 2]"),
        ("parallelism.pipeline_stage_layers=[3,4]",
         "pipeline_stage_layers=[3, 4]: expected 1 positive counts summing to N_compute=6"),
        ("parallelism.virtual_pipeline=2", "parallelism.virtual_pipeline=2 needs pipeline >= 2 (got 1)"),
        # megatron's bare asserts (arguments.py:676, optimizer_param_scheduler.py:150-160) and
        # torch's "value cannot be converted to type float without overflow" (a float32 lr tensor)
        ("training.micro_batch_size=0", "--set training.micro_batch_size=0: training.micro_batch_size=0: "
                                        "expected >= 1"),
        ("optimizer.lr=-1", "optimizer.lr=-1: expected 0 <= value <= 3.40282e+38 (megatron holds the "
                            "learning rate in a float32 tensor)"),
        ("optimizer.lr=1e39", "optimizer.lr=1e+39: expected 0 <= value <= 3.40282e+38"),
        ("optimizer.lr=.nan", "optimizer.lr=nan: expected 0 <= value"),
        ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio=2: expected 0 <= value <= 1"),
        ("schedule.warmup_iters=40", "schedule.warmup_iters=40: expected fewer than the 40 decay iterations"),
        ("optimizer.betas=[0.9, 1.5]", "optimizer.betas=[0.9, 1.5]: expected [beta1, beta2], each 0 <= beta < 1"),
        # megatron's scheduler: assert self.wsd_decay_steps is not None
        ("schedule.style=WSD", "schedule.style=WSD needs schedule.wsd_decay_iters"),
    ],
)
def test_bad_values_fail_clearly(override, message):
    from megatron_mesh.training.arguments import megatron_argv

    with pytest.raises(ConfigError) as err:
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", [override]))
    assert message in str(err.value)


def test_pipeline_split_maps_to_megatron():
    args = parsed(REPO / "configs/tiny-cpu.yml",
                  ["parallelism.pipeline=2", "parallelism.pipeline_stage_layers=[2,4]"])
    assert args.pipeline_model_parallel_size == 2 and args.mesh_pipeline_stage_layers == [2, 4]
    # megatron's own divisibility check is satisfied through its first/last-stage sizes
    assert (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers) == (2, 4)
    from megatron_mesh.training.arguments import megatron_argv

    with pytest.raises(ConfigError, match="middle stages' 3 layer applications divisible by 2"):
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", [
            "parallelism.pipeline=4", "parallelism.pipeline_stage_layers=[1,2,1,2]"]))
    with pytest.raises(ConfigError, match="overlap_grad_reduce with pipeline=2 is not supported"):
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", [
            "parallelism.pipeline=2", "parallelism.overlap_grad_reduce=true"]))


def test_virtual_pipeline_maps_to_megatron():
    """megatron validates no layer counts under VPP, so no first/last-stage sizes are passed;
    the split lists every virtual stage."""
    args = parsed(REPO / "configs/tiny-cpu.yml", [
        "parallelism.pipeline=2", "parallelism.virtual_pipeline=2",
        "parallelism.pipeline_stage_layers=[2,1,2,1]"])
    assert args.num_virtual_stages_per_pipeline_rank == 2  # validate_args turns it into VPP=2
    assert args.mesh_pipeline_stage_layers == [2, 1, 2, 1]
    assert args.decoder_first_pipeline_num_layers is None
    from megatron_mesh.training.arguments import megatron_argv

    with pytest.raises(ConfigError, match="expected 4 positive counts summing to N_compute=6"):
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", [
            "parallelism.pipeline=2", "parallelism.virtual_pipeline=2",
            "parallelism.pipeline_stage_layers=[2,4]"]))


def test_flops_in_the_log_agree_with_model_stats():
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from model_stats import build_stats

    from megatron_mesh.config.yaml_file import load_model_config
    from megatron_mesh.training.throughput import ThroughputLogger

    path = REPO / "configs/pythia-1.4b-4+8R2+4-mesh.yml"
    stats = build_stats(path, seq_length=4096)
    from megatron_mesh.model.stats import train_flops_per_token

    logger = ThroughputLogger(train_flops_per_token(load_model_config(path), 4096), peak_tflops=989.0)
    args = argparse.Namespace(seq_length=4096, global_batch_size=512, world_size=8,
                              consumed_train_samples=0, train_iters=10)
    assert logger.num_floating_point_operations(args, 512) == 512 * 4096 * stats.train_flops_per_token
    logger.line(args, 0, 0.0)
    line = logger.line(args, 10, 100.0)  # 10 iterations in 100 s
    tokens_per_s = 512 * 4096 / 10.0
    assert line["tokens-per-sec"] == pytest.approx(tokens_per_s)
    assert line["tflops-per-device"] == pytest.approx(tokens_per_s * stats.train_flops_per_token / 1e12 / 8)
    assert line["mfu"] == pytest.approx(line["tflops-per-device"] / 989.0)


@pytest.fixture
def wandb_installed(monkeypatch):
    """``wandb_installed(bool)``: importlib sees wandb or not (the GPU image has none)."""
    import importlib.util

    real = importlib.util.find_spec

    def pretend(installed):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
            (real("json") if installed else None) if name == "wandb" else real(name, *a)))
    return pretend


def test_wandb_disabled_never_reaches_megatron(wandb_installed):
    from megatron_mesh.training.arguments import megatron_argv

    wandb_installed(True)
    sets = ["logging.wandb_project=p", "logging.wandb_mode=disabled"]
    argv = megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", sets))
    assert "--wandb-project" not in argv  # Megatron only imports wandb when a project is set
    argv = megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", sets[:1]))
    assert argv[argv.index("--wandb-project") + 1] == "p"


def test_wandb_without_the_package_is_refused_naming_the_key(wandb_installed):
    from megatron_mesh.training.arguments import megatron_argv

    wandb_installed(False)
    tree = load_config_tree(REPO / "configs/tiny-cpu.yml", ["logging.wandb_project=p"])
    with pytest.raises(ConfigError, match=r"--set logging.wandb_project=p: logging.wandb_project='p' logs "
                                          r"to Weights & Biases, but the wandb package is not installed: "
                                          r"pip install wandb, or set logging.wandb_mode: disabled"):
        megatron_argv(*tree)
    tree = load_config_tree(REPO / "configs/tiny-cpu.yml", ["logging.wandb_project=p", "logging.wandb_mode=disabled"])
    assert "--wandb-project" not in megatron_argv(*tree)



def test_paper_configs_read_pythia_order():
    args = parsed(REPO / "configs/pythia-410m-4+8R2+4-mesh.yml")
    assert args.mesh_data_format == "pythia_preshuffled" and args.mesh_pythia_boundary == "per_row"
    assert args.data_path == ["data/pile-deduped-pythia-preshuffled/document"]


def test_gradient_accumulation_fusion_only_with_apex_extension(monkeypatch, megatron_world):
    """megatron's ColumnParallelLinear refuses to build with the fusion on and apex's
    fused_weight_gradient_mlp_cuda missing (the case here, and on GPU images without apex)."""
    import importlib.util

    from megatron.core.tensor_parallel import layers

    from conftest import tiny_config
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.training import arguments

    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        MeshGPTModel(tiny_config(gradient_accumulation_fusion=True))

    config = REPO / "configs/pythia-410m-4+8R2+4-mesh.yml"
    assert importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None
    assert not layers._grad_accum_fusion_available  # what megatron-core itself found
    assert parsed(config).gradient_accumulation_fusion is False
    real = importlib.util.find_spec
    monkeypatch.setattr(arguments.importlib.util, "find_spec",
                        lambda name: object() if name == "fused_weight_gradient_mlp_cuda" else real(name))
    assert parsed(config).gradient_accumulation_fusion is True


def test_sampled_depth_refuses_what_the_trainer_cannot_follow():
    """Checked before torchrun starts: under pipeline parallelism a draw that may not fit the
    layout's K steps or a stage boundary inside a loop step, and megatron-core DDP's fixed
    gradient-hook count per parameter under overlap + full recompute."""
    from megatron_mesh.training.arguments import megatron_argv

    tiny = REPO / "configs/tiny-cpu.yml"  # 1+2R2+1: prelude 0, step 0 at 1-2, step 1 at 3-4
    sampled = ["model.state_scheme=linear_injection", "model.loop_depth=poisson", "model.mean_loops=2"]
    with pytest.raises(ConfigError, match=r"graph of the layout's K=2 loop steps .* set max_loops <= 2"):
        megatron_argv(*load_config_tree(tiny, [*sampled, "parallelism.pipeline=2"]))
    with pytest.raises(ConfigError, match="a stage starts at layer application 2, inside loop step 0"):
        megatron_argv(*load_config_tree(tiny, [*sampled, "model.max_loops=2", "parallelism.pipeline=2",
                                               "parallelism.pipeline_stage_layers=[2,4]"]))
    megatron_argv(*load_config_tree(tiny, [*sampled, "model.max_loops=2", "parallelism.pipeline=2"]))
    overlap = ["parallelism.overlap_grad_reduce=true",
               "parallelism.distributed_optimizer=true", "parallelism.recompute_granularity=full",
               "parallelism.recompute_method=uniform", "parallelism.recompute_num_layers=1"]
    with pytest.raises(ConfigError, match="golden_per_param_grad_ready_counts"):
        megatron_argv(*load_config_tree(tiny, [*sampled, *overlap, "model.backprop_loops=2"]))
    megatron_argv(*load_config_tree(tiny, [*sampled, *overlap, "model.backprop_loops=1"]))
    megatron_argv(*load_config_tree(tiny, [*sampled, *overlap[:2], "model.backprop_loops=2"]))


def test_numbers_after_the_double_dash_get_their_keys_bounds():
    """`-- --lr 1e39` went to megatron unchecked and ended ~25 s later in torch's overflow."""
    from megatron_mesh.training.arguments import check_passthrough

    for argv in (["--lr", "1e39"], ["--eval-iters", "2", "--lr=1e39"]):
        with pytest.raises(ConfigError) as err:
            check_passthrough(argv)
        assert str(err.value) == ("-- --lr 1e39 (the flag of optimizer.lr): expected 0 <= value <= "
                                  "3.40282e+38 (megatron holds the learning rate in a float32 tensor)")
    with pytest.raises(ConfigError, match=r"-- --micro-batch-size 0 \(the flag of training.micro_batch_size\): "
                                          r"expected >= 1"):
        check_passthrough(["--micro-batch-size", "0"])
    # fine values, flags without bounds, and what is no number (megatron's parser names it)
    check_passthrough(["--lr", "1e-3", "--override-opt_param-scheduler", "--seq-length", "64", "--lr", "x"])


def tokenizer_tree(tmp_path, model):
    sets = ["tokenizer.type=HuggingFaceTokenizer", f"tokenizer.model={model}"]
    return load_config_tree(REPO / "configs/tiny-cpu.yml", sets if model is not None else sets[:1])


def test_the_tokenizer_is_checked_before_megatron_starts(tmp_path):
    """A missing tokenizer path reached megatron, which failed after ~25 s in three tracebacks
    ending in transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    from megatron_mesh.data.tokenizer import EXPECTED
    from megatron_mesh.training.arguments import megatron_argv

    missing = tmp_path / "20B_tokenizer.json"
    with pytest.raises(ConfigError) as err:
        megatron_argv(*tokenizer_tree(tmp_path, missing))
    assert str(err.value) == (f"--set tokenizer.model={missing}: tokenizer.model='{missing}': no such file or "
                              f"directory; expected {EXPECTED}")
    with pytest.raises(ConfigError, match="tokenizer.model='.*': a directory without tokenizer.json"):
        megatron_argv(*tokenizer_tree(tmp_path, tmp_path))
    with pytest.raises(ConfigError, match="tokenizer.model is unset: tokenizer.type=HuggingFaceTokenizer needs"):
        megatron_argv(*tokenizer_tree(tmp_path, None))
    (tmp_path / "sp.model").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a SentencePiece model: set tokenizer.type: SentencePieceTokenizer"):
        megatron_argv(*tokenizer_tree(tmp_path, tmp_path / "sp.model"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    for usable in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", "EleutherAI/gpt-neox-20b"):
        assert f"--tokenizer-model {usable}" in " ".join(megatron_argv(*tokenizer_tree(tmp_path, usable)))
    with pytest.raises(ConfigError, match="tokenizer.type=TikTokenizer needs the path of an existing"):
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", ["tokenizer.type=TikTokenizer"]))


def test_wsd_schedule_maps_to_megatron():
    args = parsed(REPO / "configs/tiny-cpu.yml", ["schedule.style=WSD", "schedule.wsd_decay_iters=3",
                                                  "schedule.wsd_decay_style=cosine"])
    assert (args.lr_decay_style, args.lr_wsd_decay_iters, args.lr_wsd_decay_style) == ("WSD", 3, "cosine")
    from megatron_mesh.training.arguments import megatron_argv

    with pytest.raises(ConfigError, match="wsd_decay_iters=99: expected at most the"):
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", [
            "schedule.style=WSD", "schedule.wsd_decay_iters=99", "training.train_iters=20"]))
