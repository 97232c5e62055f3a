"""Folding a step's raw statistics into a :class:`GALAState`, on the fast path.

The fold itself is :func:`gala_kernels.reference.fold_increments` (``d = raw / N``, then
"cumulative", "sum" or "ema"). :func:`fold_step` adds what a training call needs around it:

1. under ``torch.distributed``, the raw sums and counts are summed over the state's process group
   first (:func:`gala_kernels.distributed.sync_step_statistics`), so ``N`` is the global batch;
2. for an eager CPU step of a cumulative or sum state without pairwise tracking, the same float32
   operations run in one C++ pass (``gala::fold_stats_``, the same bits), which costs a fraction
   of the ten-odd small torch ops.

GPU training steps fold on the device, inside their own kernels (gala_kernels.backends.step).
"""

from __future__ import annotations

import torch

from . import _extension, distributed, reference
from .state import GALAState

_CPP_FOLD_MODES = {"cumulative": 0, "sum": 1}


def folds_in_cpp(state: GALAState) -> bool:
    """Whether the C++ CPU fold (``gala::fold_stats_``, also inside ``gala::fused_ce_step_cpu_``)
    covers this state: a cumulative or sum state without pairwise tracking."""
    return state.accumulation in _CPP_FOLD_MODES and state.pairwise is None


def cpp_fold_arguments(state: GALAState):
    """``(targets, running, mode)`` of the C++ fold for a state that :func:`folds_in_cpp`."""
    running = state.running_vectors if state.accumulation == "cumulative" else []
    return state.stat_vectors, running, _CPP_FOLD_MODES[state.accumulation]


def cpp_fold_applies(state: GALAState, stats: reference.StepStatistics) -> bool:
    """Whether the C++ CPU fold can take this step: an eager CPU step with float32 raw statistics
    of a state that :func:`folds_in_cpp`, with the extension built."""
    raw = stats.raw
    return (folds_in_cpp(state) and type(raw) is torch.Tensor and raw.device.type == "cpu"
            and raw.dtype == torch.float32 and raw.dim() == 2 and raw.is_contiguous()
            and not torch.compiler.is_compiling() and _extension.has_kernel("fold_stats_", "CPU"))


def fold_step(state: GALAState, stats: reference.StepStatistics) -> None:
    """Sum ``stats`` over ranks when ``state`` syncs, then fold them into ``state``."""
    stats = distributed.sync_step_statistics(state, stats)
    if cpp_fold_applies(state, stats):
        n_rows, nonfinite = stats.counts.tolist()  # a CPU tensor: no synchronisation
        targets, running, mode = cpp_fold_arguments(state)
        torch.ops.gala.fold_stats_(stats.raw, 1.0 / max(n_rows, 1), targets, running, mode, state.steps,
                                   state.nonfinite_rows, nonfinite)
        return
    reference.fold_increments(state, stats)
