"""tools/benchmark.py in-process on the tiny CPU config: JSON fields, FLOPs, throughput, phases,
--compare ratios, and the text table."""

import importlib.util
import json
import re
import statistics
import sys

import pytest

from conftest import REPO

CONFIG = "configs/tiny-cpu.yml"
BATCH, SEQ = 2, 32
# one thread: on a loaded 2-core machine two OpenMP threads can spin-wait each step into seconds
SMALL = ["--config", str(REPO / CONFIG), "--batch", str(BATCH), "--seq-length", str(SEQ),
         "--threads", "1"]
COMPARE = "model.state_scheme=base"  # tiny-cpu.yml is mesh: routers make the FLOPs differ


def load_tool(name):
    if str(REPO / "tools") not in sys.path:  # as `python tools/X.py` has it: for `import _bootstrap`
        sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    import torch

    # the tool sets its own thread count and seeds torch: give the session's back afterwards
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    yield load_tool("benchmark")
    torch.set_num_threads(threads)
    torch.random.set_rng_state(rng)


@pytest.fixture(scope="module")
def report(benchmark):
    """One --json invocation with a --compare run (module-scoped: the expensive part)."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        benchmark.main([*SMALL, "--iters", "2", "--warmup", "1", "--json", "--compare", COMPARE,
                        "--peak-tflops", "0.01"])
    return json.loads(out.getvalue())


RUN_FIELDS = {
    "run", "overrides", "layout", "scheme", "n_compute", "dtype", "step_s", "min_s", "median_s",
    "forward_s", "backward_s", "optimizer_s", "step_times_s", "flops_per_token", "tokens_per_s",
    "tflops", "peak_tflops", "mfu", "peak_memory_bytes", "memory_kind", "memory_at_start_bytes",
    "activation_bytes", "step_ratio", "memory_ratio",
}


def test_json_has_every_field(report):
    gpu = report["device"] == "cuda"  # the tool runs on a GPU when torch sees one
    assert report["device"] in ("cpu", "cuda")
    assert report["memory_kind"] == ("cuda_max_memory_allocated" if gpu else "process_peak_rss")
    assert (report["batch"], report["seq_length"]) == (BATCH, SEQ)
    assert report["tokens_per_step"] == BATCH * SEQ
    assert (report["iters"], report["warmup"]) == (2, 1)
    assert "every core application counted" in report["flops_convention"]
    assert set(report["versions"]) == {"python", "torch", "megatron_core"}
    assert [r["run"] for r in report["runs"]] == ["(base config)", COMPARE]
    for run in report["runs"]:
        assert RUN_FIELDS <= set(run), RUN_FIELDS - set(run)
        assert run["dtype"] == "fp32"  # tiny-cpu.yml says precision.dtype: fp32 (and CPUs use fp32)
        assert len(run["step_times_s"]) == 2
        assert run["peak_memory_bytes"] > 0 and run["activation_bytes"] > 0
    assert [r["scheme"] for r in report["runs"]] == ["mesh", "base"]


def test_flops_per_token_match_model_stats(report):
    model_stats = load_tool("model_stats")
    for run, overrides in zip(report["runs"], ([], [COMPARE])):
        stats = model_stats.build_stats(REPO / CONFIG, overrides, SEQ)
        assert run["flops_per_token"] == stats.train_flops_per_token
        assert run["n_compute"] == stats.n_compute == 6  # 1 + 2 x 2 + 1 layer applications
    mesh, base = report["runs"]
    assert mesh["flops_per_token"] > base["flops_per_token"]  # the routers' matmuls


def test_throughput_tflops_and_mfu_follow_from_step_time(report):
    for run in report["runs"]:
        assert run["step_s"] == pytest.approx(statistics.median(run["step_times_s"]), rel=1e-12)
        assert run["median_s"] == run["step_s"]
        assert run["min_s"] == min(run["step_times_s"])
        assert run["tokens_per_s"] == pytest.approx(BATCH * SEQ / run["step_s"], rel=1e-12)
        assert run["tflops"] == pytest.approx(
            run["tokens_per_s"] * run["flops_per_token"] / 1e12, rel=1e-12)
        assert run["peak_tflops"] == 0.01
        assert run["mfu"] == pytest.approx(run["tflops"] / 0.01, rel=1e-12)


def test_phases_add_up_to_the_step(report):
    for run in report["runs"]:
        phases = (run["forward_s"], run["backward_s"], run["optimizer_s"])
        assert all(p > 0 for p in phases)
        total = sum(phases)
        assert total <= run["step_s"] * 1.05 + 1e-3
        assert total >= run["step_s"] * 0.95 - 1e-3


def test_compare_ratios_are_relative_to_the_first_run(report):
    first, second = report["runs"]
    assert first["step_ratio"] == 1.0 and first["memory_ratio"] == 1.0
    assert second["step_ratio"] == pytest.approx(second["step_s"] / first["step_s"], rel=1e-12)
    assert second["memory_ratio"] == pytest.approx(
        second["peak_memory_bytes"] / first["peak_memory_bytes"], rel=1e-12)


def test_text_table_ratios_match_printed_step_times(benchmark, capsys):
    benchmark.main([*SMALL, "--iters", "1", "--warmup", "0", "--compare", COMPARE])
    out = capsys.readouterr().out
    import torch

    assert ("peak alloc" if torch.cuda.is_available() else "peak RSS") in out
    assert "every core application counted" in out
    rows = [line for line in out.splitlines() if line.startswith(("(base config)", COMPARE))]
    assert len(rows) == 2, out
    parsed = []
    for row in rows:
        step_ms = float(row.split()[row.split().index("fp32") + 1])
        ratios = [float(x) for x in re.findall(r"x(\d+\.\d+)", row)]
        assert len(ratios) == 2, row  # x step, x mem
        assert "-" in row.split()  # no MFU without a peak: CPU, or an fp32 run on a GPU
        parsed.append((step_ms, ratios[0]))
    (first_ms, first_ratio), (second_ms, second_ratio) = parsed
    assert first_ratio == 1.0
    # printed to 0.1 ms and 3 decimals: agree within that rounding
    bound = 0.05 / first_ms * (1 + second_ms / first_ms) + 0.0005
    assert abs(second_ratio - second_ms / first_ms) <= bound


def test_dtype_follows_the_config_on_gpu_and_is_fp32_on_cpu(benchmark):
    bf16, fp32 = {"precision": {"dtype": "bf16"}}, {"precision": {"dtype": "fp32"}}
    assert benchmark.run_dtype("config", bf16, cuda=True) == "bf16"
    assert benchmark.run_dtype("config", fp32, cuda=True) == "fp32"
    assert benchmark.run_dtype("config", {}, cuda=True) == "bf16"  # the trainer's default
    assert benchmark.run_dtype("config", bf16, cuda=False) == "fp32"
    assert benchmark.run_dtype("bf16", fp32, cuda=True) == "bf16"
    assert benchmark.run_dtype("fp32", bf16, cuda=False) == "fp32"
    with pytest.raises(SystemExit, match="--dtype bf16 needs a GPU"):
        benchmark.run_dtype("bf16", fp32, cuda=False)
