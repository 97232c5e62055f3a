"""Triton backend of the fused GALA cross-entropy (``backend="triton"``).

One file, read top to bottom (the Liger layout):

1. ``_gala_ce_fwd_kernel``: the ``@triton.jit`` kernel. One launch per call computes, for every row,
   the adjusted logits, an online softmax / logsumexp in fp32, the loss, the gradient (already
   scaled by ``w_i``) and the raw statistics increments.
2. The block-size / warps rule (:func:`choose_config`), with autotuning opt-in
   (``GALA_TRITON_AUTOTUNE=1``).
3. The launcher :func:`fused_ce_forward` (``inplace_backward=True`` writes the gradient into the
   logits buffer instead of a new ``B x C`` one).
4. The registration: ``gala_triton::fused_ce_fwd``, a ``torch.library.custom_op`` with the schema
   and outputs of ``gala::fused_ce_fwd``, given its fake and autograd by
   :func:`gala_kernels.ops.register_fused_ce`; ``gala_triton::fused_ce_fwd_inplace`` (mutates
   the logits) and :class:`InplaceFusedCE`, the autograd Function around it. The ops are opaque to
   ``torch.compile`` (``fullgraph=True`` traces through their fake implementations), on GPUs and
   under ``TRITON_INTERPRET=1`` alike. Not ``triton_op``: on the H200 with torch 2.11 / Triton
   3.6 (2026-11-27), Inductor's inlined launch of this kernel returned a loss of 0.0 in a compiled
   step that eager and the ``custom_op`` get right (tests/test_triton.py::test_compile_fullgraph_step).

Formulas (shared/SPEC.md; ``a`` adjusted logits, ``p`` softmax of a row, ``V`` non-ignored rows,
``V'`` the finite ones among them)::

    a[i, j]       = z[i, j] + class_bias[j]          class_bias = lambda1 * log(pos_grad + eps)
    loss_i        = logsumexp(a[i, :]) - a[i, y_i]   (0 for ignored rows, NaN for non-finite rows)
    grad[i, j]    = (p[i, j] - [j == y_i]) * w_i     w_i = 1/N "mean", 1 otherwise, 0 if ignored
    raw_pos[y_i] += sum_{j != y_i} p[i, j]           (= 1 - p[i, y_i], without the cancellation)
    raw_neg[y_i] += sum_{j != y_i} p[i, j]
    raw_cls[j]   += p[i, j]  for j != y_i            (a column reduction over the batch)
    raw_pair[j, y_i] += |p[i, j] - [j == y_i]|       (only with track_pairwise)

The ``lambda2`` term is constant along a row and is skipped (softmax is shift-invariant).

Where the work goes (one program = one persistent worker that walks row tiles of
``ROWS_PER_TILE`` rows, ``tile = pid, pid + G, ...``):

- ``C <= MAX_SINGLE_BLOCK_C`` (single block): a tile ``[ROWS_PER_TILE, BLOCK_C]`` is loaded once,
  kept in registers, and everything is computed from it: one read and one write of the logits.
  The column sums ``raw_cls`` of every row the program sees are kept in a ``[BLOCK_C]`` register
  vector and flushed with one atomic per column per *program* at the end, so the column
  reduction costs ``G x C`` atomics (G = grid size, a few per SM) instead of ``B x C``.
- ``C > MAX_SINGLE_BLOCK_C`` (rows too long for on-chip memory): two sweeps over column blocks,
  as Liger does. Sweep 1 keeps a running max ``m`` and sum ``d = sum exp(a - m)`` per row; sweep 2
  re-reads each block, backwards (the blocks sweep 1 read last are the likeliest to be still in
  L2), writes ``p``/grad and accumulates the statistics. Here a column accumulator over the whole
  row would not fit, so each tile's ``ROWS_PER_TILE`` rows are summed in registers before one
  atomic per column: ``B x C / ROWS_PER_TILE`` atomics.

No program ever reads a statistic another program writes: increments go to fresh zeroed scratch
buffers and are folded into the state afterwards, in Python, by ``reference.fold_increments``.

``N`` (rows not ignored) is a device value, never ``.item()``: each program counts it from the
labels when ``B`` is small (``COUNT_IN_KERNEL``), else it is one small torch reduction passed by
pointer. The mean/sum loss and the non-finite row count are reduced with atomics into a small
fp32 workspace (exact counts up to 2^24 rows); the last program to finish (a ticket counter, the
atomics are acq_rel) writes ``loss`` and ``counts``. So a call is one memset of the scratch and one
kernel (plus the small ``N`` reduction for B > COUNT_IN_KERNEL_MAX_ROWS).

float64: the interpreter runs the kernel in float64 (``COMPUTE_FP64``), which is what gradcheck
uses on CPU. On CUDA, float64 falls back to the reference math (``reference.forward_and_grad``)
inside the op: Triton's fp64 transcendental support is not relied upon.

Labels outside ``[0, C)`` that are not ``ignore_index`` are never read out of bounds: such rows get
a NaN loss and gradient and no statistics (``fused_gala_ce`` raises on them before the call in
eager mode).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

try:  # Triton is optional: without it the backend reports itself unavailable
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

from .. import ops, reference
from . import triton_interpret_enabled

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2

# workspace slots (fp32, or fp64 for float64 logits): reduced by atomics, read by the last program
_WS_LOSS, _WS_NONFINITE, _WS_TICKET = 0, 1, 2
_WS_SIZE = 3




# --------------------------------------------------------------------------------------------------
# 1. The kernel
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _to_math(x, COMPUTE_FP64: tl.constexpr):
        if COMPUTE_FP64:
            return x.to(tl.float64)
        else:
            return x.to(tl.float32)

    # B, C and ignore_index vary from call to call and gain nothing from specialization (fewer
    # compiled variants); the strides keep it (16-divisible strides allow vector loads).
    @triton.jit(do_not_specialize=["B", "C", "ignore_index"])
    def _gala_ce_fwd_kernel(
        # data ptrs
        logits_ptr,  # (B, C) fp32/bf16/fp16/fp64, unit column stride, row stride logits_row_stride
        labels_ptr,  # (B,) int64
        class_bias_ptr,  # (C,) fp32 (fp64 for fp64 logits); unused unless HAS_BIAS
        grad_ptr,  # (B, C) logits dtype, row stride grad_row_stride (may be logits_ptr: in place)
        loss_ptr,  # (B,) for REDUCTION none, () otherwise; logits dtype
        raw_stats_ptr,  # (3, C) fp32 zeroed: raw_pos, raw_neg, raw_cls; unused unless COMPUTE_STATS
        raw_pairwise_ptr,  # (C, C) fp32 zeroed; unused unless TRACK_PAIRWISE
        workspace_ptr,  # (3,) zeroed: [loss sum, non-finite rows, ticket]
        counts_ptr,  # (2,) int64 out: [N, non-finite non-ignored rows]
        n_valid_ptr,  # () int64 N; read only when COUNT_IN_KERNEL is false
        # shapes
        B,
        C,
        # strides
        logits_row_stride,
        grad_row_stride,
        # constants
        ignore_index,
        # compile-time switches
        REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
        HAS_BIAS: tl.constexpr,
        COMPUTE_STATS: tl.constexpr,
        TRACK_PAIRWISE: tl.constexpr,
        COUNT_IN_KERNEL: tl.constexpr,
        COMPUTE_FP64: tl.constexpr,
        SINGLE_BLOCK: tl.constexpr,  # C <= BLOCK_C: a tile is loaded once and kept in registers
        BLOCK_C: tl.constexpr,
        ROWS_PER_TILE: tl.constexpr,
        LABEL_BLOCK: tl.constexpr,
    ):
        """Fused GALA forward: loss, gradient and raw statistics for the row tiles of one program."""
        pid = tl.program_id(0)
        num_programs = tl.num_programs(0)
        num_tiles = tl.cdiv(B, ROWS_PER_TILE)

        # ---- step 0: N, the number of non-ignored rows, and the row weight w = 1/N ("mean") ----
        if COUNT_IN_KERNEL:
            n_valid = tl.zeros((), dtype=tl.int64)
            for start in range(0, B, LABEL_BLOCK):
                offs = start + tl.arange(0, LABEL_BLOCK)
                lab = tl.load(labels_ptr + offs, mask=offs < B, other=ignore_index)
                n_valid += tl.sum((lab != ignore_index).to(tl.int64), axis=0)
        else:
            n_valid = tl.load(n_valid_ptr).to(tl.int64)
        one = _to_math(tl.full((), 1.0, tl.float32), COMPUTE_FP64)
        if REDUCTION == 1:
            row_weight = one / _to_math(tl.maximum(n_valid, 1), COMPUTE_FP64)  # w_i = 1/N
        else:
            row_weight = one  # w_i = 1 for "sum" and "none"

        row_idx = tl.arange(0, ROWS_PER_TILE).to(tl.int64)
        col_idx = tl.arange(0, BLOCK_C)
        loss_sum = _to_math(tl.zeros((), dtype=tl.float32), COMPUTE_FP64)
        nonfinite_rows = tl.zeros((), dtype=tl.int32)
        cls_neg_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)  # single block: raw_cls of all my rows

        for tile in range(pid, num_tiles, num_programs):
            rows = tile * ROWS_PER_TILE + row_idx  # int64 (row_idx is): B * C may exceed 2^31
            row_in = rows < B
            labels = tl.load(labels_ptr + rows, mask=row_in, other=ignore_index)
            valid = row_in & (labels != ignore_index)
            label_ok = valid & (labels >= 0) & (labels < C)
            target = tl.where(label_ok, labels, 0)
            logits_row = logits_ptr + rows * logits_row_stride
            grad_row = grad_ptr + rows * grad_row_stride

            # a[i, y_i]: read before any gradient is stored (the gradient may overwrite the logits)
            a_target = _to_math(tl.load(logits_row + target, mask=label_ok, other=0.0), COMPUTE_FP64)
            if HAS_BIAS:
                a_target += _to_math(tl.load(class_bias_ptr + target, mask=label_ok, other=0.0), COMPUTE_FP64)

            if SINGLE_BLOCK:
                # ---- step 1: the tile, once: a = z + bias, non-finite check, softmax ----
                col_in = col_idx < C
                mask = row_in[:, None] & col_in[None, :]
                z = _to_math(
                    tl.load(logits_row[:, None] + col_idx[None, :], mask=mask, other=float("-inf")),
                    COMPUTE_FP64,
                )
                bad = tl.sum((mask & ~(tl.abs(z) < float("inf"))).to(tl.int32), axis=1)  # inf and NaN
                a = z
                if HAS_BIAS:
                    bias = _to_math(tl.load(class_bias_ptr + col_idx, mask=col_in, other=0.0), COMPUTE_FP64)
                    a = a + bias[None, :]
                finite = row_in & (bad == 0)
                row_max = tl.where(finite, tl.max(a, axis=1), 0.0)  # m = max_j a[i, j]
                p = tl.exp(a - row_max[:, None])  # exp(a - m); masked columns: exp(-inf) = 0
                row_sum = tl.sum(p, axis=1)  # d = sum_j exp(a - m)
                row_sum = tl.where(finite, row_sum, 1.0)
                lse = row_max + tl.log(row_sum)  # logsumexp(a[i, :]) = m + log(d)
                p = p * (1.0 / row_sum)[:, None]  # softmax(a[i, :]) = exp(a - m) / d

                # ---- step 2: gradient (p - onehot) * w_i; NaN rows for non-finite input ----
                used = label_ok & finite  # rows that yield a gradient and statistics
                is_target = col_idx[None, :] == target[:, None]
                onehot = tl.where(is_target, 1.0, 0.0)
                w = tl.where(valid, row_weight, 0.0)
                grad = (p - onehot) * w[:, None]
                grad = tl.where((valid & ~used)[:, None], float("nan"), grad)
                grad = tl.where(valid[:, None], grad, 0.0)
                tl.store(grad_row[:, None] + col_idx[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)

                # ---- step 3: statistics of the finite, non-ignored rows ----
                if COMPUTE_STATS:
                    off_target = mask & ~is_target & used[:, None]
                    p_off = tl.where(off_target, p, 0.0)
                    neg_row = tl.sum(p_off, axis=1)  # sum_{j != y_i} p[i, j]
                    tl.atomic_add(raw_stats_ptr + target, neg_row.to(tl.float32), mask=used)
                    tl.atomic_add(raw_stats_ptr + C + target, neg_row.to(tl.float32), mask=used)
                    cls_neg_acc += tl.sum(p_off, axis=0).to(tl.float32)  # raw_cls[j], this tile
                    if TRACK_PAIRWISE:
                        pair_ptrs = raw_pairwise_ptr + col_idx[None, :].to(tl.int64) * C + target[:, None]
                        pair_val = tl.abs(p - onehot).to(tl.float32)
                        tl.atomic_add(pair_ptrs, pair_val, mask=mask & used[:, None])
            else:
                # ---- step 1 (rows longer than a block): online max / sum over column blocks ----
                row_max = tl.full((ROWS_PER_TILE,), float("-inf"), tl.float32)
                row_max = _to_math(row_max, COMPUTE_FP64)
                row_sum = _to_math(tl.zeros((ROWS_PER_TILE,), dtype=tl.float32), COMPUTE_FP64)
                bad = tl.zeros((ROWS_PER_TILE,), dtype=tl.int32)
                for col_start in range(0, C, BLOCK_C):
                    cols = col_start + col_idx
                    col_in = cols < C
                    mask = row_in[:, None] & col_in[None, :]
                    a = _to_math(
                        tl.load(logits_row[:, None] + cols[None, :], mask=mask, other=float("-inf")),
                        COMPUTE_FP64,
                    )
                    bad += tl.sum((mask & ~(tl.abs(a) < float("inf"))).to(tl.int32), axis=1)
                    if HAS_BIAS:
                        a += _to_math(tl.load(class_bias_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)[
                            None, :
                        ]
                    # m' = max(m, max_j a); d = d * exp(m - m') + sum_j exp(a - m')
                    new_max = tl.maximum(row_max, tl.max(a, axis=1))
                    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # padded rows: no inf - inf
                    row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(a - shift[:, None]), axis=1)
                    row_max = new_max
                finite = row_in & (bad == 0)
                lse = tl.where(finite, row_max + tl.log(tl.where(finite, row_sum, 1.0)), 0.0)
                used = label_ok & finite
                w = tl.where(valid, row_weight, 0.0)
                neg_row = _to_math(tl.zeros((ROWS_PER_TILE,), dtype=tl.float32), COMPUTE_FP64)

                # ---- step 2: second sweep: p, gradient, statistics, block by block ----
                # Backwards: the blocks sweep 1 read last are the likeliest to still be in L2.
                num_blocks = tl.cdiv(C, BLOCK_C)
                for block in range(0, num_blocks):
                    cols = (num_blocks - 1 - block) * BLOCK_C + col_idx
                    col_in = cols < C
                    mask = row_in[:, None] & col_in[None, :]
                    z = tl.load(logits_row[:, None] + cols[None, :], mask=mask, other=0.0)
                    a = _to_math(z, COMPUTE_FP64)
                    if HAS_BIAS:
                        a += _to_math(tl.load(class_bias_ptr + cols, mask=col_in, other=0.0), COMPUTE_FP64)[
                            None, :
                        ]
                    p = tl.exp(a - lse[:, None])  # p = exp(a - logsumexp)
                    is_target = cols[None, :] == target[:, None]
                    onehot = tl.where(is_target, 1.0, 0.0)
                    grad = (p - onehot) * w[:, None]
                    grad = tl.where((valid & ~used)[:, None], float("nan"), grad)
                    grad = tl.where(valid[:, None], grad, 0.0)
                    tl.store(grad_row[:, None] + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
                    if COMPUTE_STATS:
                        off_target = mask & ~is_target & used[:, None]
                        p_off = tl.where(off_target, p, 0.0)
                        neg_row += tl.sum(p_off, axis=1)
                        # raw_cls[j]: the tile's rows summed first, then one atomic per column
                        tl.atomic_add(
                            raw_stats_ptr + 2 * C + cols, tl.sum(p_off, axis=0).to(tl.float32), mask=col_in
                        )
                        if TRACK_PAIRWISE:
                            pair_ptrs = raw_pairwise_ptr + cols[None, :].to(tl.int64) * C + target[:, None]
                            pair_val = tl.abs(p - onehot).to(tl.float32)
                            tl.atomic_add(pair_ptrs, pair_val, mask=mask & used[:, None])
                if COMPUTE_STATS:
                    tl.atomic_add(raw_stats_ptr + target, neg_row.to(tl.float32), mask=used)
                    tl.atomic_add(raw_stats_ptr + C + target, neg_row.to(tl.float32), mask=used)

            # ---- step 4: loss_i = logsumexp(a) - a[y_i]; NaN for non-finite rows and bad labels ----
            loss_row = tl.where(label_ok & finite, lse - a_target, float("nan"))
            loss_row = tl.where(valid, loss_row, 0.0)
            nonfinite_rows += tl.sum((valid & ~finite).to(tl.int32), axis=0)
            if REDUCTION == 0:
                tl.store(loss_ptr + rows, loss_row.to(loss_ptr.dtype.element_ty), mask=row_in)
            else:
                loss_sum += tl.sum(tl.where(row_in, loss_row, 0.0), axis=0)

        # ---- step 5: per-program partial sums -> scratch; the last program writes loss, counts ----
        if COMPUTE_STATS:
            if SINGLE_BLOCK:
                tl.atomic_add(raw_stats_ptr + 2 * C + col_idx, cls_neg_acc, mask=col_idx < C)
        if REDUCTION != 0:
            tl.atomic_add(workspace_ptr + 0, loss_sum.to(workspace_ptr.dtype.element_ty))
        tl.atomic_add(workspace_ptr + 1, nonfinite_rows.to(workspace_ptr.dtype.element_ty))
        # acq_rel: every partial sum above is visible to the program that draws the last ticket
        ticket = tl.atomic_add(workspace_ptr + 2, 1.0)
        if ticket == num_programs - 1:
            tl.store(counts_ptr + 0, n_valid)
            tl.store(counts_ptr + 1, tl.atomic_add(workspace_ptr + 1, 0.0).to(tl.int64))
            if REDUCTION != 0:
                total = tl.atomic_add(workspace_ptr + 0, 0.0)
                if REDUCTION == 1:
                    total = total / n_valid.to(total.dtype)  # N = 0: 0/0 = NaN, as F.cross_entropy
                tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------------
# 2. Block sizes, warps, grid: the rule (and the opt-in autotuner)
# --------------------------------------------------------------------------------------------------
# Sizes were checked against the real compiler for sm_90 without a GPU (resource usage of the
# compiled kernel: bench/ptx_resources.py). ~8 tile elements per thread keeps a 32-warp program at
# the 64-register cap with at most ~100 bytes of spill (to L1); 16 per thread needs ~128 registers
# and 32 per thread spills hundreds of bytes. Hence:
# - rows up to MAX_SINGLE_BLOCK_C columns are held in registers as one block (one read of the
#   logits): 8192 columns = 8 values per thread at 32 warps;
MAX_SINGLE_BLOCK_C = 8192
# - longer rows take the two-sweep path with [MULTI_BLOCK_ROWS, MULTI_BLOCK_C] tiles (8 per thread
#   at 32 warps). 4 rows per tile divide the raw_cls atomics by 4 (B x C / 4 in all), at the price
#   of 4 rows in flight per program (less of sweep 1 still in L2 when sweep 2 re-reads it);
MULTI_BLOCK_C = 2048
MULTI_BLOCK_ROWS = 4
# - single-block tiles aim at TILE_ELEMENTS elements (small C: several rows per tile so that a
#   program moves enough bytes per step), at most MAX_ROWS_PER_TILE rows;
TILE_ELEMENTS = 8192
MAX_ROWS_PER_TILE = 64
# - one warp per ELEMENTS_PER_WARP tile elements (8 per thread), 4 to 32 warps.
ELEMENTS_PER_WARP = 256
# Every program counts N from the labels itself when B is at most this (<= 128 KB of labels, read
# from L2); above, N is one small torch reduction passed by pointer.
COUNT_IN_KERNEL_MAX_ROWS = 16384
LABEL_BLOCK = 1024
# Persistent grid: G = min(#tiles, SMs * max(1, PROGRAM_WARPS_PER_SM // num_warps)), 64 = the most
# warps an SM holds. Programs the register file cannot hold at once run after the others (a short
# tail); more programs only add G x C flush atomics.
PROGRAM_WARPS_PER_SM = 64
# The interpreter runs programs one after another: a few programs still exercise the persistent loop.
INTERPRETER_MAX_PROGRAMS = 3


@dataclass(frozen=True)
class KernelConfig:
    block_c: int
    rows_per_tile: int
    num_warps: int
    single_block: bool
    programs_per_sm: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def choose_config(B: int, C: int) -> KernelConfig:
    """The default rule, sized from compiled resource usage (not yet from GPU timings): see above."""
    if C <= MAX_SINGLE_BLOCK_C:
        block_c = max(16, _next_pow2(C))
        rows = max(1, min(TILE_ELEMENTS // block_c, MAX_ROWS_PER_TILE, _next_pow2(max(B, 1))))
        single = True
    else:
        block_c, rows, single = MULTI_BLOCK_C, min(MULTI_BLOCK_ROWS, _next_pow2(max(B, 1))), False
    num_warps = max(4, min(32, (rows * block_c) // ELEMENTS_PER_WARP))
    return KernelConfig(block_c, rows, num_warps, single, max(1, PROGRAM_WARPS_PER_SM // num_warps))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid_size(device: torch.device, num_tiles: int, config: KernelConfig) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = _sm_count(index) * config.programs_per_sm
    else:
        limit = INTERPRETER_MAX_PROGRAMS
    return max(1, min(num_tiles, limit))


def autotune_enabled() -> bool:
    """``GALA_TRITON_AUTOTUNE=1`` times a few configs per shape on first use (eager CUDA calls only)."""
    return os.environ.get("GALA_TRITON_AUTOTUNE", "0") not in ("", "0")


_tuned: Dict[tuple, KernelConfig] = {}


def _candidates(base: KernelConfig):
    out = {base}
    for warps in (base.num_warps // 2, base.num_warps * 2):
        if 1 <= warps <= 32:
            out.add(replace(base, num_warps=warps, programs_per_sm=max(1, PROGRAM_WARPS_PER_SM // warps)))
    for rows in (base.rows_per_tile // 2, base.rows_per_tile * 2):
        if 1 <= rows <= MAX_ROWS_PER_TILE and rows * base.block_c <= 2 * TILE_ELEMENTS:
            out.add(replace(base, rows_per_tile=rows))
    if not base.single_block:
        for block_c in (base.block_c // 2, base.block_c * 2):
            if 256 <= block_c <= MAX_SINGLE_BLOCK_C:
                out.add(replace(base, block_c=block_c))
    for per_sm in (base.programs_per_sm // 2, base.programs_per_sm * 2):
        if per_sm >= 1:
            out.add(replace(base, programs_per_sm=per_sm))
    return sorted(out, key=lambda c: (c.block_c, c.rows_per_tile, c.num_warps, c.programs_per_sm))


def _autotuned_config(logits, labels, class_bias, ignore_index, reduction, compute_stats, track_pairwise):
    B, C = logits.shape
    key = (logits.device.index, logits.dtype, _next_pow2(max(B, 1)), C, reduction, compute_stats,
           track_pairwise, class_bias is not None)
    if key not in _tuned:
        best, best_ms = None, float("inf")
        for candidate in _candidates(choose_config(B, C)):
            run = functools.partial(_launch, logits, labels, class_bias, ignore_index, reduction,
                                    compute_stats, track_pairwise, inplace_backward=False, config=candidate)
            try:
                ms = triton.testing.do_bench(run, warmup=5, rep=20)
            except Exception:  # a config that does not compile (registers, shared memory) is skipped
                continue
            if ms < best_ms:
                best, best_ms = candidate, ms
        _tuned[key] = best or choose_config(B, C)
    return _tuned[key]


# --------------------------------------------------------------------------------------------------
# 3. The launcher
# --------------------------------------------------------------------------------------------------
def availability(device: torch.device) -> Tuple[bool, str]:
    """``(available, reason_if_not)`` for CUDA tensors (Triton + GPU) or CPU under the interpreter."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False, "Triton is not installed (`pip install triton`)"
    if device.type == "cuda":
        if triton_interpret_enabled():
            return False, "TRITON_INTERPRET=1 is set: Triton runs kernels on CPU tensors only; unset it"
        if not torch.cuda.is_available():
            return False, "torch reports no usable CUDA device"
        return True, ""
    if device.type == "cpu":
        if triton_interpret_enabled():
            return True, ""
        return False, (
            "the 'triton' backend runs on CUDA tensors; CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is imported) or backend='cpu'"
        )
    return False, f"the 'triton' backend does not run on {device.type} tensors"


def _check_args(logits, labels, class_bias, reduction):
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D (B, C), got {tuple(logits.shape)}")
    torch._check(
        logits.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}",
    )
    torch._check(labels.dim() == 1 and labels.shape[0] == logits.shape[0], lambda: "labels must be (B,)")
    torch._check(labels.dtype == torch.int64, lambda: f"labels must be int64, got {labels.dtype}")
    torch._check(reduction in (0, 1, 2), lambda: f"reduction code must be 0, 1 or 2, got {reduction}")
    if class_bias is not None:
        math_dtype = reference.compute_dtype(logits.dtype)
        torch._check(
            class_bias.dim() == 1 and class_bias.shape[0] == logits.shape[1],
            lambda: f"class_bias must have shape (C,) = ({logits.shape[1]},)",
        )
        torch._check(class_bias.dtype == math_dtype, lambda: f"class_bias must be {math_dtype}")


def _launch(logits, labels, class_bias, ignore_index, reduction, compute_stats, track_pairwise, *,
            inplace_backward, config):
    """Allocate the outputs and run the kernel once; returns the five outputs of the op."""
    B, C = logits.shape
    device = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # columns must be unit-stride; rows may be strided
    labels = labels.contiguous()
    fp64 = logits.dtype == torch.float64
    ws_dtype = torch.float64 if fp64 else torch.float32
    f32 = dict(dtype=torch.float32, device=device)

    track_pairwise = bool(compute_stats and track_pairwise)

    def unused_output():
        # a (0,) tensor on a storage of its own: two plain empties share the null data pointer and
        # custom ops refuse outputs that look aliased
        return torch.empty((1,), **f32)[:0]

    if compute_stats and not fp64:
        # one memset for the raw statistics and the workspace; raw_stats is a view of it
        scratch = torch.zeros(3 * C + _WS_SIZE, **f32)
        raw_stats = scratch[: 3 * C].view(3, C)
        workspace = scratch[3 * C:]
    else:
        raw_stats = torch.zeros((3, C), **f32) if compute_stats else unused_output()
        workspace = torch.zeros(_WS_SIZE, dtype=ws_dtype, device=device)
    raw_pairwise = torch.zeros((C, C), **f32) if track_pairwise else unused_output()
    grad = logits if inplace_backward else torch.empty((B, C), dtype=logits.dtype, device=device)
    loss = torch.empty((B,) if reduction == REDUCTION_NONE else (), dtype=logits.dtype, device=device)
    counts = torch.empty((2,), dtype=torch.int64, device=device)

    count_in_kernel = B <= COUNT_IN_KERNEL_MAX_ROWS
    # unused pointer arguments get `labels`, which nothing writes: a tensor passed twice, once
    # written, would alias a mutated argument when torch.compile functionalizes the launch
    n_valid = labels if count_in_kernel else (labels != ignore_index).sum()  # no .item(): stays on device
    bias = class_bias.contiguous() if class_bias is not None else labels

    num_tiles = triton.cdiv(B, config.rows_per_tile)
    grid = (_grid_size(device, num_tiles, config),)
    _gala_ce_fwd_kernel[grid](
        logits, labels, bias, grad, loss, raw_stats, raw_pairwise, workspace, counts, n_valid,
        B, C, logits.stride(0), grad.stride(0), ignore_index,
        REDUCTION=reduction,
        HAS_BIAS=class_bias is not None,
        COMPUTE_STATS=bool(compute_stats),
        TRACK_PAIRWISE=track_pairwise,
        COUNT_IN_KERNEL=count_in_kernel,
        COMPUTE_FP64=fp64,
        SINGLE_BLOCK=config.single_block,
        BLOCK_C=config.block_c,
        ROWS_PER_TILE=config.rows_per_tile,
        LABEL_BLOCK=LABEL_BLOCK,
        num_warps=config.num_warps,
    )
    return loss, grad, raw_stats, raw_pairwise, counts


def _reference_fallback(logits, labels, class_bias, ignore_index, reduction, compute_stats, track_pairwise,
                        inplace_backward):
    """float64 on CUDA: the reference math, with the op's outputs (see the module docstring)."""
    names = {REDUCTION_NONE: "none", REDUCTION_MEAN: "mean", REDUCTION_SUM: "sum"}
    loss, grad, stats = reference.forward_and_grad(
        logits, labels, class_bias, None, reduction=names[reduction], ignore_index=ignore_index,
        compute_stats=True, track_pairwise=bool(compute_stats and track_pairwise),
    )
    f32 = dict(dtype=torch.float32, device=logits.device)
    unused = lambda: torch.empty((1,), **f32)[:0]  # see _launch: no two outputs on a null storage
    raw = stats.raw.to(torch.float32) if compute_stats else unused()
    pair = stats.raw_pairwise
    raw_pairwise = pair.to(torch.float32) if compute_stats and pair is not None else unused()
    if inplace_backward:
        logits.copy_(grad)
        grad = logits
    return loss.to(logits.dtype), grad, raw, raw_pairwise, stats.counts.clone()


def fused_ce_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: int = REDUCTION_MEAN,
    label_smoothing: float = 0.0,
    compute_stats: bool = False,
    track_pairwise: bool = False,
    *,
    inplace_backward: bool = False,
    config: Optional[KernelConfig] = None,
):
    """The launcher: ``(loss, grad, raw_stats, raw_pairwise, counts)`` as ``gala::fused_ce_fwd``.

    ``inplace_backward=True`` writes the gradient into ``logits`` (and returns it as ``grad``),
    saving a ``B x C`` buffer; the caller's logits are then overwritten. ``config`` overrides the
    block-size rule (tests use it to force the multi-block path at small C). No host
    synchronisation happens here.
    """
    _check_args(logits, labels, class_bias, reduction)
    torch._check(weight is None and label_smoothing == 0.0, lambda: "weight / label_smoothing: not yet")
    if inplace_backward and logits.stride(1) != 1:
        raise ValueError("inplace_backward=True needs logits with unit column stride")
    if logits.dtype == torch.float64 and logits.device.type == "cuda":
        return _reference_fallback(logits, labels, class_bias, ignore_index, reduction, compute_stats,
                                   track_pairwise, inplace_backward)
    if config is None:
        eager_cuda = logits.device.type == "cuda" and not torch.compiler.is_compiling()
        if autotune_enabled() and eager_cuda and not inplace_backward:
            config = _autotuned_config(logits, labels, class_bias, ignore_index, reduction, compute_stats,
                                       track_pairwise)
        else:
            config = choose_config(*logits.shape)
    return _launch(logits, labels, class_bias, ignore_index, reduction, compute_stats, track_pairwise,
                   inplace_backward=inplace_backward, config=config)


# --------------------------------------------------------------------------------------------------
# 4. Registration (torch.library.custom_op), fake + autograd from gala_kernels.ops
# --------------------------------------------------------------------------------------------------


def _register_fused_ce_op():
    """``torch.ops.gala_triton.fused_ce_fwd``: schema and outputs of ``gala::fused_ce_fwd``."""

    @torch.library.custom_op("gala_triton::fused_ce_fwd", mutates_args=())
    def fused_ce_fwd(
        logits: torch.Tensor,
        labels: torch.Tensor,
        class_bias: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        ignore_index: int,
        reduction: int,
        label_smoothing: float,
        compute_stats: bool,
        track_pairwise: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, grad, raw_stats, raw_pairwise, counts = fused_ce_forward(
            logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
            track_pairwise,
        )
        # the op returns fresh tensors: raw_stats may be a view of the scratch buffer, which is fine
        return loss, grad, raw_stats, raw_pairwise, counts

    ops.register_fused_ce(fused_ce_fwd)
    return torch.ops.gala_triton.fused_ce_fwd.default


def _register_fused_ce_inplace_op():
    """``torch.ops.gala_triton.fused_ce_fwd_inplace``: the gradient overwrites ``logits``.

    Returns ``(loss, raw_stats, raw_pairwise, counts)``; the gradient is ``logits`` afterwards.
    """

    @torch.library.custom_op("gala_triton::fused_ce_fwd_inplace", mutates_args={"logits"})
    def fused_ce_fwd_inplace(
        logits: torch.Tensor,
        labels: torch.Tensor,
        class_bias: Optional[torch.Tensor],
        weight: Optional[torch.Tensor],
        ignore_index: int,
        reduction: int,
        label_smoothing: float,
        compute_stats: bool,
        track_pairwise: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, _grad, raw_stats, raw_pairwise, counts = fused_ce_forward(
            logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
            track_pairwise, inplace_backward=True,
        )
        return loss, raw_stats, raw_pairwise, counts

    @fused_ce_fwd_inplace.register_fake
    def _(logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
          track_pairwise):
        loss, _grad, raw_stats, raw_pairwise, counts = ops.fused_ce_fake(
            logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
            track_pairwise
        )
        return loss, raw_stats, raw_pairwise, counts

    return torch.ops.gala_triton.fused_ce_fwd_inplace.default


# Registered at import (never while torch.compile traces a caller); TRITON_INTERPRET is fixed by then.
_FUSED_CE_OP = _register_fused_ce_op() if HAS_TRITON else None
_FUSED_CE_INPLACE_OP = _register_fused_ce_inplace_op() if HAS_TRITON else None


def fused_ce_op():
    """The forward op of this backend (``gala_triton::fused_ce_fwd``), for ``backends.fused_ce_op``."""
    return _FUSED_CE_OP


def fused_ce_inplace_op():
    """``gala_triton::fused_ce_fwd_inplace``: ``(loss, raw_stats, raw_pairwise, counts)``, grad in logits."""
    return _FUSED_CE_INPLACE_OP


class InplaceFusedCE(torch.autograd.Function):
    """Autograd around the in-place op: forward overwrites ``logits`` with the gradient.

    Safe when nothing else needs the logits' values for its own backward (e.g. logits straight out
    of a linear layer: its backward uses the input and weight, not the output). If something does,
    autograd raises "modified by an inplace operation" instead of computing a wrong gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing,
                compute_stats, track_pairwise):
        loss, raw_stats, raw_pairwise, counts = fused_ce_inplace_op()(
            logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
            track_pairwise
        )
        # not mark_dirty: the logits are not returned; their version counter was bumped by the op,
        # so autograd still catches any other node that saved their old values
        ctx.save_for_backward(logits)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(raw_stats, raw_pairwise, counts)
        return loss, raw_stats, raw_pairwise, counts

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_statistics):
        (grad,) = ctx.saved_tensors
        return (ops.scale_saved_grad(grad, grad_loss, ctx.reduction),) + (None,) * 8


def fused_ce_inplace(logits, labels, class_bias=None, weight=None, ignore_index=-100,
                     reduction=REDUCTION_MEAN, label_smoothing=0.0, compute_stats=False,
                     track_pairwise=False):
    """``(loss, raw_stats, raw_pairwise, counts)`` with autograd; the logits' storage receives the
    gradient (what ``fused_gala_ce(..., inplace_backward=True)`` is meant to call)."""
    return InplaceFusedCE.apply(logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing,
                                compute_stats, track_pairwise)
