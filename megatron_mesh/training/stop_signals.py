"""Stopping a training run by signal: SIGTERM or SIGINT (Ctrl-C), at any moment, saves and stops.

megatron's handler (``--exit-signal-handler``) records one signal, SIGTERM, and at the end of
the iteration the run saves and exits (``checkpoint_and_decide_exit``). Three gaps, closed here:

- **Ctrl-C.** torchrun forwards SIGINT to its workers, where Python raises KeyboardInterrupt
  mid-forward and nothing is saved. SIGINT is recorded like SIGTERM instead.
- **The checkpoint writer's helper processes.** torchrun stops a worker with
  ``killpg(worker, sig)``, which also reaches the processes the worker started: megatron's
  write-results manager (a spawned ``multiprocessing`` Manager, started at the first save,
  dist_checkpointing/strategies/filesystem_async.py:65) and its persistent async-save worker
  (async_utils.py:380). Killed, they make the final save fail (``BrokenPipeError``) and the
  run ends without it. They ignore SIGTERM and SIGINT here; they end with the worker
  (megatron closes them, the manager's finalizer shuts it down, or SIGKILL).
- **A signal before megatron's handler exists** (imports, model build, checkpoint load): the
  tool records it from the worker's start (``tools/pretrain_mesh.py``) and hands it to
  megatron's handler once that exists, so every rank stops at the same iteration end (a rank
  that stopped at once would leave the others waiting in a collective until torchrun's SIGKILL).
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.managers
import os
import signal
from typing import List

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def release(received: List[int]) -> None:
    """No save on signal (``checkpointing.save_on_signal: false``): the default actions again,
    and a stop signal already received (``received``, recorded by the tool from the worker's
    start) takes its effect now."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    for sig in received[:1]:
        os.kill(os.getpid(), sig)


def ignore_stop_signals() -> None:
    """In a helper process of the worker: leave stopping to the worker."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def install(received: List[int], save_on_signal: bool) -> None:
    """Patch megatron for this training process, once ``parse_and_validate_args`` has installed
    megatron's handler (``save_on_signal``: ``--exit-signal-handler``). ``received``: the stop
    signals recorded since the worker started, and the list the tool's handler still fills."""
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async

    from megatron_mesh.training.megatron_fixes import wrap_once

    wrap_once(filesystem_async, "get_write_results_queue", _results_queue_of_a_shielded_manager)
    if not hasattr(async_utils.PersistentAsyncCaller, "unshielded_async_loop"):
        caller = async_utils.PersistentAsyncCaller
        caller.unshielded_async_loop = caller.async_loop
        caller.async_loop = staticmethod(shielded_async_loop)
    if save_on_signal:
        _megatron_handler_on_both(received)
    else:
        release(received)


def _megatron_handler_on_both(received: List[int]) -> None:
    """megatron's handler (for ``--exit-signal``) on SIGTERM and SIGINT, told of the signals
    received so far."""
    from megatron.training.global_vars import get_signal_handler

    handler = signal.getsignal(get_signal_handler().sig)
    for sig in STOP_SIGNALS:
        signal.signal(sig, functools.partial(_announced, handler))
    for sig in received[:1]:
        _announced(handler, sig, None)


def _announced(handler, signum, frame):
    handler(signum, frame)
    _say(signum)


def _say(signum: int) -> None:
    """On the first rank; os.write, unlike print, may run in a handler that interrupted a print."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, f"[mesh] {signal.Signals(signum).name}: the run saves a checkpoint at the end "
                    f"of this iteration and stops\n".encode())


def _results_queue_of_a_shielded_manager(get_write_results_queue):
    """megatron's write-results queue, served by a Manager that ignores SIGTERM (Managers
    ignore SIGINT already: bpo-36368)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def get_shielded_write_results_queue(mp_mode: str = "spawn"):
        if filesystem_async._results_queue is None:
            manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context(mp_mode))
            # a stdlib initializer: the spawned server then imports nothing of the project
            manager.start(initializer=functools.partial(signal.signal, signal.SIGTERM, signal.SIG_IGN))
            filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager
        return get_write_results_queue(mp_mode)
    return get_shielded_write_results_queue


def shielded_async_loop(*args, **kwargs):
    """megatron's persistent async-save worker (the target of its process), ignoring stop
    signals. Started by forkserver, the worker imports megatron afresh: its
    ``async_loop`` is megatron's own; forked, it inherits the patched class."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    from megatron_mesh.compat.cpu import async_save_worker_context

    ignore_stop_signals()
    loop = getattr(PersistentAsyncCaller, "unshielded_async_loop", PersistentAsyncCaller.async_loop)
    with async_save_worker_context():
        return loop(*args, **kwargs)
