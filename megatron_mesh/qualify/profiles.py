"""What each check runs: the paper's sizes on one GPU (``GPU``), or tiny models on the CPU
(``TINY``, the CI stand-in that runs every code path of the checks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

Overrides = Tuple[str, ...]


@dataclass(frozen=True)
class TrainerModel:
    """One model the trainer runs: a config file (relative to the repo) and ``--set`` items."""

    label: str
    config: str
    overrides: Overrides = ()


@dataclass(frozen=True)
class Profile:
    name: str
    cpu: bool
    """Trainer runs with ``--cpu`` (gloo); in-process checks on the CPU."""
    budget_s: float
    """Wall-clock budget of the whole check; a check still running past it fails."""
    trainer_common: Overrides
    """``--set`` items of every trainer run: mock data, bf16, the distributed optimizer."""
    small_model: Dict[str, object]
    """Model section of the in-process spec and attention checks."""
    small_batch: Tuple[int, int]
    """(batch, seq) of those checks."""
    cycle_shape: Tuple[int, int, int, int]
    """(B, s, b, h) of the MeSH-cycle check."""
    cycle_backend: str
    """torch.compile backend of the MeSH cycle (inductor on a GPU)."""
    cycle_must_be_faster: bool
    attention_must_be_fused: bool
    """The attention check fails if SDPA ran its unfused math fallback (a fused kernel, flash,
    cuDNN or memory-efficient, is what a GPU must run); otherwise any kernel is reported."""
    smoke: Tuple[TrainerModel, ...]
    """Trained, saved and exported; the last one is also stopped and resumed."""
    smoke_iters: int
    smoke_resume_at: int
    smoke_overrides: Overrides
    throughput: Tuple[TrainerModel, ...]
    throughput_iters: int
    throughput_log_interval: int
    throughput_overrides: Overrides
    parity: TrainerModel
    parity_iters: int
    parity_overrides: Overrides
    parity_layouts: Dict[str, Tuple[int, Overrides]] = field(default_factory=dict)
    """name -> (processes, ``--set`` items) compared with one process."""


MOCK_DATA = ("data.format=gpt", "data.mock=true", "data.path=null", "data.num_workers=0",
             "tokenizer.type=NullTokenizer", "tokenizer.model=null")
PRODUCTION = ("precision.dtype=bf16", "parallelism.distributed_optimizer=true",
              "logging.tensorboard_dir=null", "logging.wandb_mode=disabled",
              "training.eval_iters=0")
PARITY_LAYOUTS = {
    "tp2-sp": (2, ("parallelism.tensor=2", "parallelism.sequence_parallel=true")),
    # the core split over the two stages: the MeSH buffer crosses the boundary mid-loop (no
    # overlapped grad reduce under PP: the replicated core weights' gradients are summed first)
    "pp2-split-core": (2, ("parallelism.pipeline=2", "parallelism.pipeline_stage_layers=[2,4]",
                           "parallelism.overlap_grad_reduce=false",
                           "parallelism.overlap_param_gather=false")),
}


def _batch(seq: int, micro: int, global_: int) -> Overrides:
    return (f"training.seq_length={seq}", f"training.micro_batch_size={micro}",
            f"training.global_batch_size={global_}")


def _pythia(size: str, layout: str, scheme: str) -> TrainerModel:
    return TrainerModel(f"{size} {layout} {scheme}", f"configs/pythia-{size}-{layout}-{scheme}.yml")


GPU = Profile(
    name="gpu",
    cpu=False,
    budget_s=360,
    trainer_common=MOCK_DATA + PRODUCTION + ("tokenizer.vocab_size=50276",
                                             "parallelism.overlap_grad_reduce=true"),
    small_model=dict(layout="1+2R2+1", hidden_size=512, num_attention_heads=8, vocab_size=4096,
                     max_sequence_length=1024),
    small_batch=(2, 1024),
    cycle_shape=(5, 4096, 4, 2048),  # 1.4B 4+8R2+4: B = K + 3, the paper's seq, micro-batch 4
    cycle_backend="inductor",
    cycle_must_be_faster=True,
    attention_must_be_fused=True,
    smoke=(_pythia("160m", "2+4R2+2", "base"), _pythia("160m", "2+4R2+2", "mesh")),
    smoke_iters=30,
    smoke_resume_at=20,
    smoke_overrides=_batch(seq=2048, micro=8, global_=8),
    throughput=(_pythia("410m", "4+8R2+4", "mesh"), _pythia("1.4b", "4+8R2+4", "mesh"),
                _pythia("1.4b", "4+8R2+4", "base"), _pythia("1.4b", "24", "vanilla")),
    throughput_iters=10,
    throughput_log_interval=5,
    throughput_overrides=_batch(seq=4096, micro=4, global_=4),  # the paper's seq and micro-batch
    parity=TrainerModel("160m 2+4R2+2 mesh", "configs/pythia-160m-2+4R2+2-mesh.yml",
                        ("model.layout=1+2R2+1",)),
    parity_iters=3,
    parity_overrides=_batch(seq=1024, micro=2, global_=4),
    parity_layouts=PARITY_LAYOUTS,
)

_TINY = "configs/tiny-cpu.yml"
TINY = Profile(
    name="tiny",
    cpu=True,
    budget_s=900,
    trainer_common=MOCK_DATA + PRODUCTION + ("tokenizer.vocab_size=4000",),
    small_model=dict(layout="1+2R2+1", hidden_size=64, num_attention_heads=4, vocab_size=256,
                     max_sequence_length=64),
    small_batch=(2, 32),
    cycle_shape=(5, 64, 2, 64),
    cycle_backend="aot_eager",  # the traced graphs, without inductor's C++ build
    cycle_must_be_faster=False,
    attention_must_be_fused=False,
    smoke=(TrainerModel("tiny 1+2R2+1 mesh", _TINY),),  # CI time: the GPU profile adds base
    smoke_iters=10,
    smoke_resume_at=6,
    smoke_overrides=(),  # tiny-cpu.yml: seq 64, micro-batch 4, global batch 8
    # CI time: two runs show the rows and the ratio; the GPU profile adds the vanilla row
    throughput=(TrainerModel("tiny 1+2R2+1 mesh", _TINY),
                TrainerModel("tiny 1+2R2+1 base", _TINY, ("model.state_scheme=base",))),
    throughput_iters=4,
    throughput_log_interval=2,
    throughput_overrides=(),
    parity=TrainerModel("tiny 1+2R2+1 mesh", _TINY),
    parity_iters=3,
    parity_overrides=(),
    # CI time: one layout runs the check's code (tests/parallel/test_parity.py runs both)
    parity_layouts={"pp2-split-core": PARITY_LAYOUTS["pp2-split-core"]},
)

PROFILES = {p.name: p for p in (GPU, TINY)}
