"""The fused CPU training step of several commits, side by side in one process.

Absolute times on a small shared VM move by up to 2x within minutes, so two benchmark runs of two
builds cannot be compared. This script builds the C++ extension of each named commit with its op
namespace renamed (``gala`` -> ``gala_<n>``), loads them all next to the working tree's build, and
times the same training step (``fused_gala_ce(...).backward()`` on the working tree's Python
code, only the ops swapped: ``fused_ce_fwd``, and the one-call CPU step where a build has it),
interleaved step by step with ``F.cross_entropy`` and a copy of the logits, in a new random
order every round (a step runs slower right after a memory-heavy neighbour, so none may always
follow the same one).
Ratios are the medians of per-round ratios against the first commit, with their 20th and 80th
percentiles.

    python tools/ab_cpu_commits.py main HEAD~1 [--classes 8142 --batch 512 --dtype float32
                                                 --rounds 100 --runs 3]
    python tools/ab_cpu_commits.py main --bits      # outputs bit for bit against the first commit

Builds from before the ops took ``weight`` and ``label_smoothing`` (their schema has neither) are
called through an adapter that drops the two (the plain call passes None and 0.0). ``--bits``
times nothing: it runs ``fused_ce_fwd`` of every build on a set of odd shapes, dtypes, reductions,
ignored and non-finite rows, with and without statistics, and says which outputs differ in any
bit from the first commit's.

Needs git, cmake, ninja and a compiler (as the main build); builds go to a temporary directory
(``--build-root``) and are reused when present.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import random
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


def takes_options(op) -> bool:
    """Whether a build's op has the ``weight`` and ``label_smoothing`` arguments."""
    return "weight" in [argument.name for argument in op.default._schema.arguments]


def fused_ce_adapter(op):
    """The working tree's fused_ce_fwd call on a build without weight and label_smoothing."""
    def call(logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
             track_pairwise):
        assert weight is None and label_smoothing == 0.0, "this build has no weight / label_smoothing"
        return op(logits, labels, class_bias, ignore_index, reduction, compute_stats, track_pairwise)
    return call


def step_adapter(op):
    """The working tree's fused_ce_step_cpu_ call on a build without weight and label_smoothing."""
    def call(logits, labels, weight, stats, running, steps, nonfinite_rows, lambda1, eps, ignore_index,
             reduction, label_smoothing, mode):
        assert weight is None and label_smoothing == 0.0, "this build has no weight / label_smoothing"
        return op(logits, labels, stats, running, steps, nonfinite_rows, lambda1, eps, ignore_index,
                  reduction, mode)
    return call


def bit_cases(with_options: bool):
    """(name, fused_ce_fwd arguments) over odd shapes and every path of the kernel: the plain call,
    and with ``with_options`` class weights (some 0) and label smoothing too."""
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for B, C in ((5, 1), (9, 2), (17, 37), (33, 2049), (64, 8142), (3, 70000)):
            logits = (torch.randn(B, C + 3, generator=generator, dtype=torch.float64) * 3).to(dtype)
            logits = logits[:, 1:C + 1] if C > 2 else logits[:, :C].contiguous()  # strided rows too
            labels = torch.randint(0, C, (B,), generator=generator)
            labels[::4] = -100
            if B > 8:
                logits[7, C // 2] = float("inf")
                logits[2, 0] += 90.0  # a new exp reference
            bias = torch.randn(C, generator=generator, dtype=math_dtype)
            weight = torch.rand(C, generator=generator, dtype=math_dtype) + 0.1
            weight[::3] = 0.0
            option_sets = [(None, 0.0)]
            if with_options:
                option_sets += [(weight, 0.0), (None, 0.1), (weight, 0.3)]
            for (class_weight, smoothing), reduction in itertools.product(option_sets, (0, 1, 2)):
                for stats, pairwise in ((False, False), (True, False), (True, True)):
                    if pairwise and C > 2049:
                        continue
                    name = (f"{dtype} {B}x{C} reduction={reduction} stats={stats} pairwise={pairwise} "
                            f"weight={class_weight is not None} label_smoothing={smoothing}")
                    yield name, (logits, labels, bias if stats else None, class_weight, -100, reduction,
                                 smoothing, stats, pairwise)


def compare_bits(ops_by_name, with_options: bool) -> None:
    names = list(ops_by_name)
    different = {name: 0 for name in names[1:]}
    count = 0
    for case, args in bit_cases(with_options):
        count += 1
        outputs = {name: op(*args) for name, op in ops_by_name.items()}
        for name in names[1:]:
            for index, (got, want) in enumerate(zip(outputs[name], outputs[names[0]])):
                same = got.shape == want.shape and got.dtype == want.dtype and (
                    got.view(-1).view(torch.uint8).equal(want.view(-1).view(torch.uint8)) if got.numel()
                    else True)
                if not same:
                    different[name] += 1
                    print(f"{name}: output {index} differs from {names[0]}'s: {case}")
    for name, bad in different.items():
        print(f"{name}: {count - bad} of {count} cases bit-identical to {names[0]}")


def ratio_summary(values, reference_values) -> str:
    """Median of the per-round ratios with their 20th and 80th percentiles."""
    ratios = sorted(a / b for a, b in zip(values, reference_values))
    def at(q):
        return ratios[min(len(ratios) - 1, int(round(q * (len(ratios) - 1))))]
    return f"{at(0.5):.3f}x [{at(0.2):.3f}-{at(0.8):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="+",
                        help="commits to compare; the working tree's build is added last")
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="independent runs (each: warm-up, then rounds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--build-root", default=os.path.join(tempfile.gettempdir(), "gala_ab_builds"))
    parser.add_argument("--bits", action="store_true", help="compare outputs bit for bit instead of timing")
    parser.add_argument("--weight", action="store_true",
                        help="steps with random class weights (builds without the option are left out)")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import gala_kernels
    from gala_kernels import GALAState, backends, fused_gala_ce, ops
    from gala_kernels import loss as loss_module
    from gala_kernels.benchmark.rotation import logits_rotation

    ops_by_name, step_ops_by_name = {}, {}
    for index, commit in enumerate(args.commits):
        namespace = f"gala_{index}"
        torch.ops.load_library(str(build_commit(commit, namespace, Path(args.build_root))))
        op = getattr(torch.ops, namespace).fused_ce_fwd
        # the one-call CPU step, or None for a build from before it
        step_op = getattr(getattr(torch.ops, namespace), "fused_ce_step_cpu_", None)
        if takes_options(op):
            ops.register_fused_ce(f"{namespace}::fused_ce_fwd")
        elif args.weight or args.label_smoothing:
            print(f"{commit}: left out, its ops take no weight / label_smoothing")
            continue
        else:  # eager calls need no registered autograd (ops.call_fused_ce)
            op = fused_ce_adapter(op)
            step_op = None if step_op is None else step_adapter(step_op)
        ops_by_name[commit], step_ops_by_name[commit] = op, step_op
    working_tree = backends.fused_ce_op
    ops_by_name["working tree"] = working_tree("cpu")
    step_ops_by_name["working tree"] = getattr(torch.ops.gala, "fused_ce_step_cpu_", None)
    if args.bits:  # with the options when every build takes them
        compare_bits(ops_by_name, with_options=all(isinstance(op, torch._ops.OpOverloadPacket)
                                                   for op in ops_by_name.values()))
        return
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
    next_logits = rotation.next
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, C, (B,), generator=generator)

    options = dict(label_smoothing=args.label_smoothing)
    if args.weight:
        options["weight"] = torch.rand(C, generator=generator) * 2 + 0.1

    def gala_step(name, state):
        def step():
            use_build(name)
            z = next_logits()
            started = time.perf_counter()
            fused_gala_ce(z, labels, state, backend="cpu", **options).backward()
            z.grad = None
            return time.perf_counter() - started
        return step

    out = torch.empty(B, C, dtype=dtype)

    def ce_step():
        z = next_logits()
        started = time.perf_counter()
        F.cross_entropy(z, labels).backward()
        z.grad = None
        return time.perf_counter() - started

    def copy_step():
        z = next_logits()
        started = time.perf_counter()
        out.copy_(z.detach())
        return time.perf_counter() - started

    print(f"{B} x {C} {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}"
          + (f", weight={args.weight}, label_smoothing={args.label_smoothing}" if len(options) > 1
             or args.label_smoothing else ""))
    first = next(iter(ops_by_name))
    for run in range(args.runs):
        steps = {name: gala_step(name, GALAState(C)) for name in ops_by_name}
        steps["F.cross_entropy"], steps["copy"] = ce_step, copy_step
        for _ in range(3):
            for step in steps.values():
                step()
        samples = {name: [] for name in steps}
        names = list(steps)
        order = random.Random(run)
        for _ in range(args.rounds):
            # A new random order every round: a step runs slower right after some neighbours (a
            # memory-heavy F.cross_entropy, a copy), so no implementation may always follow the
            # same one. (Rotating the order does not do it: the cyclic neighbours stay the same.)
            order.shuffle(names)
            for name in names:
                samples[name].append(steps[name]())
        backends.fused_ce_op = working_tree
        loss_module._one_call_cpu_step, loss_module._cpu_step_op = one_call_rule, one_call_op
        cells = []
        for name, values in samples.items():
            median = statistics.median(values) * 1e3
            cells.append(f"{name} {median:.3f} ms ({ratio_summary(values, samples[first])} of {first})")
        print(f"run {run + 1} ({args.rounds} rounds; ratio: median [20th-80th percentile] of per-round "
              "ratios): " + "; ".join(cells))
    del gala_kernels


if __name__ == "__main__":
    main()
