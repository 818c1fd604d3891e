"""The trainer's compact console and full log file (megatron_mesh.training.console), on lines
megatron 0.19.2 really prints (copied from a tiny CPU run)."""

import io
import warnings

from megatron_mesh.training.console import Console, compact_line

ITERATION = (" [2026-12-07 12:24:53.074017] iteration        2/    2000 | consumed samples:           16 | "
             "elapsed time per iteration (ms): 74.5 | throughput per GPU (TFLOP/s/GPU): 0.0 | learning rate: "
             "3.000000E-05 | global batch size:     8 | lm loss: 8.326255E+00 | loss scale: 1.0 | grad norm: 0.541 |")
NOISE = [
    "  adam_beta1 ...................................... 0.9",
    "------------------------ arguments ------------------------",
    "\tdecoder.coda.0.mlp.linear_fc2.bias (param.main_grad.dtype=torch.float32)",
    "[Rank 0] (after 2 iterations) memory (MB) | allocated: 0.00 | max allocated: 0.00",
    "Number of parameters in transformer block in billions:  0.00",
    "INFO:megatron.core.optimizer_param_scheduler:> learning rate decay style: cosine",
    "WARNING: one_logger package is required to enable e2e metrics tracking. please go to https://...",
    "WARNING:megatron.core.dist_checkpointing.strategies.torch:MCore's async save is deprecated and will be removed",
    "WARNING:megatron.core.rerun_state_machine:Setting RerunStateMachine mode RerunMode.DISABLED",
    "[exiting program after receiving SIGTERM.] datetime: 2026-12-07 12:24:55.068238 ",
]


def test_the_compact_console_keeps_progress_checkpoints_and_validation():
    shown = compact_line(ITERATION)
    assert "lm loss: 8.326255E+00" in shown and "grad norm: 0.541" in shown
    assert "TFLOP/s/GPU" not in shown  # the [mesh] line measures it: no second, different figure
    assert compact_line(" [mesh] iteration        2 | tokens/s: 6,862") is not None
    saved = "  [2026-12-07 12:24:54.677893] successfully saved checkpoint from iteration       2 to /tmp/c"
    assert compact_line(saved) == saved
    for load in (" loading release distributed checkpoint from /ckpt/pythia",
                 " loading distributed checkpoint from /runs/a at iteration 4"):
        assert compact_line(load) == load
    assert compact_line("WARNING:megatron.core.foo:something new") is not None
    assert compact_line("error: saving /tmp/c/iter_0000005 failed: ...") is not None


def test_the_two_validation_losses_of_one_iteration_say_which_is_which():
    during = compact_line(" validation loss at iteration 12 | lm loss value: 7.891399E+00 | ")
    after = compact_line(" validation loss at iteration 12 on validation set | lm loss value: 7.775196E+00 | ")
    assert "(during training)" in during and "after training" in after and during != after


def test_the_compact_console_drops_megatrons_noise_and_says_a_fresh_start_plainly():
    assert [compact_line(line) for line in NOISE] == [None] * len(NOISE)
    fresh = compact_line("WARNING: could not find the metadata file /runs/a/latest_checkpointed_iteration.txt")
    assert fresh == "[mesh] no checkpoint in /runs/a yet: training from iteration 0"


def _console(tmp_path, full=False):
    console, out, err = Console(full=full), io.StringIO(), io.StringIO()
    return console, out, err


def test_every_line_reaches_the_log_file_and_the_terminal_gets_the_compact_ones(tmp_path):
    console, out, err = _console(tmp_path)
    console.line(NOISE[0] + "\n", out, errors=False)  # before the log file is known: kept
    path = console.keep_log_in(tmp_path / "logs", rank=3)
    for line in NOISE[1:] + [ITERATION]:
        console.line(line + "\n", out, errors=False)
    console.line("Traceback (most recent call last):\n", err, errors=True)
    console.log.flush()
    logged = path.read_text()
    assert path.name == "rank-3.log" and all(line in logged for line in NOISE + [ITERATION])
    assert out.getvalue() == compact_line(ITERATION) + "\n"
    assert err.getvalue() == "Traceback (most recent call last):\n"  # stderr: all but the known harmless


def test_a_warning_shows_once_and_the_full_console_shows_everything(tmp_path):
    console, out, err = _console(tmp_path)
    warning = "/x/y.py:3: UserWarning: something to look at\n"
    console.line(warning, err, errors=True)
    console.line(warning, err, errors=True)
    assert err.getvalue() == warning
    console, out, err = _console(tmp_path, full=True)
    for line in NOISE:
        console.line(line + "\n", out, errors=False)
    assert out.getvalue() == "".join(line + "\n" for line in NOISE)


def test_the_installed_streams_pass_partial_writes_as_whole_lines(tmp_path, monkeypatch):
    import sys

    console, out, err = _console(tmp_path)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    console.install()
    path = console.keep_log_in(tmp_path / "logs", rank=0)
    print(" [mesh] iter", end="")
    print("ation 5 | tokens/s: 1")
    print("  seed ...... 1234", flush=True)
    sys.stdout.flush()
    assert out.getvalue() == " [mesh] iteration 5 | tokens/s: 1\n"
    assert "  seed ...... 1234\n" in path.read_text()
    assert sys.stdout.encoding == out.encoding


def test_without_a_log_directory_nothing_accumulates(tmp_path):
    console, out, err = _console(tmp_path)
    assert console.keep_log_in(None, rank=0) is None
    for _ in range(3):
        console.line(ITERATION + "\n", out, errors=False)
    assert console._early is None and out.getvalue().count("lm loss") == 3
