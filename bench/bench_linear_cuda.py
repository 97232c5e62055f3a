"""Time and peak memory of ``fused_linear_gala_ce`` on a GPU, against the matmuls + fused kernel.

Issue 7's GPU target: the chunked ``fused_linear_gala_ce`` forward + backward runs within 1.15x of
the unchunked path it replaces, the classifier matmul plus the fused GALA kernel:

- ``chunked``: ``fused_linear_gala_ce(x, W, labels, state, b)`` (default chunk rule), + backward;
- ``full``: ``fused_gala_ce(addmm(b, x, W.T), labels, state)`` + backward through autograd: the
  forward matmul, the fused kernel, then ``grad_x = G @ W``, ``grad_W = G.T @ x``, ``grad_b``;
- ``matmuls``: the same three matmuls (and the bias sum) alone, on a stand-in gradient, to show
  how much of the step is the loss.

All three run side by side in one process, interleaved (each round runs every case once, the
order rotated), timed with CUDA events; medians over the rounds. The peak extra memory of one
step is ``torch.cuda.max_memory_allocated`` over what the inputs already hold.

    python bench/bench_linear_cuda.py                    # default shapes, writes bench/results/linear_cuda.*
    python bench/bench_linear_cuda.py --shapes 8192x32x100000:float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gala_kernels as gk  # noqa: E402
from gala_kernels.linear import default_chunk_rows, fused_linear_gala_ce  # noqa: E402

DEFAULT_SHAPES = ("8192x32x100000:float32", "8192x1024x100000:bfloat16", "4096x4096x32000:bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET = 1.15


def parse_shape(text: str):
    dims, _, dtype = text.partition(":")
    B, D, C = (int(v) for v in dims.split("x"))
    return B, D, C, DTYPES[dtype or "float32"]


def rows_for_budget(B: int, C: int, mib: int) -> int:
    """Chunk rows whose fp32 logits take ``mib`` MiB (the default rule's arithmetic)."""
    rows = max(8, (mib * 2**20) // (4 * C) // 8 * 8)
    return min(rows, -(-B // 8) * 8)


def make_cases(B: int, D: int, C: int, dtype: torch.dtype, device: torch.device, chunk_mibs=()):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, D, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(C, D, device=device, generator=g) / D**0.5).to(dtype).requires_grad_(True)
    bias = torch.zeros(C, device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, C, (B,), device=device, generator=g)
    states = {name: gk.GALAState(C, device=device) for name in ("chunked", "full")}
    stand_in_grad = torch.randn(B, C, device=device, generator=g).to(dtype) if B * C * 2 < 2**34 else None

    def clear():
        x.grad = weight.grad = bias.grad = None

    def chunked():
        fused_linear_gala_ce(x, weight, labels, states["chunked"], bias).backward()
        clear()

    def full():
        gk.fused_gala_ce(torch.addmm(bias, x, weight.t()), labels, states["full"]).backward()
        clear()

    def matmuls():
        with torch.no_grad():
            logits = torch.addmm(bias, x, weight.t())
            del logits
            stand_in_grad @ weight            # grad_x
            stand_in_grad.t() @ x             # grad_W
            stand_in_grad.sum(0)              # grad_b

    cases = {"chunked": chunked, "full": full}
    for mib in chunk_mibs:  # other chunk budgets than the default rule's
        rows = rows_for_budget(B, C, mib)
        state_m = gk.GALAState(C, device=device)

        def chunked_m(rows=rows, state_m=state_m):
            fused_linear_gala_ce(x, weight, labels, state_m, bias, chunk_size=rows).backward()
            clear()

        cases[f"chunked-{mib}MiB"] = chunked_m
    if stand_in_grad is not None:
        cases["matmuls"] = matmuls
    return cases, (x, weight, bias, labels, stand_in_grad)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_mib(step, device):
    if device.type != "cuda":  # --device cpu is a smoke test of this script: no memory numbers
        step()
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_side_by_side(cases, device, rounds: int, warmup: int):
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync(device)
    ms = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cases[name]()
                stop.record()
                stop.synchronize()
                ms[name].append(start.elapsed_time(stop))
            else:
                begin = time.perf_counter()
                cases[name]()
                ms[name].append((time.perf_counter() - begin) * 1e3)
    return ms


def p20_p80(values):
    quintiles = statistics.quantiles(values, n=5, method="inclusive")
    return quintiles[0], quintiles[-1]


def run_shape(B, D, C, dtype, device, rounds, warmup, chunk_mibs=()):
    cases, _tensors = make_cases(B, D, C, dtype, device, chunk_mibs)
    peaks = {name: peak_extra_mib(step, device) for name, step in cases.items()}
    ms = time_side_by_side(cases, device, rounds, warmup)
    med = {name: statistics.median(v) for name, v in ms.items()}
    record = dict(
        B=B, D=D, C=C, dtype=str(dtype).replace("torch.", ""), chunk_rows=default_chunk_rows(B, C, device),
        full_logits_mib=B * C * dtype.itemsize / 2**20, median_ms=med,
        p20_p80_ms={n: p20_p80(v) for n, v in ms.items()},
        peak_extra_mib=peaks, chunked_over_full=med["chunked"] / med["full"], target=TARGET,
        other_chunkings={name: dict(rows=rows_for_budget(B, C, int(name[8:-3])), median_ms=med[name],
                                    over_full=med[name] / med["full"], peak_extra_mib=peaks[name])
                         for name in med if name.startswith("chunked-")},
    )
    record["meets_target"] = record["chunked_over_full"] <= TARGET
    del cases, _tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def others(record) -> str:
    return "; ".join(f"{name[8:]}: {o['rows']} rows, {o['median_ms']:.3f} ms, {o['over_full']:.3f}, "
                     f"{o['peak_extra_mib']:.0f}" for name, o in record.get("other_chunkings", {}).items())


def markdown(records, info) -> str:
    lines = [
        "# fused_linear_gala_ce on GPU: chunked vs the matmuls + fused kernel (forward + backward)",
        "",
        f"{info['gpu']}; torch {info['torch']} (CUDA {info['cuda']}), Triton {info['triton']}, Python "
        f"{info['python']}; {info['date']}. Generated by `python bench/bench_linear_cuda.py`: the cases "
        "run interleaved in one process, CUDA events, medians (p20-p80) over the rounds.",
        "",
        "| B | D | C | dtype | chunk rows | chunked ms | full (matmul + fused kernel) ms | matmuls alone ms "
        "| chunked / full (target <= 1.15) | peak extra MiB chunked / full | other chunk budgets: rows, ms, "
        "/ full, peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['shape']} | | | | | failed: {r['error']} | | | | |")
            continue
        med, q = r["median_ms"], r["p20_p80_ms"]
        mm = f"{med['matmuls']:.3f}" if "matmuls" in med else "-"
        lines.append(
            f"| {r['B']} | {r['D']} | {r['C']} | {r['dtype']} | {r['chunk_rows']} "
            f"| {med['chunked']:.3f} ({q['chunked'][0]:.3f}-{q['chunked'][1]:.3f}) "
            f"| {med['full']:.3f} ({q['full'][0]:.3f}-{q['full'][1]:.3f}) | {mm} "
            f"| {r['chunked_over_full']:.3f} ({'meets' if r['meets_target'] else 'misses'}) "
            f"| {r['peak_extra_mib']['chunked']:.0f} / {r['peak_extra_mib']['full']:.0f} "
            f"| {others(r)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), help="BxDxC:dtype entries")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "linear_cuda"))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests this script")
    parser.add_argument("--chunk-mib", type=int, nargs="*", default=[],
                        help="also time these chunk budgets (MiB of fp32 chunk logits) beside the rule")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_linear_cuda.py needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test of the script)"
    info = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton_version, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for text in args.shapes:
        try:
            record = run_shape(*parse_shape(text), device, args.rounds, args.warmup, args.chunk_mib)
        except Exception as error:  # noqa: BLE001 - one failed shape must not lose the others
            record = dict(shape=text, error=f"{type(error).__name__}: {error}"[:300])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(record)
        print(json.dumps(record), flush=True)
        out.with_suffix(".json").write_text(json.dumps(dict(machine=info, results=records), indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(records, info))
    print(markdown(records, info))
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
