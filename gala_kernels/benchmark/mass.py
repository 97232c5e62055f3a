"""``bench mass``: the mass pass of post-hoc re-balancing, ``mass[j] = sum_i softmax(z[i, :])[j]``.

Default shape: the iNaturalist 2018 validation set, 24,426 x 8,142 fp32 logits (795 MB), streamed
in batches of 512 rows, every method accumulating into a float64 ``(C,)`` vector. With several
``--classes``, each C gets as many rows as keep the logits at that size (unless ``--rows``).
Methods, timed side by side (interleaved, a new random order every round):

- ``fused``: ``PredictionRebalancer.update`` with the fused op of ``--backend`` (``auto``: the C++
  ``gala::softmax_colsum`` on CPU and on CUDA when built, else Triton on CUDA);
- ``eager``: ``torch.softmax(z, 1).sum(0)``, the same batches;
- ``read``: ``z.sum(1)`` over the same batches, a read of the logits (the floor of any pass);
- CUDA only: ``fused-<backend>`` for each other GPU backend; ``fused-one-call[-<backend>]`` /
  ``read-one-call``, the whole set in one call (through a fresh ``PredictionRebalancer``);
  ``cuda-op-one-call``, the CUDA op alone into a preallocated mass. ``--sweep`` adds one-call
  launches of the CUDA op's kernel variants and of the Triton row kernel with other settings.

On CPU every method is timed with each of ``--threads`` (default: all cores, then 1).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import torch

from .. import mass_ops
from ..rebalance import PredictionRebalancer
from . import report
from .machine import load_average, machine_info, resolve_device
from .report import Record
from .timing import Budget, time_interleaved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INATURALIST_VAL_ROWS, INATURALIST_CLASSES = 24_426, 8_142

# (rows per tile, warps, programs per SM) of the Triton row kernel tried by --sweep
SWEEP_CONFIGS = ((1, 16, 2), (1, 8, 2))
# (variant, CTAs per SM; 0 = occupancy) of the CUDA op tried by --sweep, when the variant holds C
CUDA_SWEEP = (("", 0), ("", 1), ("t1024_e16", 0), ("t1024_e8_async", 0), ("t512_e16_async", 0),
              ("lse_then_tiles", 0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--classes", default=str(INATURALIST_CLASSES),
                        help="comma-separated numbers of classes")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows of logits (default: {INATURALIST_VAL_ROWS:,} x {INATURALIST_CLASSES:,} "
                             "elements in all, the iNaturalist 2018 validation set)")
    parser.add_argument("--batch", type=int, default=512, help="rows per update")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--backend", default="auto",
                        help="the fused method's backend (auto: cpu / cuda / triton)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts to time (default: all cores, then 1; CPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true",
                        help="CUDA: also time one-call launches of the CUDA op's kernel variants and of the "
                             "Triton row kernel with other settings")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write mass_<device>_<name>.json and .md here")


def make_logits(rows: int, classes: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Logits of a trained-looking classifier: N(0, 3^2) with the true class lifted by 8."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows, classes, dtype=torch.float32)
    for start in range(0, rows, 4096):  # generated in slices: bounded scratch memory
        block = torch.randn(min(4096, rows - start), classes, generator=g) * 3.0
        labels = torch.randint(0, classes, (block.shape[0],), generator=g)
        block[torch.arange(block.shape[0]), labels] += 8.0
        logits[start:start + block.shape[0]] = block
    return logits.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- methods

def stream_methods(logits: torch.Tensor, batch: int, backend: str,
                   sweep: bool = False) -> Dict[str, Callable[[], object]]:
    C = logits.shape[1]
    batches = [logits[s:s + batch] for s in range(0, logits.shape[0], batch)]
    device = logits.device

    def streamed(name: str) -> Callable[[], torch.Tensor]:
        def fused() -> torch.Tensor:
            rb = PredictionRebalancer(C, backend=name, device=device)
            for b in batches:
                rb.update(b)
            return rb.mass

        return fused

    def eager() -> torch.Tensor:
        mass = torch.zeros(C, dtype=torch.float64, device=device)
        for b in batches:
            mass += torch.softmax(b, dim=1, dtype=torch.float32).sum(0)
        return mass

    def read() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for b in batches:
            total += b.sum(1, dtype=torch.float32).sum()
        return total

    methods = {"fused": streamed(backend), "eager": eager, "read": read}
    if device.type == "cuda":
        def fused_one_call(name: str) -> Callable[[], None]:
            return lambda: PredictionRebalancer(C, backend=name, device=device).update(logits)

        methods["fused-one-call"] = fused_one_call(backend)
        methods["read-one-call"] = lambda: logits.sum(1, dtype=torch.float32)
        out = torch.zeros(C, dtype=torch.float64, device=device)
        for name in ("cuda", "triton"):  # each GPU backend, whatever "auto" picks
            if name != backend and mass_ops.availability(name, device)[0]:
                methods[f"fused-{name}"] = streamed(name)
                methods[f"fused-one-call-{name}"] = fused_one_call(name)
        if mass_ops.availability("cuda", device)[0]:
            # the op alone into a preallocated float64 mass: no module, no allocation
            methods["cuda-op-one-call"] = lambda: torch.ops.gala.softmax_colsum_add_(logits, out)
        if sweep:
            methods.update(cuda_kernel_sweep(logits, out))
            methods.update(row_kernel_sweep(logits))
    return methods


def row_kernel_sweep(logits: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """One-call launches of the Triton row kernel with other launch settings than the rule's."""
    from ..backends import triton_mass

    if logits.shape[1] > triton_mass.MAX_ROW_BLOCK:
        return {}
    variants = {}
    for rows_per_tile, warps, per_sm in SWEEP_CONFIGS:
        variants[f"one-call triton R{rows_per_tile} w{warps} p{per_sm}"] = (
            lambda r=rows_per_tile, w=warps, p=per_sm: triton_mass.softmax_colsum_triton(
                logits, rows_per_tile=r, num_warps=w, programs_per_sm=p))
    return variants


def cuda_kernel_sweep(logits: torch.Tensor, out: torch.Tensor) -> Dict[str, Callable[[], None]]:
    """One-call launches of the CUDA op's kernel variants (those that hold C) and CTAs per SM."""
    if not mass_ops.availability("cuda", logits.device)[0]:
        return {}
    variants = {}
    for variant, per_sm in CUDA_SWEEP:
        try:
            name = torch.ops.gala.softmax_colsum_cuda_variant(logits, variant)
            torch.ops.gala.softmax_colsum_add_(logits, out, variant, per_sm)
        except ValueError:  # the variant does not hold C
            continue
        variants[f"one-call cuda {name} c{per_sm}"] = (
            lambda v=variant, c=per_sm: torch.ops.gala.softmax_colsum_add_(logits, out, v, c))
    return variants


def read_of(method: str) -> str:
    """The read a method is compared with: one-call methods with ``read-one-call``."""
    return "read-one-call" if "one-call" in method else "read"


# ---------------------------------------------------------------- measuring

def measure_shape(args: argparse.Namespace, device: torch.device, rows: int, classes: int,
                  thread_counts: List[int]) -> List[Record]:
    logits = make_logits(rows, classes, DTYPES[args.dtype], device, args.seed)
    methods = stream_methods(logits, args.batch, args.backend, sweep=args.sweep and device.type == "cuda")
    fused_mass, eager_mass = methods["fused"](), methods["eager"]()
    max_rel_diff = float(((fused_mass - eager_mass).abs() / eager_mass.abs().clamp_min(1e-30)).max())
    logits_bytes = logits.numel() * logits.element_size()
    budgets = {name: Budget.rounds(args.repeats, args.warmup) for name in methods}
    records = []
    default_threads = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        load_before = load_average()
        timings = time_interleaved(methods, budgets, device, args.seed)
        load_after = load_average()
        for name, t in timings.items():
            eager, reads = timings["eager"], timings[read_of(name)]
            records.append(dict(
                rows=rows, classes=classes, batch=args.batch, dtype=args.dtype, logits_mb=logits_bytes / 1e6,
                threads=threads, method=name, status="ok", **t.as_record(samples=True),
                gb_per_s=logits_bytes / (t.median_ms / 1e3) / 1e9,
                speedup_vs_eager=eager.median_ms / t.median_ms, ratio_vs_read=t.median_ms / reads.median_ms,
                speedup_vs_eager_of_minima=eager.min_ms / t.min_ms,
                max_rel_diff_fused_vs_eager=max_rel_diff, load_before=load_before, load_after=load_after))
    torch.set_num_threads(default_threads)
    return records


COLUMNS = [
    report.number("torch threads", "threads", 0),
    report.text("method", "method"),
    report.number("median ms", "median_ms", 1),
    report.number("min ms", "min_ms", 1),
    report.number("max ms", "max_ms", 1),
    report.number("GB/s of logits", "gb_per_s", 1),
    report.number("vs eager", "speedup_vs_eager", 2, "x"),
    report.number("vs read", "ratio_vs_read", 2, "x"),
    report.number("vs eager, minima", "speedup_vs_eager_of_minima", 2, "x"),
    report.Column("load average before / after", lambda r: f"{r['load_before']} / {r['load_after']}"),
]

SUMMARY = (
    "`mass[j] = sum_i softmax(z[i, :])[j]` over the rows of one logits tensor, streamed in batches into a "
    "float64 `(C,)` vector, every method side by side in one run (interleaved, a new random order every "
    "round). `read` is `z.sum(1)` over the same batches, a read of the logits. `vs eager` and `vs read` are "
    "ratios of medians (`vs eager` = eager / method, `vs read` = method / read, one-call methods compared "
    "with `read-one-call`); `vs eager, minima` compares each method's fastest repeat. On CUDA every time is "
    "the span between two CUDA events around the call. The load average is the 1-minute figure of the "
    "whole machine: above the core count, other jobs ran beside and multi-threaded timings suffer."
)


def run(args: argparse.Namespace) -> Dict:
    started = time.perf_counter()
    device = resolve_device(args.device, "bench mass")
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = ([torch.get_num_threads()] if device.type == "cuda"
                         else list(dict.fromkeys([torch.get_num_threads(), 1])))
    meta = machine_info(device)
    meta["benchmark"] = "mass"
    records: List[Record] = []
    sections = []
    for classes in (int(c) for c in args.classes.split(",")):
        rows = args.rows or round(INATURALIST_VAL_ROWS * INATURALIST_CLASSES / classes)
        shape_records = measure_shape(args, device, rows, classes, thread_counts)
        records += shape_records
        first = shape_records[0]
        heading = (f"{rows:,} x {classes:,} {args.dtype} ({first['logits_mb']:.0f} MB), batches of "
                   f"{args.batch} rows, median of {args.repeats} repeats")
        body = (report.markdown_table(shape_records, COLUMNS, label_key="method")
                + f"\n\nCheck: max relative difference fused vs eager mass = "
                  f"{first['max_rel_diff_fused_vs_eager']:.2e}.")
        sections.append((heading, body))
        print(f"\n{heading}\n{body}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["load_average_end"] = load_average()
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    files = {}
    if args.out:
        title = f"Mass pass of post-hoc re-balancing ({device.type})"
        markdown = report.document(title, SUMMARY, meta, sections)
        files = report.write_result(args.out, "mass", device, markdown, {"meta": meta, "results": records})
        for path in files.values():
            print(f"wrote {path}")
    return {"meta": meta, "results": records, "files": files}

