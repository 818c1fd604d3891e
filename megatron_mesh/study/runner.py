"""Training every run of a study with tools/pretrain_mesh.py under torchrun, resumably.

Each run gets ``OUT/runs/<name>/`` with ``checkpoints/`` (checkpointing.save and .load),
``tensorboard/`` and ``train.log``. Whether a run is finished is read from its checkpoint
tracker, never assumed: a tracker at the final iteration means done (skipped); an earlier one
means interrupted, and the relaunch loads it (Megatron restores data position, RNG, optimizer
and schedule); none means a fresh start (stale TensorBoard events are cleared). A torchrun
that exits without reaching the final iteration is an error naming its log.
``OUT/study_state.json`` records each run's settings, attempts, the iteration each attempt
started from, its status and seconds; a run whose settings changed refuses to resume.

A time limit (or Ctrl-C) sends the running trainer SIGTERM: Megatron saves a checkpoint and
exits, and the next invocation continues from it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_mesh.checkpoint.paths import tracked_iteration
from megatron_mesh.study.plan import Run, Study, StudyError, config_tree, set_item

REPO = Path(__file__).resolve().parents[2]
STATE = "study_state.json"
PROGRESS = (re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?lm loss: ([0-9.eE+-]+)"),
            re.compile(r"validation loss at iteration (\d+) .*?lm loss value: ([0-9.eE+-]+)"))


def progress(line: str) -> Optional[str]:
    """A short line for the console from Megatron's training and validation lines, else None."""
    train, valid = (p.search(line) for p in PROGRESS)
    if train:
        return f"iteration {train[1]}/{train[2]}  lm loss {float(train[3]):.4f}"
    if valid:
        return f"iteration {valid[1]}  validation lm loss {float(valid[2]):.4f}"
    return None


class TimeLimit(Exception):
    """The study's time ran out (or it was interrupted); its runs resume next time."""


def run_dir(out: Path, run: Run) -> Path:
    return Path(out) / "runs" / run.name


def final_iteration(tree: dict) -> int:
    from megatron_mesh.config.experiment import parse_experiment
    from megatron_mesh.training.arguments import train_iters

    return train_iters(parse_experiment(tree, {}).training)


def read_state(out: Path) -> dict:
    path = Path(out) / STATE
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def write_state(out: Path, state: dict) -> None:
    path = Path(out) / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)


def run_sets(out: Path, run: Run) -> List[str]:
    """The run's own directories (and a data-index cache shared by the study)."""
    d = run_dir(out, run).resolve()
    return [set_item("checkpointing.save", d / "checkpoints"),
            set_item("checkpointing.load", d / "checkpoints"),
            set_item("logging.tensorboard_dir", d / "tensorboard"),
            set_item("data.cache_path", Path(out).resolve() / "cache")]


def command(study: Study, out: Path, run: Run, cpu: bool) -> List[str]:
    nproc = int(study.launch.get("nproc_per_node", 1))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(REPO / "tools" / "pretrain_mesh.py"), "--config", str(study.base),
            *(["--cpu"] if cpu else []),
            *[f"--set={item}" for item in (*run.overrides, *run_sets(out, run))]]


def _pump(stream, lines: "queue.Queue[Optional[str]]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _stop(proc: subprocess.Popen, grace: float = 600) -> None:
    """SIGTERM to torchrun (forwarded to the trainer, which saves and exits), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch(cmd: List[str], log_path: Path, deadline: Optional[float], echo: Callable[[str], None]) -> None:
    """Run ``cmd`` appending its output to ``log_path``; TimeLimit once ``deadline`` passes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                log.write(line)
                short = progress(line)
                if short:
                    echo(short)
                if deadline is not None and time.time() > deadline:
                    raise TimeLimit("time limit reached")
        except (TimeLimit, KeyboardInterrupt):
            echo("stopping the trainer (SIGTERM: it saves a checkpoint and exits) ...")
            _stop(proc)
            for line in iter(lines.get, None):  # what it printed while saving
                log.write(line)
            raise TimeLimit("interrupted: the run saved a checkpoint and resumes next time") from None
        proc.wait()


def _echo(line: str) -> None:
    print(line, flush=True)


def train_all(study: Study, runs: List[Run], out: Path, *, cpu: bool, deadline: Optional[float] = None,
              keep_intermediate: bool = False, echo: Callable[[str], None] = _echo) -> Dict[str, dict]:
    """Train every unfinished run in order; returns the state's run records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    state.update(study=str(study.path), base=str(study.base))
    for run in runs:
        final, save = final_iteration(config_tree(study, run)), run_dir(out, run) / "checkpoints"
        record = state["runs"].setdefault(run.name, {"variant": run.variant, "seed": run.seed,
                                                     "fingerprint": run.fingerprint, "attempts": []})
        at = tracked_iteration(save)
        if at is not None and record["fingerprint"] != run.fingerprint:
            raise StudyError(f"{save.parent}: trained with other settings than {study.path} now gives "
                             f"run {run.name}; delete that directory or use another --out")
        record.update(fingerprint=run.fingerprint, overrides=list(run.overrides), final_iteration=final)
        if at is not None and at >= final:
            record["status"] = "done"
            echo(f"[study] {run.name}: done (iteration {at}), skipped")
            continue
        if deadline is not None and time.time() > deadline:
            write_state(out, state)
            raise TimeLimit(f"time limit reached before {run.name}")
        train_run(study, run, out, cpu=cpu, deadline=deadline, state=state, echo=echo)
        if not keep_intermediate:
            for old in save.glob("iter_*"):
                if old.name != f"iter_{final:07d}":
                    shutil.rmtree(old, ignore_errors=True)
    write_state(out, state)
    return state["runs"]


def train_run(study: Study, run: Run, out: Path, *, cpu: bool, deadline: Optional[float], state: dict,
              echo: Callable[[str], None]) -> None:
    """One launch of a run's trainer: from scratch or from its last checkpoint, to the end."""
    d, record = run_dir(out, run), state["runs"][run.name]
    at, final = tracked_iteration(d / "checkpoints"), record["final_iteration"]
    if at is None:  # fresh start: events of an attempt that never saved would mix in
        shutil.rmtree(d / "tensorboard", ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    (d / "heldout.json").unlink(missing_ok=True)  # the report re-evaluates the new checkpoint
    echo(f"[study] {run.name}: training iterations {(at or 0) + 1}..{final}"
         + (f" (resuming from iteration {at})" if at else ""))
    start = time.time()
    record["attempts"].append({"from_iteration": at or 0, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    record["status"] = "running"
    write_state(out, state)
    with open(d / "train.log", "a") as log:
        log.write(f"\n=== [study] attempt {len(record['attempts'])}: from iteration {at or 0} ===\n")
    try:
        launch(command(study, out, run, cpu), d / "train.log", deadline,
               lambda line: echo(f"  {run.name}: {line}"))
    finally:
        reached = tracked_iteration(d / "checkpoints") or 0
        record["attempts"][-1].update(to_iteration=reached, seconds=round(time.time() - start, 1))
        record["status"] = "done" if reached >= final else "interrupted"
        write_state(out, state)
    if reached < final:
        tail = "".join((d / "train.log").read_text().splitlines(True)[-25:])
        raise StudyError(f"{run.name}: the trainer exited at iteration {reached} of {final}; "
                         f"log {d / 'train.log'} ends:\n{tail}")
    echo(f"[study] {run.name}: done in {time.time() - start:.0f} s")
