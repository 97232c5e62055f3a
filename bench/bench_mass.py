"""The mass pass of post-hoc re-balancing, ``mass[j] = sum_i softmax(z[i, :])[j]``, streamed in batches.

Default shape: the iNaturalist 2018 validation set, 24,426 x 8,142 fp32 logits (795 MB), in
batches of 512 rows, every method accumulating into a float64 ``(C,)`` vector. Methods, timed
side by side in one run (each repeat runs them all, in rotating order; the median is reported):

- ``fused``: ``PredictionRebalancer.update`` with the fused op of ``--backend`` (``auto``: the C++
  ``gala::softmax_colsum``, on CPU and on CUDA when built; else Triton on CUDA);
- ``eager``: ``torch.softmax(z, 1).sum(0)``, the same batches;
- ``read``: ``z.sum(1)`` over the same batches, a read of the logits (the floor of any pass);
- CUDA only: ``fused-<backend>`` for each other GPU backend; ``fused-one-call[-<backend>]`` /
  ``read-one-call``, the whole set in one call (through a fresh ``PredictionRebalancer``);
  ``cuda-op-one-call``, the CUDA op alone into a preallocated mass. ``--sweep`` adds one-call
  launches of the CUDA op's kernel variants and of the Triton row kernel with other settings.

Writes ``bench/results/mass_<device>.json`` and ``.md`` (machine, versions, date, load)::

    python bench/bench_mass.py                       # CPU, 24426 x 8142, batch 512
    python bench/bench_mass.py --device cuda         # on a GPU: Triton vs a read of the logits
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import gala_kernels  # noqa: F401  (loads the extension)
from gala_kernels import mass_ops
from gala_kernels.rebalance import PredictionRebalancer

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_mass(rows: int, classes: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Logits of a trained-looking classifier: N(0, 3^2) with the true class lifted by 8."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows, classes, dtype=torch.float32)
    for start in range(0, rows, 4096):  # generated in slices: bounded scratch memory
        block = torch.randn(min(4096, rows - start), classes, generator=g) * 3.0
        labels = torch.randint(0, classes, (block.shape[0],), generator=g)
        block[torch.arange(block.shape[0]), labels] += 8.0
        logits[start:start + block.shape[0]] = block
    return logits.to(device=device, dtype=dtype)


def stream_methods(logits: torch.Tensor, batch: int, backend: str,
                   sweep: bool = False) -> Dict[str, Callable[[], torch.Tensor]]:
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


# (rows per tile, warps, programs per SM) of the Triton row kernel tried by --sweep: the two best
# of 15 settings on an H200 (bench/results/mass_cuda_run2.md)
SWEEP_CONFIGS = ((1, 16, 2), (1, 8, 2))
# (variant, CTAs per SM; 0 = occupancy) of the CUDA op tried by --sweep, when the variant holds C
CUDA_SWEEP = (("", 0), ("", 1), ("t1024_e16", 0), ("t1024_e8_async", 0), ("t512_e16_async", 0),
              ("lse_then_tiles", 0))


def row_kernel_sweep(logits: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """One-call launches of the Triton row kernel with other launch settings than the rule's."""
    from gala_kernels.backends import triton_mass

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(methods: Dict[str, Callable], device: torch.device, repeats: int, warmup: int):
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    _sync(device)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no method always goes first
        for name in order:
            if device.type == "cuda":  # device time between two events (no host sync in the span)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                methods[name]()
                end.record()
                end.synchronize()
                seconds[name].append(begin.elapsed_time(end) / 1e3)
                continue
            _sync(device)
            start = time.perf_counter()
            methods[name]()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def read_of(method: str) -> str:
    """The read a method is compared with: one-call methods with ``read-one-call``."""
    return "read-one-call" if "one-call" in method else "read"


def machine(device: torch.device) -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(
        cpu=model, cores=os.cpu_count(), torch_threads_default=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_markdown(path: Path, report: dict) -> None:
    info, cfg = report["machine"], report["config"]
    where = info.get("gpu") or (
        f"{info['cpu']}, {info['cores']} cores ({info['cpu_capability']})"
    )
    lines = [
        f"# Mass pass of post-hoc re-balancing ({cfg['device']})",
        "",
        f"`mass[j] = sum_i softmax(z[i, :])[j]` over {cfg['rows']:,} x {cfg['classes']:,} {cfg['dtype']} "
        f"logits ({cfg['logits_mb']:.0f} MB), batches of {cfg['batch']} rows, float64 accumulation; "
        f"median of {cfg['repeats']} repeats, all methods side by side in one run (rotating order). "
        "`read` is `z.sum(1)` over the same batches, a read of the logits.",
        "",
        f"Machine: {where}; Python {info['python']}, torch {info['torch']}, Triton {info['triton']}; "
        f"{info['date']}. Generated by `python bench/bench_mass.py"
        + (" --device cuda" if cfg["device"].startswith("cuda") else "") + "`.",
        "",
        "| torch threads | method | median (ms) | min (ms) | max (ms) | GB/s of logits | vs eager | vs read "
        "| vs eager, minima | load average before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['threads']} | {r['method']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} "
            f"| {r['max_ms']:.1f} | "
            f"{r['gb_per_s']:.1f} | {r['speedup_vs_eager']:.2f}x | {r['ratio_vs_read']:.2f}x "
            f"| {r['speedup_vs_eager_of_minima']:.2f}x | {r['load_before'][0]} / {r['load_after'][0]} |"
        )
    check = report["max_rel_diff_fused_vs_eager"]
    lines += [
        "",
        f"Check: max relative difference fused vs eager mass = {check:.2e}.",
        "",
        "`vs eager` and `vs read` are ratios of medians (`vs eager` = eager / method, `vs read` = method / "
        "read, where one-call methods are compared with `read-one-call`); `vs eager, minima` compares each "
        "method's fastest repeat. On CUDA every time is the span between two CUDA events around the call.",
        "The load average is the 1-minute figure of the whole machine: when it exceeds the core count,",
        "other jobs ran beside and multi-threaded timings (torch's own reductions most of all) suffer;",
        "the single-thread rows are the steadier comparison.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24_426)
    parser.add_argument("--classes", type=int, default=8_142)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
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
    parser.add_argument("--out", default=None,
                        help="output path without suffix (default bench/results/mass_<device type>)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        thread_counts = [torch.get_num_threads()] if device.type == "cuda" else \
            list(dict.fromkeys([torch.get_num_threads(), 1]))
    logits = setup_mass(args.rows, args.classes, DTYPES[args.dtype], args.device, args.seed)
    methods = stream_methods(logits, args.batch, args.backend, sweep=args.sweep and device.type == "cuda")

    fused_mass, eager_mass = methods["fused"](), methods["eager"]()
    max_rel_diff = float(((fused_mass - eager_mass).abs() / eager_mass.abs().clamp_min(1e-30)).max())

    logits_bytes = logits.numel() * logits.element_size()
    results = []
    default_threads = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        load_before = [round(x, 2) for x in os.getloadavg()]
        seconds = time_side_by_side(methods, device, args.repeats, args.warmup)
        load_after = [round(x, 2) for x in os.getloadavg()]
        median = {name: statistics.median(values) for name, values in seconds.items()}
        results += [
            dict(threads=threads, method=name, median_ms=1e3 * median[name], min_ms=1e3 * min(values),
                 max_ms=1e3 * max(values), gb_per_s=logits_bytes / median[name] / 1e9,
                 speedup_vs_eager=median["eager"] / median[name],
                 ratio_vs_read=median[name] / median[read_of(name)],
                 speedup_vs_eager_of_minima=min(seconds["eager"]) / min(values),
                 load_before=load_before, load_after=load_after, seconds=values)
            for name, values in seconds.items()
        ]
    torch.set_num_threads(default_threads)
    report = dict(
        machine=machine(device),
        config=dict(rows=args.rows, classes=args.classes, batch=args.batch, dtype=args.dtype,
                    device=str(device), backend=args.backend, repeats=args.repeats, warmup=args.warmup,
                    logits_mb=logits_bytes / 1e6),
        max_rel_diff_fused_vs_eager=max_rel_diff, results=results,
    )
    print(f"{'threads':<8}{'method':<24}{'median ms':>12}{'min ms':>10}{'GB/s':>8}{'vs eager':>10}"
          f"{'vs read':>9}{'load':>8}")
    for r in results:
        print(f"{r['threads']:<8}{r['method']:<24}{r['median_ms']:>12.1f}{r['min_ms']:>10.1f}{r['gb_per_s']:>8.1f}"
              f"{r['speedup_vs_eager']:>9.2f}x{r['ratio_vs_read']:>8.2f}x{r['load_before'][0]:>8}")
    print(f"max relative difference fused vs eager mass: {max_rel_diff:.2e}")

    out = Path(args.out) if args.out else RESULTS / f"mass_{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), report)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
