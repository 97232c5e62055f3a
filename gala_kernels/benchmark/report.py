"""Derived columns, tables (screen and Markdown), JSON and the time-vs-C plot of a benchmark run.

A run is a list of records, one per (case, implementation), each a flat dict (the JSON rows).
Derived per case, from the records of that case:

    GB/s             = 2 * B * C * itemsize / median time    (read logits + write gradient)
    x copy           = median time / copy-floor median time  (1.0 = as fast as a plain copy)
    vs eager         = eager median / this median            (> 1: faster than the reference)
    vs authors       = authors' median / this median
    vs cross_entropy = F.cross_entropy median / this median
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

# Issue 2 ("Performance"): fp32, B = 512, C = 8,142, forward + backward + statistics, on the CPU.
HEADLINE_SHAPE = {"dtype": "float32", "batch": 512, "classes": 8142}
CPU_TARGETS = {"eager": 5.0, "cross_entropy": 3.0, "authors": 200.0}

CaseKey = Tuple[str, str, int, int]


def case_key(record: Dict) -> CaseKey:
    return (record["device"], record["dtype"], record["batch"], record["classes"])


def group_by_case(records: List[Dict]) -> OrderedDict[CaseKey, List[Dict]]:
    groups: OrderedDict[CaseKey, List[Dict]] = OrderedDict()
    for record in records:
        groups.setdefault(case_key(record), []).append(record)
    return groups


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def derive(records: List[Dict]) -> None:
    """Fill the derived columns in place."""
    for rows in group_by_case(records).values():
        median = {r["implementation"]: r.get("median_ms") for r in rows if r["status"] == "ok"}
        for r in rows:
            ms = r.get("median_ms") if r["status"] == "ok" else None
            r["gbps"] = _ratio(r["bytes"] / 1e9, None if ms is None else ms / 1e3)
            r["ratio_to_copy"] = _ratio(ms, median.get("copy_floor"))
            r["speedup_vs_eager"] = _ratio(median.get("eager"), ms)
            r["speedup_vs_authors"] = _ratio(median.get("authors"), ms)
            r["speedup_vs_cross_entropy"] = _ratio(median.get("cross_entropy"), ms)


def _distance_to_headline(key: CaseKey) -> Tuple[int, float, float]:
    """Sort key: same dtype first, then the closest C, then the closest B (on a log scale)."""
    _device, dtype, batch, classes = key
    return (dtype != HEADLINE_SHAPE["dtype"], abs(math.log(classes / HEADLINE_SHAPE["classes"])),
            abs(math.log(batch / HEADLINE_SHAPE["batch"])))


def headline(records: List[Dict]) -> Optional[Dict]:
    """The fused backends on the headline shape, or on the measured shape closest to it."""
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
        entry = {
            "implementation": r["implementation"],
            "median_ms": r["median_ms"],
            "gbps": r["gbps"],
            "copy_gbps": copy["gbps"] if copy else None,
            "alloc_copy_gbps": alloc_copy["gbps"] if alloc_copy else None,
            "fraction_of_copy_bandwidth": _ratio(r["gbps"], copy["gbps"] if copy else None),
            "speedup_vs_eager": r["speedup_vs_eager"],
            "speedup_vs_cross_entropy": r["speedup_vs_cross_entropy"],
            "speedup_vs_authors": r["speedup_vs_authors"],
        }
        if device == "cpu" and all(rows[0][k] == v for k, v in HEADLINE_SHAPE.items()):
            entry["targets"] = {
                name: {"target": target, "measured": r[f"speedup_vs_{name}"],
                       "met": None if r[f"speedup_vs_{name}"] is None else r[f"speedup_vs_{name}"] >= target}
                for name, target in CPU_TARGETS.items()
            }
        entries.append(entry)
    return {"device": device, "dtype": dtype, "batch": batch, "classes": classes, "fused": entries}


# ---------------------------------------------------------------- text

def _fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


TABLE_HEADER = ("| implementation | median ms | p20-p80 ms | GB/s | x copy | vs eager | vs authors "
                "| vs F.ce | peak extra MiB | notes |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def case_table(rows: List[Dict]) -> str:
    lines = [TABLE_HEADER]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | | | {r.get('reason', '')} |")
            continue
        mib = None if r.get("peak_extra_bytes") is None else r["peak_extra_bytes"] / 2**20
        lines.append(
            f"| {r['label']} | {_fmt(r['median_ms'], 3)} | {_fmt(r['p20_ms'], 3)}-{_fmt(r['p80_ms'], 3)} "
            f"| {_fmt(r['gbps'], 1)} | {_fmt(r['ratio_to_copy'], 2)} | {_fmt(r['speedup_vs_eager'], 2, 'x')} "
            f"| {_fmt(r['speedup_vs_authors'], 1, 'x')} | {_fmt(r['speedup_vs_cross_entropy'], 2, 'x')} "
            f"| {_fmt(mib, 1)} | {r.get('notes', '')} |"
        )
    return "\n".join(lines)


def headline_text(head: Optional[Dict]) -> str:
    if head is None:
        return "No fused backend ran, so there is no headline."
    lines = [
        f"Headline: {head['dtype']}, B = {head['batch']}, C = {head['classes']:,} on {head['device']}, "
        "forward + backward + statistics.",
        "",
        "| fused backend | median ms | GB/s | copy GB/s | alloc + copy GB/s | vs eager | vs F.cross_entropy "
        "| vs authors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(entry: Dict, name: str, digits: int) -> str:
        text = _fmt(entry[f"speedup_vs_{name}"], digits, "x")
        target = entry.get("targets", {}).get(name)
        if target is not None and target["met"] is not None:
            text += f" ({'meets' if target['met'] else 'misses'} >= {target['target']:g}x)"
        return text

    for e in head["fused"]:
        lines.append(
            f"| {e['implementation']} | {_fmt(e['median_ms'], 3)} | {_fmt(e['gbps'], 1)} "
            f"| {_fmt(e['copy_gbps'], 1)} | {_fmt(e['alloc_copy_gbps'], 1)} | {cell(e, 'eager', 2)} "
            f"| {cell(e, 'cross_entropy', 2)} "
            f"| {cell(e, 'authors', 0)} |"
        )
    return "\n".join(lines)


def meta_text(meta: Dict) -> str:
    keys = ("date_utc", "device", "cpu_model", "cpu_cores", "torch_threads", "gpu", "python", "torch",
            "torch_cuda", "triton", "liger_kernel", "git_commit", "labels", "timing", "memory",
            "load_average_start", "load_average_end", "total_seconds")
    return "\n".join(f"- {k}: {meta[k]}" for k in keys if k in meta and meta[k] is not None)


def markdown(meta: Dict, records: List[Dict], head: Optional[Dict], plot_name: Optional[str]) -> str:
    parts = ["# gala_kernels benchmark", "", meta_text(meta), "", "## Headline", "", headline_text(head), ""]
    if plot_name:
        parts += [f"![time vs C]({plot_name})", ""]
    parts += ["## All results", ""]
    for (device, dtype, batch, classes), rows in group_by_case(records).items():
        parts += [f"### {dtype}, B = {batch}, C = {classes:,} ({device})", "", case_table(rows), ""]
    return "\n".join(parts)


def screen_text(records: List[Dict], head: Optional[Dict]) -> str:
    parts = []
    for (device, dtype, batch, classes), rows in group_by_case(records).items():
        parts += [f"\n{dtype}, B = {batch}, C = {classes:,} ({device})", case_table(rows)]
    parts += ["", headline_text(head)]
    return "\n".join(parts)


# ---------------------------------------------------------------- files

def plot(records: List[Dict], path: str) -> Optional[str]:
    """Median time against C, one line per implementation, one panel per (dtype, B); None if no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    panels: OrderedDict[Tuple[str, int], List[Dict]] = OrderedDict()
    for r in records:
        if r["status"] == "ok":
            panels.setdefault((r["dtype"], r["batch"]), []).append(r)
    if not panels:
        return "nothing ran"
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.6 * len(panels)), squeeze=False)
    for ax, ((dtype, batch), rows) in zip(axes[:, 0], panels.items()):
        lines: OrderedDict[str, List[Dict]] = OrderedDict()
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
        ax.set_ylabel("median ms per step (fwd + bwd + stats)")
        ax.set_title(f"{rows[0]['device']}, {dtype}, B = {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(out_dir: str, meta: Dict, records: List[Dict], head: Optional[Dict]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    device = meta["device"].split(":")[0]
    paths = {k: os.path.join(out_dir, f"bench_{device}.{k}") for k in ("json", "md", "png")}
    plot_problem = plot(records, paths["png"])
    if plot_problem is not None:
        meta["plot"] = f"not written: {plot_problem}"
        del paths["png"]
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "headline": head, "results": records}, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown(meta, records, head, os.path.basename(paths["png"]) if "png" in paths else None))
    return paths
