"""Default model labels: the run, not the directory kind ('checkpoints', 'hf')."""

from megatron_mesh.evaluation.names import model_name


def test_a_run_is_named_after_its_directory(tmp_path):
    run = tmp_path / "runs" / "demo"
    assert model_name(run / "checkpoints") == "demo"
    assert model_name(run / "checkpoints" / "iter_0000300") == "demo@300"
    assert model_name(run / "hf") == "demo/hf"
    assert model_name(tmp_path / "pythia-160m") == "pythia-160m"
    assert model_name(run / "checkpoints" / "..") == "demo"  # resolved first
