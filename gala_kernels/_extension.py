"""Loads the compiled extension ``gala_kernels._C`` once; records why when it cannot.

``import gala_kernels`` must work without it (the ``"torch"`` backend serves), so a missing or
broken extension only warns, once, with the reason.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

_loaded: Optional[bool] = None
_reason: str = ""


def load() -> bool:
    """Import ``gala_kernels._C`` (which registers the ``torch.ops.gala`` ops); True on success."""
    global _loaded, _reason
    if _loaded is None:
        try:
            from . import _C  # noqa: F401

            _loaded = True
        except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
            _loaded = False
            _reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "gala_kernels: the compiled extension gala_kernels._C could not be loaded "
                f"({_reason}); the 'cpu' and 'cuda' backends are unavailable and the 'torch' "
                "backend serves. Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded


def unavailable_reason() -> str:
    load()
    return _reason


_KNOWN_OPS = ("fused_ce_fwd", "softmax_colsum", "softmax_colsum_add_", "fold_stats_", "fused_ce_step_cpu_",
              "fused_ce_step_", "fold_step_", "scale_grad_")
_DISPATCH_KEYS = ("CPU", "CUDA")
_kernels: dict = {}


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.gala.<op_name>`` has an implementation for ``dispatch_key``.

    Answered from a table filled once when the extension loads, so that torch.compile traces
    through it (dynamo cannot trace the dispatcher query itself).
    """
    if not load():
        return False
    if not _kernels:
        for op in _KNOWN_OPS:
            for key in _DISPATCH_KEYS:
                try:
                    _kernels[(op, key)] = torch._C._dispatch_has_kernel_for_dispatch_key(f"gala::{op}", key)
                except RuntimeError:  # an extension built from older sources lacks this op
                    _kernels[(op, key)] = False
    return _kernels.get((op_name, dispatch_key), False)


def release_cpu_buffers() -> int:
    """Free the CPU blocks that the fused op keeps for reuse; returns how many bytes they held.

    The C++ CPU op takes its ``B x C`` gradient from a cache of freed blocks (at most two, each of
    at least 1 MiB, reused for a request of the same size), so that a training loop does not
    fault fresh pages in at every step. Call this to hand that memory back, e.g. after training;
    ``GALA_CPU_BUFFER_CACHE=0`` in the environment turns the cache off. 0 without the extension.
    """
    return int(torch.ops.gala.release_cpu_buffers()) if load() else 0


def cached_cpu_buffer_bytes() -> int:
    """Bytes of freed CPU blocks kept for reuse now (see :func:`release_cpu_buffers`)."""
    return int(torch.ops.gala.cached_cpu_buffer_bytes()) if load() else 0
