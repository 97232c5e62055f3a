"""``bench crossover`` (GPU only): the CUDA C++ step against the Triton step over B x C x dtype.

For every point of the sweep, a training step (``fused_gala_ce`` with a ``GALAState`` and
``loss.backward()``) with ``backend="cuda"`` and with ``backend="triton"``, each timed with
``triton.testing.do_bench`` on logits rotated beyond L2. The table says which one is faster and
which one ``backend="auto"`` picks (:func:`gala_kernels.backends.cuda_rule.prefer_cuda`); the
summary gives, per (dtype, C), the largest B where CUDA still wins, and the single ``B x C``
threshold that misclassifies the fewest points: the evidence for the rule of ``"auto"``.

``--no-label-check`` sets ``GALA_CUDA_CHECK_LABELS=0`` (the CUDA op's label range check and its host
synchronisation off); the result file then says so in its notes.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List

import torch

from . import report
from .machine import load_average, machine_info, require_cuda
from .report import Record
from .rotation import logits_rotation
from .timing import Budget, time_do_bench

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEP_BATCHES = "128,256,512,1024,2048,4096,8192"
SWEEP_CLASSES = "1000,8142,32768"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default=SWEEP_BATCHES, help="comma-separated batch sizes B")
    parser.add_argument("--classes", default=SWEEP_CLASSES, help="comma-separated numbers of classes C")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench budget per point and backend")
    parser.add_argument("--no-label-check", action="store_true",
                        help="set GALA_CUDA_CHECK_LABELS=0 (noted in the result file)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write crossover_<device>_<name>.json and .md here")


def step_of(backend: str, batch: int, classes: int, dtype: torch.dtype, device: torch.device):
    import gala_kernels as gk

    rotation = logits_rotation(batch, classes, dtype, device, scale=3.0)
    labels = torch.randint(0, classes, (batch,), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    state = gk.GALAState(classes, device=device)

    def step() -> None:
        logits = rotation.next()
        gk.fused_gala_ce(logits, labels, state, backend=backend).backward()
        logits.grad = None

    return step


def sweep(args: argparse.Namespace, device: torch.device,
          after_each_c: Callable[[List[Record]], None]) -> List[Record]:
    from ..backends import cuda_rule

    points = []
    free, _ = torch.cuda.mem_get_info(device)
    budget = Budget(warmup=1, min_repeats=1, max_repeats=1, seconds=args.rep_ms / 1e3)
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for C in (int(c) for c in args.classes.split(",")):
            for B in (int(b) for b in args.batches.split(",")):
                if 8 * B * C * dtype.itemsize > free:  # rotations + gradient: stay well inside memory
                    continue
                cuda_ms = time_do_bench(step_of("cuda", B, C, dtype, device), budget, device).median_ms
                triton_ms = time_do_bench(step_of("triton", B, C, dtype, device), budget, device).median_ms
                points.append({"dtype": dtype_name, "classes": C, "batch": B, "status": "ok",
                               "cuda_step_ms": cuda_ms, "triton_step_ms": triton_ms,
                               "cuda_wins": cuda_ms < triton_ms,
                               "rule_prefers_cuda": cuda_rule.prefer_cuda(B, C, dtype)})
                print(f"{dtype_name} C={C} B={B}: cuda {cuda_ms:.4f} ms, triton {triton_ms:.4f} ms",
                      flush=True)
                torch.cuda.empty_cache()
            after_each_c(points)
    return points


def crossover(points: List[Record]) -> Dict[str, object]:
    """Per (dtype, C): the largest B where cuda still wins; overall: a B x C threshold and how
    many sweep points a pure size threshold, and the current rule, get wrong."""
    per_shape: Dict[str, Dict[str, object]] = {}
    for p in points:
        entry = per_shape.setdefault(f"{p['dtype']} C={p['classes']}",
                                     {"largest_B_cuda_wins": None, "smallest_B_triton_wins": None})
        if p["cuda_wins"]:
            entry["largest_B_cuda_wins"] = max(entry["largest_B_cuda_wins"] or 0, p["batch"])
        else:
            b = entry["smallest_B_triton_wins"]
            entry["smallest_B_triton_wins"] = p["batch"] if b is None else min(b, p["batch"])
    best = None
    for threshold in sorted({p["batch"] * p["classes"] for p in points} | {0}):
        errors = sum((p["batch"] * p["classes"] <= threshold) != p["cuda_wins"] for p in points)
        if best is None or errors < best[1]:
            best = (threshold, errors)
    return {"per_shape": per_shape, "best_elements_threshold": best[0] if best else None,
            "threshold_misclassified_points": best[1] if best else None,
            "current_rule_misclassified_points": sum(p["rule_prefers_cuda"] != p["cuda_wins"]
                                                      for p in points),
            "points": len(points)}


COLUMNS = [
    report.text("dtype", "dtype"),
    report.number("C", "classes", 0),
    report.number("B", "batch", 0),
    report.number("cuda step ms", "cuda_step_ms", 4),
    report.number("triton step ms", "triton_step_ms", 4),
    report.Column("faster", lambda p: "cuda" if p["cuda_wins"] else "triton", align_right=False),
    report.Column("auto picks", lambda p: "cuda" if p["rule_prefers_cuda"] else "triton", align_right=False),
]

SUMMARY = ("A training step (`fused_gala_ce` with a `GALAState` + `backward()`) with `backend=\"cuda\"` and "
           "with `backend=\"triton\"` at every point of the sweep; median ms of `triton.testing.do_bench`, "
           "logits rotated beyond L2. `auto picks` is what `backend=\"auto\"` chooses at that shape.")


def run(args: argparse.Namespace) -> Dict:
    started = time.perf_counter()
    device = require_cuda("bench crossover (the CUDA C++ backend against Triton)")
    if args.no_label_check:
        os.environ["GALA_CUDA_CHECK_LABELS"] = "0"  # read by the op at its first call in this process
    from .. import backends
    from ..backends import cuda_rule

    for name in ("cuda", "triton"):
        ok, reason = backends.availability(name, device)
        if not ok:
            raise SystemExit(f"bench crossover needs the {name!r} backend: {reason}")
    meta = machine_info(device)
    meta["benchmark"] = "crossover"
    files: Dict[str, str] = {}

    def write(points: List[Record], final: bool) -> str:
        summary = crossover(points)
        text = (f"Best single B x C threshold: {summary['best_elements_threshold']} elements "
                f"({summary['threshold_misclassified_points']} of {summary['points']} points misclassified); "
                f"`auto` (cuda up to {cuda_rule.SINGLE_PASS_MAX_CLASSES:,} classes) misclassifies "
                f"{summary['current_rule_misclassified_points']}.")
        table = report.markdown_table(points, COLUMNS, label_key="dtype")
        if args.out:
            run_meta = dict(meta, load_average_end=load_average(),
                            total_seconds=round(time.perf_counter() - started, 1))
            if not final:
                run_meta["incomplete"] = True
            markdown = report.document("CUDA C++ step against the Triton step", SUMMARY, run_meta,
                                       [("Sweep", table), ("Crossover", text)])
            files.update(report.write_result(args.out, "crossover", device, markdown,
                                             {"meta": run_meta, "sweep": points, "crossover": summary}))
        return table + "\n\n" + text

    points = sweep(args, device, lambda so_far: write(so_far, final=False))
    print("\n" + write(points, final=True))
    for path in files.values():
        print(f"wrote {path}")
    return {"meta": meta, "sweep": points, "crossover": crossover(points), "files": files}
