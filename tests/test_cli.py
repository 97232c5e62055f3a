"""The two commands, ``python -m gala_kernels bench`` and ``demo``, in their smallest settings.

They run in subprocesses (the real entry point, and no torch.compile / Triton state leaks into
the other tests). Timings are never checked here: only that every expected implementation is in
the JSON (measured, or skipped/failed with a reason) and that the demo is reproducible.
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
from gala_kernels.bench import label_probabilities
from gala_kernels.benchmark.implementations import all_implementations
from gala_kernels.demo import exponential_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_cli(*args: str, timeout: int = 240) -> str:
    completed = subprocess.run([sys.executable, "-m", "gala_kernels", *args], cwd=ROOT, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def test_bench_quick_writes_every_implementation(tmp_path):
    classes, batch = 96, 16
    stdout = run_cli("bench", "--quick", "--classes", str(classes), "--batch", str(batch), "--no-progress",
                     "--out", str(tmp_path))
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert (tmp_path / "bench_cpu.md").read_text().startswith("# gala_kernels benchmark")
    assert (tmp_path / "bench_cpu.png").exists() == HAS_MATPLOTLIB
    for key in ("date_utc", "cpu_model", "cpu_cores", "torch", "python"):
        assert data["meta"][key], key

    records = {r["implementation"]: r for r in data["results"]}
    expected = [i.name for i in all_implementations()]
    assert sorted(records) == sorted(expected)
    must_run = ["copy_floor", "copy_alloc_floor", "eager", "cross_entropy", "authors"]
    if backends.availability("cpu", torch.device("cpu"))[0]:
        must_run.append("fused_cpu")
    for name, record in records.items():
        assert (record["batch"], record["classes"], record["dtype"]) == (batch, classes, "float32")
        if name in must_run:
            assert record["status"] == "ok", record
        if record["status"] == "ok":
            assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"], record
            assert record["gbps"] > 0 and record["ratio_to_copy"] > 0
        else:
            assert record["status"] in ("skipped", "failed") and record["reason"], record
    assert records["fused_triton"]["status"] == "skipped"  # never the interpreter on CPU
    assert records["copy_floor"]["ratio_to_copy"] == pytest.approx(1.0)
    assert records["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert records["eager"]["bytes"] == 2 * batch * classes * 4
    if "fused_cpu" in must_run:
        assert data["headline"]["fused"][0]["implementation"] == "fused_cpu"
        assert "fused_cpu" in stdout


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
