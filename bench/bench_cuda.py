"""The CUDA C++ backend beside the Triton backend and the copy floor, on a GPU (issue 4).

For each shape, timed side by side in one process with ``triton.testing.do_bench`` (CUDA events,
median and 20/80 percentiles), each call reading the next of several logits buffers whose total
size is beyond the L2 cache:

- ``copy``: ``out.copy_(logits)``, a read and a write of B x C: the floor of a fused step;
- ``cuda-op`` / ``triton-op``: the forward op alone (loss, gradient, raw statistics), mean
  reduction, statistics on, no pairwise;
- ``cuda-step`` / ``triton-step``: a training step as a user runs it: ``fused_gala_ce`` with a
  ``GALAState`` (margins, op, fold into the state) and ``loss.backward()`` down to the logits;
- ``torch-ce-step``: ``F.cross_entropy`` forward + backward, for context.

The CUDA op's own label check (a host synchronisation, csrc/cuda/gala_ce_cuda_binding.cpp) is
switched off here (GALA_CUDA_CHECK_LABELS=0): ``fused_gala_ce`` already checks the labels in
Python for every non-CPU backend, so both steps pay exactly one synchronisation, and the op
timings measure the kernels and their dispatch alone.

Then a crossover sweep (B x C x dtype, steps of both backends) prints where ``cuda`` stops
beating ``triton``: the evidence for the rule in gala_kernels/backends/cuda_rule.py.

Writes ``bench/results/cuda_vs_triton_<gpu>.json`` and ``.md`` (and copies them to $OUT)::

    python bench/bench_cuda.py                  # the issue's four shapes + the crossover sweep
    python bench/bench_cuda.py --no-sweep
"""

from __future__ import annotations

import os

os.environ.setdefault("GALA_CUDA_CHECK_LABELS", "0")  # read by the op at its first call

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gala_kernels as gk  # noqa: E402
from gala_kernels import backends, reference  # noqa: E402
from gala_kernels.backends import cuda_rule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ISSUE_SHAPES = [(512, 8142, "float32"), (1024, 1000, "float32"), (4096, 8142, "bfloat16"),
                (8192, 32768, "bfloat16")]
SWEEP_BATCHES = [128, 256, 512, 1024, 2048, 4096, 8192]
SWEEP_CLASSES = [1000, 8142, 32768]
QUANTILES = [0.5, 0.2, 0.8]


# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------
class Rotation:
    """Logits buffers cycled so that their total size exceeds the L2 cache (never timed warm)."""

    def __init__(self, B: int, C: int, dtype: torch.dtype, device: torch.device, requires_grad: bool):
        l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or (64 << 20)
        nbytes = B * C * dtype.itemsize
        count = max(2, math.ceil(3 * l2 / nbytes))
        g = torch.Generator(device=device).manual_seed(0)
        self.buffers = [
            (torch.randn(B, C, device=device, generator=g) * 3).to(dtype).requires_grad_(requires_grad)
            for _ in range(count)
        ]
        self.index = 0

    def next(self) -> torch.Tensor:
        self.index = (self.index + 1) % len(self.buffers)
        return self.buffers[self.index]


def setup_steps(B: int, C: int, dtype: torch.dtype, device: torch.device,
                names: List[str]) -> Dict[str, Callable[[], None]]:
    """One callable per implementation name (see the module docstring)."""
    g = torch.Generator(device=device).manual_seed(1)
    labels = torch.randint(0, C, (B,), device=device, generator=g)
    steps: Dict[str, Callable[[], None]] = {}
    needs_plain = any(not n.endswith("step") for n in names)
    needs_leaf = any(n.endswith("step") for n in names)
    plain = Rotation(B, C, dtype, device, requires_grad=False) if needs_plain else None
    leaf = Rotation(B, C, dtype, device, requires_grad=True) if needs_leaf else None
    out = torch.empty(B, C, device=device, dtype=dtype) if "copy" in names else None

    def with_grad_freed(loss_fn):
        def step():
            z = leaf.next()
            loss_fn(z).backward()
            z.grad = None
        return step

    for name in names:
        backend = name.split("-")[0]
        if name == "copy":
            steps[name] = lambda: out.copy_(plain.next())
        elif name.endswith("-op"):
            op = backends.fused_ce_op(backend)
            state = gk.GALAState(C, device=device)
            bias = reference.class_bias(state, 1.2, 1e-3, reference.compute_dtype(dtype))
            steps[name] = (lambda op=op, bias=bias: op(plain.next(), labels, bias, -100, 1, True, False))
        elif name == "torch-ce-step":
            steps[name] = with_grad_freed(lambda z: F.cross_entropy(z, labels))
        elif name.endswith("-step"):
            state = gk.GALAState(C, device=device)
            steps[name] = with_grad_freed(
                lambda z, backend=backend, state=state: gk.fused_gala_ce(z, labels, state, backend=backend))
        else:
            raise ValueError(name)
    return steps


def time_ms(step: Callable[[], None], rep_ms: float) -> List[float]:
    from triton.testing import do_bench

    return [float(v) for v in do_bench(step, warmup=max(5.0, rep_ms / 4), rep=rep_ms, quantiles=QUANTILES)]


def available_names(device: torch.device) -> List[str]:
    names = ["copy"]
    for backend in ("cuda", "triton"):
        ok, reason = backends.availability(backend, device)
        if ok:
            names += [f"{backend}-op", f"{backend}-step"]
        else:
            print(f"[bench_cuda] backend {backend!r} skipped: {reason}")
    return names + ["torch-ce-step"]


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def run_shapes(device, shapes, names, rep_ms) -> List[Dict[str, object]]:
    rows = []
    for B, C, dtype_name in shapes:
        dtype = DTYPES[dtype_name]
        steps = setup_steps(B, C, dtype, device, names)
        row: Dict[str, object] = {"B": B, "C": C, "dtype": dtype_name,
                                  "step_bytes": 2 * B * C * dtype.itemsize}
        for name, step in steps.items():
            median, p20, p80 = time_ms(step, rep_ms)
            row[name] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
        copy_ms = row["copy"]["median_ms"]
        for name in steps:
            row[name]["x_copy"] = row[name]["median_ms"] / copy_ms
        rows.append(row)
        print(format_row(row, names), flush=True)
        del steps
        torch.cuda.empty_cache()
    return rows


def run_sweep(device, rep_ms, dtypes=("float32", "bfloat16")) -> List[Dict[str, object]]:
    """cuda-step vs triton-step over B x C: where does the CUDA op stop winning?"""
    points = []
    free, _ = torch.cuda.mem_get_info(device)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for C in SWEEP_CLASSES:
            for B in SWEEP_BATCHES:
                if 8 * B * C * dtype.itemsize > free:  # rotations + gradient: stay well inside memory
                    continue
                steps = setup_steps(B, C, dtype, device, ["cuda-step", "triton-step"])
                cuda_ms = time_ms(steps["cuda-step"], rep_ms)[0]
                triton_ms = time_ms(steps["triton-step"], rep_ms)[0]
                points.append({"B": B, "C": C, "dtype": dtype_name, "cuda_step_ms": cuda_ms,
                               "triton_step_ms": triton_ms, "cuda_wins": cuda_ms < triton_ms,
                               "rule_prefers_cuda": cuda_rule.prefer_cuda(B, C, dtype)})
                del steps
                torch.cuda.empty_cache()
    return points


def crossover(points: List[Dict[str, object]]) -> Dict[str, object]:
    """Per (dtype, C): the largest B where cuda still wins; overall: a B x C threshold and how
    many sweep points a pure size threshold gets wrong."""
    per_shape = {}
    for p in points:
        key = f"{p['dtype']} C={p['C']}"
        entry = per_shape.setdefault(key, {"largest_B_cuda_wins": None, "smallest_B_triton_wins": None})
        if p["cuda_wins"]:
            entry["largest_B_cuda_wins"] = max(entry["largest_B_cuda_wins"] or 0, p["B"])
        else:
            b = entry["smallest_B_triton_wins"]
            entry["smallest_B_triton_wins"] = p["B"] if b is None else min(b, p["B"])
    best = None
    for threshold in sorted({p["B"] * p["C"] for p in points} | {0}):
        errors = sum((p["B"] * p["C"] <= threshold) != p["cuda_wins"] for p in points)
        if best is None or errors < best[1]:
            best = (threshold, errors)
    rule_errors = sum(p["rule_prefers_cuda"] != p["cuda_wins"] for p in points)
    return {"per_shape": per_shape,
            "best_elements_threshold": best[0] if best else None,
            "threshold_misclassified_points": best[1] if best else None,
            "current_rule_misclassified_points": rule_errors, "points": len(points)}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def format_row(row, names) -> str:
    cells = [f"{row['B']}x{row['C']} {row['dtype']}"]
    for name in names:
        if name in row:
            cells.append(f"{name} {row[name]['median_ms']:.4f} ms ({row[name]['x_copy']:.2f}x copy)")
    return " | ".join(cells)


def machine() -> Dict[str, object]:
    def version(name):
        try:
            import importlib.metadata
            return importlib.metadata.version(name)
        except Exception:
            return None
    props = torch.cuda.get_device_properties(0)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "gpu": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "l2_bytes": int(getattr(props, "L2_cache_size", 0)),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "triton": version("triton"), "cuda_archs_built": os.environ.get("GALA_CUDA_ARCHS"),
        "label_check_in_op": os.environ.get("GALA_CUDA_CHECK_LABELS"),
    }


def markdown(info, names, rows, sweep, cross) -> str:
    lines = [f"# CUDA C++ backend vs Triton ({info['gpu']})", "",
             f"{info['date_utc']}; torch {info['torch']} (CUDA {info['torch_cuda']}), "
             f"Triton {info['triton']}, Python {info['python']}; built for sm_{info['cuda_archs_built']}. "
             "Median ms of "
             "`triton.testing.do_bench` (20/80 percentiles in the JSON), logits rotated beyond L2; "
             "ratio to the copy floor in brackets. `*-op`: the forward op alone; `*-step`: "
             "`fused_gala_ce` with a state + `backward()`.", ""]
    header = ["shape"] + names
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['B']} x {row['C']} {row['dtype']}"]
        for name in names:
            cells.append(f"{row[name]['median_ms']:.4f} ({row[name]['x_copy']:.2f}x)" if name in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", "## Crossover (cuda-step vs triton-step)", "",
                  "| dtype | C | B | cuda ms | triton ms | faster | rule says |",
                  "|---|---|---|---|---|---|---|"]
        for p in sweep:
            lines.append(f"| {p['dtype']} | {p['C']} | {p['B']} | {p['cuda_step_ms']:.4f} | "
                         f"{p['triton_step_ms']:.4f} | {'cuda' if p['cuda_wins'] else 'triton'} | "
                         f"{'cuda' if p['rule_prefers_cuda'] else 'triton'} |")
        lines += ["", f"Best single B x C threshold: {cross['best_elements_threshold']} elements "
                  f"({cross['threshold_misclassified_points']} of {cross['points']} points misclassified); "
                  f"the current rule (cuda up to cuda_rule.CUDA_SHARED_STATS_MAX_CLASSES = "
                  f"{cuda_rule.CUDA_SHARED_STATS_MAX_CLASSES} classes) misclassifies "
                  f"{cross['current_rule_misclassified_points']}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rep-ms", type=float, default=200.0, help="do_bench budget per implementation")
    parser.add_argument("--no-sweep", action="store_true", help="skip the crossover sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA GPU")
    device = torch.device("cuda")
    names = available_names(device)
    if "cuda-op" not in names:
        raise SystemExit("the CUDA backend is not built: see bench/gpu_check_cuda.sh")
    info = machine()
    print(f"[bench_cuda] {info['gpu']}, torch {info['torch']}, triton {info['triton']}", flush=True)
    rows = run_shapes(device, ISSUE_SHAPES, names, args.rep_ms)
    sweep, cross = [], {}
    if not args.no_sweep and "triton-step" in names:
        sweep = run_sweep(device, rep_ms=min(args.rep_ms, 100.0))
        cross = crossover(sweep)
    text = markdown(info, names, rows, sweep, cross)
    slug = re.sub(r"[^a-z0-9]+", "_", info["gpu"].lower()).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = args.out / f"cuda_vs_triton_{slug}.md", args.out / f"cuda_vs_triton_{slug}.json"
    md_path.write_text(text)
    json_path.write_text(json.dumps({"machine": info, "shapes": rows, "sweep": sweep, "crossover": cross},
                                    indent=2))
    if os.environ.get("OUT"):
        for path in (md_path, json_path):
            shutil.copy2(path, Path(os.environ["OUT"]) / path.name)
    print("\n" + text)
    if cross:
        print(f"[bench_cuda] measured crossover: cuda faster up to B x C = "
              f"{cross['best_elements_threshold']} elements; compare with the rule in "
              f"gala_kernels/backends/cuda_rule.py (per shape: {json.dumps(cross['per_shape'])})")


if __name__ == "__main__":
    main()
