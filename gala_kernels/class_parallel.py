"""Class-parallel GALA cross-entropy (Megatron vocab-parallel style).

The classifier's ``C`` columns are split by ranges over the ranks of a process group: rank ``r``
holds the weight rows / logit columns ``[c0, c1)`` and the matching slice of the GALA state
(``GALAState(c1 - c0)``). Every rank sees the same rows and labels. Per row ``i`` (docs/contract.md
formulas; ``a`` = adjusted logits, math in fp32, fp64 for fp64 inputs):

    a[i, j]   = z[i, j] + lambda1 * log(pos_grad[j] + eps)           j in [c0, c1), local
    m_i       = all_reduce_MAX( max_{local j} a[i, j] )
    S_i       = all_reduce_SUM( sum_{local j} exp(a[i, j] - m_i) )
    a_y_i     = all_reduce_SUM( a[i, y_i] if c0 <= y_i < c1 else 0 )  (the owner contributes)
    Q_i       = all_reduce_SUM( sum_{local j != y_i} exp(a[i, j] - m_i) )
    lse_i     = m_i + log(S_i)      loss_i = lse_i - a_y_i      p[i, j] = exp(a[i, j] - lse_i)
    dz[i, j]  = (p[i, j] - [j == y_i]) * w_i                        local, no communication

The two SUMs and the MAX pack into 2 all-reduces of ``O(B)`` floats per call. Statistics of the
local columns, equal to the unsplit computation's slice:

    raw_pos[y] = raw_neg[y] += Q_i / S_i  (= sum_{j != y} p[i, j], no cancellation)  rank owning y
    raw_clsneg[j]           += p[i, j]  for y_i != j                                   local column

``N`` and the non-finite row count are global already (the rows are replicated). A row with a
non-finite logit on ANY rank has loss NaN and a NaN gradient on every rank, and no statistics.
The ``lambda2`` term is constant along a row and skipped (it changes no loss or gradient).
Pairwise tracking is not supported here (``Phi[j, k]`` would need every class ``k``'s column).

The state slice must NOT be synced over the class-parallel group (the ranks hold different
columns): build it with :func:`class_parallel_state` (sync off, or over a separate data-parallel
group); a state that would sync over the class group is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import distributed, folding, reference
from .ops import REDUCTION_CODES
from .state import GALAState


def class_range(num_classes: int, group=None) -> Tuple[int, int]:
    """``[c0, c1)`` of this rank for an even split of ``num_classes`` over ``group`` (first ranks +1)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def class_parallel_state(num_local_classes: int, *, data_parallel_group=None, sync_data_parallel=False,
                         **state_kwargs) -> GALAState:
    """A :class:`GALAState` for this rank's class slice; statistics synced only over data parallelism.

    With ``sync_data_parallel`` the slice is summed over ``data_parallel_group`` (the ranks that
    hold the SAME columns for different rows); otherwise it stays local.
    """
    if state_kwargs.get("track_pairwise"):
        raise ValueError("track_pairwise is not supported by the class-parallel loss")
    state = GALAState(num_local_classes, **state_kwargs)
    if sync_data_parallel:
        return distributed.configure_sync(state, "auto", data_parallel_group)
    return distributed.configure_sync(state, None)


def _group_ranks(group) -> set:
    if group is None or group is dist.group.WORLD:
        return set(range(dist.get_world_size()))
    return set(dist.get_process_group_ranks(group))


def _check_state_sync(state: GALAState, group) -> None:
    """The slice's statistics sync group may share no rank but this one with the class group."""
    sync_group = distributed.sync_group(state)
    if sync_group is None:
        return
    shared = _group_ranks(sync_group) & _group_ranks(group)
    if len(shared) > 1:
        raise ValueError(
            "this GALAState would sum its statistics over ranks that hold OTHER class slices "
            f"(ranks {sorted(shared)}): build it with gala_kernels.class_parallel.class_parallel_state(...) "
            "or disable its sync (gala_kernels.distributed.configure_sync(state, None))"
        )


@dataclass(frozen=True)
class _Config:
    class_start: int
    reduction: str
    ignore_index: int
    compute_stats: bool
    group: object


def _forward_and_grad(logits, labels, class_bias, config: _Config):
    """The class-parallel computation of one call: ``(loss, grad, raw or None, counts or None)``."""
    cdt = reference.compute_dtype(logits.dtype)
    B, C_local = logits.shape
    z = logits.to(cdt)
    valid = labels != config.ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    local_y = y - config.class_start
    owned = valid & (local_y >= 0) & (local_y < C_local)  # this rank holds column y_i
    local_y = torch.where(owned, local_y, torch.zeros_like(local_y))
    onehot = torch.zeros(B, C_local, dtype=cdt, device=logits.device)
    onehot[owned, local_y[owned]] = 1.0

    # Rows with a non-finite logit on any rank are computed on zeros and flagged (MAX = "any").
    finite_here = torch.isfinite(z).all(dim=1)
    a = torch.where(finite_here.unsqueeze(1), z, torch.zeros_like(z))
    if class_bias is not None:
        a = a + class_bias.to(cdt)

    # 1. m_i = max over all columns; non-finite flag = max over ranks.
    max_and_flag = torch.stack([a.max(dim=1).values, (~finite_here).to(cdt)])
    dist.all_reduce(max_and_flag, op=dist.ReduceOp.MAX, group=config.group)
    row_max, nonfinite = max_and_flag[0], max_and_flag[1] > 0

    # 2. S_i, Q_i (sum over j != y_i) and a_y_i, summed over ranks in one all-reduce.
    e = torch.exp(a - row_max.unsqueeze(1))
    a_y = torch.where(owned, a.gather(1, local_y.unsqueeze(1)).squeeze(1), torch.zeros_like(row_max))
    sums = torch.stack([e.sum(dim=1), (e * (1.0 - onehot)).sum(dim=1), a_y])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=config.group)
    sum_exp, sum_exp_not_y, a_y = sums[0], sums[1], sums[2]

    lse = row_max + torch.log(sum_exp)
    loss_rows = torch.where(nonfinite, torch.full_like(lse, float("nan")), lse - a_y)
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))
    p = e / sum_exp.unsqueeze(1)

    n_valid = valid.sum()
    w = valid.to(cdt)
    if config.reduction == "mean":
        w = torch.where(valid, w / n_valid.clamp(min=1), torch.zeros_like(w))
        loss = loss_rows.sum() / n_valid  # N = 0: NaN, as F.cross_entropy
    elif config.reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows
    grad = (p - onehot) * w.unsqueeze(1)
    grad = torch.where((valid & nonfinite).unsqueeze(1), torch.full_like(grad, float("nan")), grad)

    raw = counts = None
    if config.compute_stats:
        used = valid & ~nonfinite
        counts = torch.stack([n_valid, (valid & nonfinite).sum()]).to(torch.int64)
        raw = torch.zeros(3, C_local, dtype=cdt, device=logits.device)
        mine = used & owned
        p_not_y = sum_exp_not_y / sum_exp  # sum_{j != y} p[i, j], without 1 - p_y cancellation
        raw[0].index_add_(0, local_y[mine], p_not_y[mine])  # raw_pos[y]
        raw[1].index_add_(0, local_y[mine], p_not_y[mine])  # raw_neg[y]
        raw[2] = (p * (1.0 - onehot))[used].sum(dim=0)  # raw_clsneg[j], local columns
    return loss, grad.to(logits.dtype), raw, counts


class _ClassParallelGALAFunction(torch.autograd.Function):
    """Outputs ``(loss, raw, counts)``; the gradient is made in the forward, backward scales it."""

    @staticmethod
    def forward(ctx, logits, labels, class_bias, config: _Config):
        loss, grad, raw, counts = _forward_and_grad(logits, labels, class_bias, config)
        ctx.save_for_backward(grad)
        ctx.reduction = config.reduction
        empty = logits.new_empty(0, dtype=torch.float32)
        raw = raw if raw is not None else empty
        counts = counts if counts is not None else empty.to(torch.int64)
        ctx.mark_non_differentiable(raw, counts)
        return loss.to(logits.dtype), raw, counts

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_statistics):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad_loss = grad_loss.unsqueeze(1)
        return grad * grad_loss.to(grad.dtype), None, None, None


def class_parallel_gala_ce(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    state_shard: Optional[GALAState] = None,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    lambda1: float = 1.2,
    lambda2: float = 0.9,
    eps: float = 1e-3,
    reduction: str = "mean",
    ignore_index: int = -100,
    update_state: bool = True,
) -> torch.Tensor:
    """GALA cross-entropy over logits split by columns across ``group``; same value on every rank.

    ``logits_shard`` is ``(B, c1 - c0)``, the columns ``[class_start, class_start + C_local)`` of the
    full ``(B, num_classes)`` logits; ``labels`` are the GLOBAL labels, identical on every rank;
    ``state_shard`` this rank's slice of the state (see :func:`class_parallel_state`). The loss,
    this rank's gradient columns and the state slice equal those of the unsplit ``fused_gala_ce``.
    Every rank of ``group`` must call it (collective).
    """
    del lambda2  # constant along a row: changes neither the loss nor any gradient
    if logits_shard.dim() != 2:
        raise ValueError(f"logits_shard must be 2-D (B, C_local), got {tuple(logits_shard.shape)}")
    C_local = logits_shard.shape[1]
    if C_local < 1:
        raise ValueError("logits_shard has no columns: every rank must hold at least one class")
    if not 0 <= class_start <= num_classes - C_local:
        raise ValueError(
            f"columns [{class_start}, {class_start + C_local}) are not inside [0, num_classes={num_classes})"
        )
    if labels.dim() != 1 or labels.shape[0] != logits_shard.shape[0] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({logits_shard.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {tuple(REDUCTION_CODES)}, got {reduction!r}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{index}] = {int(labels[index])} is out of range [0, {num_classes})")
    class_bias = None
    if state_shard is not None:
        if state_shard.num_classes != C_local:
            raise ValueError(f"state_shard has num_classes={state_shard.num_classes} but logits_shard has "
                             f"{C_local} columns")
        if state_shard.pairwise is not None:
            raise ValueError("track_pairwise is not supported by the class-parallel loss")
        math_dtype = reference.compute_dtype(logits_shard.dtype)
        class_bias = reference.class_bias(state_shard, lambda1, eps, math_dtype)
    compute_stats = state_shard is not None and update_state
    if compute_stats:
        _check_state_sync(state_shard, group)
    config = _Config(int(class_start), reduction, int(ignore_index), compute_stats, group)
    loss, raw, counts = _ClassParallelGALAFunction.apply(logits_shard, labels, class_bias, config)
    if compute_stats:
        folding.fold_step(state_shard, reference.StepStatistics(raw, None, counts))
    return loss


class _CopyToClassParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the class group (each rank's columns
    contribute a part of ``dloss/dx``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def class_parallel_linear_gala_ce(
    x: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    state_shard: Optional[GALAState] = None,
    bias_shard: Optional[torch.Tensor] = None,
    *,
    class_start: int,
    num_classes: int,
    group=None,
    **loss_kwargs,
) -> torch.Tensor:
    """``class_parallel_gala_ce(x @ weight_shard.T + bias_shard, ...)`` where ``x`` (B, D) is the same on
    every rank; ``dloss/dx`` is summed over the group, so it equals the unsplit gradient on every rank."""
    x = _CopyToClassParallel.apply(x, group)
    if bias_shard is None:
        logits_shard = x @ weight_shard.t()
    else:
        logits_shard = torch.addmm(bias_shard, x, weight_shard.t())
    return class_parallel_gala_ce(logits_shard, labels, state_shard, class_start=class_start,
                                  num_classes=num_classes, group=group, **loss_kwargs)
