"""Pure-PyTorch reference of the GALA loss: the oracle every backend is tested against.

Readable and vectorised, valid in float64, and also the ``"torch"`` backend. Every formula
below is the one in ``shared/SPEC.md``; the names follow it:

    a[i, j]  = z[i, j] + lambda1 * log(pos_grad[j] + eps) - lambda2 * log(neg_grad[y_i] + eps)
    p[i, :]  = softmax(a[i, :])
    loss_i   = logsumexp(a[i, :]) - a[i, y_i]                 (0 for ignored rows)
    dz[i, j] = (p[i, j] - [j == y_i]) * w_i * grad_output      (w_i = 1/N "mean", 1 otherwise)

Statistics (training only), raw sums over the valid, finite rows ``V'``; the per-step
increments are ``d = s * raw`` with ``s = 1/N`` (N = number of non-ignored rows):

    raw_pos[k]    = sum_{i in V', y_i = k} (1 - p[i, k])
    raw_neg[k]    = sum_{i in V', y_i = k} sum_{j != k} p[i, j]
    raw_clsneg[j] = sum_{i in V', y_i != j} p[i, j]
    raw_pair[j,k] = sum_{i in V', y_i = k} |p[i, j] - [j == k]|

The fused backends return the same raw sums; :func:`fold_increments` is the one place where they
enter the state, for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .state import GALAState

REDUCTIONS = ("mean", "sum", "none")
ACCUMULATIONS = ("cumulative", "sum", "ema")


@dataclass
class StepStatistics:
    """What one training step adds to a :class:`GALAState`, before scaling by ``s = 1/N``.

    ``raw`` is ``(3, C)`` float32/float64 holding ``raw_pos``, ``raw_neg`` and ``raw_clsneg``;
    ``raw_pairwise`` is ``(C, C)`` or ``None``; ``counts`` is int64 ``(2,)``:
    ``[N (non-ignored rows), non-finite non-ignored rows]``. All of them stay on the device
    (no host synchronisation), so a step can be traced by ``torch.compile``.
    """

    raw: torch.Tensor
    raw_pairwise: Optional[torch.Tensor]
    counts: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math is float32 whatever the input dtype, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_bias(state: "GALAState", lambda1: float, eps: float, dtype=torch.float32) -> torch.Tensor:
    """The per-column margin ``lambda1 * log(pos_grad + eps)``, shape ``(C,)``."""
    return lambda1 * torch.log(state.pos_grad.to(dtype) + eps)


def _row_weights(valid: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``w_i``: ``1/N`` for "mean", 1 for "sum" and "none", 0 for ignored rows."""
    w = valid.to(dtype)
    if reduction == "mean":
        w = w / valid.sum()  # N = 0: every weight is 0/0 -> masked below
        w = torch.where(valid, w, torch.zeros_like(w))
    return w


def forward_and_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_shift: Optional[torch.Tensor],
    *,
    reduction: str,
    ignore_index: int,
    compute_stats: bool,
    track_pairwise: bool,
):
    """The whole GALA computation, without autograd: loss, gradient and raw statistics.

    Returns ``(loss, grad, stats)`` where ``loss`` follows ``reduction`` (in the compute dtype),
    ``grad`` is ``dloss/dlogits`` for ``grad_output = 1`` (in the logits dtype) and ``stats`` is
    a :class:`StepStatistics` or ``None``.
    """
    cdt = compute_dtype(logits.dtype)
    B, C = logits.shape
    z = logits.to(cdt)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    finite = torch.isfinite(z).all(dim=1)

    # a = z + lambda1*log(pos_grad+eps) - lambda2*log(neg_grad[y]+eps)
    a = z
    if bias is not None:
        a = a + bias.to(cdt)
    if row_shift is not None:
        a = a - row_shift.to(cdt)[y].unsqueeze(1)

    lse = torch.logsumexp(a, dim=1)
    a_y = a.gather(1, y.unsqueeze(1)).squeeze(1)
    nan = torch.full_like(lse, float("nan"))
    loss_rows = torch.where(finite, lse - a_y, nan)  # rows with a non-finite logit: NaN
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))

    p = torch.exp(a - lse.unsqueeze(1))
    onehot = torch.nn.functional.one_hot(y, C).to(cdt)
    w = _row_weights(valid, reduction, cdt)
    grad = (p - onehot) * w.unsqueeze(1)
    grad = torch.where((valid & ~finite).unsqueeze(1), torch.full_like(grad, float("nan")), grad)

    n_valid = valid.sum()
    if reduction == "mean":
        loss = loss_rows.sum() / n_valid  # N = 0 gives NaN, as F.cross_entropy does
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows

    stats = None
    if compute_stats:
        counts = torch.stack([n_valid, (valid & ~finite).sum()]).to(torch.int64)
        used = valid & finite
        pu, ohu, yu = p[used], onehot[used], y[used]
        p_y = pu.gather(1, yu.unsqueeze(1)).squeeze(1)
        raw = torch.zeros(3, C, dtype=cdt, device=logits.device)
        raw[0].index_add_(0, yu, 1.0 - p_y)  # raw_pos[k]
        raw[1].index_add_(0, yu, (pu * (1.0 - ohu)).sum(dim=1))  # raw_neg[k]: sum_{j != k} p
        raw[2] = (pu * (1.0 - ohu)).sum(dim=0)  # raw_clsneg[j]: column sum over y_i != j
        raw_pairwise = None
        if track_pairwise:
            raw_pairwise = torch.zeros(C, C, dtype=cdt, device=logits.device)
            raw_pairwise.index_add_(1, yu, (pu - ohu).abs().t())  # column y_i += |p_i - e_y|
        stats = StepStatistics(raw=raw, raw_pairwise=raw_pairwise, counts=counts)
    return loss, grad.to(logits.dtype), stats


class _ReferenceFunction(torch.autograd.Function):
    """Autograd through the reference: the gradient is made in the forward, backward scales it.

    Outputs ``(loss, raw, raw_pairwise, counts)``; only ``loss`` is differentiable. Empty
    tensors stand for statistics that were not asked for.
    """

    @staticmethod
    def forward(ctx, logits, labels, bias, row_shift, reduction, ignore_index, compute_stats, pairwise):
        loss, grad, stats = forward_and_grad(
            logits, labels, bias, row_shift, reduction=reduction, ignore_index=ignore_index,
            compute_stats=compute_stats, track_pairwise=pairwise,
        )
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        empty = logits.new_empty(0, dtype=torch.float32)
        raw = stats.raw if stats is not None else empty
        raw_pairwise = stats.raw_pairwise if stats is not None and pairwise else empty
        counts = stats.counts if stats is not None else empty.to(torch.int64)
        ctx.mark_non_differentiable(raw, raw_pairwise, counts)
        return loss.to(logits.dtype), raw, raw_pairwise, counts

    @staticmethod
    def backward(ctx, grad_output, *_unused_stat_grads):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_output = grad_output.unsqueeze(1)
        return (grad * grad_output).to(grad.dtype), None, None, None, None, None, None, None


def fold_increments(state: "GALAState", stats: StepStatistics) -> None:
    """Fold one step's raw statistics into ``state`` (SPEC.md, "Folding the increments").

    ``d = s * raw`` with ``s = 1/N``; then, by ``state.accumulation``:

    - ``"cumulative"``: ``R += d; state += R`` (the authors' running matrix, added every step)
    - ``"sum"``:        ``state += d``
    - ``"ema"``:        ``state = beta * state + (1 - beta) * d``

    Everything stays on the device, so no host synchronisation happens here.
    """
    n_valid = stats.counts[0]
    s = 1.0 / n_valid.clamp(min=1).to(torch.float64)
    pairs = [(state.stat_vectors, (stats.raw * s).to(torch.float32))]
    if state.pairwise is not None and stats.raw_pairwise is not None:
        pairs.append(([state.pairwise], [(stats.raw_pairwise * s).to(torch.float32)]))
    with torch.no_grad():
        for index, (targets, increments) in enumerate(pairs):
            running = state.running_vectors if index == 0 else [state.running_pairwise]
            for k, target in enumerate(targets):
                d = increments[k]
                if state.accumulation == "cumulative":
                    running[k].add_(d)
                    target.add_(running[k])
                elif state.accumulation == "sum":
                    target.add_(d)
                else:
                    target.mul_(state.ema_beta).add_(d, alpha=1.0 - state.ema_beta)
        state.steps.add_(1)
        state.nonfinite_rows.add_(stats.counts[1])


def gala_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    state: Optional["GALAState"] = None,
    *,
    lambda1: float = 1.2,
    lambda2: float = 0.9,
    eps: float = 1e-3,
    reduction: str = "mean",
    ignore_index: int = -100,
    update_state: bool = True,
    backend: str = "torch",
) -> torch.Tensor:
    """The reference GALA cross-entropy; same signature and semantics as ``fused_gala_ce``.

    ``state=None`` gives plain cross-entropy (evaluation semantics). With a state, the margins
    use the state as it was before the call, and the step's statistics are folded in afterwards
    when ``update_state`` is true.

    The ``lambda2`` term ``- lambda2 * log(neg_grad[y_i] + eps)`` is constant along a row, so it
    changes neither the loss nor any gradient (softmax is shift-invariant). That is a property of
    the authors' formulation; the reference computes it anyway, for parity, and the fused
    kernels skip it.
    """
    del backend  # the reference is the "torch" backend
    bias = row_shift = None
    if state is not None:
        bias = class_bias(state, lambda1, eps, compute_dtype(logits.dtype))
        row_shift = lambda2 * torch.log(state.neg_grad.to(bias.dtype) + eps)
    compute_stats = state is not None and update_state
    pairwise = compute_stats and state.pairwise is not None
    loss, raw, raw_pairwise, counts = _ReferenceFunction.apply(
        logits, labels, bias, row_shift, reduction, ignore_index, compute_stats, pairwise
    )
    if compute_stats:
        stats = StepStatistics(raw, raw_pairwise if pairwise else None, counts)
        fold_increments(state, stats)
    return loss
