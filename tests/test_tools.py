"""The development tools under tools/ import and run (on tiny shapes), so that they do not rot."""

import os
import re
import subprocess
import sys

import pytest
import torch

from gala_kernels import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args: str, timeout: int = 240) -> str:
    completed = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 0, f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


@pytest.mark.skipif(not backends.availability("cpu", torch.device("cpu"))[0], reason="needs the C++ CPU op")
def test_options_cost_cpu_reports_every_variant_against_plain(tmp_path):
    out = tmp_path / "options_cost.txt"
    stdout = run_tool("tools/options_cost_cpu.py", "--batch", "8", "--classes", "37", "--rounds", "5",
                      "--runs", "1", "--out", str(out))
    run_line = next(line for line in stdout.splitlines() if line.startswith("run 1:"))
    for variant in ("plain", "weight", "label_smoothing=0.1", "weight + label_smoothing=0.1"):
        cell = rf"(^|; |: ){re.escape(variant)} \d+\.\d+ ms \(\d+\.\d+x"
        assert re.search(cell, run_line), (variant, run_line)
    assert "plain" in run_line and "(1.000x [1.000-1.000])" in run_line
    assert run_line in out.read_text()


@pytest.mark.parametrize("tool", ["tools/ab_cpu_commits.py", "tools/ptx_resources.py"])
def test_tool_help(tool):
    if tool.endswith("ptx_resources.py"):
        pytest.importorskip("triton")
    assert "usage:" in run_tool(tool, "--help")
