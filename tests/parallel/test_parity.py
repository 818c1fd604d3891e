"""Parallel training equals the single-process run: real torchrun processes, Megatron's trainer,
gloo on CPU. Every run starts from the same release checkpoint (so initialisation cannot differ
between layouts, and each parallel run also loads a TP=1-written checkpoint resharded) and
reads the same data; we compare the lm loss and grad norm of the first three optimizer steps,
as TensorBoard records them (full fp32 precision).

bf16 (``precision.dtype: bf16``, the production path: megatron's Float16Module, fp32 main
parameters and gradients, the distributed optimizer's main-parameter shards) is compared with a
bf16 single process, for mesh and anchor, under TP=2 + SP, PP=2 splitting the core, PP=2 x VP=2
and DP=2 with the distributed optimizer; the TP=2 and PP=2 x VP=2 checkpoints resume at TP=PP=1.
fp32 keeps the four-process TP=2+SP x PP=2.

Tolerance, fp32: parallel runs sum the same fp32 numbers in another order (TP splits matmuls and
reduces partial sums, SP all-reduces router and norm gradients, DP averages micro-batch
gradients with reduce-scatter): gradients agree to ~1e-8 and losses to ~1e-7 relative (1e-5
allowed). The grad norm gets 1e-4: without apex, megatron-core computes it with
utils.local_multi_tensor_l2_norm (fp32 torch.norm per tensor, then of the norms), which is off
the float64 value by ~1.6e-5 relative for this model, differently for each way the tensors are
split. A wrong reduction (a missing or doubled gradient all-reduce) moves the grad norm by
percents and the losses from step 2 on by far more.

Tolerance, bf16 (u = 2^-8): a layout changes the fp32 sums behind each bf16 rounding. Where
those sums differ only in order (~1e-7 relative), the rounded bf16 value changes only when the
sum lies within ~1e-7 of a rounding boundary, i.e. for ~1e-7 / u ~ 3e-5 of the elements, by one
ulp (2u); where TP rounds each rank's partial sum before the all-reduce (row-parallel linears),
every element may move by u. Averaged over the 512 token losses and the ~2e5 squared gradient
elements these move the loss by a few 1e-6 and the grad norm by ~1e-4 (measured: <= 5.2e-6 and
<= 1.2e-4, TP=2+SP the largest). Allowed: 3e-5 and 5e-4. A rank silently computing in fp32
moves the step-2 loss by ~5e-4 (the fp32 and bf16 single-process runs differ that much), a
missing reduction the grad norm by percents.
"""

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from batch import release_checkpoint, tiny_section
from trainer import train

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

STEPS = 3


@pytest.fixture(scope="module", params=["mesh", "anchor"])
def start(request, tmp_path_factory, megatron_world):
    """A release checkpoint of a random tiny-cpu.yml model with the given scheme."""
    scheme = request.param
    return scheme, release_checkpoint(tmp_path_factory, f"start-{scheme}", tiny_section(scheme))


def scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("lm loss", "grad-norm")}


def run(tmp_path, start, name, nproc=1, dtype="fp32", save=None, passthrough=(), extra_env=None,
        **settings):
    """One training run from the shared checkpoint (or from the checkpoint in ``save``, if it
    holds one, saving there): its TensorBoard scalars and, under "log" and "full_log", its
    console and every rank's whole output."""
    scheme, ckpt = start
    overrides = {"model.state_scheme": scheme, "checkpointing.pretrained": ckpt,
                 "training.train_iters": STEPS, "precision.dtype": dtype, "logging.interval": 1,
                 "logging.tensorboard_dir": tmp_path / f"tb-{name}", "logging.log_dir": tmp_path / f"logs-{name}",
                 **settings}
    if save is not None:
        overrides["checkpointing.save"] = tmp_path / save
    log, _ = train(tmp_path, [f"{k}={v}" for k, v in overrides.items()], nproc=nproc,
                   passthrough=passthrough, extra_env=extra_env)
    # every rank's whole output: the argument dump, test probes' lines, megatron's warnings
    full_log = "".join(f.read_text() for f in sorted((tmp_path / f"logs-{name}").glob("rank-*.log")))
    return {**scalars(tmp_path / f"tb-{name}"), "log": log, "full_log": full_log}


@pytest.fixture(scope="module")
def reference(start, tmp_path_factory):
    """The fp32 single-process run, saving after every step."""
    tmp = tmp_path_factory.mktemp("reference")
    return {**run(tmp, start, "reference", save="reference", **{"checkpointing.interval": 1}),
            "dir": tmp / "reference"}


@pytest.fixture(scope="module")
def bf16_reference(start, tmp_path_factory):
    """The bf16 single-process run with the distributed optimizer (the production setting),
    saving after every step."""
    tmp = tmp_path_factory.mktemp("bf16-reference")
    return {**run(tmp, start, "reference", dtype="bf16", save="reference",
                  **{"checkpointing.interval": 1, "parallelism.distributed_optimizer": True}),
            "dir": tmp / "reference"}


TOLERANCE = {"fp32": {"lm loss": 1e-5, "grad-norm": 1e-4},
             "bf16": {"lm loss": 3e-5, "grad-norm": 5e-4}}


def assert_same_run(got, want, dtype="fp32", steps=range(1, STEPS + 1)):
    for tag in ("lm loss", "grad-norm"):
        assert sorted(got[tag]) == list(steps), tag
        for step in steps:
            rel = TOLERANCE[dtype][tag]
            assert got[tag][step] == pytest.approx(want[tag][step], rel=rel), (tag, step, got[tag], want[tag])


SP = {"parallelism.tensor": 2, "parallelism.sequence_parallel": True}
DISTOPT = {"parallelism.distributed_optimizer": True, "parallelism.overlap_grad_reduce": True,
           "parallelism.overlap_param_gather": True}
# stage 0: prelude + the first layer of loop step 0; stage 1: the rest (the core is split, both
# stages hold core layer 0, and the MeSH buffer crosses the boundary mid-loop)
PP2_SPLIT_CORE = {"parallelism.pipeline": 2, "parallelism.pipeline_stage_layers": "[2,4]"}
TP2_PP2 = {**SP, **PP2_SPLIT_CORE}
# 2 ranks x 2 virtual stages (interleaved schedule): stages 0..3 hold [prelude, core 0 of step 0],
# [core 1 of step 0], [step 1's core], [coda]; rank 0 holds core layer 0 in both of its chunks
PP2_VP2 = {"parallelism.pipeline": 2, "parallelism.virtual_pipeline": 2,
           "parallelism.pipeline_stage_layers": "[2,1,2,1]"}
# bf16 runs use megatron's Float16OptimizerWithFloat16Params (TP, PP) or the distributed
# optimizer (DP, PP x VP), against the distributed optimizer at DP = 1: both keep fp32 main
# parameters, so they must agree. (fp32 and the distributed optimizer: tests/tools/test_pretrain.py)
DISTOPT_PP = {"parallelism.distributed_optimizer": True}
BF16_CASES = {"tp2-sp": (2, SP), "dp2-distopt-overlap": (2, DISTOPT),
              "pp2-split-core": (2, PP2_SPLIT_CORE), "pp2-vp2-distopt": (2, {**PP2_VP2, **DISTOPT_PP})}
# DP=2 overlaps the parameter all-gathers, which megatron's DDP chains bucket by bucket in the
# order the parameters are registered; buckets of ~30K parameters split this model between and
# inside layers, so a module used before its registration turn shows (megatron-core warns).
PASSTHROUGH = {"dp2-distopt-overlap": ("--ddp-bucket-size", "30000")}
OUT_OF_ORDER = "The next bucket's parameter all-gather operation has already been dispatched"
# pipeline runs count their P2P sends and shape handshakes (p2p_probe/sitecustomize.py)
P2P_PROBE = {"PYTHONPATH": str(Path(__file__).parent / "p2p_probe")}
PIPELINED = ("pp2-split-core", "pp2-vp2-distopt")
RESUMED = ("tp2-sp", "pp2-vp2-distopt")
"""Runs that save every step: test_checkpoint_resumes_unparallelized_and_exports resumes them."""


@pytest.fixture(scope="module")
def bf16_runs(start, tmp_path_factory):
    """name -> the bf16 run of BF16_CASES[name] (run once per scheme, on first use)."""
    done = {}

    def get(name):
        if name not in done:
            tmp = tmp_path_factory.mktemp(f"bf16-{name}")
            nproc, settings = BF16_CASES[name]
            saving = ({"checkpointing.interval": 1, "checkpointing.optimizer_reshardable": True}
                      if name in RESUMED else {})
            done[name] = {**run(tmp, start, name, nproc, "bf16", name if saving else None,
                                PASSTHROUGH.get(name, ()), P2P_PROBE if name in PIPELINED else None,
                                **settings, **saving), "dir": tmp / name}
        return done[name]

    return get


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_parallel_run_matches_single_process(start, bf16_reference, bf16_runs, name):
    """PP=2 x VP=2 also proves that the core weights two chunks of one rank share (one
    parameter, borrowed by the later chunk) survive Float16Module's bf16 conversion and the
    distributed optimizer's main-parameter copies: a chunk computing with a stale copy would
    lose that copy's gradient (step-1 grad norm) and its updates (later losses)."""
    assert_same_run(bf16_runs(name), bf16_reference, "bf16")


def test_parameters_are_used_in_registration_order(bf16_runs):
    """The scheme is registered after the prelude (its transitional step runs there) and the
    parallel-residual layer runs attention before the MLP, as registered: no bucket's
    all-gather is waited for before its turn."""
    assert OUT_OF_ORDER not in bf16_runs("dp2-distopt-overlap")["full_log"]


@pytest.mark.parametrize("name", PIPELINED)
def test_pipeline_sends_fixed_shapes(bf16_runs, name):
    """Every boundary sends the run's one carry width, so megatron-core's schedules exchange no
    shapes (each exchange: a blocking handshake and a device sync before the send)."""
    counts = re.findall(r"\[p2p-probe\] rank (\d): sends (\d+), shape handshakes (\d+)",
                        bf16_runs(name)["full_log"])
    assert sorted(int(rank) for rank, _, _ in counts) == [0, 1]
    assert all(int(sends) > 0 and int(handshakes) == 0 for _, sends, handshakes in counts), counts


def mesh_reference(request, start, name="reference"):
    """The reference fixture ``name`` for the mesh model; other schemes skip (before building it)."""
    if start[0] != "mesh":
        pytest.skip("runs for the mesh model only")
    return request.getfixturevalue(name)


def test_fp32_tp2_sp_pp2_matches_single_process(request, tmp_path, start):
    """(mesh only) fp32, four processes: TP=2 with SP inside each of two pipeline stages."""
    reference = mesh_reference(request, start)
    assert_same_run(run(tmp_path, start, "tp2-sp-pp2", 4, **TP2_PP2), reference)


def test_bf16_resume_is_exact(request, tmp_path, start):
    """(mesh only) A bf16 run with the distributed optimizer resumed from its step-2
    checkpoint (bf16 weights; the optimizer's fp32 main parameters, Adam moments and step)
    logs the uninterrupted run's step 3 bit for bit and saves the same weights. (Without apex
    or TE this resume needs megatron_mesh.training.megatron_fixes.)"""
    from megatron_mesh.checkpoint.reader import load_checkpoint

    bf16_reference = mesh_reference(request, start, "bf16_reference")
    saved = tmp_path / "resumed"
    shutil.copytree(bf16_reference["dir"] / "iter_0000002", saved / "iter_0000002")
    (saved / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = run(tmp_path, start, "resumed", dtype="bf16", save="resumed",
                  **{"parallelism.distributed_optimizer": True})
    for tag in ("lm loss", "grad-norm"):
        assert resumed[tag] == {3: bf16_reference[tag][3]}, tag
    got, _ = load_checkpoint(str(saved), iteration=3)
    want, _ = load_checkpoint(str(bf16_reference["dir"]), iteration=3)
    assert got.keys() == want.keys()
    for key in want:
        assert want[key].dtype == torch.bfloat16, key  # the model's own (bf16) weights are saved
        assert torch.equal(got[key], want[key]), key


def test_router_statistics_are_logged(start, bf16_reference):
    """The trainer logs MeSH router statistics to TensorBoard every log interval (here 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(bf16_reference["dir"].parent / "tb-reference"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("mesh/router/")]
    if start[0] != "mesh":
        assert tags == []
        return
    slots = tiny_section("mesh").get("buffer_slots") or 2 + 3  # K + 3 for 1+2R2+1
    assert {t.split("/")[2] for t in tags} == {"transition", "step0", "step1"}
    for tag in tags:
        values = [e.value for e in events.Scalars(tag)]
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
        if tag.endswith("_norm"):
            assert all(0.0 < v <= 1.0 for v in values), (tag, values)
    # routers start near uniform (small random weights, zero bias)
    first = events.Scalars("mesh/router/transition/write_entropy")[0].value
    assert first == pytest.approx(math.log(slots), rel=0.05)


@pytest.mark.parametrize("name", RESUMED)
def test_checkpoint_resumes_unparallelized_and_exports(request, tmp_path, start, name):
    """(mesh only) The bf16 TP=2+SP or PP=2 x VP=2 (distributed optimizer, saved reshardable)
    run's step-2 checkpoint resumes at TP=PP=1 with its optimizer (state resharded): step three
    is the single-process run's step three, and the parallel checkpoint exports the reference's
    weights up to bf16 noise. The PP x VP split holds core weights on both ranks (replicas,
    saved once) and twice on rank 0 (one tied parameter)."""
    from megatron_mesh.checkpoint.reader import load_checkpoint

    reference = mesh_reference(request, start, "bf16_reference")
    parallel = request.getfixturevalue("bf16_runs")(name)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(parallel["dir"] / "iter_0000002", resumed_dir / "iter_0000002")
    (resumed_dir / "latest_checkpointed_iteration.txt").write_text("2")
    optimizer = {k: v for k, v in BF16_CASES[name][1].items() if k == "parallelism.distributed_optimizer"}
    resumed = run(tmp_path, start, "resumed", dtype="bf16", save="resumed", **optimizer)
    assert_same_run(resumed, reference, "bf16", steps=[3])

    saved, _ = load_checkpoint(str(parallel["dir"]), iteration=2)
    saved_tp1, _ = load_checkpoint(str(reference["dir"]), iteration=2)
    assert saved.keys() == saved_tp1.keys()
    # Adam divides each gradient element by its own RMS, so where a gradient is near 0 (a sum
    # that nearly cancels, e.g. a router bias) the layouts' bf16 rounding noise (TP+SP rounds
    # each rank's partial sums) can change that element's update by up to 2 lr per step
    # (|update| <= lr): 4 lr = 0.012 over two steps, plus one bf16 ulp of storage rounding.
    # Over all weights the updates of the two runs differ by 3.1% (TP=2+SP) and 0.9% (PP=2 x
    # VP=2) of the update itself (measured); a wrong resharding or a missing gradient reduction
    # changes whole tensors: O(1) of the update or more. Allowed: 10%.
    start_weights, _ = load_checkpoint(str(start[1]))
    update = difference = 0.0
    for key, want in saved_tp1.items():
        diff, scale = (saved[key].float() - want.float()).abs(), want.float().abs()
        assert (diff <= 4 * 3e-3 + 2**-7 * scale).all(), (key, diff.max())
        difference += diff.square().sum().item()
        update += (want.float() - start_weights[key].float()).square().sum().item()
    assert (difference / update) ** 0.5 <= 0.1, (difference / update) ** 0.5


def test_pipeline_replicas_stay_identical(tmp_path):
    """From a fresh initialisation (tiny-cpu.yml, mesh), the copies of core layer 0 and of the
    routers on both stages are equal after three steps (legacy per-rank checkpoints keep both
    copies, where torch_dist saves one)."""
    overrides = {"checkpointing.save": tmp_path / "ckpt", "checkpointing.format": "torch",
                 "training.train_iters": STEPS, **PP2_SPLIT_CORE}
    train(tmp_path, [f"{k}={v}" for k, v in overrides.items()], nproc=2)
    stages = [torch.load(tmp_path / f"ckpt/iter_0000003/mp_rank_00_00{s}/model_optim_rng.pt",
                         weights_only=False)["model"] for s in range(2)]
    shared = sorted(k for k in stages[0] if k in stages[1] and torch.is_tensor(stages[0][k]))
    assert any(k.startswith("decoder.cores.0.0.") for k in shared)
    assert any(k.startswith("decoder.scheme.routers.") for k in shared)
    assert not any(k.startswith(("decoder.cores.0.1.", "decoder.prelude.", "embedding.")) for k in shared)
    for key in shared:
        assert torch.equal(stages[0][key], stages[1][key]), key
