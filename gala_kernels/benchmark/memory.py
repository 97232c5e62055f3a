"""Peak memory of one call, and the memory a benchmark may use.

- CUDA: ``torch.cuda.max_memory_allocated`` during the call minus ``memory_allocated`` before it.
- CPU: torch keeps no allocator statistics (and ``tracemalloc`` does not see its allocations), so
  the probe is the process's peak resident set (``VmHWM`` of ``/proc/self/status``, reset by
  writing ``5`` to ``/proc/self/clear_refs``) minus the resident set before the call, after
  ``gala_kernels.release_cpu_buffers()`` (the fused CPU op's cached gradient blocks) and glibc's
  ``malloc_trim(0)`` have returned freed memory to the system. It has page resolution and counts
  every allocation of the call, torch's or not. Linux only; elsewhere the probe returns None.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Callable, Optional

import torch


def proc_status_kib(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_freed_heap() -> None:
    """Hand freed memory back to the system, so that what a call needs shows up as new resident
    pages: gc, the fused CPU op's cached gradient blocks, and glibc's free heap."""
    gc.collect()
    from .._extension import release_cpu_buffers

    release_cpu_buffers()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """``VmHWM := VmRSS`` (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one call minus memory_allocated before it"
    return ("peak resident set during one call (VmHWM after writing 5 to /proc/self/clear_refs) minus the "
            "resident set before it, after gc, gala_kernels.release_cpu_buffers() and malloc_trim(0); counts "
            "torch's and every other allocation")


def peak_extra_memory(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes one call of ``step`` needs beyond what was allocated before it (None: cannot measure)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    release_freed_heap()
    if not reset_peak_rss():
        return None
    before = proc_status_kib("VmRSS")
    step()
    peak = proc_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free GPU memory, or the system's ``MemAvailable`` for CPU (None: unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
