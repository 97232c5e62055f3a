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
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from .ops import REDUCTION_CODES, register_fused_ce

if TYPE_CHECKING:  # pragma: no cover
    from .state import GALAState

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


def class_bias(state: GALAState, lambda1: float, eps: float, dtype=torch.float32) -> torch.Tensor:
    """The per-column margin ``lambda1 * log(pos_grad + eps)``, shape ``(C,)``."""
    return state.pos_grad.to(dtype).add(eps).log_().mul_(lambda1)  # one allocation


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


_REDUCTION_NAMES = {code: name for name, code in REDUCTION_CODES.items()}


@torch.library.custom_op("gala_ref::fused_ce_fwd", mutates_args=())
def reference_fused_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_bias: Optional[torch.Tensor],
    ignore_index: int,
    reduction: int,
    compute_stats: bool,
    track_pairwise: bool,
    row_shift: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_and_grad` as a custom op with the fused ops' schema (plus ``row_shift``,
    the lambda2 term the kernels skip), so the reference goes through the same autograd and
    torch.compile path as every other backend. Empty tensors stand for skipped statistics."""
    loss, grad, stats = forward_and_grad(
        logits, labels, class_bias, row_shift, reduction=_REDUCTION_NAMES[reduction],
        ignore_index=ignore_index, compute_stats=compute_stats, track_pairwise=track_pairwise,
    )
    empty = lambda: torch.empty(0, dtype=torch.float32, device=logits.device)  # noqa: E731
    raw = stats.raw.float() if stats is not None else empty()
    raw_pairwise = stats.raw_pairwise.float() if stats is not None and track_pairwise else empty()
    counts = stats.counts if stats is not None else torch.zeros(2, dtype=torch.int64, device=logits.device)
    return loss.to(logits.dtype), grad, raw, raw_pairwise, counts


_CPP_FOLD_MODES = {"cumulative": 0, "sum": 1}


def folds_in_cpp(state: GALAState) -> bool:
    """Whether the C++ CPU fold (``gala::fold_stats_``, also inside ``gala::fused_ce_step_cpu_``)
    covers this state: a cumulative or sum state without pairwise tracking."""
    return state.accumulation in _CPP_FOLD_MODES and state.pairwise is None


def cpp_fold_arguments(state: GALAState):
    """``(targets, running, mode)`` of the C++ fold for a state that :func:`folds_in_cpp`."""
    running = state.running_vectors if state.accumulation == "cumulative" else []
    return state.stat_vectors, running, _CPP_FOLD_MODES[state.accumulation]


def _fold_in_cpp(state: GALAState, stats: StepStatistics) -> bool:
    """Whether the C++ CPU fold (the same bits) can take this step: an eager CPU step with
    float32 raw statistics of a state that :func:`folds_in_cpp`."""
    from . import _extension

    raw = stats.raw
    return (folds_in_cpp(state) and type(raw) is torch.Tensor and raw.dtype == torch.float32
            and raw.dim() == 2 and raw.is_contiguous() and _extension.has_kernel("fold_stats_", "CPU"))


def fold_increments(state: GALAState, stats: StepStatistics) -> None:
    """Fold one step's raw statistics into ``state`` (SPEC.md, "Folding the increments").

    ``d = s * raw`` with ``s = 1/N``; then, by ``state.accumulation``:

    - ``"cumulative"``: ``R += d; state += R`` (the authors' running matrix, added every step)
    - ``"sum"``:        ``state += d``
    - ``"ema"``:        ``state = beta * state + (1 - beta) * d``

    Under ``torch.distributed`` (``state.sync``), the raw sums and counts are first summed over
    ranks, so ``N`` is the global batch. Everything stays on the device: no host synchronisation.
    """
    from .distributed import sync_step_statistics  # distributed imports this module

    stats = sync_step_statistics(state, stats)
    counts = stats.counts
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        # N read on the host (free for a CPU tensor): one op fewer per scaled tensor. Same values:
        # a float32 tensor times a float64 scalar is computed in float32 either way.
        n_rows, nonfinite = counts.tolist()
        s = 1.0 / max(n_rows, 1)
        if _fold_in_cpp(state, stats):  # the same float32 operations in one C++ pass
            targets, running, mode = cpp_fold_arguments(state)
            torch.ops.gala.fold_stats_(stats.raw, s, targets, running, mode, state.steps,
                                       state.nonfinite_rows, nonfinite)
            return
    else:
        s = 1.0 / counts[0].clamp(min=1).to(torch.float64)  # stays on the device: no host sync
        nonfinite = counts[1]
    groups = [(state.stat_vectors, list((stats.raw * s).float().unbind(0)), state.running_vectors)]
    if state.pairwise is not None and stats.raw_pairwise is not None:
        groups.append(([state.pairwise], [(stats.raw_pairwise * s).float()], [state.running_pairwise]))
    with torch.no_grad():
        # torch._foreach_*: one fused launch per line for the three vectors on a GPU
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
    loss, _grad, raw, raw_pairwise, counts = reference_fused_ce(
        logits, labels, bias, ignore_index, REDUCTION_CODES[reduction], compute_stats, pairwise, row_shift
    )
    if compute_stats:
        stats = StepStatistics(raw, raw_pairwise if pairwise else None, counts)
        fold_increments(state, stats)
    return loss


register_fused_ce(reference_fused_ce)


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
    (every op here is visible to the compiler, unlike the custom op of :func:`gala_ce`).
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
