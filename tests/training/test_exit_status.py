"""Why a run stopped, as requeue scripts read it (megatron_mesh.training.exit_status)."""

from argparse import Namespace

from megatron_mesh.training import exit_status


def recorder(tmp_path, save=True):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("120")
    args = Namespace(rank=0, save=str(tmp_path / "ckpt"), exit_signal_handler=True,
                     exit_duration_in_mins=None, exit_interval=None)
    return exit_status.StopRecorder(tmp_path / "status.json", args), tmp_path / "status.json"


def test_megatron_rerun_exit_codes_map_to_their_requeue(tmp_path):
    stops, path = recorder(tmp_path)
    stops.exited(16)  # EXIT_CODE_RESUME_TO_DISAMBIGUATE: resume elsewhere
    status = exit_status.read(path)
    assert (status.state, status.stop, status.requeue, status.iteration) == ("stopped", "rerun", True, 120)
    stops.exited(17)  # EXIT_CODE_FAILED_ON_RESULT_VALIDATION: a reproducible fault
    assert (exit_status.read(path).stop, exit_status.read(path).requeue) == ("validation", False)


def test_a_failure_is_not_a_stop(tmp_path):
    stops, path = recorder(tmp_path)
    exit_status.write(path, "running", None, stops.args.save)
    stops.exited(1)  # an error's sys.exit: the status keeps saying running
    assert (exit_status.read(path).state, exit_status.read(path).requeue) == ("running", False)


def test_only_the_first_rank_writes(tmp_path):
    stops, path = recorder(tmp_path)
    stops.args.rank = 3
    stops.finished()
    assert not path.exists()


def rerun_stop(stops, path, again, monkeypatch):
    """One run of a requeued job that megatron stops with exit code 16: the status file deleted
    first (as scripts/slurm do), ``again`` as megatron's rerun machinery says."""
    monkeypatch.setattr(exit_status, "_rerun_state", lambda: (again, "node7", "3"))
    path.unlink(missing_ok=True)
    stops = exit_status.StopRecorder(path, stops.args)
    stops.exited(16)
    status = exit_status.read(path)
    return status.stop, status.requeue, status.reruns, status.iteration


def test_rerun_stops_in_a_row_at_one_checkpoint_end_in_a_stop_that_is_not_requeued(tmp_path, monkeypatch):
    """megatron exits 16 again on every resume that lands on the same host and device (always,
    on a one-node job or a CPU): the requeue script would restart the run forever."""
    stops, path = recorder(tmp_path)
    seen = [rerun_stop(stops, path, again, monkeypatch) for again in (False, True, True, True)]
    assert seen == [("rerun", True, 1, 120), ("rerun", True, 2, 120),
                    ("rerun_limit", False, 3, 120), ("rerun_limit", False, 4, 120)]
    message = exit_status.read(path).message
    assert "found a fault (NaN/Inf" in message and "in iteration 121 that reproduced" in message
    assert ("4 stops in a row at iteration 120: every resume ran on the same host and device "
            "(node7, device 3)") in message
    for advice in ("sbatch --exclude=node7", "inspect the data of iteration 121",
                   "lower the learning rate", "`-- --ckpt-step N`", "`-- --rerun-mode disabled`"):
        assert advice in message, advice


def test_the_rerun_count_starts_again_at_a_new_save_or_another_iteration(tmp_path, monkeypatch):
    stops, path = recorder(tmp_path)
    assert [rerun_stop(stops, path, again, monkeypatch)[2] for again in (False, True)] == [1, 2]
    # resumed elsewhere, it trained on; a fault later made megatron save and stop again
    assert rerun_stop(stops, path, False, monkeypatch)[2] == 1
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("130")
    assert rerun_stop(stops, path, None, monkeypatch)[2] == 1  # unknown state: by the iteration
    assert rerun_stop(stops, path, None, monkeypatch)[2] == 2
