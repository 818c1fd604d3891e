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
