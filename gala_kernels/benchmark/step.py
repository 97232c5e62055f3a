"""``bench step`` (the default): a GALA training step, every fused backend against the baselines.

Every implementation of :mod:`.step_implementations` times one step on ``(B, C)`` logits: every
built backend of ``fused_gala_ce`` and its forward op alone, the eager GALA step in plain PyTorch,
``torch.compile`` of it, the authors' path, ``F.cross_entropy``, Liger-Kernel when installed, and
two copy floors. On CPU all implementations of a shape are interleaved; on a GPU each one is timed
with ``triton.testing.do_bench``. Then each one's peak extra memory is probed. With ``--out DIR``:
``step_<device>_<name>.json``, ``.md`` and ``.png`` (time against C) under ``DIR``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import backends
from . import step_report, traffic
from .machine import load_average, machine_info, resolve_device
from .memory import memory_method, peak_extra_memory
from .report import Progress, Record, error_text, result_stem, write_result
from .rotation import Rotation, logits_rotation
from .step_implementations import Case, Implementation, Prepared, all_implementations
from .timing import Budget, time_each

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

Shape = Tuple[int, int, str]  # (B, C, dtype name)

# Shapes when none are given, by (device type, mode); the first one also gives the dimensions that
# --batch, --classes and --dtype do not override.
CPU_FULL = [(512, classes, dtype) for dtype in ("float32", "bfloat16") for classes in (8142, 32768, 131072)]
DEFAULT_SHAPES: Dict[Tuple[str, str], List[Shape]] = {
    ("cpu", "full"): CPU_FULL,
    ("cpu", "quick"): [(256, 2048, "float32"), (256, 8142, "float32")],
    ("cuda", "full"): [(512, 8142, "float32"), (4096, 8142, "bfloat16"), (8192, 32768, "bfloat16"),
                       (2048, 131072, "bfloat16")],
    ("cuda", "quick"): [(4096, 8142, "bfloat16"), (4096, 32768, "bfloat16")],
    ("cpu", "dry_run"): [(8, 37, "float32"), (6, 70, "bfloat16")],
    ("cuda", "dry_run"): [(8, 37, "float32"), (6, 70, "bfloat16")],
}
# (normal implementations, slow ones such as the authors' path); on CUDA `seconds` is do_bench's rep.
BUDGETS = {
    ("cpu", "full"): (Budget(warmup=2, min_repeats=5, max_repeats=50, seconds=2.0),
                      Budget(warmup=1, min_repeats=3, max_repeats=3)),
    ("cpu", "quick"): (Budget(warmup=1, min_repeats=3, max_repeats=10, seconds=0.25),
                       Budget(warmup=1, min_repeats=2, max_repeats=2)),
    ("cuda", "full"): (Budget(warmup=3, min_repeats=10, max_repeats=200, seconds=0.2),
                       Budget(warmup=1, min_repeats=3, max_repeats=3, seconds=0.05)),
    ("cuda", "quick"): (Budget(warmup=3, min_repeats=5, max_repeats=50, seconds=0.05),
                        Budget(warmup=1, min_repeats=2, max_repeats=2, seconds=0.02)),
    ("cpu", "dry_run"): (Budget.rounds(2), Budget.rounds(1)),
    ("cuda", "dry_run"): (Budget(warmup=1, min_repeats=2, max_repeats=2, seconds=0.01),
                          Budget(warmup=1, min_repeats=1, max_repeats=1, seconds=0.01)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda when present, else cpu)")
    parser.add_argument("--shapes", default=None, metavar="BxC:dtype,...",
                        help="comma-separated shapes, e.g. 512x8142:float32,4096x8142:bfloat16 "
                             "(instead of the product of --batch, --classes and --dtype)")
    parser.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--classes", default=None, help="comma-separated numbers of classes C")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes B")
    parser.add_argument("--quick", action="store_true", help="small sweep, under a minute on a 2-core CPU")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, one or two calls each, Triton in its interpreter on CPU "
                             "(set TRITON_INTERPRET=1): checks the benchmark itself, times nothing")
    parser.add_argument("--out", default=None, metavar="DIR", help="write JSON, Markdown and a PNG plot here")
    parser.add_argument("--class-freq", default=None, metavar="PATH",
                        help="JSON list of per-class training counts; labels are drawn from it; "
                             "default: uniform labels")
    parser.add_argument("--implementations", default=None,
                        help="comma-separated subset of: " + ",".join(i.name for i in all_implementations()))
    parser.add_argument("--compile-max-elements", type=int, default=None, metavar="N",
                        help="skip torch.compile on shapes with B x C > N (compiling takes ~40 s per shape "
                             "on a cold GPU machine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--no-traffic-model", action="store_true",
                        help="leave out the Triton kernels' traffic modelled under the interpreter "
                             "(the 'model' columns; a few seconds per shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- arguments

def _csv(text: Optional[str], convert, default: Sequence) -> List:
    if text is None:
        return list(default)
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def _dtype_name(name: str) -> str:
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; choose from float32, bfloat16, float16")
    return str(DTYPES[name]).replace("torch.", "")


def parse_shapes(text: str) -> List[Shape]:
    """``"512x8142:float32,4096x8142:bf16"`` -> ``[(512, 8142, "float32"), (4096, 8142, "bfloat16")]``."""
    shapes = []
    for entry in _csv(text, str, []):
        dims, _, dtype = entry.partition(":")
        try:
            batch, classes = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {entry!r} is not BxC[:dtype]") from None
        shapes.append((batch, classes, _dtype_name(dtype or "float32")))
    return shapes


def mode_of(args: argparse.Namespace) -> str:
    return "dry_run" if args.dry_run else "quick" if args.quick else "full"


def select_shapes(args: argparse.Namespace, device: torch.device,
                  profile: Optional[List[float]]) -> List[Shape]:
    """``--shapes``; else the device's default shapes; else, when ``--batch``, ``--classes``,
    ``--dtype`` or ``--class-freq`` is given, their product, each dimension not given taken from
    the first default shape (``--class-freq``: as many classes as the profile)."""
    if args.shapes:
        return parse_shapes(args.shapes)
    default = DEFAULT_SHAPES[(device.type, mode_of(args))]
    if args.dtype is None and args.classes is None and args.batch is None and profile is None:
        return list(default)
    first_batch, first_classes, first_dtype = default[0]
    dtypes = _csv(args.dtype, _dtype_name, [first_dtype])
    classes = _csv(args.classes, int, [len(profile) if profile is not None else first_classes])
    batches = _csv(args.batch, int, [first_batch])
    return [(b, c, d) for d in dtypes for b in batches for c in classes]


def select_implementations(args: argparse.Namespace) -> List[Implementation]:
    implementations = all_implementations(args.compile_max_elements)
    if args.implementations:
        wanted = set(_csv(args.implementations, str, []))
        unknown = wanted - {i.name for i in implementations}
        if unknown:
            raise SystemExit(f"--implementations: unknown {sorted(unknown)}; choose from "
                             + ", ".join(i.name for i in implementations))
        implementations = [i for i in implementations if i.name in wanted]
    return implementations


# ---------------------------------------------------------------- labels

def load_class_profile(path: str) -> List[float]:
    """Per-class training counts: a JSON list of numbers (or a ``{class: count}`` object)."""
    with open(path) as f:
        counts = json.load(f)
    if isinstance(counts, dict):
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


def make_labels(case: Case, profile: Optional[List[float]], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if profile is None:
        labels = torch.randint(0, case.classes, (case.batch,), generator=generator)
    else:
        probabilities = label_probabilities(profile, case.classes)
        labels = torch.multinomial(probabilities, case.batch, replacement=True, generator=generator)
    return labels.to(case.device)


# ---------------------------------------------------------------- measuring

def time_and_probe(prepared: Dict[str, Prepared], budgets: Dict[str, Budget], device: torch.device,
                   records: Dict[str, Record], seed: int) -> None:
    """Time every prepared step (:func:`~gala_kernels.benchmark.timing.time_each`), then probe
    each one's peak extra memory; fills ``records`` or marks a failure."""

    def failed(name: str, exc: Exception) -> None:
        records[name].update(status="failed", reason=f"while timing: {error_text(exc)}")

    timings = time_each({name: p.step for name, p in prepared.items()}, budgets, device, seed, failed)
    for name, timing in timings.items():
        records[name].update(timing.as_record())
        try:
            records[name]["peak_extra_bytes"] = peak_extra_memory(prepared[name].step, device)
        except Exception as exc:
            records[name]["peak_extra_bytes"] = None
            records[name]["notes"] += f" (memory probe failed: {error_text(exc)})"


def measure_case(case: Case, implementations: List[Implementation], rotation: Rotation, labels: torch.Tensor,
                 budget: Budget, slow_budget: Budget, progress: Progress, seed: int) -> List[Record]:
    """One record per implementation on ``case``: timings and peak extra memory, or why it did not run.

    Every implementation is set up first (torch.compile compiles there, outside the timing), then
    all are timed together, then each one's memory is probed.
    """
    shape = f"{str(case.dtype).replace('torch.', '')} B={case.batch} C={case.classes}"
    records: Dict[str, Record] = {}
    prepared: Dict[str, Prepared] = {}
    for impl in implementations:
        progress.describe(f"{shape} setting up {impl.name}")
        record: Record = {"implementation": impl.name, "label": impl.label, "family": impl.family,
                          "makes_gradient": impl.makes_gradient}
        reason = impl.skip_reason(case)
        if reason is not None:
            record.update(status="skipped", reason=reason)
        else:
            try:
                prepared[impl.name] = impl.setup(case, rotation, labels)
                record.update(status="ok", setup_seconds=prepared[impl.name].setup_seconds,
                              notes=prepared[impl.name].notes)
            except Exception as exc:  # one implementation failing on a shape must not end the sweep
                record.update(status="failed", reason=error_text(exc))
        records[impl.name] = record
        progress.step()

    progress.describe(f"{shape} timing {len(prepared)} implementations")
    budgets = {i.name: slow_budget if i.slow else budget for i in implementations if i.name in prepared}
    time_and_probe(prepared, budgets, case.device, records, seed)
    progress.step()
    return [records[impl.name] for impl in implementations]


def traffic_model(case: Case, progress: Progress) -> Record:
    """The 'model' columns of the Triton rows (gala_kernels/benchmark/traffic.py), or why not."""
    dtype = str(case.dtype).replace("torch.", "")
    progress.describe(f"{dtype} B={case.batch} C={case.classes} modelling the Triton kernels' traffic")
    try:
        figures = traffic.model_case(case.batch, case.classes, dtype)
    except Exception as exc:  # Triton missing, or the model failed: the timings still stand
        return {"model_note": f"traffic model unavailable: {error_text(exc)}"}
    if figures["model_batch"] != case.batch:
        figures["model_note"] = f"traffic modelled at B={figures['model_batch']}"
    return figures


def run_meta(args: argparse.Namespace, device: torch.device) -> Record:
    meta = machine_info(device)
    meta.update({
        "benchmark": "step",
        "labels": f"drawn from {args.class_freq}" if args.class_freq else "uniform",
        "timing": ("triton.testing.do_bench (CUDA events), median and 20/80 quantiles, one implementation "
                   "after the other" if device.type == "cuda" else
                   "time.perf_counter per call after warm-up, implementations interleaved in a random "
                   "order every round; median and 20/80 percentiles"),
        "memory": memory_method(device),
        "step": "forward + loss.backward() + statistics update (GALA); logits rotated beyond the cache",
        "bytes": "2 * B * C * itemsize (read logits + write gradient)",
        "traffic_model": ("off" if args.no_traffic_model else
                          "Triton rows: one training step's loads, stores and atomics counted under "
                          "TRITON_INTERPRET=1, no cache; the fold of the statistics (O(C)) apart"),
        "quick": bool(args.quick),
        "dry_run": bool(args.dry_run),
    })
    return meta


def run(args: argparse.Namespace) -> Dict:
    """Run the sweep described by ``args``; returns ``{"meta", "headline", "results", "files"}``."""
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "bench step")
    profile = load_class_profile(args.class_freq) if args.class_freq else None
    shapes = select_shapes(args, device, profile)
    implementations = select_implementations(args)
    budget, slow_budget = BUDGETS[(device.type, mode_of(args))]
    meta = run_meta(args, device)

    cases = [Case(device, DTYPES[d], b, c, dry_run=args.dry_run) for b, c, d in shapes]
    progress = Progress(len(cases) * (len(implementations) + 1), enabled=not args.no_progress)
    records: List[Record] = []
    for case in cases:
        rotation = logits_rotation(case.batch, case.classes, case.dtype, device, seed=args.seed,
                                   count=1 if args.dry_run else 0)
        labels = make_labels(case, profile, args.seed)
        dtype_name = str(case.dtype).replace("torch.", "")
        auto = backends.resolve("auto", rotation.buffers[0], shape=(case.batch, case.classes))
        model = {} if args.no_traffic_model else traffic_model(case, progress)
        for record in measure_case(case, implementations, rotation, labels, budget, slow_budget, progress,
                                   args.seed):
            if record["implementation"] == "fused_triton" and model:  # the plain step's kernels
                note = model.get("model_note")
                record = {**record, **model}
                if note:  # a skipped row shows its reason where a row that ran shows its notes
                    key = "notes" if record.get("status") == "ok" else "reason"
                    record[key] = "; ".join(filter(None, [record.get(key), note]))
            records.append({"device": device.type, "dtype": dtype_name, "batch": case.batch,
                            "classes": case.classes, "bytes": case.step_bytes, "grad_bytes": case.grad_bytes,
                            "buffers_rotated": len(rotation.buffers), "auto_backend": auto, **record})
        del rotation
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out and case is not cases[-1]:  # a run cut short still leaves what it measured
            step_report.derive(records)
            partial_meta = {**meta, "incomplete": True}
            write_files(args.out, device, partial_meta, records, step_report.headline(records))
    progress.close()

    step_report.derive(records)
    head = step_report.headline(records)
    meta["load_average_end"] = load_average()
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    print(step_report.screen_text(records, head))
    files = write_files(args.out, device, meta, records, head) if args.out else {}
    for path in files.values():
        print(f"wrote {path}")
    return {"meta": meta, "headline": head, "results": records, "files": files}


def write_files(out_dir: str, device: torch.device, meta: Record, records: List[Record],
                head: Optional[Record]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, result_stem("step", device) + ".png")
    plot_problem = step_report.plot(records, png)
    if plot_problem is not None:
        meta["plot"] = f"not written: {plot_problem}"
    markdown = step_report.markdown(meta, records, head, None if plot_problem else os.path.basename(png))
    payload = {"meta": meta, "headline": head, "results": records}
    files = write_result(out_dir, "step", device, markdown, payload)
    if plot_problem is None:
        files["png"] = png
    return files
