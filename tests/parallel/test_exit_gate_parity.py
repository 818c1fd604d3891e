"""Exit gates train under tensor and data parallelism as in one process: test_parity.py's runs
(real torchrun processes, Megatron's trainer, gloo on CPU, one release checkpoint, the same
data; lm loss and grad norm of three optimizer steps, fp32) for tiny-cpu.yml's model made
1+2R3+1 with ``exit_gate: true``.

What parallelism touches: the readouts after loop steps 1 and 2 go through the vocab-parallel
output layer and cross-entropy (TP=2); under sequence parallelism each rank gates its own
s / 2 tokens, the gate logits are gathered over the tensor-parallel group and the gates'
gradients, partial sums over each rank's tokens, are all-reduced (like the layer norms'); under
DP=2 with the distributed optimizer stage II's frozen model leaves only the gates in the
optimizer. 'lm loss' is the expected loss over the exits; the log also carries 'exit step',
'exit entropy', 'exit objective' and 'lm loss at K', all of which must match too.
"""

import pytest

from batch import release_checkpoint, tiny_section
from test_parity import DISTOPT, SP, STEPS, TOLERANCE, assert_same_run, run

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

EXIT = {"layout": "1+2R3+1", "exit_gate": True}
REPORTS = ("exit step", "exit entropy", "exit objective", "lm loss at K")


@pytest.fixture(scope="module")
def start(tmp_path_factory, megatron_world):
    """A release checkpoint of a random tiny-cpu.yml MeSH model with exit gates."""
    return "mesh", release_checkpoint(tmp_path_factory, "start-exit", {**tiny_section("mesh"), **EXIT})


def exit_run(tmp_path, start, name, nproc=1, training="expected_loss", **settings):
    from test_parity import scalars  # noqa: F401 (the tags below are read the same way)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = {f"model.{k}": v for k, v in EXIT.items()}
    out = run(tmp_path, start, name, nproc, "fp32", **model, **{"model.exit_training": training},
              **settings)
    events = EventAccumulator(str(tmp_path / f"tb-{name}"))
    events.Reload()
    out.update({tag: {e.step: e.value for e in events.Scalars(tag)} for tag in REPORTS})
    return out


@pytest.fixture(scope="module")
def references(start, tmp_path_factory):
    """The single-process runs of either stage; stage II's saves its checkpoint."""
    out = {}
    for training in ("expected_loss", "gate_only"):
        tmp = tmp_path_factory.mktemp(f"exit-{training}")
        out[training] = {**exit_run(tmp, start, "reference", training=training, save="saved"),
                         "dir": tmp / "saved"}
    return out


CASES = {"tp2-sp": (2, SP, "expected_loss"), "dp2-distopt-overlap": (2, DISTOPT, "expected_loss"),
         "tp2-sp-gate-only": (2, SP, "gate_only"), "dp2-distopt-gate-only": (2, DISTOPT, "gate_only")}


def test_reference_logs_the_exit_statistics(references):
    log = references["expected_loss"]["log"]
    for tag in REPORTS:
        assert f" {tag}: " in log, tag
    stage1 = references["expected_loss"]
    # the gates start uniform over K = 3 steps (exit step 2, entropy log 3) and move from there
    assert stage1["exit step"][1] == pytest.approx(2.0, abs=0.05)
    assert stage1["exit entropy"][1] == pytest.approx(1.0986, abs=0.01)
    assert stage1["exit objective"][1] == pytest.approx(stage1["lm loss"][1] - 0.1 * stage1["exit entropy"][1],
                                                        rel=1e-5)


def test_gate_only_moves_the_gates_and_nothing_else(start, references):
    from megatron_mesh.checkpoint.reader import load_checkpoint

    before, _ = load_checkpoint(str(start[1]))
    after, _ = load_checkpoint(str(references["gate_only"]["dir"]))
    gates = {k for k in after if ".exit_gate." in k}
    assert gates and before.keys() == after.keys()
    for name in before:
        same = bool((before[name] == after[name]).all())
        assert same == (name not in gates), name


@pytest.mark.parametrize("name", CASES)
def test_exit_gate_parallel_run_matches_single_process(tmp_path, start, references, name):
    nproc, settings, training = CASES[name]
    got = exit_run(tmp_path, start, name, nproc, training, **settings)
    want = references[training]
    assert_same_run(got, want, "fp32")
    for tag in REPORTS:
        for step in range(1, STEPS + 1):
            assert got[tag][step] == pytest.approx(want[tag][step], rel=TOLERANCE["fp32"]["lm loss"]), (tag, step)
