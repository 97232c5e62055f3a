"""Pure-PyTorch reference of the GALA loss: the oracle every backend is tested against.

Readable, vectorised, valid in float64, and made of plain torch operations only (no compiled
code, no custom op): the fast paths (gala_kernels.loss, gala_kernels.backends) call into it, never
the other way round. The formulas are those of docs/contract.md; the names follow it:

    a[i, j]  = z[i, j] + lambda1 * log(pos_grad[j] + eps) - lambda2 * log(neg_grad[y_i] + eps)
    p[i, :]  = softmax(a[i, :])
    nll_i    = logsumexp(a[i, :]) - a[i, y_i]

Loss and gradient, with torch's ``weight`` (per class, ``wt``; all ones by default) and
``label_smoothing`` (``ls``) semantics, for a non-ignored row i:

    loss_i   = (1 - ls) * wt[y_i] * nll_i + (ls / C) * sum_j wt[j] * (logsumexp(a[i, :]) - a[i, j])
    dz[i, j] = r_i * ( ((1 - ls) * wt[y_i] + (ls / C) * sum_k wt[k]) * p[i, j]
                       - (1 - ls) * wt[y_i] * [j == y_i] - (ls / C) * wt[j] ) * grad_output

with ``r_i = 1/W`` for "mean" (``W = sum_{i not ignored} wt[y_i]``, NaN when ``W = 0`` as in
torch), 1 for "sum" and "none"; ignored rows give 0.

Statistics (training only) do not depend on ``weight`` or ``label_smoothing``: raw sums over the
valid, finite rows ``V'``, and per-step increments ``d = s * raw`` with ``s = 1/N`` (N = number
of non-ignored rows):

    raw_pos[k]    = sum_{i in V', y_i = k} (1 - p[i, k])
    raw_neg[k]    = sum_{i in V', y_i = k} sum_{j != k} p[i, j]
    raw_clsneg[j] = sum_{i in V', y_i != j} p[i, j]
    raw_pair[j,k] = sum_{i in V', y_i = k} |p[i, j] - [j == k]|

The fused backends return (or fold themselves) the same raw sums; :func:`fold_increments` is the
pure fold they are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .state import GALAState

REDUCTIONS = ("none", "mean", "sum")


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


def class_bias(state: GALAState, lambda1: float, eps: float, dtype=torch.float32) -> torch.Tensor:
    """The per-column margin ``lambda1 * log(pos_grad + eps)``, shape ``(C,)``."""
    return state.pos_grad.to(dtype).add(eps).log_().mul_(lambda1)  # one allocation


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
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
):
    """The whole GALA computation, without autograd: loss, gradient and raw statistics.

    Returns ``(loss, grad, stats)`` where ``loss`` follows ``reduction`` (in the compute dtype),
    ``grad`` is ``dloss/dlogits`` for ``grad_output = 1`` (in the logits dtype) and ``stats`` is
    a :class:`StepStatistics` or ``None``. Labels must be in ``[0, C)`` or ``ignore_index``.
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

    class_weight = torch.ones(C, dtype=cdt, device=logits.device) if weight is None else weight.to(cdt)
    label_weight = class_weight[y]  # wt[y_i]
    ls = float(label_smoothing)

    lse = torch.logsumexp(a, dim=1)
    a_y = a.gather(1, y.unsqueeze(1)).squeeze(1)
    loss_rows = (1.0 - ls) * label_weight * (lse - a_y)  # (1 - ls) * wt[y_i] * nll_i
    if ls > 0.0:  # + (ls / C) * sum_j wt[j] * (lse_i - a[i, j])
        loss_rows = loss_rows + (ls / C) * ((lse.unsqueeze(1) - a) * class_weight).sum(dim=1)
    nan = torch.full_like(lse, float("nan"))
    loss_rows = torch.where(finite, loss_rows, nan)  # rows with a non-finite logit: NaN
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))

    p = torch.exp(a - lse.unsqueeze(1))
    onehot = torch.nn.functional.one_hot(y, C).to(cdt)
    # r_i = 1/W for "mean" (W = sum of wt[y_i] over the non-ignored rows; NaN when W = 0, as
    # torch), 1 for "sum" and "none", 0 for ignored rows
    total_weight = torch.where(valid, label_weight, torch.zeros_like(label_weight)).sum()
    r = valid.to(cdt)
    if reduction == "mean":
        r = torch.where(valid, 1.0 / total_weight, torch.zeros_like(r))
        r = torch.where(valid & (total_weight == 0), torch.full_like(r, float("nan")), r)
    target_coef = (1.0 - ls) * label_weight  # (1 - ls) * wt[y_i]
    prob_coef = target_coef + (ls / C) * class_weight.sum()  # ... + (ls / C) * sum_k wt[k]
    grad = prob_coef.unsqueeze(1) * p - target_coef.unsqueeze(1) * onehot
    if ls > 0.0:
        grad = grad - (ls / C) * class_weight
    grad = grad * r.unsqueeze(1)
    grad = torch.where((valid & ~finite).unsqueeze(1), torch.full_like(grad, float("nan")), grad)
    grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad))

    n_valid = valid.sum()
    if reduction == "mean":  # W = 0 (N = 0, or every label of weight 0) gives NaN, as torch
        loss = loss_rows.sum() / total_weight
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows

    stats = None
    if compute_stats:
        counts = torch.stack([n_valid, (valid & ~finite).sum()]).to(torch.int64)
        # Rows used for the statistics: non-ignored and finite. Masking (not boolean indexing)
        # keeps every shape static, so torch.compile traces this without graph breaks.
        used = (valid & finite).unsqueeze(1)
        pu = torch.where(used, p, torch.zeros_like(p))
        ohu = onehot * used
        off_label = pu * (1.0 - onehot)  # p[i, j] for j != y_i, 0 on unused rows
        zeros = torch.zeros(C, dtype=cdt, device=logits.device)
        raw_pos = zeros.index_add(0, y, (ohu - pu * onehot).sum(dim=1))  # sum_{y_i = k} (1 - p[i, k])
        raw_neg = zeros.index_add(0, y, off_label.sum(dim=1))  # sum_{y_i = k} sum_{j != k} p[i, j]
        raw_clsneg = off_label.sum(dim=0)  # sum_{y_i != j} p[i, j]
        raw = torch.stack([raw_pos, raw_neg, raw_clsneg])
        raw_pairwise = None
        if track_pairwise:  # column y_i of Phi += |p_i - e_{y_i}|
            raw_pairwise = torch.zeros(C, C, dtype=cdt, device=logits.device)
            raw_pairwise = raw_pairwise.index_add(1, y, (pu - ohu).abs().t())
        stats = StepStatistics(raw=raw, raw_pairwise=raw_pairwise, counts=counts)
    return loss, grad.to(logits.dtype), stats


class _ReferenceGALA(torch.autograd.Function):
    """Autograd around :func:`forward_and_grad`: the gradient is made in the forward, the backward
    scales it by ``grad_output`` (per row for reduction "none"). Outputs ``(loss, stats)``, the
    second a :class:`StepStatistics` or None (not differentiable)."""

    @staticmethod
    def forward(ctx, logits, labels, bias, row_shift, options):
        loss, grad, stats = forward_and_grad(logits, labels, bias, row_shift, **options)
        ctx.save_for_backward(grad)
        ctx.per_row = options["reduction"] == "none"
        return loss.to(logits.dtype), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_stats):
        (grad,) = ctx.saved_tensors
        scale = grad_loss.unsqueeze(1) if ctx.per_row else grad_loss
        return grad * scale.to(grad.dtype), None, None, None, None


def fold_increments(state: GALAState, stats: StepStatistics) -> None:
    """Fold one step's raw statistics into ``state`` (docs/contract.md, "Folding").

    ``d = s * raw`` with ``s = 1/N``; then, by ``state.accumulation``:

    - ``"cumulative"``: ``R += d; state += R`` (the authors' running matrix, added every step)
    - ``"sum"``:        ``state += d``
    - ``"ema"``:        ``state = beta * state + (1 - beta) * d``

    ``stats`` are this process's own (summing them over ranks is the caller's business:
    gala_kernels.folding). Everything stays on the device: no host synchronisation.
    """
    counts = stats.counts
    s = 1.0 / counts[0].clamp(min=1).to(torch.float64)
    nonfinite = counts[1]
    groups = [(state.stat_vectors, list((stats.raw * s).float().unbind(0)), state.running_vectors)]
    if state.pairwise is not None and stats.raw_pairwise is not None:
        groups.append(([state.pairwise], [(stats.raw_pairwise * s).float()], [state.running_pairwise]))
    with torch.no_grad():
        for targets, increments, running in groups:
            if state.accumulation == "cumulative":
                torch._foreach_add_(running, increments)
                torch._foreach_add_(targets, running)
            elif state.accumulation == "sum":
                torch._foreach_add_(targets, increments)
            else:
                torch._foreach_mul_(targets, state.ema_beta)
                torch._foreach_add_(targets, increments, alpha=1.0 - state.ema_beta)
        state.steps.add_(1)
        state.nonfinite_rows.add_(nonfinite)


def gala_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    state: Optional[GALAState] = None,
    *,
    lambda1: float = 1.2,
    lambda2: float = 0.9,
    eps: float = 1e-3,
    reduction: str = "mean",
    ignore_index: int = -100,
    update_state: bool = True,
    backend: str = "torch",
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The reference GALA cross-entropy, in one process; the semantics of ``fused_gala_ce``.

    ``state=None`` gives plain cross-entropy (evaluation semantics). With a state, the margins
    use the state as it was before the call, and the step's statistics are folded in afterwards
    when ``update_state`` is true (this process's statistics only: no sum over ranks).
    Labels must be in ``[0, C)`` or ``ignore_index`` (not checked here).

    The ``lambda2`` term ``- lambda2 * log(neg_grad[y_i] + eps)`` is constant along a row, so it
    changes neither the loss nor any gradient (softmax is shift-invariant). That is a property of
    the authors' formulation; the reference computes it anyway, for parity, and the fused
    kernels skip it. ``weight`` and ``label_smoothing`` change the loss and its gradient exactly
    as in ``torch.nn.functional.cross_entropy``, never the statistics.
    """
    del backend  # the reference is the "torch" backend
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    bias = row_shift = None
    if state is not None:
        bias = class_bias(state, lambda1, eps, compute_dtype(logits.dtype))
        row_shift = lambda2 * torch.log(state.neg_grad.to(bias.dtype) + eps)
    compute_stats = state is not None and update_state
    options = dict(reduction=reduction, ignore_index=ignore_index, compute_stats=compute_stats,
                   track_pairwise=compute_stats and state.pairwise is not None, weight=weight,
                   label_smoothing=label_smoothing)
    loss, stats = _ReferenceGALA.apply(logits, labels, bias, row_shift, options)
    if compute_stats:
        fold_increments(state, stats)
    return loss


def eager_gala_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    state: GALAState,
    *,
    lambda1: float = 1.2,
    eps: float = 1e-3,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The GALA training step as a user would write it in plain PyTorch: autograd through
    ``F.cross_entropy`` on the adjusted logits, the statistics from the softmax under no_grad.

    The same loss, gradient and state as :func:`gala_ce` (mean reduction) for finite logits; it
    is the "eager GALA" baseline of the benchmarks and what they hand to ``torch.compile``
    (standard torch ops only, which the compiler can fuse).
    """
    cdt = compute_dtype(logits.dtype)
    C = logits.shape[1]
    adjusted = logits.to(cdt) + class_bias(state, lambda1, eps, cdt)
    loss = torch.nn.functional.cross_entropy(adjusted, labels, ignore_index=ignore_index)
    with torch.no_grad():
        valid = labels != ignore_index
        finite = torch.isfinite(adjusted).all(dim=1)
        y = torch.where(valid, labels, torch.zeros_like(labels))
        used = (valid & finite).unsqueeze(1)
        p = torch.where(used, torch.softmax(adjusted, dim=1), torch.zeros_like(adjusted))
        off_label = p * (1.0 - torch.nn.functional.one_hot(y, C).to(cdt))  # p[i, j], j != y_i
        raw_pos = torch.zeros(C, dtype=cdt, device=logits.device).index_add(0, y, off_label.sum(dim=1))
        raw = torch.stack([raw_pos, raw_pos, off_label.sum(dim=0)]).float()
        counts = torch.stack([valid.sum(), (valid & ~finite).sum()])
        fold_increments(state, StepStatistics(raw, None, counts))
    return loss.to(logits.dtype)
