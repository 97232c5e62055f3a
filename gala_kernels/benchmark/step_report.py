"""Derived columns, tables, headline and plot of the ``step`` benchmark.

A run is a list of records, one per (case, implementation). Derived per case, from the records of
that case (:data:`DERIVED`):

    GB/s                  = 2 * B * C * itemsize / median time    (read logits + write gradient)
    x copy                = median time / copy-floor median time  (1.0 = as fast as a plain copy)
    vs eager              = eager median / this median            (> 1: faster than the reference)
    vs authors            = authors' median / this median
    vs F.ce               = F.cross_entropy median / this median
    x plain               = this median / the median of the same backend's plain step
                            (rows with a loss option, and CUDA-graph replays)
    peak beyond gradient  = peak extra memory - B * C * itemsize   (for calls that allocate a gradient)

and, for the Triton rows, the traffic of the Triton kernels modelled under the interpreter
(gala_kernels/benchmark/traffic.py; no cache, so a value read twice counts twice):

    model reads           = bytes loaded from the logits / their size
    model bytes/floor     = bytes moved by the loss kernels / (2 * B * C * itemsize)
    model atomics         = elements updated atomically

A new column is a function in :data:`DERIVED` that sets a key of the record (or a key the
implementation's setup measured) and a :class:`~gala_kernels.benchmark.report.Column` in
:data:`COLUMNS`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

from . import report
from .report import Column, Record, ratio

# The shape of the README's headline: fp32, B = 512, C = 8,142 (iNaturalist 2018).
HEADLINE_SHAPE = {"dtype": "float32", "batch": 512, "classes": 8142}

CaseKey = Tuple[str, str, int, int]


def case_key(record: Record) -> CaseKey:
    return (record["device"], record["dtype"], record["batch"], record["classes"])


def group_by_case(records: List[Record]) -> OrderedDict[CaseKey, List[Record]]:
    groups: OrderedDict[CaseKey, List[Record]] = OrderedDict()
    for record in records:
        groups.setdefault(case_key(record), []).append(record)
    return groups


# ---------------------------------------------------------------- derived columns

Medians = Dict[str, Optional[float]]


def _bandwidth(r: Record, medians: Medians) -> None:
    ms = r.get("median_ms")
    r["gbps"] = ratio(r["bytes"] / 1e9, None if ms is None else ms / 1e3)


def _ratios(r: Record, medians: Medians) -> None:
    ms = r.get("median_ms")
    r["ratio_to_copy"] = ratio(ms, medians.get("copy_floor"))
    r["speedup_vs_eager"] = ratio(medians.get("eager"), ms)
    r["speedup_vs_authors"] = ratio(medians.get("authors"), ms)
    r["speedup_vs_cross_entropy"] = ratio(medians.get("cross_entropy"), ms)


def _peak_beyond_gradient(r: Record, medians: Medians) -> None:
    peak = r.get("peak_extra_bytes")
    r["peak_beyond_gradient_bytes"] = (
        None if peak is None else max(0, peak - (r["grad_bytes"] if r.get("makes_gradient") else 0)))


def plain_step_of(name: str) -> Optional[str]:
    """The plain step a row is compared with: ``fused_cpu`` for ``fused_cpu[weight=random]`` and
    for ``fused_cpu_graph``; None for the plain rows themselves."""
    if "[" in name:
        return name.split("[", 1)[0]
    if name.endswith("_graph"):
        return name[: -len("_graph")]
    return None


def _relative_to_plain(r: Record, medians: Medians) -> None:
    plain = plain_step_of(r["implementation"])
    r["ratio_to_plain"] = ratio(r.get("median_ms"), medians.get(plain)) if plain else None


DERIVED: List[Callable[[Record, Medians], None]] = [_bandwidth, _ratios, _relative_to_plain,
                                                    _peak_beyond_gradient]


def derive(records: List[Record]) -> None:
    """Fill the derived columns in place (a record that did not run gets none)."""
    for rows in group_by_case(records).values():
        medians = {r["implementation"]: r.get("median_ms") for r in rows if r["status"] == "ok"}
        for r in rows:
            if r["status"] == "ok":
                for fill in DERIVED:
                    fill(r, medians)


COLUMNS: List[Column] = [
    report.text("implementation", "label"),
    report.number("median ms", "median_ms", 3),
    report.span("p20-p80 ms", "p20_ms", "p80_ms", 3),
    report.number("GB/s", "gbps", 1),
    report.number("x copy", "ratio_to_copy", 2),
    report.number("vs eager", "speedup_vs_eager", 2, "x"),
    report.number("vs authors", "speedup_vs_authors", 1, "x"),
    report.number("vs F.ce", "speedup_vs_cross_entropy", 2, "x"),
    report.number("x plain", "ratio_to_plain", 2),
    report.mebibytes("peak extra MiB", "peak_extra_bytes"),
    report.mebibytes("beyond gradient MiB", "peak_beyond_gradient_bytes"),
    report.number("model reads", "model_logit_reads", 2, "x", without_run=True),
    report.number("model bytes/floor", "model_bytes_over_floor", 2, without_run=True),
    report.number("model atomics", "model_atomics", 0, without_run=True),
    report.text("notes", "notes"),
]


def case_table(rows: List[Record]) -> str:
    return report.markdown_table(rows, COLUMNS)


# ---------------------------------------------------------------- headline

def _distance_to_headline(key: CaseKey) -> Tuple[bool, float, float]:
    """Sort key: same dtype first, then the closest C, then the closest B (on a log scale)."""
    _device, dtype, batch, classes = key
    return (dtype != HEADLINE_SHAPE["dtype"], abs(math.log(classes / HEADLINE_SHAPE["classes"])),
            abs(math.log(batch / HEADLINE_SHAPE["batch"])))


def headline(records: List[Record]) -> Optional[Record]:
    """The fused training steps on the headline shape, or on the measured shape closest to it."""
    groups = group_by_case(records)
    candidates = [key for key, rows in groups.items()
                  if any(r["family"] == "fused" and r["status"] == "ok" for r in rows)]
    if not candidates:
        return None
    chosen = min(candidates, key=_distance_to_headline)
    rows = groups[chosen]
    ran = {r["implementation"]: r for r in rows if r["status"] == "ok"}
    copy, alloc_copy = ran.get("copy_floor"), ran.get("copy_alloc_floor")
    device, dtype, batch, classes = chosen
    entries = []
    for r in rows:
        if r["family"] != "fused" or r["status"] != "ok":
            continue
        entries.append({
            "implementation": r["implementation"],
            "median_ms": r["median_ms"],
            "gbps": r["gbps"],
            "copy_gbps": copy["gbps"] if copy else None,
            "alloc_copy_gbps": alloc_copy["gbps"] if alloc_copy else None,
            "fraction_of_copy_bandwidth": ratio(r["gbps"], copy["gbps"] if copy else None),
            "speedup_vs_eager": r["speedup_vs_eager"],
            "speedup_vs_cross_entropy": r["speedup_vs_cross_entropy"],
            "speedup_vs_authors": r["speedup_vs_authors"],
        })
    return {"device": device, "dtype": dtype, "batch": batch, "classes": classes, "fused": entries}


HEADLINE_COLUMNS: List[Column] = [
    report.text("fused backend", "implementation"),
    report.number("median ms", "median_ms", 3),
    report.number("GB/s", "gbps", 1),
    report.number("copy GB/s", "copy_gbps", 1),
    report.number("alloc + copy GB/s", "alloc_copy_gbps", 1),
    report.number("vs eager", "speedup_vs_eager", 2, "x"),
    report.number("vs F.cross_entropy", "speedup_vs_cross_entropy", 2, "x"),
    report.number("vs authors", "speedup_vs_authors", 0, "x"),
]


def headline_text(head: Optional[Record]) -> str:
    if head is None:
        return "No fused backend ran, so there is no headline."
    return (f"{head['dtype']}, B = {head['batch']}, C = {head['classes']:,} on {head['device']}, "
            "forward + backward + statistics.\n\n" + report.markdown_table(head["fused"], HEADLINE_COLUMNS))


# ---------------------------------------------------------------- text and files

SUMMARY = (
    "One GALA training step on `(B, C)` logits: forward, `loss.backward()` down to the logits and, for "
    "GALA, the statistics update into a persistent `GALAState` (the `* op alone` rows: the backend's "
    "forward op only). GB/s counts `2 * B * C * itemsize` (read the logits, write the gradient); "
    "`x copy` is the time over the copy floor's; `vs ...` are speed-ups (the other's median over this "
    "one); peak extra memory is what one call adds, `beyond gradient` without the `B x C` gradient it "
    "returns. Columns are explained in docs/performance.md."
)


def markdown(meta: Record, records: List[Record], head: Optional[Record], plot_name: Optional[str]) -> str:
    sections = [("Headline", headline_text(head))]
    if plot_name:
        sections.append(("", f"![median time per step against C, copy floors dashed/dotted]({plot_name})"))
    for (device, dtype, batch, classes), rows in group_by_case(records).items():
        picks = f"; backend='auto' picks {rows[0]['auto_backend']!r}" if device == "cuda" else ""
        sections.append((f"{dtype}, B = {batch}, C = {classes:,} ({device}{picks})", case_table(rows)))
    notes = [f"timing: {meta['timing']}", f"memory: {meta['memory']}", f"labels: {meta['labels']}"]
    if meta.get("dry_run"):
        notes.insert(0, "**dry run**: tiny shapes, the Triton interpreter on CPU; these times mean nothing.")
    return report.document("GALA training step: fused backends against the baselines", SUMMARY, meta,
                           sections, notes)


def screen_text(records: List[Record], head: Optional[Record]) -> str:
    parts = []
    for (device, dtype, batch, classes), rows in group_by_case(records).items():
        parts += [f"\n{dtype}, B = {batch}, C = {classes:,} ({device})", case_table(rows)]
    parts += ["", "Headline: " + headline_text(head)]
    return "\n".join(parts)


def plot(records: List[Record], path: str) -> Optional[str]:
    """Median time against C, one line per implementation, one panel per (dtype, B); None when
    written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    panels: OrderedDict[Tuple[str, int], List[Record]] = OrderedDict()
    for r in records:
        if r["status"] == "ok":
            panels.setdefault((r["dtype"], r["batch"]), []).append(r)
    if not panels:
        return "nothing ran"
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.6 * len(panels)), squeeze=False)
    for ax, ((dtype, batch), rows) in zip(axes[:, 0], panels.items()):
        lines: OrderedDict[str, List[Record]] = OrderedDict()
        for r in rows:
            lines.setdefault(r["implementation"], []).append(r)
        for name, points in lines.items():
            points.sort(key=lambda r: r["classes"])
            xs = [p["classes"] for p in points]
            ys = [p["median_ms"] for p in points]
            low = [p["median_ms"] - p["p20_ms"] for p in points]
            high = [p["p80_ms"] - p["median_ms"] for p in points]
            floor = points[0]["family"] == "floor"
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=points[0]["label"],
                        color=("black" if name == "copy_floor" else "dimgray") if floor else None,
                        linestyle=("--" if name == "copy_floor" else ":") if floor else "-",
                        linewidth=2.5 if floor else 1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel("median ms per call")
        ax.set_title(f"{rows[0]['device']}, {dtype}, B = {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None

