"""Result records, tables and result files shared by every benchmark.

A benchmark produces *records*: flat dicts, one per (case, implementation), that go to the JSON
file as they are. A table is a list of :class:`Column` s; each column renders one cell from a
record, so adding a measured or derived quantity is a key in the records and one ``Column`` in
the list. A record whose ``status`` is not ``"ok"`` is shown as ``| label | status | ... | reason |``,
its middle cells blank except the columns that do not come from running it (``without_run``, such
as a kernel's modelled traffic, known without a GPU).

Every benchmark writes ``<out>/<benchmark>_<device slug>.json`` and ``.md`` (see
:func:`write_result`): one current file per benchmark and machine, with the machine, versions and
date inside, and a visible note for every environment switch that changes behaviour.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .machine import device_slug

Record = Dict[str, object]


# ---------------------------------------------------------------- cells

def fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    """``-`` for a missing value; thousands separators from 1000 up."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Column:
    """One table column: its header and how a record becomes a cell."""

    header: str
    cell: Callable[[Record], str]
    align_right: bool = True
    without_run: bool = False  # also shown for a record that did not run (status not "ok")


def number(header: str, key: str, digits: int = 2, suffix: str = "", without_run: bool = False) -> Column:
    return Column(header, lambda r: fmt(r.get(key), digits, suffix), without_run=without_run)


def text(header: str, key: str) -> Column:
    return Column(header, lambda r: str(r.get(key, "") or ""), align_right=False)


def span(header: str, low_key: str, high_key: str, digits: int = 3) -> Column:
    """``low-high``, e.g. the 20th-80th percentiles."""
    return Column(header, lambda r: f"{fmt(r.get(low_key), digits)}-{fmt(r.get(high_key), digits)}")


def mebibytes(header: str, key: str) -> Column:
    return Column(header, lambda r: fmt(None if r.get(key) is None else r[key] / 2**20, 1))


def markdown_table(records: Iterable[Record], columns: Sequence[Column], label_key: str = "label") -> str:
    """A Markdown table; the first column is the label, the last one takes a failed row's reason."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---:" if c.align_right else "---" for c in columns) + "|"]
    for r in records:
        if r.get("status", "ok") != "ok":
            middle = [c.cell(r) if c.without_run else "" for c in columns[2:-1]]
            cells = [str(r.get(label_key, "")), str(r["status"]), *middle, str(r.get("reason", ""))]
        else:
            cells = [c.cell(r) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- documents

META_KEYS = ("date_utc", "device", "gpu", "gpu_sm_count", "gpu_capability", "cuda_archs_requested",
             "cpu_model", "cpu_cores", "cpu_capability", "memory_gib", "torch_threads", "python", "torch",
             "torch_cuda", "triton",
             "liger_kernel", "git_commit", "command", "environment", "load_average_start", "load_average_end",
             "total_seconds")

ENVIRONMENT_NOTES = {
    "GALA_SYNC_LABEL_CHECK": (None, "CUDA calls checked their labels before running "
                                    "(one host synchronisation per call)"),
    "GALA_CUDA_CHECK_LABELS": ("0", "the CUDA evaluation op's label range check (one host synchronisation "
                               "per call) was OFF for this run: out-of-range labels are not detected"),
    "GALA_CPU_BUFFER_CACHE": ("0", "the CPU op's cache of freed gradient blocks was OFF for this run"),
    "GALA_TRITON_AUTOTUNE": (None, "Triton configs were autotuned per shape on first use"),
    "TRITON_INTERPRET": (None, "Triton kernels ran in the interpreter: their times are not kernel times"),
}


def environment_notes(meta: Record) -> List[str]:
    """One line per behaviour-changing environment switch that was set (docs/environment.md)."""
    notes = []
    for name, value in (meta.get("environment") or {}).items():
        expected, meaning = ENVIRONMENT_NOTES.get(name, (None, "set"))
        active = value == expected if expected is not None else value not in ("", "0")
        if active:
            notes.append(f"**{name}={value}**: {meaning}.")
    return notes


def meta_text(meta: Record) -> str:
    return "\n".join(f"- {k}: {meta[k]}" for k in META_KEYS if meta.get(k) not in (None, {}, ""))


def document(title: str, summary: str, meta: Record, sections: Sequence[tuple],
             notes: Sequence[str] = ()) -> str:
    """The Markdown of a result file: title, what was measured, machine, notes, then the sections
    (``(heading, body)`` pairs; an empty heading adds the body alone)."""
    parts = [f"# {title}", "", summary, "", "## Machine", "", meta_text(meta), ""]
    all_notes = environment_notes(meta) + list(notes)
    if meta.get("incomplete"):
        all_notes.insert(0, "**incomplete**: written while the run went on; it stopped before the end.")
    if all_notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in all_notes] + [""]
    for heading, body in sections:
        if heading:
            parts += [f"## {heading}", ""]
        parts += [body, ""]
    return "\n".join(parts)


def result_stem(benchmark: str, device: torch.device) -> str:
    """``<benchmark>_<device slug>``: the name of a benchmark's result files on this machine."""
    return f"{benchmark}_{device_slug(device)}"


def write_result(out_dir: str, benchmark: str, device: torch.device, markdown: str,
                 payload: Record) -> Dict[str, str]:
    """Write ``<stem>.md`` and ``<stem>.json`` under ``out_dir``; returns their paths by suffix."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, result_stem(benchmark, device))
    paths = {"md": stem + ".md", "json": stem + ".json"}
    with open(paths["json"], "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(markdown)
    return paths


def error_text(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 300 characters (for a record's ``reason``)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


class Progress:
    """tqdm when installed, else one line per item on stderr; silent when disabled."""

    def __init__(self, total: int, enabled: bool, unit: str = "run"):
        self.bar = None
        self.total, self.done, self.enabled = total, 0, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr)
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
