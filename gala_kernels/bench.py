"""Times a GALA training step: every fused backend against eager, torch.compile and the authors' path.

``python -m gala_kernels bench`` also times ``F.cross_entropy``, Liger-Kernel and a plain copy of
the logits, over shapes and dtypes.

Each implementation times a full training step on ``(B, C)`` logits: forward, ``loss.backward()``
and (GALA only) the statistics update. Results: a table on screen and, with ``--out DIR``,
``bench_<device>.json``, ``bench_<device>.md`` and ``bench_<device>.png`` (time against C per
implementation, the copy floor dashed). See :mod:`gala_kernels.benchmark` for the details of the
timers, the memory probe and the derived columns.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .benchmark import report
from .benchmark.implementations import Case, Implementation, Prepared, all_implementations
from .benchmark.machine import load_average, machine_info
from .benchmark.timing import (
    Budget,
    Rotation,
    last_level_cache_bytes,
    memory_method,
    peak_extra_memory,
    rotation_count,
    time_cpu_interleaved,
    time_gpu,
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# (dtypes, classes, batches) when not given on the command line.
DEFAULT_SHAPES = {
    ("cpu", False): (["float32", "bfloat16"], [8142, 32768, 131072], [512]),
    ("cpu", True): (["float32"], [2048, 8142], [256]),
    ("cuda", False): (["bfloat16", "float32"], [8142, 32768, 131072, 262144], [4096]),
    ("cuda", True): (["bfloat16"], [8142, 32768], [4096]),
}
# (normal implementations, slow ones such as the authors' path); on CUDA `seconds` is do_bench's rep.
BUDGETS = {
    ("cpu", False): (Budget(warmup=2, min_repeats=5, max_repeats=50, seconds=2.0),
                     Budget(warmup=1, min_repeats=3, max_repeats=3, seconds=0.0)),
    ("cpu", True): (Budget(warmup=1, min_repeats=3, max_repeats=10, seconds=0.25),
                    Budget(warmup=1, min_repeats=2, max_repeats=2, seconds=0.0)),
    ("cuda", False): (Budget(warmup=3, min_repeats=10, max_repeats=200, seconds=0.2),
                      Budget(warmup=1, min_repeats=3, max_repeats=3, seconds=0.05)),
    ("cuda", True): (Budget(warmup=3, min_repeats=5, max_repeats=50, seconds=0.05),
                     Budget(warmup=1, min_repeats=2, max_repeats=2, seconds=0.02)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda when present, else cpu)")
    parser.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--classes", default=None, help="comma-separated numbers of classes C")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes B")
    parser.add_argument("--quick", action="store_true", help="small sweep, under a minute on a 2-core CPU")
    parser.add_argument("--out", default=None, metavar="DIR", help="write JSON, Markdown and a PNG plot here")
    parser.add_argument("--class-freq", default=None, metavar="PATH",
                        help="JSON list of per-class training counts; labels are drawn from it "
                             "(e.g. shared/data/cls_freq/iNaturalist18.json); default: uniform labels")
    parser.add_argument("--implementations", default=None,
                        help="comma-separated subset of: " + ",".join(i.name for i in all_implementations()))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _csv(text: Optional[str], convert, default: Sequence) -> List:
    if text is None:
        return list(default)
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SystemExit(f"--dtype: unknown dtype {name!r}; choose from float32, bfloat16, float16")
    return DTYPES[name]


def load_class_profile(path: str) -> List[float]:
    """Per-class training counts: a JSON list of numbers (the format of shared/data/cls_freq)."""
    with open(path) as f:
        counts = json.load(f)
    if isinstance(counts, dict):  # {"class": count}
        counts = list(counts.values())
    if not counts or not all(isinstance(c, (int, float)) and c >= 0 for c in counts):
        raise SystemExit(f"--class-freq: {path} must hold a JSON list of non-negative class counts")
    return [float(c) for c in counts]


def label_probabilities(profile: List[float], classes: int) -> torch.Tensor:
    """Sampling probabilities of ``classes`` classes from a count profile.

    With as many classes as the profile, the profile itself; otherwise the profile sorted by
    decreasing count, linearly interpolated to ``classes`` points (the same long tail, stretched).
    """
    counts = torch.tensor(profile, dtype=torch.float64)
    if classes != counts.numel():
        ordered = counts.sort(descending=True).values
        positions = torch.linspace(0, ordered.numel() - 1, classes, dtype=torch.float64)
        low = positions.floor().long()
        high = positions.ceil().long()
        frac = positions - low
        counts = ordered[low] * (1 - frac) + ordered[high] * frac
    return counts / counts.sum()


def make_labels(case: Case, profile: Optional[List[float]], generator: torch.Generator) -> torch.Tensor:
    if profile is None:
        labels = torch.randint(0, case.classes, (case.batch,), generator=generator)
    else:
        probabilities = label_probabilities(profile, case.classes)
        labels = torch.multinomial(probabilities, case.batch, replacement=True, generator=generator)
    return labels.to(case.device)


def make_rotation(case: Case, seed: int) -> Rotation:
    """Logits buffers (``requires_grad``) cycled so that together they exceed the last-level cache;
    drawn on the device itself, N(0, 2^2)."""
    count = rotation_count(case.step_bytes // 2, last_level_cache_bytes(case.device))
    generator = torch.Generator(device=case.device).manual_seed(seed)
    buffers = []
    for _ in range(count):
        logits = torch.randn(case.batch, case.classes, generator=generator, device=case.device) * 2.0
        buffers.append(logits.to(case.dtype).requires_grad_(True))
    return Rotation(buffers)


class Progress:
    """tqdm when installed, else one line per item on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.total, self.done, self.enabled = total, 0, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def describe(self, description: str) -> None:
        if self.bar is not None:
            self.bar.set_description(description)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {description}", file=sys.stderr, flush=True)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _error_text(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def time_prepared(prepared: Dict[str, Prepared], budgets: Dict[str, Budget], device: torch.device,
                  records: Dict[str, Dict]) -> None:
    """CPU: all steps interleaved (:func:`time_cpu_interleaved`); GPU: one ``do_bench`` after the
    other (the device is not shared). Fills the timing columns of ``records``, or marks a failure."""
    if device.type == "cuda":
        timings = {}
        for name, p in prepared.items():
            try:
                timings[name] = time_gpu(p.step, budgets[name])
            except Exception as exc:
                records[name].update(status="failed", reason=f"while timing: {_error_text(exc)}")
    else:
        try:
            timings = time_cpu_interleaved({name: p.step for name, p in prepared.items()}, budgets)
        except Exception as exc:
            timings = {}
            for name in prepared:
                records[name].update(status="failed", reason=f"while timing: {_error_text(exc)}")
    for name, timing in timings.items():
        records[name].update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                             repeats=timing.repeats)
        try:
            records[name]["peak_extra_bytes"] = peak_extra_memory(prepared[name].step, device)
        except Exception as exc:
            records[name]["peak_extra_bytes"] = None
            records[name]["notes"] += f" (memory probe failed: {_error_text(exc)})"


def measure_case(case: Case, implementations: List[Implementation], rotation: Rotation,
                 labels: torch.Tensor, budget: Budget, slow_budget: Budget, progress: Progress) -> List[Dict]:
    """One record per implementation on ``case``: timings and peak extra memory, or why it did not run.

    Every implementation is set up first (torch.compile compiles there, outside the timing), then
    all are timed together (:func:`time_prepared`), then each one's memory is probed.
    """
    shape = f"{str(case.dtype).replace('torch.', '')} B={case.batch} C={case.classes}"
    records: Dict[str, Dict] = {}
    prepared = {}
    for impl in implementations:
        progress.describe(f"{shape} setting up {impl.name}")
        record = {"implementation": impl.name, "label": impl.label, "family": impl.family}
        reason = impl.skip_reason(case)
        if reason is not None:
            record.update(status="skipped", reason=reason)
        else:
            try:
                prepared[impl.name] = impl.setup(case, rotation, labels)
                record.update(status="ok", setup_seconds=prepared[impl.name].setup_seconds,
                              notes=prepared[impl.name].notes)
            except Exception as exc:  # one implementation failing on a shape must not end the sweep
                record.update(status="failed", reason=_error_text(exc))
        records[impl.name] = record
        progress.step()

    progress.describe(f"{shape} timing {len(prepared)} implementations")
    budgets = {i.name: slow_budget if i.slow else budget for i in implementations if i.name in prepared}
    time_prepared(prepared, budgets, case.device, records)
    progress.step()
    return [records[impl.name] for impl in implementations]


def run(args: argparse.Namespace) -> Dict:
    """Run the sweep described by ``args``; returns ``{"meta", "headline", "results", "files"}``."""
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    profile = load_class_profile(args.class_freq) if args.class_freq else None
    default_dtypes, default_classes, default_batches = DEFAULT_SHAPES[(device.type, args.quick)]
    if profile is not None and args.classes is None:
        default_classes = [len(profile)]
    dtypes = _csv(args.dtype, _dtype, [DTYPES[d] for d in default_dtypes])
    classes = _csv(args.classes, int, default_classes)
    batches = _csv(args.batch, int, default_batches)
    implementations = all_implementations()
    if args.implementations:
        wanted = set(_csv(args.implementations, str, []))
        unknown = wanted - {i.name for i in implementations}
        if unknown:
            raise SystemExit(f"--implementations: unknown {sorted(unknown)}")
        implementations = [i for i in implementations if i.name in wanted]
    budget, slow_budget = BUDGETS[(device.type, args.quick)]

    meta = machine_info(device)
    meta.update({
        "labels": f"drawn from {args.class_freq}" if profile is not None else "uniform",
        "timing": ("triton.testing.do_bench (CUDA events), median and 20/80 quantiles"
                   if device.type == "cuda" else "time.perf_counter per step after warm-up, median and 20/80 "
                   "percentiles"),
        "memory": memory_method(device),
        "step": "forward + loss.backward() + statistics update (GALA); logits rotated beyond the cache",
        "bytes": "2 * B * C * itemsize (read logits + write gradient)",
        "quick": bool(args.quick),
    })

    cases = [Case(device, dtype, b, c) for dtype in dtypes for b in batches for c in classes]
    progress = Progress(len(cases) * (len(implementations) + 1), enabled=not args.no_progress)
    records: List[Dict] = []
    for case in cases:
        rotation = make_rotation(case, args.seed)
        labels = make_labels(case, profile, torch.Generator().manual_seed(args.seed))
        dtype_name = str(case.dtype).replace("torch.", "")
        for record in measure_case(case, implementations, rotation, labels, budget, slow_budget, progress):
            records.append({"device": device.type, "dtype": dtype_name, "batch": case.batch,
                            "classes": case.classes, "bytes": case.step_bytes,
                            "buffers_rotated": len(rotation.buffers), **record})
        del rotation
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()

    report.derive(records)
    head = report.headline(records)
    meta["load_average_end"] = load_average()
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    print(report.screen_text(records, head))
    files = report.write_outputs(args.out, meta, records, head) if args.out else {}
    for path in files.values():
        print(f"wrote {path}")
    return {"meta": meta, "headline": head, "results": records, "files": files}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="gala-kernels bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
