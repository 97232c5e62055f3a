"""Summing the per-step GALA statistics over data-parallel ranks (docs/contract.md, "With distributed data
parallel ...").

Each rank computes the RAW statistics of its own rows (``raw`` (3, C), ``raw_pairwise`` (C, C),
``counts`` = [N, non-finite rows]). Before the fold, they are all-reduced (SUM) over the process
group, so the fold's scale is ``s = 1/N_global`` and every rank folds the same increments:

    raw_global = sum_ranks raw_rank          counts_global = sum_ranks counts_rank
    d          = raw_global / N_global       (then "cumulative", "sum" or "ema", as usual)

Every rank then holds the state one process would hold after the concatenated global batch
(up to the floating-point order of the sums). The reduction moves ``3*C`` floats and 2 int64 per
step (``C*C`` more with pairwise tracking): with a ``(C, D)`` classifier whose gradient DDP already
all-reduces, that is ``D/3`` times less traffic than DDP's own.

Ordering, honestly: :func:`sync_step_statistics` is synchronous: the fold right after it sees
the global sums, so the state is complete when the loss call returns (callers may read it at
once). With NCCL, ``work.wait()`` does not block the host: it makes the compute stream wait for
the all-reduce, so the backward's kernels queue behind a 3*C-float all-reduce (microseconds);
with gloo (CPU) the host waits. The reduction is needed only by the next step's forward, so it
CAN overlap the backward: :func:`begin_sync` starts it (``async_op=True``) and returns a
:class:`PendingStatistics` whose ``wait()`` must be called, and the result folded, before the next
forward reads the state. That deferred fold is not wired into the loss functions (it would
change when the state is visible to the caller); it pays off only for large pairwise (C*C)
tracking.

The settings live on the state: ``state.sync`` (``"auto"``: sync whenever ``torch.distributed``
is initialised with more than one rank in the group; ``None``: never) and
``state.process_group`` (``None``: the default group). :func:`configure_sync` sets them; a state
without them behaves as ``sync="auto"``.

On the first synced step, the ranks compare their state settings (``num_classes``,
``accumulation``, ``ema_beta``, ``track_pairwise``) with one small all-gather; a mismatch raises
a ``ValueError`` naming both values on EVERY rank (no rank goes on to an all-reduce of a different
size, which would hang or corrupt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .reference import StepStatistics
from .state import ACCUMULATIONS, SYNC_MODES, GALAState

__all__ = ["SYNC_MODES", "configure_sync", "sync_group", "check_consistency", "begin_sync",
           "sync_step_statistics", "sync_step_scratch", "PendingStatistics"]
_CHECKED_ATTR = "_gala_sync_checked_groups"


def configure_sync(state: GALAState, sync: Optional[str] = "auto", process_group=None) -> GALAState:
    """Set how ``state`` syncs its per-step statistics; returns ``state``.

    ``sync="auto"`` sums them over ``process_group`` (default: the world) whenever
    ``torch.distributed`` is initialised and the group has more than one rank; ``sync=None``
    keeps them local (e.g. a class-parallel slice of the state, or per-rank statistics on purpose).
    """
    return state.set_sync(sync, process_group)


def sync_group(state: GALAState):
    """The process group ``state`` syncs over now, or ``None`` when it stays local."""
    if getattr(state, "sync", "auto") is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(state, "process_group", None)
    if group is None:
        group = dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def _settings_tensor(state: GALAState) -> torch.Tensor:
    """``[num_classes, accumulation index, ema_beta, track_pairwise]`` as float64 (all exact)."""
    return torch.tensor(
        [state.num_classes, ACCUMULATIONS.index(state.accumulation), state.ema_beta,
         float(state.track_pairwise)],
        dtype=torch.float64, device=state.pos_grad.device,
    )


def _describe(name: str, value: float) -> str:
    if name == "num_classes":
        return str(int(value))
    if name == "accumulation":
        return repr(ACCUMULATIONS[int(value)])
    if name == "track_pairwise":
        return str(bool(value))
    return repr(float(value))


def check_consistency(state: GALAState, group=None) -> None:
    """All ranks of ``group`` compare their state settings; ``ValueError`` on every rank if not equal.

    One all-gather of 4 float64 per rank. The message names the setting, both values and both
    ranks (group ranks), e.g. ``num_classes is 10 on rank 0 but 12 on rank 1``.
    """
    mine = _settings_tensor(state)
    gathered: List[torch.Tensor] = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    names = ("num_classes", "accumulation", "ema_beta", "track_pairwise")
    reference_values = gathered[0].tolist()
    for rank, values in enumerate(gathered[1:], start=1):
        for name, first, other in zip(names, reference_values, values.tolist()):
            if name == "ema_beta" and ACCUMULATIONS[int(reference_values[1])] != "ema":
                continue  # ema_beta only matters for accumulation="ema" (equal there, checked above)
            if first != other:
                raise ValueError(
                    f"GALAState settings differ across ranks: {name} is {_describe(name, first)} on rank 0 "
                    f"but {_describe(name, other)} on rank {rank}. Every rank must build its GALAState / "
                    "GALALoss with the same num_classes, accumulation, ema_beta and track_pairwise."
                )


@dataclass
class PendingStatistics:
    """Statistics whose all-reduce is in flight; :meth:`wait` returns the global ones."""

    stats: StepStatistics
    works: list

    def wait(self) -> StepStatistics:
        for work in self.works:
            work.wait()
        self.works = []
        return self.stats


def begin_sync(stats: StepStatistics, group=None) -> PendingStatistics:
    """Start the SUM all-reduce of ``stats`` (in place) over ``group``; returns the pending result.

    ``raw`` (3, C), ``counts`` (2,) int64 and, when present, ``raw_pairwise`` (C, C). The tensors
    are reduced in place, so they must not be read before :meth:`PendingStatistics.wait`.
    """
    tensors = [stats.raw, stats.counts]
    if stats.raw_pairwise is not None:
        tensors.append(stats.raw_pairwise)
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in tensors]
    return PendingStatistics(stats, works)


def sync_step_statistics(state: GALAState, stats: StepStatistics) -> StepStatistics:
    """The statistics to fold into ``state``: summed over ranks when ``state`` syncs, else ``stats``.

    Called by :func:`gala_kernels.folding.fold_step` before every fold of a host-side step. The
    first synced call per state and group also runs :func:`check_consistency`. Synchronous: the
    result is complete when this returns.
    """
    group = sync_group(state)
    if group is None:
        return stats
    _check_once(state, group)
    return begin_sync(stats, group).wait()


def sync_step_scratch(state: GALAState) -> None:
    """Sum a device step's sums in ``state.step_scratch`` (and ``raw_pairwise_scratch``) over the
    ranks, in place, when ``state`` syncs: the raw sums and the step's three counts
    (gala_kernels/state.py), ``3C + 3`` floats. No host synchronisation (after the first call's
    :func:`check_consistency`)."""
    group = sync_group(state)
    if group is None:
        return
    _check_once(state, group)
    dist.all_reduce(state.step_scratch[: 3 * state.num_classes + 3], op=dist.ReduceOp.SUM, group=group)
    if state.raw_pairwise_scratch is not None:
        dist.all_reduce(state.raw_pairwise_scratch, op=dist.ReduceOp.SUM, group=group)


def _check_once(state: GALAState, group) -> None:
    """:func:`check_consistency` on the first synced call per state and group."""
    checked = state.__dict__.setdefault(_CHECKED_ATTR, set())
    if id(group) not in checked:
        check_consistency(state, group)
        checked.add(id(group))
