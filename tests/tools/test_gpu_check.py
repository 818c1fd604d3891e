"""tools/gpu_check.py: the CPU stand-in end to end (every check's code, tiny models), and how
failures, skips and the budget are reported."""

import argparse
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

TOOL = str(REPO / "tools" / "gpu_check.py")


def test_tiny_qualification_passes_end_to_end(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, TOOL, "--tiny", "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=900)
    print(done.stdout)  # the verdicts, for the CI log
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("[")]
    names = ["versions", "specs", "attention", "cycle", "trainer", "throughput", "parity"]
    assert [line.split()[1] for line in verdicts] == names
    assert all(line.startswith("[PASS]") for line in verdicts), verdicts

    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["profile"] == "tiny"
    checks = {c["name"]: c for c in report["checks"]}
    assert "CPU stand-in" in checks["specs"]["summary"]
    assert checks["cycle"]["details"]["worst_error_over_bound"] <= 1.0
    trained = checks["trainer"]["details"]
    assert all(t["export_error"] <= 1e-4 and not t["problems"] for t in trained.values())
    rows = checks["throughput"]["details"]
    assert set(rows) == {"tiny 1+2R2+1 mesh", "tiny 1+2R2+1 base"}
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["step_ms"] > 0 for r in rows.values())
    assert all(r["memory_kind"] == "peak RSS" for r in rows.values())
    assert checks["parity"]["details"]["worst"]  # compared, not skipped
    markdown = (out / "report.md").read_text()
    assert "| throughput | pass |" in markdown and "step vs base" in markdown
    assert not (out / "scratch").exists()  # checkpoints and exports removed without --keep
    assert (out / "logs" / "trainer-tiny-1-2R2-1-mesh-2.log").is_file()


def test_failures_skips_and_budget(tmp_path, monkeypatch):
    from megatron_mesh.qualify import runner
    from megatron_mesh.qualify.profiles import TINY
    from megatron_mesh.qualify.report import SkipCheck

    def broken(ctx):
        raise RuntimeError("kernel exploded\nsecond line")

    def not_here(ctx):
        raise SkipCheck("needs 2 GPUs")

    monkeypatch.setitem(runner.CHECKS, "broken", broken)
    monkeypatch.setitem(runner.CHECKS, "not_here", not_here)
    lines = []
    report = runner.qualify(TINY, tmp_path, ["versions", "not_here", "broken"], "test", echo=lines.append)
    status = {r.name: r.status for r in report.results}
    assert status == {"versions": "pass", "not_here": "skip", "broken": "fail"} and not report.passed
    assert "RuntimeError: kernel exploded (logs/broken.txt)" in lines[2]
    assert "second line" in (tmp_path / "logs" / "broken.txt").read_text()  # the traceback
    assert lines[-1].startswith("FAILED: 3 checks, 1 skipped")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [c["status"] for c in saved["checks"]] == ["pass", "skip", "fail"]

    report = runner.qualify(TINY, tmp_path, ["versions"], "test", budget_s=0, echo=lines.append)
    assert report.results[0].status == "fail" and "budget is spent" in report.results[0].summary


def test_exit_status_and_refusals(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the tool sets for itself
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check

    assert gpu_check.main(["--tiny", "--checks", "versions", "--budget-s", "0", "--out", str(tmp_path)]) == 1
    assert "[FAIL] versions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # this machine has no GPU
        gpu_check.main(["--out", str(tmp_path)])
    assert refused.value.code == 2  # a user's error, as the docstring's exit statuses say
    assert capsys.readouterr().err == "error: no CUDA device is visible; --tiny runs the CPU stand-in\n"
    with pytest.raises(SystemExit, match=r"unknown \['warp'\]") as unknown:
        gpu_check.main(["--tiny", "--checks", "versions,warp"])
    assert unknown.value.code == 2


def test_plan_counts_the_runs_flops_and_fits_the_budget():
    from megatron_mesh.config.yaml_file import load_model_config
    from megatron_mesh.model.stats import train_flops_per_token
    from megatron_mesh.qualify import plan
    from megatron_mesh.qualify.profiles import GPU

    lines = plan.estimate(GPU)
    assert sum(line.seconds for line in lines) < GPU.budget_s
    big = next(line for line in lines if line.what.startswith("1.4b 4+8R2+4 mesh"))
    per_token = train_flops_per_token(load_model_config(REPO / "configs/pythia-1.4b-4+8R2+4-mesh.yml"), 4096)
    compute = GPU.throughput_iters * 4 * 4096 * per_token / (plan.PEAK_TFLOPS * 1e12 * plan.MFU)
    assert big.seconds == pytest.approx(plan.STARTUP_S + compute)


@pytest.mark.parametrize("profile_name", ["gpu", "tiny"])
def test_every_trainer_run_of_a_profile_maps_to_megatron_arguments(profile_name, tmp_path):
    """The GPU profile's runs cannot first be tried on a GPU: each one's config, overrides and
    Megatron arguments are checked here (the tiny profile's also run end to end above)."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_mesh.config.yaml_file import load_config_tree
    from megatron_mesh.qualify import parity, smoke, throughput
    from megatron_mesh.qualify.profiles import PROFILES
    from megatron_mesh.training.arguments import add_mesh_arguments, megatron_argv

    profile = PROFILES[profile_name]
    runs = [(m, smoke.run_overrides(profile, tmp_path / "ckpt"), 1) for m in profile.smoke]
    runs += [(m, throughput.run_overrides(profile), 1) for m in profile.throughput]
    runs += [(profile.parity, parity.run_overrides(profile, tmp_path / "start", tmp_path / "tb", layout), n)
             for n, layout in [(1, ()), *profile.parity_layouts.values()]]
    parser = add_mesh_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    for model, overrides, nproc in runs:
        sets = [*profile.trainer_common, *model.overrides, *overrides]
        args = parser.parse_args(megatron_argv(*load_config_tree(REPO / model.config, sets)))
        assert args.bf16 and args.use_distributed_optimizer and args.mock_data, model.label
        assert args.tensor_model_parallel_size * args.pipeline_model_parallel_size <= nproc
        assert args.global_batch_size % (args.micro_batch_size * nproc // (
            args.tensor_model_parallel_size * args.pipeline_model_parallel_size)) == 0

