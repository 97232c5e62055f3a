"""Triton kernels for the mass pass of post-hoc re-balancing.

docs/rebalancing.md::

    mass[j] = sum_i softmax(z[i, :])[j]

This module computes one call's share, ``colsum[j] = sum_{i < B} softmax(z[i, :])[j]``, ``(C,)``
in the math dtype (float32, float64 for float64 logits). Two kernels:

* ``_colsum_rows_kernel`` (``C <= MAX_ROW_BLOCK``): a whole row fits one block. Each program
  walks ``rows_per_program`` rows, ``ROWS`` at a time (a ``(ROWS, BLOCK_C)`` tile: row max,
  ``e = exp(z - max)``, ``acc += sum over the tile's rows of e / sum(e)``), keeps the column sums
  of its rows in registers and adds them to ``out`` with one ``tl.atomic_add`` per column at the
  end. The logits are read once. Short rows are grouped (several per tile) so that a thread
  holds ~16 values; the launch rule is :func:`row_kernel_config` and ``PROGRAMS_PER_SM``.
* ``_colsum_tiles_kernel`` (larger ``C``): a program owns ``BLOCK_R`` rows; pass 1 is an online
  logsumexp over column blocks, pass 2 re-reads each ``(BLOCK_R, BLOCK_C)`` tile, sums
  ``exp(z - lse)`` over its rows and adds the ``BLOCK_C`` partial sums atomically.

The kernels ADD into ``out`` (zeros for a plain call; ``PredictionRebalancer.update`` passes its
float64 ``mass``, so an update is one launch and no temporary).

Both reduce over several rows per program before any atomic. Atomics make the float32 sums
order-dependent across programs (last-bit differences between runs); the C++ CPU op is the
deterministic one.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (the tests do that through tests/conftest.py).

This module depends on nothing of the package above ``backends``: :mod:`gala_kernels.mass_ops`
imports it, never the other way round.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .interpret import triton_interpret_enabled

# Widest row kept whole in one block (registers of one program): 16384 fp32 over 16 warps is
# 32 values per thread for z and as many for the accumulator.
MAX_ROW_BLOCK = 16384
# Tile of the large-C kernel.
TILE_ROWS = 16
TILE_COLS = 1024
# Programs per SM the row kernel aims at, and the fewest rows a program handles (bounds the
# atomics to 1/MIN_ROWS_PER_PROGRAM of the logits' elements). Each program ends with C atomics:
# on an H200 (24,426 x 8,142 fp32) 2 programs per SM beat 4 and 8 at every tile shape tried, and
# one row per tile with 16 warps beat 2 and 4 rows (`bench mass --device cuda --sweep` times the
# two best settings beside the rule's; docs/performance.md).
PROGRAMS_PER_SM = 2
MIN_ROWS_PER_PROGRAM = 4
# Most rows in one tile of the row kernel.
ROWS_PER_TILE_MAX = 8


@triton.jit
def _colsum_rows_kernel(
    # data ptrs
    logits_ptr,  # (B, C), row stride `stride_row`, unit column stride
    out_ptr,  # (C,) float32 or float64; receives += sum_i softmax(z[i, :])
    # shapes and strides
    n_rows,
    n_cols,
    stride_row,
    rows_per_program,
    # constants
    BLOCK_C: tl.constexpr,  # next power of two >= n_cols
    ROWS: tl.constexpr,  # rows per tile (a power of two)
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    acc = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_in = rows < row_end
        # 1. p = softmax(z) of each row of the tile: masked columns are -inf, so exp gives 0 there.
        #    A row of NaN / +inf, or -inf everywhere, gives NaN throughout, as torch.softmax.
        z = tl.load(logits_ptr + rows[:, None] * stride_row + cols[None, :],
                    mask=row_in[:, None] & col_mask[None, :], other=float("-inf"))
        z = z.to(ACC_DTYPE)
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = e * (1.0 / tl.sum(e, axis=1))[:, None]
        # 2. acc[j] += p[i, j] over the tile's rows (rows past row_end are all -inf: NaN, dropped).
        acc += tl.sum(tl.where(row_in[:, None], p, 0.0), axis=0)
    # 3. One atomic per column per program.
    tl.atomic_add(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _colsum_tiles_kernel(
    # data ptrs
    logits_ptr,  # (B, C), row stride `stride_row`, unit column stride
    out_ptr,  # (C,) float32 or float64; receives += sum_i softmax(z[i, :])
    # shapes and strides
    n_rows,
    n_cols,
    stride_row,
    # constants
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows[:, None] * stride_row

    # 1. Online logsumexp per row: (m, s) <- (m', s * exp(m - m') + sum(exp(z - m'))).
    #    m_safe keeps exp's argument finite while a row has seen only -inf (m' = -inf).
    m = tl.full([BLOCK_R], float("-inf"), dtype=ACC_DTYPE)
    s = tl.zeros([BLOCK_R], dtype=ACC_DTYPE)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        z = tl.load(row_ptrs + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)  # -inf for a row that is -inf everywhere: its p is NaN, as torch.softmax

    # 2. colsum[j] += sum over this program's rows of p[i, j] = exp(z[i, j] - lse[i]).
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(row_ptrs + cols[None, :], mask=mask, other=float("-inf")).to(ACC_DTYPE)
        p = tl.where(row_mask[:, None], tl.exp(z - lse[:, None]), 0.0)
        tl.atomic_add(out_ptr + cols, tl.sum(p, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sums' dtype: float64 for float64 logits, else float32 (whatever the input precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_rows_per_program(logits: torch.Tensor, programs_per_sm: int) -> int:
    """Enough programs to fill the GPU, each summing at least MIN_ROWS_PER_PROGRAM rows."""
    B = logits.shape[0]
    if logits.device.type != "cuda":  # the interpreter: a few programs exercise the atomics
        return max(1, triton.cdiv(B, 4))
    target_programs = programs_per_sm * _multiprocessor_count(logits.device.index or 0)
    return max(MIN_ROWS_PER_PROGRAM, triton.cdiv(B, target_programs))


def row_kernel_config(block_c: int):
    """``(ROWS, num_warps)`` of the row kernel for a row block of ``block_c`` columns: 4 to 16
    warps, and rows per tile for about 16 tile values per thread (one row from 8,192 columns)."""
    num_warps = min(16, max(4, block_c // 512))
    rows = max(1, min(ROWS_PER_TILE_MAX, (16 * 32 * num_warps) // block_c))
    return rows, num_warps


def softmax_colsum_triton(
    logits: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    rows_per_program: Optional[int] = None,
    max_row_block: int = MAX_ROW_BLOCK,
    rows_per_tile: Optional[int] = None,
    num_warps: Optional[int] = None,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> torch.Tensor:
    """Launch the mass pass: ``out += colsum`` (``out`` = zeros in the math dtype when None).

    ``out`` must be a contiguous ``(C,)`` float32/float64 tensor on the logits' device. The other
    keywords override the launch rule (tests and ``bench mass --sweep`` use them).
    """
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, C = logits.shape
    acc_dtype = accumulation_dtype(logits.dtype)
    if out is None:
        out = torch.zeros(C, dtype=acc_dtype, device=logits.device)
    elif not (out.shape == (C,) and out.is_contiguous() and out.device == logits.device
              and out.dtype in (torch.float32, torch.float64)):
        raise ValueError(f"out must be a contiguous ({C},) float32/float64 tensor on {logits.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if B == 0:
        return out
    tl_acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    block_c = triton.next_power_of_2(C)
    if block_c <= max_row_block:
        rule_rows, rule_warps = row_kernel_config(block_c)
        rows_per_tile = rows_per_tile or rule_rows
        rows = rows_per_program or _default_rows_per_program(logits, programs_per_sm)
        grid = (triton.cdiv(B, rows),)
        _colsum_rows_kernel[grid](
            logits, out, B, C, logits.stride(0), rows,
            BLOCK_C=block_c, ROWS=rows_per_tile, ACC_DTYPE=tl_acc, num_warps=num_warps or rule_warps,
        )
    else:
        block_cols = min(TILE_COLS, block_c)
        grid = (triton.cdiv(B, TILE_ROWS),)
        _colsum_tiles_kernel[grid](
            logits, out, B, C, logits.stride(0),
            BLOCK_R=TILE_ROWS, BLOCK_C=block_cols, ACC_DTYPE=tl_acc, num_warps=num_warps or 8,
        )
    return out


@torch.library.custom_op("gala_triton::softmax_colsum", mutates_args=())
def _softmax_colsum_op(logits: torch.Tensor) -> torch.Tensor:
    return softmax_colsum_triton(logits)


@_softmax_colsum_op.register_fake
def _softmax_colsum_fake(logits: torch.Tensor) -> torch.Tensor:
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D (B, C)")
    return logits.new_empty((logits.shape[1],), dtype=accumulation_dtype(logits.dtype))


def softmax_colsum_op():
    """The Triton mass pass as a custom op (schema ``softmax_colsum(Tensor logits) -> Tensor``)."""
    return _softmax_colsum_op


def availability(device: torch.device) -> Tuple[bool, str]:
    """``(available, reason_if_not)`` for the Triton mass pass on ``device``."""
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if triton_interpret_enabled():
            return True, ""
        return False, (
            "Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported (slow; for tests), or use a CUDA tensor"
        )
    return False, f"the 'triton' backend runs on CUDA tensors, got a tensor on {device}"
