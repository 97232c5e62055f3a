"""``GALAState``: the per-class gradient statistics that GALA accumulates, as module buffers."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from . import label_errors

ACCUMULATIONS = ("cumulative", "sum", "ema")
SYNC_MODES = ("auto", None)

# Slots after the 3 * C raw sums of GALAState.step_scratch (float32; counts exact up to 2^24 rows).
# A GPU training step (gala_kernels/backends/step.py) accumulates into it and leaves it zeroed
# after its fold; the first three slots are summed over ranks with the raw sums.
SCRATCH_ROWS, SCRATCH_NONFINITE, SCRATCH_BAD_LABELS = 0, 1, 2  # of the step (all its calls), for the fold
SCRATCH_LOSS, SCRATCH_TICKET, SCRATCH_CALL_ROWS, SCRATCH_CALL_WEIGHT, SCRATCH_FOLD_TICKET = 3, 4, 5, 6, 7
SCRATCH_SLOTS = 8


class GALAState(nn.Module):
    """Per-class gradient statistics (docs/contract.md, "State"), kept as float32 buffers.

    - ``pos_grad`` (theta): accumulated positive logit-gradient magnitude of each class;
    - ``neg_grad`` (phi): accumulated negative gradient, attributed to the sample's class;
    - ``cls_neg_grad`` (psi): accumulated negative gradient received by each classifier column;
    - ``pairwise`` (Phi, ``(C, C)``, only with ``track_pairwise``): ``Phi[j, k]`` is the gradient
      magnitude column ``j`` received from samples of class ``k``;
    - ``steps`` and ``nonfinite_rows``: int64 counters.

    With ``accumulation="cumulative"`` the raw running sums ``R`` of the authors' scheme are
    buffers too (``running_*``), so a ``state_dict`` round trip resumes exactly. Being an
    ``nn.Module`` of buffers, ``.to()``, ``state_dict()`` and DDP broadcasting just work.

    ``sync="auto"`` (default): under ``torch.distributed``, the raw increments of every step are
    summed over ``process_group`` (default: the world) before the fold, with ``s = 1/N_global``, so
    every rank holds the state one process would after the concatenated global batch.
    ``sync=None`` keeps the statistics per rank.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        accumulation: str = "cumulative",
        ema_beta: float = 0.99,
        track_pairwise: bool = False,
        device=None,
        sync: Optional[str] = "auto",
        process_group=None,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        if not 0.0 <= float(ema_beta) < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta!r}")
        self.num_classes = num_classes
        self.accumulation = accumulation
        self.ema_beta = float(ema_beta)
        self.track_pairwise = bool(track_pairwise)
        # "auto": when torch.distributed is initialised, sum each step's increments over ranks
        # (over process_group, default the world) before the fold; None: never
        self.set_sync(sync, process_group)

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        C = num_classes
        self.register_buffer("pos_grad", zeros(C))
        self.register_buffer("neg_grad", zeros(C))
        self.register_buffer("cls_neg_grad", zeros(C))
        self.register_buffer("pairwise", zeros(C, C) if track_pairwise else None)
        cumulative = accumulation == "cumulative"
        self.register_buffer("running_pos_grad", zeros(C) if cumulative else None)
        self.register_buffer("running_neg_grad", zeros(C) if cumulative else None)
        self.register_buffer("running_cls_neg_grad", zeros(C) if cumulative else None)
        self.register_buffer("running_pairwise", zeros(C, C) if cumulative and track_pairwise else None)
        self.register_buffer("steps", zeros((), dtype=torch.int64))
        self.register_buffer("nonfinite_rows", zeros((), dtype=torch.int64))
        # Working memory of a GPU training step, not part of the state (not saved): the step's raw
        # sums and counts (zero between steps), the raw pairwise sums, and the record of the first
        # out-of-range label a step met (gala_kernels/label_errors.py).
        self.register_buffer("step_scratch", zeros(3 * C + SCRATCH_SLOTS), persistent=False)
        self.register_buffer("raw_pairwise_scratch", zeros(C, C) if track_pairwise else None,
                             persistent=False)
        self.register_buffer("label_error", zeros(label_errors.SLOTS, dtype=torch.int64), persistent=False)

    def set_sync(self, sync: Optional[str] = "auto", process_group=None) -> GALAState:
        """How the per-step statistics are summed over ranks: ``"auto"`` over ``process_group``
        (default: the world) whenever ``torch.distributed`` is initialised with more than one rank,
        ``None`` never. Returns ``self``."""
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if sync is None and process_group is not None:
            raise ValueError("process_group is given but sync=None: the statistics would not be synced")
        self.sync = sync
        self.process_group = process_group
        return self

    def check_errors(self) -> None:
        """Raise the ``ValueError`` of an out-of-range label that a CUDA training step met.

        On CUDA tensors a step does not stop the host to look at its labels: a step that meets a
        label outside ``[0, C)`` (and not ``ignore_index``) returns a NaN loss, gives the bad rows
        zero gradient and leaves the state untouched, and records the first bad row on the device.
        The next call that uses this state raises the error once the record's copy to the host has
        landed; this method waits for the steps queued so far and raises it now. A no-op when no
        error is pending, and on CPU (where a bad label raises at once).
        """
        label_errors.raise_pending(self, wait=True)

    @property
    def stat_vectors(self) -> List[torch.Tensor]:
        """``[pos_grad, neg_grad, cls_neg_grad]``, in the order of the kernels' raw sums."""
        return [self.pos_grad, self.neg_grad, self.cls_neg_grad]

    @property
    def running_vectors(self) -> List[Optional[torch.Tensor]]:
        return [self.running_pos_grad, self.running_neg_grad, self.running_cls_neg_grad]

    @torch.no_grad()
    def reset(self) -> None:
        """Zero every statistic and counter (and forget a pending label error)."""
        for buffer in self.buffers():
            buffer.zero_()
        label_errors.forget(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name in ("pos_grad", "neg_grad", "cls_neg_grad"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != (self.num_classes,):
                raise ValueError(
                    f"GALAState checkpoint mismatch: {prefix + name} has shape {tuple(saved.shape)}, "
                    f"but this state has num_classes={self.num_classes}"
                )
        for name in ("pairwise", "running_pos_grad", "running_pairwise"):
            mine = getattr(self, name)
            if (prefix + name in state_dict) != (mine is not None):
                raise ValueError(
                    f"GALAState checkpoint mismatch: {prefix + name} is "
                    f"{'present' if prefix + name in state_dict else 'absent'} in the checkpoint but "
                    f"{'absent' if mine is None else 'present'} here (accumulation={self.accumulation!r}, "
                    f"track_pairwise={self.track_pairwise})"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, accumulation={self.accumulation!r}, "
            f"ema_beta={self.ema_beta}, track_pairwise={self.track_pairwise}"
        )
