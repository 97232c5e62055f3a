"""Development tool: the fused CPU training step of several commits, side by side in one process.

Absolute times on a small shared VM move by up to 2x within minutes, so two benchmark runs of two
builds cannot be compared. This script builds the C++ extension of each named commit with its op
namespace renamed (``gala`` -> ``gala_<n>``), loads them all next to the working tree's build, and
times the same training step (``fused_gala_ce(...).backward()`` on the working tree's Python
code, only the ops swapped: ``fused_ce_fwd``, and the one-call CPU step where a build has it),
interleaved step by step with ``F.cross_entropy`` and a copy of the logits, in a new random
order every round (a step runs slower right after a memory-heavy neighbour, so none may always
follow the same one).
Ratios are the medians of per-round ratios against the first commit.

    python tools/ab_cpu_commits.py main HEAD~1 [--classes 8142 --batch 512 --dtype float32
                                                 --rounds 100 --runs 3]

Needs git, cmake, ninja and a compiler (as the main build); builds go to a temporary directory
(``--build-root``) and are reused when present.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gala_kernels.benchmark.rotation import logits_rotation
from gala_kernels.benchmark.timing import Budget, time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def build_commit(commit: str, namespace: str, build_root: Path) -> Path:
    """The commit's extension with its op namespace renamed; returns the .so path."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", commit], cwd=ROOT, text=True).strip()
    out_dir = build_root / f"{namespace}_{sha}"
    built = sorted(out_dir.glob("lib/_C*.so"))
    if built:
        return built[0]
    src = out_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.check_output(["git", "archive", "--format=tar", sha, "csrc", "CMakeLists.txt"],
                                      cwd=ROOT)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    for path in (src / "csrc").rglob("*"):
        if path.suffix not in {".cpp", ".h", ".cu", ".cuh"}:
            continue
        text = path.read_text()
        text = re.sub(r"TORCH_LIBRARY(_IMPL)?\(gala,", rf"TORCH_LIBRARY\1({namespace},", text)
        text = re.sub(r"\bnamespace gala\b", f"namespace {namespace}", text)
        text = re.sub(r"\bgala::", f"{namespace}::", text)
        path.write_text(text)
    subprocess.check_call(["cmake", "-S", str(src), "-B", str(out_dir / "build"), "-G", "Ninja",
                           f"-DPython_EXECUTABLE={sys.executable}",
                           f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir / 'lib'}"], stdout=subprocess.DEVNULL)
    subprocess.check_call(["cmake", "--build", str(out_dir / "build"), "-j", str(os.cpu_count() or 2)],
                          stdout=subprocess.DEVNULL)
    return sorted(out_dir.glob("lib/_C*.so"))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="+",
                        help="commits to compare; the working tree's build is added last")
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="independent runs (each: warm-up, then rounds)")
    parser.add_argument("--build-root", default=os.path.join(tempfile.gettempdir(), "gala_ab_builds"))
    args = parser.parse_args()

    import gala_kernels
    from gala_kernels import GALAState, backends, fused_gala_ce, ops
    from gala_kernels import loss as loss_module

    ops_by_name, step_ops_by_name = {}, {}
    for index, commit in enumerate(args.commits):
        namespace = f"gala_{index}"
        torch.ops.load_library(str(build_commit(commit, namespace, Path(args.build_root))))
        ops.register_fused_ce(f"{namespace}::fused_ce_fwd")
        ops_by_name[commit] = getattr(torch.ops, namespace).fused_ce_fwd
        # the one-call CPU step, or None for a build without it
        step_ops_by_name[commit] = getattr(getattr(torch.ops, namespace), "fused_ce_step_cpu_", None)
    working_tree = backends.fused_ce_op
    ops_by_name["working tree"] = working_tree("cpu")
    step_ops_by_name["working tree"] = getattr(torch.ops.gala, "fused_ce_step_cpu_", None)
    one_call_rule, one_call_op = loss_module._one_call_cpu_step, loss_module._cpu_step_op

    def use_build(name):
        """The working tree's fused_gala_ce, running this build's ops: its fused_ce_fwd, and its
        one-call step where it has one (else the three calls, as that commit did)."""
        backends.fused_ce_op = lambda _backend: ops_by_name[name]
        step_op = step_ops_by_name[name]
        if step_op is None:
            loss_module._one_call_cpu_step = lambda *_: False
            return
        loss_module._one_call_cpu_step = one_call_rule
        loss_module._cpu_step_op = functools.partial(one_call_op, op=step_op)

    B, C, dtype = args.batch, args.classes, getattr(torch, args.dtype)
    rotation = logits_rotation(B, C, dtype, torch.device("cpu"))  # beyond the last-level cache
    labels = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(0))
    out = torch.empty(B, C, dtype=dtype)

    def gala_step(name, state):
        def step():
            use_build(name)
            z = rotation.next()
            fused_gala_ce(z, labels, state, backend="cpu").backward()
            z.grad = None
        return step

    def ce_step():
        z = rotation.next()
        F.cross_entropy(z, labels).backward()
        z.grad = None

    def copy_step():
        out.copy_(rotation.next().detach())

    print(f"{B} x {C} {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    first = args.commits[0]
    for run in range(args.runs):
        steps = {name: gala_step(name, GALAState(C)) for name in ops_by_name}
        steps["F.cross_entropy"], steps["copy"] = ce_step, copy_step
        # interleaved, a new random order every round (the benchmarks' timer); equal round counts,
        # so the samples of one round line up across implementations
        budgets = {name: Budget.rounds(args.rounds, warmup=3) for name in steps}
        timings = time_interleaved(steps, budgets, torch.device("cpu"), seed=run)
        backends.fused_ce_op = working_tree
        loss_module._one_call_cpu_step, loss_module._cpu_step_op = one_call_rule, one_call_op
        cells = []
        for name, timing in timings.items():
            ratio = statistics.median([a / b for a, b in zip(timing.samples_ms, timings[first].samples_ms)])
            cells.append(f"{name} {timing.median_ms:.3f} ms ({ratio:.3f}x of {first})")
        print(f"run {run + 1}: " + "; ".join(cells))
    del gala_kernels


if __name__ == "__main__":
    main()
