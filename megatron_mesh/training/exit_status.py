"""Why a training run stopped, in a file a requeue script can read (``exit_status.json``).

torchrun's exit code cannot say it: a torchrun stopped by SIGTERM exits 1 with a
SignalException traceback whatever its workers did, and a run stopped by
``--exit-duration-in-mins`` exits 0 like a finished one. So the first rank writes the file:
``running`` when training starts, and after the run's final save completed, why it stopped and
whether to requeue it. A run that fails (or is killed before its final save) leaves
``running``: a requeue script then sees no stop it can resume from.

    stop            requeue  when
    signal          yes      SIGTERM (pre-emption, scancel, torchrun's forwarded signal)
    time_limit      yes      --exit-duration-in-mins (the job's time limit is near)
    rerun           yes      megatron's rerun machinery asks for a resume on other hardware
                             (exit code 16, EXIT_CODE_RESUME_TO_DISAMBIGUATE)
    rerun_limit     no       the RERUN_LIMIT-th rerun stop in a row at one checkpoint: the
                             resumes all ran on the device that reproduced the fault, where
                             megatron cannot tell a faulty device from a fault of the run
                             (``message`` says what to do)
    exit_interval   no       training.exit_interval: a stop the config asked for
    validation      no       the rerun machinery found a reproducible fault (exit code 17)
    finished        no       train_iters / train_tokens reached

megatron's result validation (``--rerun-mode validate_results``, its default) reruns a step
whose gradients hold NaN/Inf; when the fault reproduces in place it saves the iteration before
the step, exits 16 and wants the step rerun on another GPU. A resume on the same host and device
(megatron compares its hostname and CUDA device with the ones it saved) exits 16 again without
saving: a requeue landing there, and every requeue of a one-node or CPU job, would loop
forever. So the first rank counts them in the save directory (RERUN_FILE: the status file may
live elsewhere, and scripts/slurm delete it before each start): the stop that saved is the
first, each resume megatron sent back for its device one more (``reruns`` in the status).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

from megatron_mesh.checkpoint.paths import tracked_iteration
from megatron_mesh.training.megatron_fixes import wrap_once

STATUS_FILE = "exit_status.json"
RERUN_FILE = "rerun_stops.json"
"""In the save directory: the rerun stops in a row at the checkpoint megatron saved to rerun."""
REQUEUE = {"signal": True, "time_limit": True, "rerun": True, "rerun_limit": False,
           "exit_interval": False, "validation": False, "finished": False}
RERUN_EXIT_CODES = {16: "rerun", 17: "validation"}  # megatron/core/rerun_state_machine.py
RERUN_LIMIT = 3
"""Rerun stops in a row at one checkpoint: the one that saved it, then two resumes that landed
on the same device again (a cluster's requeue can land elsewhere; a one-node job never does)."""


@dataclass(frozen=True)
class ExitStatus:
    state: str
    """'running' while training, 'stopped' after the final save of a stop, 'finished'."""
    stop: Optional[str]
    """Why it stopped (see the module docstring), None while running."""
    requeue: bool
    """Whether a job scheduler should start the run again (it resumes from ``iteration``)."""
    iteration: Optional[int]
    """The iteration of the last complete checkpoint (the tracker's), if any."""
    save: Optional[str]
    host: str
    pid: int
    time: str
    reruns: int = 0
    """For a rerun stop: the rerun stops in a row at ``iteration``, this one included."""
    message: Optional[str] = None
    """What to do, for a stop that needs a person (``rerun_limit``)."""


def write(path: Path, state: str, stop: Optional[str], save: Optional[str], *, reruns: int = 0,
          message: Optional[str] = None) -> None:
    """Write the status file whole (temporary file, then rename)."""
    iteration = tracked_iteration(save) if save else None
    status = ExitStatus(state, stop, REQUEUE.get(stop, False), iteration, save,
                        socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"),
                        reruns, message)
    _write_json(path, asdict(status))


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def read(path: Path) -> ExitStatus:
    return ExitStatus(**json.loads(Path(path).read_text()))


def count_rerun_stop(save, iteration: Optional[int], again: Optional[bool]) -> int:
    """Record a rerun stop at ``iteration`` in ``save``'s RERUN_FILE; the stops in a row there.
    ``again``: megatron sent this resume back for its device (False: the stop that saved the
    checkpoint starts the count; None: unknown, counted on while the iteration is the same)."""
    path = Path(save) / RERUN_FILE
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # cut short: start over
        earlier = {}
    same = earlier.get("iteration") == iteration and again is not False
    stops = int(earlier.get("stops", 0)) + 1 if same else 1
    _write_json(path, {"iteration": iteration, "stops": stops})
    return stops


def _rerun_state() -> Tuple[Optional[bool], str, str]:
    """From megatron's rerun machinery: whether it sent this resume back for its device (its
    state RERUNNING_AGAIN_FROM_CHECKPOINT), and the host and device that reproduced the fault."""
    try:
        from megatron.core import rerun_state_machine as rerun

        machine = rerun._GLOBAL_RERUN_STATE_MACHINE  # get_rerun_state_machine() would create one
        again = machine.state == rerun.RerunState.RERUNNING_AGAIN_FROM_CHECKPOINT
        return again, machine.suspicious_node or socket.gethostname(), str(machine.suspicious_device)
    except Exception:  # none (a unit test), or another megatron: count by the iteration alone
        return None, socket.gethostname(), "?"


def rerun_limit_message(iteration: Optional[int], reruns: int, host: str, device: str) -> str:
    at = f"iteration {iteration}" if iteration is not None else "the tracker's iteration"
    step = f"iteration {iteration + 1}" if iteration is not None else "the step after it"
    return (
        f"megatron's result validation found a fault (NaN/Inf or an unexpectedly large value in "
        f"the gradients) in {step} that reproduced when it reran the step, and saved {at} to "
        f"rerun it on other hardware; {reruns} stops in a row at {at}: every resume ran on the "
        f"same host and device ({host}, device {device}), where it cannot tell a faulty device "
        f"from a fault of the run, so the run is not requeued again. Resume on another node or "
        f"GPU (e.g. sbatch --exclude={host}): a fault that does not reproduce there was the "
        f"device's; one that does (stop `validation`) is the run's: inspect the data of {step}, "
        f"lower the learning rate, or resume from an earlier checkpoint (`-- --ckpt-step N`). "
        f"Where there is no other device, `-- --rerun-mode disabled` trains on and stops at the "
        f"first NaN/Inf gradient it meets")


class StopRecorder:
    """Learns why megatron's training loop stopped (``checkpoint_and_decide_exit`` returns
    True after its save) and writes the status file on the first rank."""

    def __init__(self, path: Optional[Path], args):
        self.path, self.args, self.stop = path, args, None

    def install(self) -> None:
        from megatron.training import training

        wrap_once(training, "checkpoint_and_decide_exit", self._recording)
        if self._writes():
            write(self.path, "running", None, self.args.save)

    def _recording(self, decide_exit):
        def checkpoint_and_decide_exit(*args, **kwargs):
            should_exit = decide_exit(*args, **kwargs)
            if should_exit:
                self.stop = self._reason(iteration=args[3] if len(args) > 3 else kwargs["iteration"])
            return should_exit
        return checkpoint_and_decide_exit

    def _reason(self, iteration: int) -> str:
        """The branch of checkpoint_and_decide_exit (training.py:3230) that returned True."""
        from megatron.training.global_vars import get_signal_handler

        args = self.args
        if args.exit_signal_handler and any(get_signal_handler().signals_received()):
            return "signal"
        if args.exit_duration_in_mins and not (args.exit_interval and iteration % args.exit_interval == 0):
            return "time_limit"
        return "exit_interval"

    def exited(self, code) -> None:
        """megatron's sys.exit(code) after a stop (0) or a rerun decision (16, 17)."""
        stop = RERUN_EXIT_CODES.get(code, self.stop if code in (0, None) else None)
        if stop == "rerun" and self.args.save and self.args.rank == 0:
            self._rerun_stopped()
        elif stop and self._writes():
            write(self.path, "stopped", stop, self.args.save)

    def _rerun_stopped(self) -> None:
        """A rerun stop, or the RERUN_LIMIT-th in a row at one checkpoint: ``rerun_limit``."""
        again, host, device = _rerun_state()
        iteration = tracked_iteration(self.args.save)
        reruns = count_rerun_stop(self.args.save, iteration, again)
        stop, message = "rerun", None
        if reruns >= RERUN_LIMIT:
            stop, message = "rerun_limit", rerun_limit_message(iteration, reruns, host, device)
            print(f"[mesh] error: {message}", file=sys.stderr, flush=True)
        if self._writes():
            write(self.path, "stopped", stop, self.args.save, reruns=reruns, message=message)

    def finished(self) -> None:
        if self._writes():
            write(self.path, "finished", "finished", self.args.save)

    def _writes(self) -> bool:
        return self.path is not None and self.args.rank == 0
