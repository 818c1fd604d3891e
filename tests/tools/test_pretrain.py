"""tools/pretrain_mesh.py end to end: real torchrun processes, Megatron's trainer, CPU + gloo."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from megatron_mesh.training import exit_status
from trainer import CONFIG, LOSS, ckpt_overrides, command, corrupt_a_weight, env, tracker, train

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them


def test_tiny_run_learns_logs_and_checkpoints(tmp_path):
    save, tb, wandb = tmp_path / "ckpt", tmp_path / "tb", tmp_path / "wandb"
    log, losses = train(tmp_path, ckpt_overrides(save, **{
        "training.train_iters": 40, "checkpointing.interval": 20, "logging.tensorboard_dir": tb,
        "logging.wandb_project": "mesh-test", "logging.wandb_mode": "offline",
        "logging.wandb_dir": wandb}))
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[i] for i in range(1, 6)) / 5, sum(losses[i] for i in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    assert "[mesh] iteration" in log and "tokens/s" in log and "ETA" in log
    assert list(tb.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list(wandb.glob("wandb/offline-run-*")), "no offline W&B run"
    assert tracker(save) == 40
    assert (save / "iter_0000020").is_dir() and (save / "iter_0000040").is_dir()
    status = exit_status.read(save / "exit_status.json")
    assert (status.state, status.stop, status.requeue, status.iteration) == ("finished", "finished", False, 40)

    # bytes changed inside a weight of the latest checkpoint: the resume stops before loading
    # it, naming the file, both hashes and the intact iteration (torch would load the garbage)
    damaged = corrupt_a_weight(save / "iter_0000040")
    out = subprocess.run(command(tmp_path, ckpt_overrides(save, **{"training.train_iters": 41})),
                         capture_output=True, text=True, cwd=REPO, env=env(), timeout=300)
    assert out.returncode != 0
    assert (f"error: {save / 'iter_0000040'}: damaged checkpoint: {damaged}: xxh3_128 " in out.stderr
            and "iter_0000020 verifies: resume from it with `-- --ckpt-step 20`" in out.stderr), \
        out.stderr[-3000:]


def test_resume_continues_the_exact_same_run(tmp_path):
    # dropout on: a resume that lost the RNG state would draw other masks and other losses; the
    # distributed optimizer: its fp32 resume needs megatron_mesh.training.megatron_fixes
    straight = {"training.train_iters": 16, "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
                "parallelism.distributed_optimizer": True}
    _, full = train(tmp_path, ckpt_overrides(tmp_path / "a", **straight))
    _, first = train(tmp_path, ckpt_overrides(tmp_path / "b", **straight, **{"training.exit_interval": 8}))
    assert sorted(first) == list(range(1, 9)) and tracker(tmp_path / "b") == 8
    log, second = train(tmp_path, ckpt_overrides(tmp_path / "b", **straight))
    assert "loading" in log.lower() and sorted(second) == list(range(9, 17))
    # every logged loss, the resumed run's first two included, bit for bit (megatron alone
    # averages iterations 9 and 10 in the line of 10: training.megatron_fixes)
    assert {**first, **second} == full


def test_sigterm_saves_a_loadable_checkpoint_and_half_written_ones_are_ignored(tmp_path):
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(command(tmp_path, ckpt_overrides(save, **{"training.train_iters": 2000})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env())
    lines = []
    deadline = time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if LOSS.search(line) and int(LOSS.search(line).group(1)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "training never started"
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 1  # torchrun reports the signal as a failure...
    log = "".join(lines)
    assert "[mesh] SIGTERM: the run saves a checkpoint at the end of this iteration" in log, log[-3000:]
    stopped_at = tracker(save)
    assert 3 <= stopped_at < 2000
    status = exit_status.read(save / "exit_status.json")  # ...the run's exit status does not
    assert (status.state, status.stop, status.requeue, status.iteration) == ("stopped", "signal", True, stopped_at)

    # a save that died half way: a newer iteration directory the tracker never pointed at
    partial = save / f"iter_{stopped_at + 100:07d}"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"truncated")
    log, resumed = train(tmp_path, ckpt_overrides(save, **{
        "training.train_iters": 2000, "training.exit_interval": stopped_at + 2}))
    assert f"iteration {stopped_at:8d}" in log or f"at iteration {stopped_at}" in log
    assert sorted(resumed) == [stopped_at + 1, stopped_at + 2]
    status = exit_status.read(save / "exit_status.json")
    assert (status.stop, status.requeue, status.iteration) == ("exit_interval", False, stopped_at + 2)


ORPHAN = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from pretrain_mesh import stop_with_the_launcher
signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[2], "w").write("SIGTERM"), sys.exit(0)))
stop_with_the_launcher()
print("ready", flush=True)
time.sleep(30)
"""


def test_a_worker_stops_when_its_launcher_is_killed(tmp_path):
    """torchrun's workers run in their own session: `kill -9` of torchrun's group misses them.
    Here a parent (in torchrun's place) starts a worker and dies by SIGKILL: the worker gets
    SIGTERM, which megatron's handler turns into a save and a stop."""
    got = tmp_path / "got"
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.Popen(sys.argv[1:]); input()",
         sys.executable, "-c", ORPHAN, str(REPO / "tools"), str(got)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TORCHELASTIC_RUN_ID": "test"})
    assert launcher.stdout.readline().strip() == "ready"
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 20
    while not got.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert got.exists() and got.read_text() == "SIGTERM"


def test_trains_on_pythia_preshuffled_rows(tmp_path):
    from megatron_mesh.data.indexed import write_indexed_dataset

    rows = ([(r * 31 + k) % 3000 + 1 for k in range(2049)] for r in range(32))
    write_indexed_dataset(rows, tmp_path / "document", vocab_size=4096)
    log, losses = train(tmp_path, [
        "data.mock=false", "data.format=pythia_preshuffled", f"data.path=[{tmp_path / 'document'}]",
        "model.max_sequence_length=2048", "training.seq_length=2048", "training.micro_batch_size=1",
        "training.global_batch_size=2", "training.train_iters=3", "logging.interval=1",
    ])
    assert sorted(losses) == [1, 2, 3]
    assert "consumed samples:            6" in log


def test_refuses_to_fall_back_to_cpu_silently(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_mesh.py"), "--config",
                          str(CONFIG)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode != 0 and "no CUDA device is visible; pass --cpu" in out.stderr


# A GPU machine as torch sees one: CUDA is available unless CUDA_VISIBLE_DEVICES hides every GPU.
VISIBLE_GPU = """
import os, runpy, sys, torch
torch.cuda.is_available = lambda: os.environ.get("CUDA_VISIBLE_DEVICES") != ""
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python tools/pretrain_mesh.py` has it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cpu_flag_means_the_cpu_where_a_gpu_is_visible(tmp_path):
    environment = {k: v for k, v in env().items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", VISIBLE_GPU, str(REPO / "tools" / "pretrain_mesh.py"),
                          "--config", str(CONFIG), "--cpu", "--print-args"],
                         capture_output=True, text=True, cwd=REPO, timeout=120, env=environment)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    assert argv[argv.index("--distributed-backend") + 1] == "gloo"
    assert "--use-cpu-initialization" in argv and "--no-gradient-accumulation-fusion" in argv


def test_a_tokenizer_json_file_trains_and_exports_and_a_missing_one_stops_at_once(tmp_path):
    """tokenizer.model naming a tokenizer.json file (GPT-NeoX-20B's form, which
    tools/preprocess_data.py takes) failed ~25 s in, in three tracebacks ending in transformers'
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"; so did a missing path."""
    import json
    import shutil

    from megatron_mesh.corpora.python_docs import pydoc_topics
    from megatron_mesh.data.indexed import train_bpe_tokenizer
    from megatron_mesh.data.preprocess import preprocess

    tokenizer = tmp_path / "bpe_tokenizer.json"
    shutil.copy(f"{train_bpe_tokenizer(pydoc_topics()[:40], 400, tmp_path / 'hf-tokenizer')}/tokenizer.json",
                tokenizer)
    sets = {"tokenizer.type": "HuggingFaceTokenizer", "tokenizer.model": str(tmp_path / "gone.json")}
    start = time.time()
    out = subprocess.run(command(tmp_path, [f"{k}={v}" for k, v in sets.items()]), capture_output=True,
                         text=True, cwd=REPO, env=env(), timeout=120)
    assert out.returncode != 0 and time.time() - start < 20, out.stderr[-2000:]
    assert f"tokenizer.model='{tmp_path / 'gone.json'}': no such file or directory; expected" in out.stderr
    assert "Repo id" not in out.stderr and "megatron" not in out.stdout.lower()

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pydoc_topics()[:40]))
    preprocess([tmp_path / "docs.jsonl"], tmp_path / "docs", str(tokenizer), progress=False)
    sets.update({"tokenizer.model": str(tokenizer), "data.mock": False, "data.path": str(tmp_path / "docs"),
                 "data.split": "100,0,0", "training.train_iters": 2})
    _, losses = train(tmp_path, ckpt_overrides(tmp_path / "ckpt", **sets))
    assert sorted(losses) == [1, 2]

    subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "megatron-to-hf", "--input",
                    str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")], check=True, timeout=300)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    inputs = tok("The for statement", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_resume_with_another_schedule_names_the_keys_and_the_fix(tmp_path):
    """A resume with another training.train_iters stopped in megatron's scheduler load, after the
    model was built, on a bare assert naming neither the keys nor --override-opt_param-scheduler."""
    save = tmp_path / "ckpt"
    train(tmp_path, ckpt_overrides(save, **{"training.train_iters": 2}))
    longer = ckpt_overrides(save, **{"training.train_iters": 4})
    out = subprocess.run(command(tmp_path, longer), capture_output=True, text=True, cwd=REPO, env=env(),
                         timeout=300)
    assert out.returncode != 0
    assert (f"error: {save / 'iter_0000002'}: this run's optimizer schedule differs from the checkpoint's "
            "(lr_warmup_steps: checkpoint 1.6, this run 3.2" in out.stderr), out.stderr[-3000:]
    assert ("lr_decay_steps: checkpoint 16, this run 32, from schedule.decay_iters (default: "
            "training.train_iters) x training.global_batch_size" in out.stderr)
    assert "Pass `-- --override-opt_param-scheduler` to continue with this run's" in out.stderr
    _, losses = train(tmp_path, longer, passthrough=["--override-opt_param-scheduler"])  # as it says
    assert sorted(losses) == [3, 4]
