"""``bench linear``: time and peak memory of ``fused_linear_gala_ce`` against the full logits.

Cases, per shape ``B x D x C`` (forward + backward of a training step, statistics on):

- ``chunked``: ``fused_linear_gala_ce(x, W, labels, state, b)`` with the default chunk rule;
- ``chunked-torch`` (CPU): the same with ``backend="torch"`` (the reference, chunk by chunk);
- ``chunked-<N>MiB`` (``--chunk-mib N``): the same with chunks whose fp32 logits take N MiB;
- ``full``: ``fused_gala_ce(addmm(b, x, W.T), labels, state)``: the ``(B, C)`` logits and their
  gradient materialised, the forward matmul, the fused kernel, then ``grad_x = G @ W``,
  ``grad_W = G.T @ x`` and ``grad_b`` through autograd;
- ``matmuls`` (CUDA): those three matmuls and the bias sum alone, on a stand-in gradient: how much
  of the step is the loss.

CPU: each case runs ``--steps`` steps in a fresh process, which measures the peak resident set one
step ADDS to its inputs (``VmHWM`` reset through ``/proc/self/clear_refs`` before each step) and
its time; step 1 includes the heap growth of the first step, later steps are the steady state.
CUDA: the cases run side by side in one process (interleaved, CUDA events, ``--rounds`` rounds),
and the peak extra memory of one step is ``max_memory_allocated`` over what the inputs hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

from . import report
from .machine import load_average, machine_info, resolve_device
from .memory import proc_status_kib, reset_peak_rss
from .report import Record
from .timing import Budget, time_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {"cpu": "8192x32x100000:float32",
                  "cuda": "8192x32x100000:float32,8192x1024x100000:bfloat16,4096x4096x32000:bfloat16"}
CPU_CASES = ("chunked", "chunked-torch", "full")

Shape = Tuple[int, int, int, str]  # (B, D, C, dtype name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--shapes", default=None, metavar="BxDxC:dtype,...",
                        help=f"default: {DEFAULT_SHAPES['cpu']} on CPU, {DEFAULT_SHAPES['cuda']} on CUDA")
    parser.add_argument("--skip", default="", help="comma-separated cases not to run, e.g. full")
    parser.add_argument("--chunk-mib", default="", help="comma-separated chunk budgets (MiB of fp32 chunk "
                                                        "logits) timed beside the default rule")
    parser.add_argument("--steps", type=int, default=2, help="CPU: steps per case (each in a fresh process)")
    parser.add_argument("--rounds", type=int, default=20, help="CUDA: interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="CUDA: warm-up rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write linear_<device>_<name>.json and .md here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def parse_shapes(text: str) -> List[Shape]:
    shapes = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        dims, _, dtype = entry.partition(":")
        try:
            B, D, C = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {entry!r} is not BxDxC[:dtype]") from None
        if (dtype or "float32") not in DTYPES:
            raise SystemExit(f"--shapes: unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        shapes.append((B, D, C, dtype or "float32"))
    return shapes


def shape_text(shape: Shape) -> str:
    return "{}x{}x{}:{}".format(*shape)


def rows_for_budget(B: int, C: int, mib: int) -> int:
    """Chunk rows whose fp32 logits take ``mib`` MiB (the default rule's arithmetic)."""
    rows = max(8, (mib * 2**20) // (4 * C) // 8 * 8)
    return min(rows, -(-B // 8) * 8)


# ---------------------------------------------------------------- one shape's cases

class Problem:
    """Inputs of one shape, and one training-step callable per case."""

    def __init__(self, shape: Shape, device: torch.device, seed: int):
        import gala_kernels as gk
        from gala_kernels.linear import default_chunk_rows, fused_linear_gala_ce

        self.B, self.D, self.C, dtype_name = shape
        dtype = DTYPES[dtype_name]
        g = torch.Generator(device=device).manual_seed(seed)
        B, D, C = self.B, self.D, self.C
        self.x = torch.randn(B, D, device=device, generator=g).to(dtype).requires_grad_(True)
        self.weight = (torch.randn(C, D, device=device, generator=g) / D**0.5).to(dtype).requires_grad_(True)
        self.bias = torch.zeros(C, device=device, dtype=dtype).requires_grad_(True)
        self.labels = torch.randint(0, C, (B,), device=device, generator=g)
        self.device, self.dtype = device, dtype
        self.default_chunk_rows = default_chunk_rows(B, C, device)
        self._gk, self._linear = gk, fused_linear_gala_ce

    def clear(self) -> None:
        self.x.grad = self.weight.grad = self.bias.grad = None

    def chunked(self, backend: str = "auto", chunk_rows=None) -> Callable[[], None]:
        state = self._gk.GALAState(self.C, device=self.device)

        def step() -> None:
            self._linear(self.x, self.weight, self.labels, state, self.bias, backend=backend,
                         chunk_size=chunk_rows).backward()
            self.clear()

        return step

    def full(self, backend: str = "auto") -> Callable[[], None]:
        state = self._gk.GALAState(self.C, device=self.device)

        def step() -> None:
            logits = torch.addmm(self.bias, self.x, self.weight.t())
            self._gk.fused_gala_ce(logits, self.labels, state, backend=backend).backward()
            self.clear()

        return step

    def matmuls(self) -> Callable[[], None]:
        stand_in = torch.randn(self.B, self.C, device=self.device).to(self.dtype)

        def step() -> None:
            with torch.no_grad():
                torch.addmm(self.bias, self.x, self.weight.t())
                stand_in @ self.weight  # grad_x
                stand_in.t() @ self.x  # grad_W
                stand_in.sum(0)  # grad_b

        return step

    def warm_up(self, backend: str) -> None:
        """A tiny call of each path: the first call loads the ops (one-time memory, not per step)."""
        tiny_w = self.weight[:10].detach().clone().requires_grad_(True)
        tiny_b = self.bias[:10].detach().clone().requires_grad_(True)
        tiny_x, tiny_y = self.x[:8].detach(), self.labels[:8] % 10
        self._linear(tiny_x, tiny_w, tiny_y, self._gk.GALAState(10, device=self.device), tiny_b,
                     backend=backend).backward()
        self._gk.fused_gala_ce(torch.addmm(tiny_b, tiny_x, tiny_w.t()), tiny_y, backend=backend).backward()


def shape_record(problem: Problem, case: str, chunk_rows: int) -> Record:
    return dict(case=case, B=problem.B, D=problem.D, C=problem.C,
                dtype=str(problem.dtype).replace("torch.", ""), chunk_rows=chunk_rows,
                full_logits_mib=problem.B * problem.C * problem.dtype.itemsize / 2**20)


# ---------------------------------------------------------------- CPU: a process per case

def run_cpu_child(case: str, shape: Shape, seed: int, steps: int) -> Record:
    """``steps`` forward + backward passes of one case; runs inside the child process."""
    problem = Problem(shape, torch.device("cpu"), seed)
    backend = "torch" if case == "chunked-torch" else "cpu"
    step = problem.full(backend) if case == "full" else problem.chunked(backend)
    problem.warm_up(backend)
    peaks, step_ms = [], []
    for _ in range(steps):
        reset_peak_rss()
        before = proc_status_kib("VmHWM")
        started = time.perf_counter()
        step()
        step_ms.append((time.perf_counter() - started) * 1e3)
        peaks.append(((proc_status_kib("VmHWM") or 0) - (before or 0)) / 1024)
    record = shape_record(problem, case, problem.B if case == "full" else problem.default_chunk_rows)
    record.update(status="ok", peak_added_mib=peaks, step_ms=step_ms, median_ms=statistics.median(step_ms),
                  threads=torch.get_num_threads(),
                  malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    return record


def measure_cpu(shape: Shape, args: argparse.Namespace, skip: List[str]) -> List[Record]:
    records = []
    for case in CPU_CASES:
        if case in skip:
            continue
        command = [sys.executable, "-m", "gala_kernels", "bench", "linear", "--child", case,
                   "--shapes", shape_text(shape), "--seed", str(args.seed), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            records.append(dict(case=case, status="failed", reason=last[:300]))
        else:
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in records[-1].items() if k != "malloc_mmap_threshold"}), flush=True)
    full = next((r for r in records if r["case"] == "full" and r["status"] == "ok"), None)
    for r in records:
        if r["status"] == "ok":
            steady_full = full["peak_added_mib"][-1] if full else None
            r["peak_vs_full"] = report.ratio(r["peak_added_mib"][-1], steady_full)
    return records


CPU_COLUMNS = [
    report.text("case", "case"),
    report.Column("B x D x C", lambda r: f"{r['B']} x {r['D']} x {r['C']:,}"),
    report.number("chunk rows", "chunk_rows", 0),
    report.number("full logits MiB", "full_logits_mib", 0),
    report.Column("peak added MiB, step 1 / 2 ...",
                  lambda r: " / ".join(f"{m:.0f}" for m in r["peak_added_mib"])),
    report.Column("fwd + bwd ms, step 1 / 2 ...", lambda r: " / ".join(f"{t:.0f}" for t in r["step_ms"])),
    report.number("steady peak / full", "peak_vs_full", 3),
]


# ---------------------------------------------------------------- CUDA: interleaved in one process

def _peak_extra_mib(step: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_cuda(shape: Shape, args: argparse.Namespace, skip: List[str],
                 device: torch.device) -> List[Record]:
    problem = Problem(shape, device, args.seed)
    steps: Dict[str, Callable[[], None]] = {}
    rows: Dict[str, int] = {}
    if "chunked" not in skip:
        steps["chunked"], rows["chunked"] = problem.chunked(), problem.default_chunk_rows
    if "full" not in skip:
        steps["full"], rows["full"] = problem.full(), problem.B
    for mib in (int(m) for m in args.chunk_mib.split(",") if m.strip()):
        chunk = rows_for_budget(problem.B, problem.C, mib)
        steps[f"chunked-{mib}MiB"], rows[f"chunked-{mib}MiB"] = problem.chunked(chunk_rows=chunk), chunk
    if "matmuls" not in skip and problem.B * problem.C * 2 < 2**34:
        steps["matmuls"], rows["matmuls"] = problem.matmuls(), problem.B
    peaks = {name: _peak_extra_mib(step, device) for name, step in steps.items()}
    budgets = {name: Budget.rounds(args.rounds, args.warmup) for name in steps}
    timings = time_interleaved(steps, budgets, device, args.seed)
    full_ms = timings["full"].median_ms if "full" in timings else None
    records = []
    for name, timing in timings.items():
        record = shape_record(problem, name, rows[name])
        record.update(status="ok", **timing.as_record(samples=True), peak_extra_mib=peaks[name],
                      ratio_to_full=report.ratio(timing.median_ms, full_ms))
        records.append(record)
    del problem, steps
    torch.cuda.empty_cache()
    return records


CUDA_COLUMNS = [
    report.text("case", "case"),
    report.Column("B x D x C, dtype", lambda r: f"{r['B']} x {r['D']} x {r['C']:,}, {r['dtype']}"),
    report.number("chunk rows", "chunk_rows", 0),
    report.number("median ms", "median_ms", 3),
    report.span("p20-p80 ms", "p20_ms", "p80_ms", 3),
    report.number("/ full", "ratio_to_full", 3),
    report.number("peak extra MiB", "peak_extra_mib", 0),
]

SUMMARY = {
    "cpu": ("Peak resident memory one training step (forward + backward) adds on top of its inputs (x, W, b, "
            "labels, state) and of what earlier steps left allocated, read from VmHWM in a fresh process per "
            "case (glibc malloc with its default settings), and the time of each step. Step 1 includes the "
            "heap growth of the first step; later steps are the steady state. Other jobs share a small "
            "machine's cores: compare times only within one run."),
    "cuda": ("Forward + backward of a training step. The cases run interleaved in one process (a new random "
             "order every round), timed with CUDA events; medians and 20/80 percentiles over the rounds. "
             "`/ full` is the median over the `full` case's; peak extra memory is max_memory_allocated "
             "during one step over what the inputs hold."),
}


def run(args: argparse.Namespace) -> Dict:
    if args.child:
        record = run_cpu_child(args.child, parse_shapes(args.shapes)[0], args.seed, args.steps)
        print(json.dumps(record))
        return {"results": [record]}
    started = time.perf_counter()
    device = resolve_device(args.device, "bench linear")
    shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type])
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    meta = machine_info(device)
    meta["benchmark"] = "linear"
    records: List[Record] = []
    for shape in shapes:
        try:
            measured = measure_cuda(shape, args, skip, device) if device.type == "cuda" else \
                measure_cpu(shape, args, skip)
        except Exception as exc:  # one failed shape must not lose the others
            measured = [dict(case=shape_text(shape), status="failed", reason=report.error_text(exc))]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records += measured
    columns = CUDA_COLUMNS if device.type == "cuda" else CPU_COLUMNS
    table = report.markdown_table(records, columns, label_key="case")
    print("\n" + table)
    meta["load_average_end"] = load_average()
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    files = {}
    if args.out:
        title = f"fused_linear_gala_ce against the full logits ({device.type})"
        markdown = report.document(title, SUMMARY[device.type], meta, [("Results", table)])
        files = report.write_result(args.out, "linear", device, markdown, {"meta": meta, "results": records})
        for path in files.values():
            print(f"wrote {path}")
    return {"meta": meta, "results": records, "files": files}
