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
    exit_interval   no       training.exit_interval: a stop the config asked for
    validation      no       the rerun machinery found a reproducible fault (exit code 17)
    finished        no       train_iters / train_tokens reached
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_mesh.checkpoints import tracked_iteration
from megatron_mesh.compat.megatron_fixes import wrap_once

STATUS_FILE = "exit_status.json"
REQUEUE = {"signal": True, "time_limit": True, "rerun": True, "exit_interval": False,
           "validation": False, "finished": False}
RERUN_EXIT_CODES = {16: "rerun", 17: "validation"}  # megatron/core/rerun_state_machine.py


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


def write(path: Path, state: str, stop: Optional[str], save: Optional[str]) -> None:
    """Write the status file whole (temporary file, then rename)."""
    iteration = tracked_iteration(save) if save else None
    status = ExitStatus(state, stop, REQUEUE.get(stop, False), iteration, save,
                        socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(status), indent=1) + "\n")
    os.replace(tmp, path)


def read(path: Path) -> ExitStatus:
    return ExitStatus(**json.loads(Path(path).read_text()))


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
        if stop and self._writes():
            write(self.path, "stopped", stop, self.args.save)

    def finished(self) -> None:
        if self._writes():
            write(self.path, "finished", "finished", self.args.save)

    def _writes(self) -> bool:
        return self.path is not None and self.args.rank == 0
