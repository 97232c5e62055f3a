"""The command line, ``python -m gala_kernels bench [step|mass|linear|crossover]`` and ``demo``, in their
smallest settings.

They run in subprocesses (the real entry point, and no torch.compile / Triton state leaks into
the other tests). Timings are never checked here: only that every expected implementation is in
the JSON (measured, or skipped/failed with a reason), that the result files are named and
headed as documented, and that the demo is reproducible.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gala_kernels import backends
from gala_kernels.benchmark import cli, crossover
from gala_kernels.benchmark.machine import device_slug
from gala_kernels.benchmark.step import label_probabilities, parse_shapes
from gala_kernels.benchmark.step_implementations import all_implementations
from gala_kernels.demo import exponential_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
CPU_STEM = device_slug(torch.device("cpu"))


def run_cli(*args: str, timeout: int = 240, env=None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, "-m", "gala_kernels", *args], cwd=ROOT, capture_output=True,
                               text=True, timeout=timeout, env=env)
    if expect_ok:
        assert completed.returncode == 0, (
            f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}")
    return completed


def test_bench_without_a_sub_benchmark_runs_step_quick(tmp_path):
    """``bench --quick`` (what ``./dev.sh bench --quick`` runs) is the step benchmark."""
    classes, batch = 96, 16
    stdout = run_cli("bench", "--quick", "--classes", str(classes), "--batch", str(batch), "--no-progress",
                     "--out", str(tmp_path)).stdout
    data = json.loads((tmp_path / f"step_{CPU_STEM}.json").read_text())
    markdown = (tmp_path / f"step_{CPU_STEM}.md").read_text()
    assert markdown.startswith("# GALA training step") and "## Machine" in markdown
    assert (tmp_path / f"step_{CPU_STEM}.png").exists() == HAS_MATPLOTLIB
    for key in ("date_utc", "cpu_model", "cpu_cores", "torch", "python"):
        assert data["meta"][key], key

    records = {r["implementation"]: r for r in data["results"]}
    expected = [i.name for i in all_implementations()]
    assert sorted(records) == sorted(expected)
    must_run = ["copy_floor", "copy_alloc_floor", "eager", "cross_entropy", "authors"]
    if backends.availability("cpu", torch.device("cpu"))[0]:
        must_run += ["fused_cpu", "fused_op_cpu"]
    for name, record in records.items():
        assert (record["batch"], record["classes"], record["dtype"]) == (batch, classes, "float32")
        assert record["auto_backend"] == ("cpu" if "fused_cpu" in must_run else "torch")
        if name in must_run:
            assert record["status"] == "ok", record
        if record["status"] == "ok":
            assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"], record
            assert record["gbps"] > 0 and record["ratio_to_copy"] > 0
            assert record["peak_beyond_gradient_bytes"] is None or record["peak_beyond_gradient_bytes"] >= 0
        else:
            assert record["status"] in ("skipped", "failed") and record["reason"], record
    assert records["fused_triton"]["status"] == "skipped"  # never the interpreter on CPU, outside --dry-run
    if importlib.util.find_spec("triton") is not None:
        # the modelled traffic of the skipped Triton row is there all the same, in the file and the table
        triton = records["fused_triton"]
        assert triton["model_logit_reads"] == pytest.approx(1.0) and triton["model_atomics"] > 0, triton
        row = next(line for line in markdown.splitlines() if line.startswith("| fused_gala_ce [triton] |"))
        assert "| skipped |" in row and "| 1.00x |" in row, row
    assert records["copy_floor"]["ratio_to_copy"] == pytest.approx(1.0)
    assert records["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert records["eager"]["bytes"] == 2 * batch * classes * 4
    if "fused_cpu" in must_run:
        assert data["headline"]["fused"][0]["implementation"] == "fused_cpu"
        assert "fused_cpu" in stdout


def test_step_dry_run_runs_the_triton_rows_in_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run_cli("bench", "step", "--dry-run", "--no-progress", "--out", str(tmp_path), "--implementations",
            "copy_floor,fused_triton,fused_op_triton_inplace", env=env)
    data = json.loads((tmp_path / f"step_{CPU_STEM}.json").read_text())
    records = data["results"]
    assert {r["implementation"] for r in records} == {"copy_floor", "fused_triton", "fused_op_triton_inplace"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in records), records
    assert data["meta"]["dry_run"] is True
    markdown = (tmp_path / f"step_{CPU_STEM}.md").read_text()
    assert "**dry run**" in markdown and "**TRITON_INTERPRET=1**" in markdown


def test_bench_mass_writes_one_file_for_every_shape_and_notes_switches(tmp_path):
    env = {**os.environ, "GALA_CPU_BUFFER_CACHE": "0"}
    run_cli("bench", "mass", "--classes", "50,70", "--rows", "64", "--batch", "16", "--repeats", "2",
            "--threads", "1", "--out", str(tmp_path), env=env)
    data = json.loads((tmp_path / f"mass_{CPU_STEM}.json").read_text())
    methods = {(r["classes"], r["method"]) for r in data["results"]}
    assert methods == {(c, m) for c in (50, 70) for m in ("fused", "eager", "read")}
    for r in data["results"]:
        assert r["max_rel_diff_fused_vs_eager"] < 1e-5 and len(r["samples_ms"]) == 2
        assert r["ratio_vs_read"] > 0 and r["speedup_vs_eager"] > 0
    markdown = (tmp_path / f"mass_{CPU_STEM}.md").read_text()
    assert "**GALA_CPU_BUFFER_CACHE=0**" in markdown  # a switch that changes behaviour is never silent


def test_bench_linear_cpu_measures_every_case_in_its_own_process(tmp_path):
    run_cli("bench", "linear", "--shapes", "64x8x300:float32", "--out", str(tmp_path))
    results = json.loads((tmp_path / f"linear_{CPU_STEM}.json").read_text())["results"]
    records = {r["case"]: r for r in results}
    assert set(records) == {"chunked", "chunked-torch", "full"}
    for record in records.values():
        assert record["status"] == "ok", record
        assert len(record["peak_added_mib"]) == 2 and len(record["step_ms"]) == 2
    # None when the full case adds no page at this tiny size (a ratio to zero)
    assert records["full"]["peak_vs_full"] in (None, pytest.approx(1.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("args", [("crossover",), ("mass", "--device", "cuda")])
def test_gpu_benchmarks_say_clearly_that_they_need_a_gpu(args):
    completed = run_cli("bench", *args, expect_ok=False, timeout=120)
    assert completed.returncode != 0
    assert "needs a CUDA GPU" in completed.stderr and "Traceback" not in completed.stderr


def test_bench_help_lists_the_sub_benchmarks():
    stdout = run_cli("bench", "--help").stdout
    for name in cli.SUB_BENCHMARKS:
        assert name in stdout


def test_default_sub_benchmark():
    assert cli.with_default_benchmark([]) == ["step"]
    assert cli.with_default_benchmark(["--quick"]) == ["step", "--quick"]
    assert cli.with_default_benchmark(["mass", "--rows", "8"]) == ["mass", "--rows", "8"]
    assert cli.with_default_benchmark(["--help"]) == ["--help"]


def test_crossover_summary():
    points = [dict(dtype="float32", classes=c, batch=b, cuda_wins=b * c <= 4096, rule_prefers_cuda=True)
              for c in (64, 128) for b in (8, 32, 64)]
    summary = crossover.crossover(points)
    assert summary["best_elements_threshold"] == 4096 and summary["threshold_misclassified_points"] == 0
    assert summary["current_rule_misclassified_points"] == 1
    assert summary["per_shape"]["float32 C=128"] == {"largest_B_cuda_wins": 32, "smallest_B_triton_wins": 64}


def test_parse_shapes():
    assert parse_shapes("512x8142:float32, 4096X8142:bf16,8x3") == [
        (512, 8142, "float32"), (4096, 8142, "bfloat16"), (8, 3, "float32")]
    with pytest.raises(SystemExit):
        parse_shapes("512:float32")


def demo_results(out_dir) -> dict:
    run_cli("demo", "--quick", "--classes", "12", "--n-max", "150", "--epochs", "2", "--timing-steps", "3",
            "--seed", "3", "--no-progress", "--out", str(out_dir))
    return json.loads((out_dir / "demo.json").read_text())


def test_demo_quick_is_reproducible(tmp_path):
    first = demo_results(tmp_path / "first")
    second = demo_results(tmp_path / "second")
    assert (tmp_path / "first" / "demo.png").exists() == HAS_MATPLOTLIB
    methods = list(first["results"])
    assert methods == ["CE", "GALA", "GALA + re-balancing"]
    for result in first["results"].values():
        assert len(result["per_class"]) == 12
        for group in ("overall", "many", "medium", "few"):
            assert math.isnan(result[group]) or 0.0 <= result[group] <= 1.0
    assert set(first["gala_step_timing"]) == {"auto", "torch"}
    # identical accuracies (NaN-aware: json gives NaN for an empty shot group) and tau
    assert json.dumps(first["results"]) == json.dumps(second["results"])
    assert first["tau"] == second["tau"] and first["train_class_counts"] == second["train_class_counts"]


def test_exponential_profile():
    assert exponential_profile(5, 100, 100.0).tolist() == [100, 31, 10, 3, 1]
    assert exponential_profile(1, 7, 10.0).tolist() == [7]
    assert exponential_profile(4, 10, 1000.0).min() >= 1


def test_label_probabilities_follow_the_profile():
    profile = [5.0, 1.0, 3.0, 1.0]
    same = label_probabilities(profile, 4)
    assert torch.allclose(same, torch.tensor(profile, dtype=torch.float64) / 10)
    stretched = label_probabilities(profile, 7)  # sorted profile [5, 3, 1, 1] interpolated to 7 points
    assert stretched.numel() == 7 and math.isclose(float(stretched.sum()), 1.0)
    assert bool((stretched[:-1] >= stretched[1:]).all()) and float(stretched[0]) > float(stretched[-1])
