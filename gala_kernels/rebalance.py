"""Post-hoc prediction re-balancing (the GALA paper's second contribution), streaming.

docs/rebalancing.md, over an evaluation set of M rows of logits z::

    mass[j]  = sum_i softmax(z[i, :])[j]           (column L1 norm of the probabilities)
    score    = z[i, j] - tau * log(mass[j])        (argmax-equivalent to p[i, j] / mass[j]**tau)
    pred_i   = argmax_j score[i, j]

``mass`` is accumulated batch by batch in float64, in O(C) memory (never the M x C matrix), by a
fused mass pass (a row softmax, then column sums of the probabilities: the C++ op on CPU, the
CUDA C++ op or Triton on CUDA; see :mod:`gala_kernels.mass_ops`).

Conventions (documented choices):

* A class with ``mass == 0`` (e.g. a column of -inf logits, or logits so low that every
  probability underflows) gets the score ``-inf`` for any ``tau != 0``: nobody predicts it, and
  re-balancing must not turn it into ``+inf`` (``z - tau * log(0)``) nor NaN
  (``-inf - (-inf)``). With ``tau == 0`` the scores are the logits themselves (plain argmax).
* Scores are float32 (float64 for float64 logits), so bfloat16 / float16 logits lose nothing.
* A row holding NaN or +inf, or -inf everywhere, makes every ``mass`` entry NaN (as
  ``torch.softmax`` does); ``adjust``/``predict`` then raise, naming the cause.
* The authors' code applies a second softmax to ``p / mass**tau``: that changes confidences,
  not predictions, and is not reproduced (``softmax(adjust(z))`` gives it if needed).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import mass_ops
from .backends import BACKENDS
from .metrics import mean_over_present, per_class_accuracy

# fit_tau's default grid: 0.0, 0.1, ..., 3.0 (the authors' values, 1.4 to 1.7, lie inside).
DEFAULT_TAUS: Tuple[float, ...] = tuple(k / 10 for k in range(31))
# Rows per step when fit_tau sweeps the held-out logits (bounds its scratch memory).
FIT_TAU_BATCH_ROWS = 2048


def class_penalty(mass: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau * log(mass)`` (float64, ``(C,)``) with ``+inf`` where ``mass == 0`` and ``tau != 0``,
    so that ``score = z - penalty`` is ``-inf`` for a class nobody predicts; zeros for tau = 0."""
    if tau == 0:
        return torch.zeros_like(mass, dtype=torch.float64)
    penalty = tau * torch.log(mass.to(torch.float64))
    return penalty.masked_fill(mass == 0, math.inf)


def _scores(logits: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    dtype = mass_ops.math_dtype(logits.dtype)
    return logits.to(dtype) - penalty.to(dtype)


def _check_labels(labels: torch.Tensor, num_rows: int, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != num_rows:
        raise ValueError(f"labels must have shape ({num_rows},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    if num_rows > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels


class PredictionRebalancer(nn.Module):
    """Streaming post-hoc re-balancing: ``update`` on evaluation (or held-out) logits, then
    ``adjust`` / ``predict``.

    Args:
        num_classes: C.
        tau: the exponent (the authors: 1.5 iNaturalist 2018, 1.7 ImageNet-LT, 1.4 Places-LT);
            :func:`fit_tau` picks it on held-out logits. Settable at any time (``rb.tau = 1.5``).
        backend: the mass pass: ``"auto"``, ``"torch"``, ``"cpu"`` (C++ op), ``"triton"``,
            ``"cuda"`` (CUDA C++ op).
        device: where the buffers live (move them later with ``.to(device)``).

    Buffers (saved in ``state_dict``, with ``tau``): ``mass`` float64 ``(C,)``, the running
    ``sum_i softmax(z_i)``; ``num_rows`` int64 ``()``, the rows seen since the last reset.
    ``mass`` is read-only: change it through ``update``, ``reset`` or ``load_state_dict``.

    Example::

        rb = PredictionRebalancer(C, tau=1.5).to(device)
        for x, _ in loader:
            rb.update(model(x))             # pass 1: the mass over the evaluation set
        for x, y in loader:
            preds = rb.predict(model(x))    # pass 2: re-balanced predictions
    """

    def __init__(self, num_classes: int, tau: float = 1.0, *, backend: str = "auto",
                 device: Optional[torch.device] = None):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_classes = int(num_classes)
        self.tau = float(tau)
        self.backend = backend
        self.register_buffer("mass", torch.zeros(self.num_classes, dtype=torch.float64, device=device))
        self.register_buffer("num_rows", torch.zeros((), dtype=torch.int64, device=device))
        # Host-side mirrors, so adjust/predict need no device sync: whether any row was seen,
        # and a cache of the validated penalty keyed by (version, tau, device).
        self._has_rows = False
        self._version = 0
        self._penalty_cache: Optional[Tuple[tuple, torch.Tensor]] = None

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}, backend={self.backend!r}"

    # --- accumulation --------------------------------------------------------------------

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """``mass += sum_i softmax(logits[i, :])`` over a ``(B, C)`` batch (any float dtype)."""
        mass_ops.check_logits(logits, self.num_classes)
        if logits.device != self.mass.device:
            raise ValueError(f"logits are on {logits.device} but the rebalancer's buffers are on "
                             f"{self.mass.device}; move it with rebalancer.to(logits.device)")
        if logits.shape[0] == 0:
            return
        mass_ops.accumulate_softmax_colsum(logits.detach(), self.mass, backend=self.backend)
        # In place, and plain attributes set through __dict__: nn.Module.__setattr__ costs a few
        # microseconds per call, a good part of a streamed GPU update (`bench mass`).
        self.num_rows.add_(logits.shape[0])
        state = self.__dict__
        state["_has_rows"] = True
        state["_version"] += 1

    def reset(self) -> None:
        """Forget every row seen: ``mass = 0``, ``num_rows = 0``."""
        self.mass.zero_()
        self.num_rows.zero_()
        self._has_rows = False
        self._version += 1

    # --- predictions ---------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """``tau * log(mass)`` (float64 ``(C,)``, ``+inf`` for classes of zero mass when tau != 0)."""
        if not self._has_rows:
            raise RuntimeError(
                "PredictionRebalancer has no mass yet: call update() on the held-out/eval logits "
                "(all batches) first, then adjust() or predict()"
            )
        key = (self._version, self.tau, self.mass.device)
        if self._penalty_cache is None or self._penalty_cache[0] != key:
            # One host sync per update series (not per batch): NaN mass makes every score NaN.
            if bool(torch.isnan(self.mass).any()):
                raise ValueError(
                    "PredictionRebalancer.mass is NaN: a batch passed to update() held a row with NaN "
                    "or +inf logits, or a row that is -inf everywhere (its softmax is NaN); "
                    "clean the logits, reset() and update() again"
                )
            self._penalty_cache = (key, class_penalty(self.mass, self.tau))
        return self._penalty_cache[1]

    @torch.no_grad()
    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores ``z - tau * log(mass)`` (float32, float64 for float64 logits), ``(B, C)``."""
        mass_ops.check_logits(logits, self.num_classes)
        penalty = self.penalty()
        if logits.device != penalty.device:
            raise ValueError(f"logits are on {logits.device} but the rebalancer's buffers are on "
                             f"{penalty.device}; move it with rebalancer.to(logits.device)")
        return _scores(logits, penalty)

    @torch.no_grad()
    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """``argmax_j (z[i, j] - tau * log(mass[j]))``, int64 ``(B,)``."""
        return self.adjust(logits).argmax(dim=1)

    # --- state ---------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, float]:
        return {"tau": self.tau}

    def set_extra_state(self, state: Dict[str, float]) -> None:
        self.tau = float(state["tau"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # One sync at load time keeps adjust/predict sync-free afterwards.
        self._has_rows = bool(self.num_rows.item() > 0)
        self._version += 1

    def _apply(self, fn, *args, **kwargs):
        self._penalty_cache = None  # .to(device) / .double() etc. replace the buffers
        return super()._apply(fn, *args, **kwargs)


def _tau_list(taus: Optional[Iterable[float]]) -> List[float]:
    values = sorted({float(t) for t in (DEFAULT_TAUS if taus is None else taus)})
    if not values:
        raise ValueError("taus must hold at least one value")
    if any(not math.isfinite(t) for t in values):
        raise ValueError(f"taus must be finite, got {values}")
    return values


@torch.no_grad()
def fit_tau(
    logits: torch.Tensor, labels: torch.Tensor, taus: Optional[Iterable[float]] = None, *,
    backend: str = "auto",
) -> Tuple[float, Dict[float, float]]:
    """Grid search for the tau with the best balanced (mean per-class) accuracy.

    One mass computation over ``logits`` (``(M, C)`` held-out logits, any float dtype), then for
    each tau the balanced accuracy of ``argmax(z - tau * log(mass))`` against ``labels``
    (classes absent from ``labels`` are left out of the mean, as in :func:`lt_accuracy`).

    Args:
        taus: the grid; default 0.0, 0.1, ..., 3.0.
        backend: the mass pass backend (as in :class:`PredictionRebalancer`).

    Returns:
        ``(best_tau, table)`` with ``table = {tau: balanced_accuracy}`` for every tau in
        ascending order. Ties go to the smaller tau (the smallest correction that is as good).
    """
    mass_ops.check_logits(logits)
    num_rows, num_classes = logits.shape
    if num_rows == 0:
        raise ValueError("fit_tau needs at least one held-out row, got logits of shape (0, C)")
    labels = _check_labels(labels, num_rows, num_classes).to(logits.device)
    tau_values = _tau_list(taus)

    # The one mass computation, streamed so that no backend holds more than a batch of probabilities.
    mass = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    for start in range(0, num_rows, FIT_TAU_BATCH_ROWS):
        mass += mass_ops.softmax_colsum(logits[start:start + FIT_TAU_BATCH_ROWS], backend=backend).double()
    if bool(torch.isnan(mass).any()):
        raise ValueError("fit_tau: the mass is NaN: a row of logits holds NaN or +inf, or is -inf everywhere")
    penalties = [class_penalty(mass, tau) for tau in tau_values]

    correct = torch.zeros(len(tau_values), num_classes, dtype=torch.int64, device=logits.device)
    for start in range(0, num_rows, FIT_TAU_BATCH_ROWS):
        z = logits[start:start + FIT_TAU_BATCH_ROWS]
        y = labels[start:start + FIT_TAU_BATCH_ROWS]
        for k, penalty in enumerate(penalties):
            preds = _scores(z, penalty).argmax(dim=1)
            correct[k] += torch.bincount(y[preds == y], minlength=num_classes)

    samples = torch.bincount(labels, minlength=num_classes).cpu()
    table = {
        tau: mean_over_present(per_class_accuracy(correct[k].cpu(), samples))
        for k, tau in enumerate(tau_values)
    }
    best_tau = tau_values[0]
    for tau in tau_values[1:]:  # ascending, strict improvement only: ties keep the smaller tau
        if table[tau] > table[best_tau]:
            best_tau = tau
    return best_tau, table


__all__ = ["PredictionRebalancer", "fit_tau", "class_penalty", "DEFAULT_TAUS"]
