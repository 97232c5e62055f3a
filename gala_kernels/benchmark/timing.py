"""Timers, peak-memory probes and cache-busting logits buffers.

- CPU: ``time.perf_counter`` around each step after warm-up, the implementations interleaved
  (rounds of one step each); median and 20/80 percentiles of the repeats (as many as fit in a
  time budget, between a minimum and a maximum count).
- GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) with quantiles
  (0.5, 0.2, 0.8); CUDA events by hand when Triton is missing.
- Every step reads the next of several logits buffers whose total size is beyond the last-level
  cache (CPU L3 or GPU L2), so no implementation is timed on logits that are still cached.
- Peak extra memory of one step: on CUDA ``max_memory_allocated`` minus the allocated bytes
  before the step. On CPU torch keeps no allocator statistics (and ``tracemalloc`` does not see
  its allocations), so the probe is the process's peak resident set (``VmHWM`` of
  ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``) minus the resident
  set before the step, after ``gala_kernels.release_cpu_buffers()`` (the fused CPU op's cached
  gradient blocks) and ``malloc_trim(0)`` have returned freed memory to the system. It has page
  resolution and counts every allocation of the step, torch's or not.
"""

from __future__ import annotations

import ctypes
import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Budget:
    """How long to time one implementation on one shape."""

    warmup: int
    min_repeats: int
    max_repeats: int
    seconds: float


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list (numpy's default rule)."""
    position = q * (len(sorted_values) - 1)
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarise(samples_ms: List[float]) -> Timing:
    ordered = sorted(samples_ms)
    median, p20, p80 = (quantile(ordered, q) for q in QUANTILES)
    return Timing(median, p20, p80, len(ordered))


def time_cpu_interleaved(steps: Dict[str, Callable[[], None]],
                         budgets: Dict[str, Budget]) -> Dict[str, Timing]:
    """Time several CPU steps side by side: after each one's warm-up, rounds of one step of each.

    On a small shared machine the load drifts; interleaving gives every implementation the same
    conditions, so their ratios hold even when the absolute times move. The rounds go on until
    every step has its ``min_repeats`` and the sum of the budgets' ``seconds`` has passed, or every
    step has its ``max_repeats`` (a slow step drops out of the rounds at its maximum).
    """
    for name, step in steps.items():
        for _ in range(budgets[name].warmup):
            step()
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    seconds = sum(budgets[name].seconds for name in steps)
    started = time.perf_counter()
    while True:
        active = [name for name in steps if len(samples[name]) < budgets[name].max_repeats]
        short = any(len(samples[name]) < budgets[name].min_repeats for name in steps)
        if not active or (not short and time.perf_counter() - started >= seconds):
            break
        for name in active:
            t0 = time.perf_counter()
            steps[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarise(values) for name, values in samples.items()}


def time_gpu(step: Callable[[], None], budget: Budget) -> Timing:
    """CUDA-event timing; ``budget.seconds`` becomes do_bench's ``rep`` (in ms)."""
    rep_ms = max(1.0, budget.seconds * 1e3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, p20, p80 = do_bench(step, warmup=max(1.0, rep_ms / 4), rep=rep_ms, quantiles=list(QUANTILES))
        repeats = -1  # do_bench picks its own count from rep_ms
        return Timing(float(median), float(p20), float(p80), repeats)
    for _ in range(budget.warmup):
        step()
    torch.cuda.synchronize()
    samples: List[float] = []
    started = time.perf_counter()
    while len(samples) < budget.max_repeats and (
        len(samples) < budget.min_repeats or time.perf_counter() - started < budget.seconds
    ):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return summarise(samples)




# ---------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_heap() -> None:
    """Hand freed memory back to the system, so that what a step needs shows up as new resident
    pages: gc, the fused CPU op's cached gradient blocks, and glibc's free heap."""
    gc.collect()
    from .._extension import release_cpu_buffers

    release_cpu_buffers()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
    return ("peak resident set during one step (VmHWM after writing 5 to /proc/self/clear_refs) minus the "
            "resident set before it, after gc, gala_kernels.release_cpu_buffers() and malloc_trim(0); counts "
            "torch's and every other allocation")


def peak_extra_memory(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Bytes one call of ``step`` needs beyond what was allocated before it (None: cannot measure)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_freed_heap()
    if not _reset_peak_rss():
        return None
    before = _proc_status_kib("VmRSS")
    step()
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def available_memory_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    kib = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    kib = int(line.split()[1])
    except OSError:
        return None
    return None if kib is None else kib * 1024


# ---------------------------------------------------------------- cache busting

def last_level_cache_bytes(device: torch.device) -> int:
    """GPU L2 or CPU L3 size; 64 MiB when it cannot be read."""
    fallback = 64 << 20
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or fallback
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as size_file:
                text = size_file.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or fallback


def rotation_count(buffer_bytes: int, cache_bytes: int, max_buffers: int = 64) -> int:
    """How many logits buffers to cycle so that, together, they are at least twice the cache."""
    return max(2, min(max_buffers, math.ceil(2 * cache_bytes / max(1, buffer_bytes))))


class Rotation:
    """Hands out the next of several same-shape tensors on each call."""

    def __init__(self, buffers: List[torch.Tensor]):
        self.buffers = buffers
        self.position = 0

    def next(self) -> torch.Tensor:
        tensor = self.buffers[self.position]
        self.position = (self.position + 1) % len(self.buffers)
        return tensor
