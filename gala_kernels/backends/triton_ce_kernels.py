"""The Triton kernels of the fused GALA cross-entropy, as ``@triton.jit`` helpers per phase.

Formulas (docs/contract.md; ``a`` adjusted logits, ``p`` softmax of a row, ``y`` its label, ``wt``
the class weights (ones without ``weight``), ``ls`` the label smoothing, ``r`` the row scale)::

    a[i, j]    = z[i, j] + bias[j]             bias = lambda1 * log(pos_grad + eps), or given, or 0
    lse_i      = logsumexp(a[i, :]) = m_i + log(sum_j exp(a[i, j] - m_i))
    loss_i     = (1 - ls) * wt[y] * (lse_i - a[i, y]) + (ls / C) * sum_j wt[j] * (lse_i - a[i, j])
    grad[i, j] = r_i * ((1 - ls) * wt[y] * (p[i, j] - [j == y]) + (ls / C) * (sum_k wt[k] * p[i, j] - wt[j]))
    r_i        = 1/W "mean" (W = sum of wt[y_i] over the non-ignored rows; NaN if W = 0), 1 otherwise
    raw_pos[y] += sum_{j != y} p[i, j]         (= 1 - p[i, y], without the cancellation)
    raw_neg[y] += the same value
    raw_cls[j] += p[i, j]  for j != y          (a column sum over the batch)
    raw_pair[j, y] += |p[i, j] - [j == y]|     (with pairwise tracking)

The kernels:

- :func:`gala_ce_rows_kernel`: rows that fit on chip (``C <= MAX_SINGLE_BLOCK_C``). A persistent
  program walks tiles of ``ROWS_PER_TILE`` rows, each tile loaded once: the logits are read once
  and the gradient written once. The bias (and the class weights) are loaded once per program,
  ``raw_cls`` is kept in registers over all the program's rows and flushed with one atomic per
  column per program.
- :func:`gala_ce_partials_kernel` then :func:`gala_ce_columns_kernel`: longer rows, on a
  ``(column slices, row groups)`` grid. The first pass reads each slice of each row once and
  writes its partial ``(max, sum of exp without the target, smoothing sum)``; the second combines
  a row's partials into ``lse`` and reads the slice again to write ``p`` and the gradient. A
  program keeps its slice's bias and ``raw_cls`` in registers over all its rows: the logits are
  read twice, the gradient written once, and ``raw_cls`` costs one atomic per column per row group.
- :func:`gala_count_rows_kernel`: ``N`` and ``W`` of a large batch (the rows kernel counts them
  itself when ``B <= COUNT_IN_KERNEL_MAX_ROWS``).
- :func:`gala_fold_kernel`: the fold of sums left in the scratch (distributed, pairwise).
- :func:`scale_grad_kernel`: the backward, ``grad *= grad_output`` unless it is 1.

Every launch ends the same way (:func:`finish_launch`): the last program to take a ticket
writes the reduced loss, the counts or the bad-label record, and, for a training step, folds the
step's sums into the state and leaves the scratch zeroed. No value ever goes back to the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import label_errors, state

# Slots of the (8,) float32 slot vector after the raw sums (gala_kernels/state.py)
SLOT_ROWS = tl.constexpr(state.SCRATCH_ROWS)  # non-ignored rows of the step (all its calls)
SLOT_NONFINITE = tl.constexpr(state.SCRATCH_NONFINITE)  # ... holding a non-finite logit
SLOT_BAD_LABELS = tl.constexpr(state.SCRATCH_BAD_LABELS)  # ... with a label outside [0, C)
SLOT_LOSS = tl.constexpr(state.SCRATCH_LOSS)  # per launch: sum of the row losses
SLOT_TICKET = tl.constexpr(state.SCRATCH_TICKET)  # per launch: programs finished
SLOT_CALL_ROWS = tl.constexpr(state.SCRATCH_CALL_ROWS)  # per launch: N of this call (counted first)
SLOT_CALL_WEIGHT = tl.constexpr(state.SCRATCH_CALL_WEIGHT)  # per launch: W of this call
SLOT_FOLD_TICKET = tl.constexpr(state.SCRATCH_FOLD_TICKET)  # gala_fold_kernel's programs finished
# label_error (gala_kernels/label_errors.py)
ERR_FLAG = tl.constexpr(label_errors.FLAG)
ERR_ROW = tl.constexpr(label_errors.ROW)
ERR_LABEL = tl.constexpr(label_errors.LABEL)
ERR_STEP = tl.constexpr(label_errors.STEP)
ERR_IGNORE_INDEX = tl.constexpr(label_errors.IGNORE_INDEX)
ERR_CALL_KEY = tl.constexpr(label_errors.CALL_KEY)
ROW_KEY_BASE = tl.constexpr(label_errors.ROW_KEY_BASE)
# BIAS_MODE: 0 no bias, 1 a given class bias, 2 lambda1 * log(pos_grad + eps) from the state
# ACCUMULATION: 0 "cumulative", 1 "sum", 2 "ema" (gala_kernels/state.py ACCUMULATIONS)


# ------------------------------------------------------------------------------------------------
# helpers: math dtype, bias, labels, row counts
# ------------------------------------------------------------------------------------------------
@triton.jit
def to_math(x, COMPUTE_FP64: tl.constexpr):
    """fp32 math whatever the input dtype; fp64 for fp64 logits (the interpreter, gradcheck)."""
    if COMPUTE_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def load_bias(bias_ptr, cols, col_in, lambda1, eps, BIAS_MODE: tl.constexpr, COMPUTE_FP64: tl.constexpr):
    """``bias[cols]``: 0, a given class bias, or ``lambda1 * log(pos_grad + eps)`` from the state."""
    if BIAS_MODE == 2:
        pos_grad = to_math(tl.load(bias_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)
        return lambda1 * tl.log(pos_grad + eps)
    elif BIAS_MODE == 1:
        return to_math(tl.load(bias_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)
    else:
        return to_math(tl.zeros(cols.shape, tl.float32), COMPUTE_FP64)


@triton.jit
def classify_rows(labels_ptr, rows, row_in, C, ignore_index):
    """``(valid, label_ok, bad, target)``: non-ignored rows, those with a label in ``[0, C)``, those
    with a label outside it (never used as an index), and the label to index with (0 if not ok)."""
    labels = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index)
    valid = row_in & (labels != ignore_index)
    label_ok = valid & (labels >= 0) & (labels < C)
    bad = valid & ~label_ok
    target = tl.where(label_ok, labels, 0)
    return valid, label_ok, bad, target


@triton.jit
def label_weights(weight_ptr, target, label_ok, HAS_WEIGHT: tl.constexpr, COMPUTE_FP64: tl.constexpr):
    """``wt[y_i]`` of rows with a label in range (0 elsewhere; 1 without class weights)."""
    if HAS_WEIGHT:
        w = to_math(tl.load(weight_ptr + target, mask=label_ok, other=0.0), COMPUTE_FP64)
    else:
        w = to_math(tl.full(target.shape, 1.0, tl.float32), COMPUTE_FP64)
    return tl.where(label_ok, w, 0.0)


@triton.jit
def count_rows(
    labels_ptr,
    weight_ptr,
    B,
    C,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    LABEL_BLOCK: tl.constexpr,
):
    """``(N, W)`` of the whole batch: non-ignored rows, and the sum of their label weights."""
    n_valid = tl.zeros((), dtype=tl.int64)
    total_weight = to_math(tl.zeros((), dtype=tl.float32), COMPUTE_FP64)
    for start in range(0, B, LABEL_BLOCK):
        rows = start + tl.arange(0, LABEL_BLOCK)
        valid, label_ok, _bad, target = classify_rows(labels_ptr, rows, rows < B, C, ignore_index)
        n_valid += tl.sum(valid.to(tl.int64), axis=0)
        total_weight += tl.sum(label_weights(weight_ptr, target, label_ok, HAS_WEIGHT, COMPUTE_FP64), axis=0)
    return n_valid, total_weight


@triton.jit
def float64_scalars(fp64_scalars_ptr, lambda1, eps, label_smoothing, COMPUTE_FP64: tl.constexpr):
    """``(lambda1, eps, label_smoothing)`` in the math dtype: Python floats reach a kernel as fp32, so
    float64 math takes them from a float64 tensor ``[lambda1, eps, label_smoothing]``."""
    if COMPUTE_FP64:
        return tl.load(fp64_scalars_ptr + 0), tl.load(fp64_scalars_ptr + 1), tl.load(fp64_scalars_ptr + 2)
    else:
        return lambda1, eps, label_smoothing


@triton.jit
def row_scale(n_valid, total_weight, REDUCTION: tl.constexpr, COMPUTE_FP64: tl.constexpr):
    """``r``: 1/W for "mean" (NaN when W = 0 with rows to weight, as torch), 1 otherwise."""
    one = to_math(tl.full((), 1.0, tl.float32), COMPUTE_FP64)
    if REDUCTION == 1:
        return tl.where(total_weight > 0, one / total_weight, tl.where(n_valid > 0, float("nan"), 0.0))
    else:
        return one


# ------------------------------------------------------------------------------------------------
# helpers: loss and gradient of rows whose lse is known
# ------------------------------------------------------------------------------------------------
@triton.jit
def row_loss(lse, a_target, smooth_sum, label_weight, label_smoothing, C, HAS_SMOOTHING: tl.constexpr):
    """``loss_i = (1 - ls) * wt[y] * (lse - a_y) + (ls / C) * sum_j wt[j] * (lse - a_j)``."""
    loss = label_weight * (lse - a_target)
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / C) * smooth_sum
    return loss


@triton.jit
def grad_tile(
    p,
    is_target,
    sum_other,
    col_weight,
    label_weight,
    weight_total,
    scale,
    label_smoothing,
    C,
    HAS_SMOOTHING: tl.constexpr,
):
    """``r * ((1 - ls) * wt[y] * (p - onehot) + (ls / C) * (sum_k wt[k] * p - wt[j]))``; the target
    column's ``p - 1`` is ``-sum_{j != y} p`` (no cancellation)."""
    p_minus_onehot = tl.where(is_target, -sum_other[:, None], p)
    if HAS_SMOOTHING:
        g = (1.0 - label_smoothing) * label_weight[:, None] * p_minus_onehot
        g += (label_smoothing / C) * (weight_total * p - col_weight[None, :])
    else:
        g = label_weight[:, None] * p_minus_onehot
    return g * scale[:, None]


@triton.jit
def store_grad_tile(grad_row_ptrs, cols, g, mask, valid, bad, used):
    """Ignored and bad-label rows get 0, rows holding a non-finite logit NaN."""
    g = tl.where((valid & ~bad & ~used)[:, None], float("nan"), g)
    g = tl.where((valid & ~bad)[:, None], g, 0.0)
    tl.store(grad_row_ptrs[:, None] + cols[None, :], g.to(grad_row_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def add_pairwise(pairwise_ptr, cols, target, p, is_target, sum_other, mask, used, C):
    """``raw_pair[j, y] += |p[j] - [j == y]|`` (the target column: ``sum_{j != y} p``)."""
    value = tl.where(is_target, sum_other[:, None], p).to(tl.float32)
    ptrs = pairwise_ptr + cols[None, :].to(tl.int64) * C + target[:, None]
    tl.atomic_add(ptrs, value, mask=mask & used[:, None])


@triton.jit
def record_bad_rows(label_error_ptr, rows, bad):
    """``CALL_KEY = max(CALL_KEY, ROW_KEY_BASE - row)`` over the bad rows: the first one wins."""
    key = tl.max(tl.where(bad, ROW_KEY_BASE - rows, 0), axis=0)
    if key > 0:
        tl.atomic_max(label_error_ptr + ERR_CALL_KEY, key)


# ------------------------------------------------------------------------------------------------
# the end of every launch: the last program reduces, records, folds
# ------------------------------------------------------------------------------------------------
@triton.jit
def fold_state(
    raw_ptr,
    C,
    s,
    pos_ptr,
    neg_ptr,
    cls_ptr,
    run_pos_ptr,
    run_neg_ptr,
    run_cls_ptr,
    ema_beta,
    ACCUMULATION: tl.constexpr,
    FOLD_BLOCK: tl.constexpr,
):
    """``d = s * raw``; "cumulative": ``R += d; state += R``; "sum": ``state += d``; "ema":
    ``state = beta * state + (1 - beta) * d``, in float32 as the reference fold. The raw sums are
    zeroed on the way."""
    for start in range(0, 3 * C, FOLD_BLOCK):
        k = start + tl.arange(0, FOLD_BLOCK)
        inside = k < 3 * C
        which = k // C  # 0 pos_grad, 1 neg_grad, 2 cls_neg_grad
        j = k - which * C
        d = tl.load(raw_ptr + k, mask=inside, other=0.0, cache_modifier=".cg") * s
        state_ptrs = tl.where(which == 0, pos_ptr + j, tl.where(which == 1, neg_ptr + j, cls_ptr + j))
        state = tl.load(state_ptrs, mask=inside, other=0.0)
        if ACCUMULATION == 0:
            run_ptrs = tl.where(
                which == 0, run_pos_ptr + j, tl.where(which == 1, run_neg_ptr + j, run_cls_ptr + j)
            )
            running = tl.load(run_ptrs, mask=inside, other=0.0) + d
            tl.store(run_ptrs, running, mask=inside)
            state = state + running
        elif ACCUMULATION == 1:
            state = state + d
        else:
            state = state * ema_beta + d * (1.0 - ema_beta)
        tl.store(state_ptrs, state, mask=inside)
        tl.store(raw_ptr + k, tl.zeros((FOLD_BLOCK,), tl.float32), mask=inside)


@triton.jit
def zero_raw(raw_ptr, C, FOLD_BLOCK: tl.constexpr):
    for start in range(0, 3 * C, FOLD_BLOCK):
        k = start + tl.arange(0, FOLD_BLOCK)
        tl.store(raw_ptr + k, tl.zeros((FOLD_BLOCK,), tl.float32), mask=k < 3 * C)


@triton.jit
def finish_launch(
    loss_ptr,
    loss_acc_ptr,
    raw_ptr,
    slots_ptr,
    counts_ptr,
    label_error_ptr,
    labels_ptr,
    pos_ptr,
    neg_ptr,
    cls_ptr,
    run_pos_ptr,
    run_neg_ptr,
    run_cls_ptr,
    steps_ptr,
    nonfinite_ptr,
    C,
    ignore_index,
    row_offset,
    total_weight,
    ema_beta,
    REDUCTION: tl.constexpr,
    WRITE_COUNTS: tl.constexpr,
    RECORD_BAD_LABELS: tl.constexpr,
    FOLD: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,
    ACCUMULATION: tl.constexpr,
    FOLD_BLOCK: tl.constexpr,
):
    """Take a ticket; the last program of the launch: the reduced loss, the counts (``fused_ce_fwd``)
    or the bad-label record, the fold (a training step), and the per-launch slots zeroed."""
    # acq_rel: every partial sum this program added is visible to the program with the last ticket
    ticket = tl.atomic_add(slots_ptr + SLOT_TICKET, 1.0)
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        if REDUCTION != 0:
            total = tl.atomic_add(loss_acc_ptr, 0.0)  # read through L2, after every program's add
            if REDUCTION == 1:
                total = total / total_weight  # W = 0: 0/0 = NaN, as F.cross_entropy
            tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))
        n_rows = tl.atomic_add(slots_ptr + SLOT_ROWS, 0.0)
        nonfinite_rows = tl.atomic_add(slots_ptr + SLOT_NONFINITE, 0.0)
        bad_rows = tl.atomic_add(slots_ptr + SLOT_BAD_LABELS, 0.0)
        if WRITE_COUNTS:
            tl.store(counts_ptr + 0, n_rows.to(tl.int64))
            tl.store(counts_ptr + 1, nonfinite_rows.to(tl.int64))
        if RECORD_BAD_LABELS:
            key = tl.atomic_xchg(label_error_ptr + ERR_CALL_KEY, 0)
            if key > 0:
                if tl.load(label_error_ptr + ERR_FLAG) == 0:
                    row = ROW_KEY_BASE - key
                    tl.store(label_error_ptr + ERR_ROW, row_offset + row)
                    tl.store(label_error_ptr + ERR_LABEL, tl.load(labels_ptr + row))
                    tl.store(label_error_ptr + ERR_STEP, tl.load(steps_ptr))
                    tl.store(label_error_ptr + ERR_IGNORE_INDEX, ignore_index)
                    tl.store(label_error_ptr + ERR_FLAG, 1)
        if FOLD:
            if COMPUTE_STATS:
                if bad_rows == 0:
                    s = (1.0 / tl.maximum(n_rows, 1.0).to(tl.float64)).to(tl.float32)  # s = 1/N
                    fold_state(
                        raw_ptr,
                        C,
                        s,
                        pos_ptr,
                        neg_ptr,
                        cls_ptr,
                        run_pos_ptr,
                        run_neg_ptr,
                        run_cls_ptr,
                        ema_beta,
                        ACCUMULATION,
                        FOLD_BLOCK,
                    )
                    tl.store(steps_ptr, tl.load(steps_ptr) + 1)
                    tl.store(nonfinite_ptr, tl.load(nonfinite_ptr) + nonfinite_rows.to(tl.int64))
                else:  # a bad label: the state stays as it was, the sums are dropped
                    zero_raw(raw_ptr, C, FOLD_BLOCK)
            tl.store(slots_ptr + SLOT_ROWS, 0.0)
            tl.store(slots_ptr + SLOT_NONFINITE, 0.0)
            tl.store(slots_ptr + SLOT_BAD_LABELS, 0.0)
        tl.store(loss_acc_ptr, tl.zeros((), loss_acc_ptr.dtype.element_ty))
        tl.store(slots_ptr + SLOT_CALL_ROWS, 0.0)
        tl.store(slots_ptr + SLOT_CALL_WEIGHT, 0.0)
        tl.store(slots_ptr + SLOT_TICKET, 0.0)  # the ticket last


@triton.jit
def add_launch_counts(
    slots_ptr, loss_acc_ptr, loss_sum, n_rows, nonfinite_rows, bad_rows, REDUCTION: tl.constexpr
):
    """One atomic per count per program: the loss sum and the step's row counts."""
    if REDUCTION != 0:
        tl.atomic_add(loss_acc_ptr, loss_sum.to(loss_acc_ptr.dtype.element_ty))
    tl.atomic_add(slots_ptr + SLOT_ROWS, n_rows.to(tl.float32))
    tl.atomic_add(slots_ptr + SLOT_NONFINITE, nonfinite_rows.to(tl.float32))
    tl.atomic_add(slots_ptr + SLOT_BAD_LABELS, bad_rows.to(tl.float32))


# ------------------------------------------------------------------------------------------------
# kernel 1: rows that fit on chip
# ------------------------------------------------------------------------------------------------
# B, C and the scalars vary from call to call and gain nothing from specialization (fewer compiled
# variants); the strides keep it (16-divisible strides allow vector loads).
@triton.jit(
    do_not_specialize=[
        "B",
        "C",
        "ignore_index",
        "lambda1",
        "eps",
        "label_smoothing",
        "ema_beta",
        "row_offset",
    ]
)
def gala_ce_rows_kernel(
    # data ptrs
    logits_ptr,  # (B, C) fp32/bf16/fp16/fp64, unit column stride, row stride logits_row_stride
    labels_ptr,  # (B,) int64
    bias_ptr,  # (C,): the class bias (math dtype) or pos_grad (float32), by BIAS_MODE
    weight_ptr,  # (C,) class weights in the math dtype; unused unless HAS_WEIGHT
    grad_ptr,  # (B, C) logits dtype, row stride grad_row_stride (may be logits_ptr: in place)
    loss_ptr,  # (B,) for REDUCTION none, () otherwise; logits dtype
    raw_ptr,  # (3, C) float32 raw sums [pos, neg, cls]; unused unless COMPUTE_STATS
    slots_ptr,  # (8,) float32 slots, zero except the step's counts (see gala_kernels/state.py)
    loss_acc_ptr,  # () the loss sum of the launch, zero before and after: SLOT_LOSS, or fp64 for fp64
    pairwise_ptr,  # (C, C) float32 raw pairwise sums; unused unless TRACK_PAIRWISE
    counts_ptr,  # (2,) int64 out [N, non-finite rows]; unused unless WRITE_COUNTS
    label_error_ptr,  # (6,) int64 bad-label record; unused unless RECORD_BAD_LABELS
    fp64_scalars_ptr,  # (3,) float64 [lambda1, eps, label_smoothing]; read only when COMPUTE_FP64
    # the state, folded by the last program when FOLD
    pos_ptr,
    neg_ptr,
    cls_ptr,
    run_pos_ptr,
    run_neg_ptr,
    run_cls_ptr,
    steps_ptr,
    nonfinite_ptr,
    # shapes and strides
    B,
    C,
    logits_row_stride,
    grad_row_stride,
    # constants
    ignore_index,
    lambda1,
    eps,
    label_smoothing,
    ema_beta,
    row_offset,
    # compile-time switches
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    BIAS_MODE: tl.constexpr,  # 0 none, 1 given, 2 lambda1 * log(pos_grad + eps)
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,
    TRACK_PAIRWISE: tl.constexpr,
    WRITE_COUNTS: tl.constexpr,
    RECORD_BAD_LABELS: tl.constexpr,
    FOLD: tl.constexpr,
    ACCUMULATION: tl.constexpr,
    COUNT_IN_KERNEL: tl.constexpr,  # else N and W come from the slots (gala_count_rows_kernel)
    COMPUTE_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_PER_TILE: tl.constexpr,
    LABEL_BLOCK: tl.constexpr,
    FOLD_BLOCK: tl.constexpr,
):
    """Loss, gradient and raw statistics of the row tiles of one program (``C <= BLOCK_C``)."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(B, ROWS_PER_TILE)
    lambda1, eps, label_smoothing = float64_scalars(
        fp64_scalars_ptr, lambda1, eps, label_smoothing, COMPUTE_FP64
    )

    # ---- step 0: N, W and the row scale r; this program's bias and weights, once ----
    if COUNT_IN_KERNEL:
        n_valid, total_weight = count_rows(
            labels_ptr, weight_ptr, B, C, ignore_index, HAS_WEIGHT, COMPUTE_FP64, LABEL_BLOCK
        )
    else:
        n_valid = tl.load(slots_ptr + SLOT_CALL_ROWS)
        total_weight = to_math(tl.load(slots_ptr + SLOT_CALL_WEIGHT), COMPUTE_FP64)
    scale = row_scale(n_valid, total_weight, REDUCTION, COMPUTE_FP64)
    cols = tl.arange(0, BLOCK_C)
    col_in = cols < C
    bias = load_bias(bias_ptr, cols, col_in, lambda1, eps, BIAS_MODE, COMPUTE_FP64)
    col_weight = to_math(tl.zeros((BLOCK_C,), tl.float32), COMPUTE_FP64)
    weight_total = to_math(tl.zeros((), tl.float32), COMPUTE_FP64) + C
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            col_weight = to_math(tl.load(weight_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)
            weight_total = tl.sum(col_weight, axis=0)
        else:
            col_weight = tl.where(col_in, 1.0, 0.0).to(col_weight.dtype)

    row_idx = tl.arange(0, ROWS_PER_TILE).to(tl.int64)
    loss_sum = to_math(tl.zeros((), dtype=tl.float32), COMPUTE_FP64)
    n_rows = tl.zeros((), dtype=tl.int32)
    nonfinite_rows = tl.zeros((), dtype=tl.int32)
    bad_rows = tl.zeros((), dtype=tl.int32)
    cls_neg_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)  # raw_cls of all this program's rows

    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rows = tile * ROWS_PER_TILE + row_idx  # int64: B * C may exceed 2^31
        row_in = rows < B
        valid, label_ok, bad, target = classify_rows(labels_ptr, rows, row_in, C, ignore_index)

        # ---- step 1: the tile, once: a = z + bias, non-finite check, softmax ----
        mask = row_in[:, None] & col_in[None, :]
        z = to_math(
            tl.load(
                logits_ptr + rows[:, None] * logits_row_stride + cols[None, :], mask=mask, other=float("-inf")
            ),
            COMPUTE_FP64,
        )
        finite = row_in & (tl.sum((mask & ~(tl.abs(z) < float("inf"))).to(tl.int32), axis=1) == 0)
        a = z + bias[None, :]
        row_max = tl.where(finite, tl.max(a, axis=1), 0.0)  # m = max_j a[i, j]
        e = tl.exp(a - row_max[:, None])  # masked columns: exp(-inf) = 0
        row_sum = tl.where(finite, tl.sum(e, axis=1), 1.0)  # sum_j exp(a - m)
        lse = row_max + tl.log(row_sum)
        p = e / row_sum[:, None]
        is_target = cols[None, :] == target[:, None]
        used = label_ok & finite  # rows that yield a gradient and statistics
        p_off = tl.where(mask & ~is_target & used[:, None], p, 0.0)
        sum_other = tl.sum(p_off, axis=1)  # sum_{j != y} p[i, j]
        a_target = tl.sum(tl.where(is_target & mask, a, 0.0), axis=1)

        # ---- step 2: loss (NaN for non-finite and bad-label rows, 0 for ignored ones) ----
        label_weight = label_weights(weight_ptr, target, label_ok, HAS_WEIGHT, COMPUTE_FP64)
        smooth_sum = lse * 0.0
        if HAS_SMOOTHING:  # sum_j wt[j] * (lse - a_j) = sum_j wt[j] * (m - a_j) + (lse - m) * sum_j wt[j]
            smooth_sum = tl.sum(tl.where(mask, (row_max[:, None] - a) * col_weight[None, :], 0.0), axis=1)
            smooth_sum += (lse - row_max) * weight_total
        loss_row = row_loss(lse, a_target, smooth_sum, label_weight, label_smoothing, C, HAS_SMOOTHING)
        loss_row = tl.where(used, loss_row, float("nan"))
        loss_row = tl.where(valid, loss_row, 0.0)
        if REDUCTION == 0:
            tl.store(loss_ptr + rows, loss_row.to(loss_ptr.dtype.element_ty), mask=row_in)
        else:
            loss_sum += tl.sum(tl.where(row_in, loss_row, 0.0), axis=0)

        # ---- step 3: gradient ----
        g = grad_tile(
            p,
            is_target,
            sum_other,
            col_weight,
            label_weight,
            weight_total,
            tl.zeros_like(label_weight) + scale,
            label_smoothing,
            C,
            HAS_SMOOTHING,
        )
        store_grad_tile(grad_ptr + rows * grad_row_stride, cols, g, mask, valid, bad, used)

        # ---- step 4: statistics of the finite rows with a label in range ----
        if COMPUTE_STATS:
            tl.atomic_add(raw_ptr + target, sum_other.to(tl.float32), mask=used)
            tl.atomic_add(raw_ptr + C + target, sum_other.to(tl.float32), mask=used)
            cls_neg_acc += tl.sum(p_off, axis=0).to(tl.float32)
            if TRACK_PAIRWISE:
                add_pairwise(pairwise_ptr, cols, target, p, is_target, sum_other, mask, used, C)
        n_rows += tl.sum(valid.to(tl.int32), axis=0)
        nonfinite_rows += tl.sum((valid & ~bad & ~finite).to(tl.int32), axis=0)
        bad_rows += tl.sum(bad.to(tl.int32), axis=0)
        if RECORD_BAD_LABELS:
            record_bad_rows(label_error_ptr, rows, bad)

    # ---- step 5: this program's sums out; the last program finishes the launch ----
    if COMPUTE_STATS:
        tl.atomic_add(raw_ptr + 2 * C + cols, cls_neg_acc, mask=col_in)
    add_launch_counts(slots_ptr, loss_acc_ptr, loss_sum, n_rows, nonfinite_rows, bad_rows, REDUCTION)
    finish_launch(
        loss_ptr,
        loss_acc_ptr,
        raw_ptr,
        slots_ptr,
        counts_ptr,
        label_error_ptr,
        labels_ptr,
        pos_ptr,
        neg_ptr,
        cls_ptr,
        run_pos_ptr,
        run_neg_ptr,
        run_cls_ptr,
        steps_ptr,
        nonfinite_ptr,
        C,
        ignore_index,
        row_offset,
        total_weight,
        ema_beta,
        REDUCTION,
        WRITE_COUNTS,
        RECORD_BAD_LABELS,
        FOLD,
        COMPUTE_STATS,
        ACCUMULATION,
        FOLD_BLOCK,
    )


# ------------------------------------------------------------------------------------------------
# kernels 2 and 3: rows longer than on-chip memory, on a (column slices, row groups) grid
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["B", "C", "ignore_index", "lambda1", "eps"])
def gala_ce_partials_kernel(
    # data ptrs
    logits_ptr,
    labels_ptr,
    bias_ptr,
    weight_ptr,
    partials_ptr,  # (3 * S + 1, B) math dtype out, see PARTIAL_* below
    slice_weight_ptr,  # (S,) math dtype out: sum of wt[j] over each slice (HAS_SMOOTHING)
    slots_ptr,  # the call's N and W are added into SLOT_CALL_ROWS / SLOT_CALL_WEIGHT
    fp64_scalars_ptr,  # (3,) float64 [lambda1, eps, label_smoothing]; read only when COMPUTE_FP64
    # shapes and strides
    B,
    C,
    logits_row_stride,
    # constants
    ignore_index,
    lambda1,
    eps,
    # compile-time switches
    BIAS_MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_PER_TILE: tl.constexpr,
):
    """First pass: each program reads its column slice of its row group's rows once.

    Per row i and slice s (rows of the partials buffer ``[s]``, ``[S + s]``, ``[2S + s]``)::

        m_s = max_{j in s} a[i, j]
        d_s = sum_{j in s, j != y} exp(a[i, j] - m_s)       NaN marks a row holding a non-finite logit
        q_s = sum_{j in s} wt[j] * (m_s - a[i, j])           (label smoothing only)

    and in row ``[3S]`` the target's adjusted logit ``a[i, y]``, written by the slice holding it
    (read here, before the second pass may overwrite the logits with the gradient).
    """
    s = tl.program_id(0)
    group = tl.program_id(1)
    num_slices = tl.num_programs(0)
    lambda1, eps, _unused = float64_scalars(fp64_scalars_ptr, lambda1, eps, 0.0, COMPUTE_FP64)
    cols = s * BLOCK_C + tl.arange(0, BLOCK_C)
    col_in = cols < C
    bias = load_bias(bias_ptr, cols, col_in, lambda1, eps, BIAS_MODE, COMPUTE_FP64)
    col_weight = tl.where(col_in, 1.0, 0.0).to(bias.dtype)
    if HAS_WEIGHT and HAS_SMOOTHING:
        col_weight = to_math(tl.load(weight_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)
    if HAS_SMOOTHING and group == 0:
        tl.store(slice_weight_ptr + s, tl.sum(col_weight, axis=0))

    row_idx = tl.arange(0, ROWS_PER_TILE).to(tl.int64)
    n_valid = tl.zeros((), dtype=tl.float32)
    total_weight = tl.zeros((), dtype=tl.float32)
    for tile in range(group, tl.cdiv(B, ROWS_PER_TILE), tl.num_programs(1)):
        rows = tile * ROWS_PER_TILE + row_idx
        row_in = rows < B
        valid, label_ok, _bad, target = classify_rows(labels_ptr, rows, row_in, C, ignore_index)
        mask = row_in[:, None] & col_in[None, :]
        z = to_math(
            tl.load(
                logits_ptr + rows[:, None] * logits_row_stride + cols[None, :], mask=mask, other=float("-inf")
            ),
            COMPUTE_FP64,
        )
        nonfinite = tl.sum((mask & ~(tl.abs(z) < float("inf"))).to(tl.int32), axis=1) > 0
        a = z + bias[None, :]
        slice_max = tl.max(a, axis=1)
        shift = tl.where(slice_max == float("-inf"), 0.0, slice_max)
        is_target = cols[None, :] == target[:, None]
        d = tl.sum(tl.where(is_target, 0.0, tl.exp(a - shift[:, None])), axis=1)
        d = tl.where(nonfinite, float("nan"), d)
        out = partials_ptr + s * B + rows
        tl.store(out, slice_max, mask=row_in)
        tl.store(out + num_slices * B, d, mask=row_in)
        if HAS_SMOOTHING:
            q = tl.sum(tl.where(mask, (shift[:, None] - a) * col_weight[None, :], 0.0), axis=1)
            tl.store(out + 2 * num_slices * B, q, mask=row_in)
        holds_target = label_ok & (target >= s * BLOCK_C) & (target < s * BLOCK_C + BLOCK_C)
        a_target = tl.sum(tl.where(is_target & mask, a, 0.0), axis=1)
        tl.store(partials_ptr + 3 * num_slices * B + rows, a_target, mask=holds_target)
        if s == 0:
            n_valid += tl.sum(valid.to(tl.float32), axis=0)
            total_weight += tl.sum(
                label_weights(weight_ptr, target, label_ok, HAS_WEIGHT, COMPUTE_FP64), axis=0
            ).to(tl.float32)
    if s == 0:
        tl.atomic_add(slots_ptr + SLOT_CALL_ROWS, n_valid)
        tl.atomic_add(slots_ptr + SLOT_CALL_WEIGHT, total_weight)


@triton.jit
def combine_partials(
    partials_ptr,
    slice_weight_ptr,
    rows,
    row_in,
    B,
    num_slices,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    SLICE_BLOCK: tl.constexpr,
    ROWS_PER_TILE: tl.constexpr,
):
    """A row's slices combined: ``M = max_s m_s``, ``D = sum_s d_s exp(m_s - M)`` (= sum_{j != y}
    exp(a_j - M)), and for the smoothing sum ``sum_s (q_s + W_s (M - m_s))`` (= sum_j wt[j] (M - a_j),
    every term >= 0: no cancellation)."""
    row_max = to_math(tl.full((ROWS_PER_TILE,), float("-inf"), tl.float32), COMPUTE_FP64)
    for start in range(0, num_slices, SLICE_BLOCK):
        sl = start + tl.arange(0, SLICE_BLOCK)
        inside = (sl < num_slices)[:, None] & row_in[None, :]
        m = tl.load(partials_ptr + sl[:, None] * B + rows[None, :], mask=inside, other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(m, axis=0))
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    d_total = tl.zeros_like(row_max)
    smooth_total = tl.zeros_like(row_max)
    for start in range(0, num_slices, SLICE_BLOCK):
        sl = start + tl.arange(0, SLICE_BLOCK)
        inside = (sl < num_slices)[:, None] & row_in[None, :]
        ptrs = partials_ptr + sl[:, None] * B + rows[None, :]
        m = tl.load(ptrs, mask=inside, other=float("-inf"))
        d = tl.load(ptrs + num_slices * B, mask=inside, other=0.0)
        rescale = tl.where(m == float("-inf"), 0.0, tl.exp(m - shift[None, :]))
        d_total += tl.sum(tl.where(d == 0.0, 0.0, d * rescale), axis=0)  # NaN (non-finite) propagates
        if HAS_SMOOTHING:
            q = tl.load(ptrs + 2 * num_slices * B, mask=inside, other=0.0)
            slice_weight = tl.load(slice_weight_ptr + sl, mask=sl < num_slices, other=0.0)
            smooth_total += tl.sum(
                tl.where(inside, q + slice_weight[:, None] * (shift[None, :] - m), 0.0), axis=0
            )
    return shift, d_total, smooth_total


@triton.jit(
    do_not_specialize=[
        "B",
        "C",
        "ignore_index",
        "lambda1",
        "eps",
        "label_smoothing",
        "ema_beta",
        "row_offset",
    ]
)
def gala_ce_columns_kernel(
    # data ptrs
    logits_ptr,
    labels_ptr,
    bias_ptr,
    weight_ptr,
    grad_ptr,
    loss_ptr,
    partials_ptr,
    slice_weight_ptr,  # from gala_ce_partials_kernel
    raw_ptr,
    slots_ptr,
    loss_acc_ptr,
    pairwise_ptr,
    counts_ptr,
    label_error_ptr,
    fp64_scalars_ptr,
    pos_ptr,
    neg_ptr,
    cls_ptr,
    run_pos_ptr,
    run_neg_ptr,
    run_cls_ptr,
    steps_ptr,
    nonfinite_ptr,
    # shapes and strides
    B,
    C,
    logits_row_stride,
    grad_row_stride,
    # constants
    ignore_index,
    lambda1,
    eps,
    label_smoothing,
    ema_beta,
    row_offset,
    # compile-time switches
    REDUCTION: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,
    TRACK_PAIRWISE: tl.constexpr,
    WRITE_COUNTS: tl.constexpr,
    RECORD_BAD_LABELS: tl.constexpr,
    FOLD: tl.constexpr,
    ACCUMULATION: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS_PER_TILE: tl.constexpr,
    SLICE_BLOCK: tl.constexpr,
    FOLD_BLOCK: tl.constexpr,
):
    """Second pass: ``lse`` from the partials, then the slice read again: ``p``, gradient, statistics.

    The program of slice 0 also owns each row's scalars: its loss, ``raw_pos[y]``, ``raw_neg[y]``,
    the counts and the bad-label record.
    """
    s = tl.program_id(0)
    group = tl.program_id(1)
    num_slices = tl.num_programs(0)
    lambda1, eps, label_smoothing = float64_scalars(
        fp64_scalars_ptr, lambda1, eps, label_smoothing, COMPUTE_FP64
    )
    n_valid = tl.load(slots_ptr + SLOT_CALL_ROWS)
    total_weight = to_math(tl.load(slots_ptr + SLOT_CALL_WEIGHT), COMPUTE_FP64)
    scale = row_scale(n_valid, total_weight, REDUCTION, COMPUTE_FP64)
    cols = s * BLOCK_C + tl.arange(0, BLOCK_C)
    col_in = cols < C
    bias = load_bias(bias_ptr, cols, col_in, lambda1, eps, BIAS_MODE, COMPUTE_FP64)
    col_weight = tl.zeros_like(bias)
    weight_total = to_math(tl.zeros((), tl.float32), COMPUTE_FP64) + C
    if HAS_SMOOTHING:
        col_weight = tl.where(col_in, 1.0, 0.0).to(bias.dtype)
        if HAS_WEIGHT:
            col_weight = to_math(tl.load(weight_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)
            weight_total = to_math(tl.zeros((), tl.float32), COMPUTE_FP64)
            for start in range(0, num_slices, SLICE_BLOCK):
                sl = start + tl.arange(0, SLICE_BLOCK)
                weight_total += tl.sum(
                    tl.load(slice_weight_ptr + sl, mask=sl < num_slices, other=0.0), axis=0
                )

    row_idx = tl.arange(0, ROWS_PER_TILE).to(tl.int64)
    loss_sum = to_math(tl.zeros((), dtype=tl.float32), COMPUTE_FP64)
    n_rows = tl.zeros((), dtype=tl.int32)
    nonfinite_rows = tl.zeros((), dtype=tl.int32)
    bad_rows = tl.zeros((), dtype=tl.int32)
    cls_neg_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(group, tl.cdiv(B, ROWS_PER_TILE), tl.num_programs(1)):
        rows = tile * ROWS_PER_TILE + row_idx
        row_in = rows < B
        valid, label_ok, bad, target = classify_rows(labels_ptr, rows, row_in, C, ignore_index)

        # ---- step 1: lse from the partials: lse = M + log(D + exp(a_y - M)) ----
        row_max, d_total, smooth_total = combine_partials(
            partials_ptr,
            slice_weight_ptr,
            rows,
            row_in,
            B,
            num_slices,
            HAS_SMOOTHING,
            COMPUTE_FP64,
            SLICE_BLOCK,
            ROWS_PER_TILE,
        )
        finite = row_in & (d_total == d_total)  # NaN: some slice held a non-finite logit
        a_target = tl.load(partials_ptr + 3 * num_slices * B + rows, mask=label_ok & finite, other=0.0)
        shift = tl.where(finite, row_max, 0.0)
        e_target = tl.where(label_ok & finite, tl.exp(a_target - shift), 0.0)
        total = tl.where(finite, d_total + e_target, 1.0)
        lse = shift + tl.log(total)
        sum_other = tl.where(finite, d_total / total, 0.0)  # sum_{j != y} p[i, j]
        used = label_ok & finite

        # ---- step 2: the slice again: p, gradient, raw_cls ----
        mask = row_in[:, None] & col_in[None, :]
        z = to_math(
            tl.load(
                logits_ptr + rows[:, None] * logits_row_stride + cols[None, :], mask=mask, other=float("-inf")
            ),
            COMPUTE_FP64,
        )
        p = tl.where(mask & finite[:, None], tl.exp(z + bias[None, :] - lse[:, None]), 0.0)
        is_target = cols[None, :] == target[:, None]
        label_weight = label_weights(weight_ptr, target, label_ok, HAS_WEIGHT, COMPUTE_FP64)
        g = grad_tile(
            p,
            is_target,
            sum_other,
            col_weight,
            label_weight,
            weight_total,
            tl.zeros_like(label_weight) + scale,
            label_smoothing,
            C,
            HAS_SMOOTHING,
        )
        store_grad_tile(grad_ptr + rows * grad_row_stride, cols, g, mask, valid, bad, used)
        if COMPUTE_STATS:
            p_off = tl.where(mask & ~is_target & used[:, None], p, 0.0)
            cls_neg_acc += tl.sum(p_off, axis=0).to(tl.float32)
            if TRACK_PAIRWISE:
                add_pairwise(pairwise_ptr, cols, target, p, is_target, sum_other, mask, used, C)

        # ---- step 3 (slice 0): the row's loss, raw_pos / raw_neg, counts ----
        if s == 0:
            smooth_sum = smooth_total + (lse - shift) * weight_total  # sum_j wt[j] * (lse - a_j)
            loss_row = row_loss(lse, a_target, smooth_sum, label_weight, label_smoothing, C, HAS_SMOOTHING)
            loss_row = tl.where(used, loss_row, float("nan"))
            loss_row = tl.where(valid, loss_row, 0.0)
            if REDUCTION == 0:
                tl.store(loss_ptr + rows, loss_row.to(loss_ptr.dtype.element_ty), mask=row_in)
            else:
                loss_sum += tl.sum(tl.where(row_in, loss_row, 0.0), axis=0)
            if COMPUTE_STATS:
                tl.atomic_add(raw_ptr + target, sum_other.to(tl.float32), mask=used)
                tl.atomic_add(raw_ptr + C + target, sum_other.to(tl.float32), mask=used)
            n_rows += tl.sum(valid.to(tl.int32), axis=0)
            nonfinite_rows += tl.sum((valid & ~bad & ~finite).to(tl.int32), axis=0)
            bad_rows += tl.sum(bad.to(tl.int32), axis=0)
            if RECORD_BAD_LABELS:
                record_bad_rows(label_error_ptr, rows, bad)

    if COMPUTE_STATS:
        tl.atomic_add(raw_ptr + 2 * C + cols, cls_neg_acc, mask=col_in)
    if s == 0:
        add_launch_counts(slots_ptr, loss_acc_ptr, loss_sum, n_rows, nonfinite_rows, bad_rows, REDUCTION)
    finish_launch(
        loss_ptr,
        loss_acc_ptr,
        raw_ptr,
        slots_ptr,
        counts_ptr,
        label_error_ptr,
        labels_ptr,
        pos_ptr,
        neg_ptr,
        cls_ptr,
        run_pos_ptr,
        run_neg_ptr,
        run_cls_ptr,
        steps_ptr,
        nonfinite_ptr,
        C,
        ignore_index,
        row_offset,
        total_weight,
        ema_beta,
        REDUCTION,
        WRITE_COUNTS,
        RECORD_BAD_LABELS,
        FOLD,
        COMPUTE_STATS,
        ACCUMULATION,
        FOLD_BLOCK,
    )


# ------------------------------------------------------------------------------------------------
# small kernels: N and W of a large batch, the fold of a pending step, the backward's scaling
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["B", "C", "ignore_index"])
def gala_count_rows_kernel(
    labels_ptr,
    weight_ptr,
    slots_ptr,
    B,
    C,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    LABEL_BLOCK: tl.constexpr,
):
    """``N`` and ``W`` into SLOT_CALL_ROWS / SLOT_CALL_WEIGHT (zero before), one block per program."""
    rows = tl.program_id(0) * LABEL_BLOCK + tl.arange(0, LABEL_BLOCK)
    valid, label_ok, _bad, target = classify_rows(labels_ptr, rows, rows < B, C, ignore_index)
    tl.atomic_add(slots_ptr + SLOT_CALL_ROWS, tl.sum(valid.to(tl.float32), axis=0))
    weights = label_weights(weight_ptr, target, label_ok, HAS_WEIGHT, COMPUTE_FP64)
    tl.atomic_add(slots_ptr + SLOT_CALL_WEIGHT, tl.sum(weights, axis=0).to(tl.float32))


@triton.jit(do_not_specialize=["C", "ema_beta"])
def gala_fold_kernel(
    raw_ptr,
    slots_ptr,
    raw_pairwise_ptr,
    pos_ptr,
    neg_ptr,
    cls_ptr,
    run_pos_ptr,
    run_neg_ptr,
    run_cls_ptr,
    pairwise_ptr,
    run_pairwise_ptr,
    steps_ptr,
    nonfinite_ptr,
    C,
    ema_beta,
    ACCUMULATION: tl.constexpr,
    TRACK_PAIRWISE: tl.constexpr,
    FOLD_BLOCK: tl.constexpr,
    PAIRWISE_BLOCK: tl.constexpr,
):
    """The fold of sums a step left in the scratch (skipped when a bad label was counted): program 0
    folds the three vectors, every program a share of the pairwise matrix; the last one to finish
    updates the counters and zeroes the count slots."""
    pid = tl.program_id(0)
    n_rows = tl.load(slots_ptr + SLOT_ROWS)
    bad_rows = tl.load(slots_ptr + SLOT_BAD_LABELS)
    s = (1.0 / tl.maximum(n_rows, 1.0).to(tl.float64)).to(tl.float32)  # s = 1/N
    if pid == 0:
        if bad_rows == 0:
            fold_state(
                raw_ptr,
                C,
                s,
                pos_ptr,
                neg_ptr,
                cls_ptr,
                run_pos_ptr,
                run_neg_ptr,
                run_cls_ptr,
                ema_beta,
                ACCUMULATION,
                FOLD_BLOCK,
            )
        else:
            zero_raw(raw_ptr, C, FOLD_BLOCK)
    if TRACK_PAIRWISE:
        for start in range(pid * PAIRWISE_BLOCK, C * C, tl.num_programs(0) * PAIRWISE_BLOCK):
            k = start + tl.arange(0, PAIRWISE_BLOCK).to(tl.int64)
            inside = k < C * C
            if bad_rows == 0:
                d = tl.load(raw_pairwise_ptr + k, mask=inside, other=0.0) * s
                state = tl.load(pairwise_ptr + k, mask=inside, other=0.0)
                if ACCUMULATION == 0:
                    running = tl.load(run_pairwise_ptr + k, mask=inside, other=0.0) + d
                    tl.store(run_pairwise_ptr + k, running, mask=inside)
                    state = state + running
                elif ACCUMULATION == 1:
                    state = state + d
                else:
                    state = state * ema_beta + d * (1.0 - ema_beta)
                tl.store(pairwise_ptr + k, state, mask=inside)
            tl.store(raw_pairwise_ptr + k, tl.zeros((PAIRWISE_BLOCK,), tl.float32), mask=inside)
    ticket = tl.atomic_add(slots_ptr + SLOT_FOLD_TICKET, 1.0)
    if ticket == tl.num_programs(0) - 1:
        if bad_rows == 0:
            tl.store(steps_ptr, tl.load(steps_ptr) + 1)
            tl.store(nonfinite_ptr, tl.load(nonfinite_ptr) + tl.load(slots_ptr + SLOT_NONFINITE).to(tl.int64))
        tl.store(slots_ptr + SLOT_ROWS, 0.0)
        tl.store(slots_ptr + SLOT_NONFINITE, 0.0)
        tl.store(slots_ptr + SLOT_BAD_LABELS, 0.0)
        tl.store(slots_ptr + SLOT_FOLD_TICKET, 0.0)


@triton.jit(do_not_specialize=["n"])
def scale_grad_kernel(grad_ptr, grad_output_ptr, n, COMPUTE_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """``grad *= grad_output``, read on the device: nothing to do (not even a read of ``grad``) when 1."""
    scale = to_math(tl.load(grad_output_ptr), COMPUTE_FP64)
    if scale != 1.0:
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            k = start + tl.arange(0, BLOCK).to(tl.int64)
            inside = k < n
            g = to_math(tl.load(grad_ptr + k, mask=inside, other=0.0), COMPUTE_FP64)
            tl.store(grad_ptr + k, (g * scale).to(grad_ptr.dtype.element_ty), mask=inside)
