"""Triton backend of the fused GALA cross-entropy (``backend="triton"``).

Read top to bottom (the kernels themselves are in :mod:`.triton_ce_kernels`):

1. The launch configuration (:func:`choose_config`, :func:`grid`): block sizes, warps and the
   grid, with autotuning opt-in (``GALA_TRITON_AUTOTUNE=1``).
2. The launchers: :func:`fused_ce_forward` (``gala::fused_ce_fwd``: loss, gradient and the raw
   statistics as outputs) and :func:`fused_ce_step` (``fused_ce_step_``: a training step that
   reads and writes the state on the device; gala_kernels/backends/step.py), both over
   :func:`_launch_loss_kernels`; :func:`fold_step` and :func:`scale_grad`.
3. The registration: ``gala_triton::fused_ce_fwd`` (+ ``_inplace``), ``fused_ce_step_``
   (+ ``_inplace``) and ``fold_step_`` as ``torch.library.custom_op``s, so that ``torch.compile``
   traces through their fake implementations; eager calls go to the launchers directly (the
   custom-op dispatch costs tens of microseconds of host time, which a short GPU step pays in full).

Where the work goes, per call:

- ``C <= MAX_SINGLE_BLOCK_C``: one launch of ``gala_ce_rows_kernel``: each row is read once (a
  persistent program walks tiles of rows, the tile kept in registers) and the gradient written
  once. For a batch above ``COUNT_IN_KERNEL_MAX_ROWS`` rows, ``gala_count_rows_kernel`` counts N
  and W first (each program of the main kernel would otherwise read all the labels).
- longer rows: ``gala_ce_partials_kernel`` then ``gala_ce_columns_kernel`` on a
  ``(column slices, row groups)`` grid: the logits are read twice, the gradient written once, the
  column sums ``raw_cls`` take one atomic per column per row group.

float64: the interpreter runs the kernels in float64 (``COMPUTE_FP64``), which is what gradcheck
uses on CPU. On CUDA, float64 takes the reference math (``reference.forward_and_grad``) inside
``fused_ce_fwd``: Triton's fp64 transcendental support is not relied upon.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

try:  # Triton is optional: without it the backend reports itself unavailable
    import triton

    from . import triton_ce_kernels as kernels

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    kernels = None
    HAS_TRITON = False

from .. import ops, reference
from .. import state as state_layout
from . import schemas
from .interpret import triton_interpret_enabled
from .step_ops import StepOps, run_step_op, step_fake

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2
BIAS_NONE, BIAS_GIVEN, BIAS_FROM_STATE = 0, 1, 2

# --------------------------------------------------------------------------------------------------
# 1. Launch configuration
# --------------------------------------------------------------------------------------------------
# Register budget (checked with the real compiler for sm_90: tools/ptx_resources.py prints
# registers and spill instructions per kernel variant; docs/kernels.md, "Registers").
# - rows up to MAX_SINGLE_BLOCK_C columns are held in registers as one block (one read of the
#   logits): 8192 columns = 8 values per thread at 32 warps, the 64-register cap;
MAX_SINGLE_BLOCK_C = 8192
# - longer rows are cut into slices of MULTI_BLOCK_C columns, MULTI_BLOCK_ROWS rows per tile,
#   at most MULTI_BLOCK_MAX_WARPS warps: the two-pass kernels need more than 64 registers per
#   thread (they spill at 32 warps), which 16 warps hold with no spill. One program per SM is
#   resident either way (the register file), so the grid stays that of the tile size
#   (programs_per_sm below);
MULTI_BLOCK_C = 2048
MULTI_BLOCK_ROWS = 4
MULTI_BLOCK_MAX_WARPS = 16
# - single-block tiles aim at TILE_ELEMENTS elements (small C: several rows per tile), at most
#   MAX_ROWS_PER_TILE rows; one warp per ELEMENTS_PER_WARP tile elements, 4 to 32 warps.
TILE_ELEMENTS = 8192
MAX_ROWS_PER_TILE = 64
ELEMENTS_PER_WARP = 256
# Every program of the rows kernel counts N (and W) from the labels itself when B is at most this
# (<= 128 KB of labels, read from L2); above, gala_count_rows_kernel does it once.
COUNT_IN_KERNEL_MAX_ROWS = 16384
LABEL_BLOCK = 1024
FOLD_BLOCK = 1024
PAIRWISE_FOLD_BLOCK = 8192  # elements of the C x C pairwise matrix per step of a program (16 warps)
SCALE_BLOCK = 4096
# Partials (one per column slice) that gala_ce_columns_kernel combines per step: all of them at
# once up to MAX_SLICE_BLOCK slices (C up to ~0.5M at 2048 columns per slice).
MAX_SLICE_BLOCK = 256
# Grid. A program's fixed traffic (its bias and weights, the flush of raw_cls: 2 x 4 bytes per
# column) must stay small against the row traffic it serves (2 x itemsize bytes per element of
# each row it reads and writes, 3 x for the two-pass kernels): a program serves at least
# FIXED_TRAFFIC_SHARE x that many rows, i.e. 8 x 4 / itemsize (rows kernel) and 8 x 12 / itemsize
# (two-pass kernels), so the fixed part is at most 1/8 of the rest. Within that, programs fill the
# GPU: programs_per_sm = PROGRAM_WARPS_PER_SM / (tile elements / ELEMENTS_PER_WARP).
FIXED_TRAFFIC_SHARE = 8
PROGRAM_WARPS_PER_SM = 64
# Under the interpreter there is no GPU: the grid is sized as on an H200 (132 SMs), so that the
# modelled traffic (tools and tests count it) is that of the GPU launch.
MODELLED_SM_COUNT = 132


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
    """The default rule (register budget above; GPU timings may refine it via the autotuner)."""
    if C <= MAX_SINGLE_BLOCK_C:
        block_c = max(16, _next_pow2(C))
        rows = max(1, min(TILE_ELEMENTS // block_c, MAX_ROWS_PER_TILE, _next_pow2(max(B, 1))))
        single = True
    else:
        block_c, rows, single = MULTI_BLOCK_C, min(MULTI_BLOCK_ROWS, _next_pow2(max(B, 1))), False
    tile_warps = max(4, min(32, (rows * block_c) // ELEMENTS_PER_WARP))
    num_warps = tile_warps if single else min(tile_warps, MULTI_BLOCK_MAX_WARPS)
    return KernelConfig(block_c, rows, num_warps, single, max(1, PROGRAM_WARPS_PER_SM // tile_warps))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return MODELLED_SM_COUNT


def grid(B: int, C: int, itemsize: int, device: torch.device, config: KernelConfig) -> Tuple[int, int]:
    """``(column slices, row groups)``: ``(1, programs)`` for the rows kernel."""
    num_tiles = max(1, triton.cdiv(B, config.rows_per_tile))
    resident = sm_count(device) * config.programs_per_sm
    if config.single_block:
        min_rows = FIXED_TRAFFIC_SHARE * 4 // itemsize
        return 1, max(1, min(num_tiles, resident, triton.cdiv(B, min_rows)))
    slices = triton.cdiv(C, config.block_c)
    min_rows = FIXED_TRAFFIC_SHARE * 12 // itemsize
    return slices, max(1, min(num_tiles, resident // slices, B // min_rows))


def autotune_enabled() -> bool:
    """``GALA_TRITON_AUTOTUNE=1`` times a few configs per shape on first use (eager CUDA calls only)."""
    return os.environ.get("GALA_TRITON_AUTOTUNE", "0") not in ("", "0")


_tuned: Dict[tuple, KernelConfig] = {}


def _candidates(base: KernelConfig):
    out = {base}
    for warps in (base.num_warps // 2, base.num_warps * 2):  # the grid is the tile's (choose_config)
        if 1 <= warps <= 32:
            out.add(replace(base, num_warps=warps))
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


def _config_for(logits, key: tuple, run) -> KernelConfig:
    """The rule's config, or with autotuning (eager CUDA calls) the fastest of its neighbours;
    ``run(config)`` launches once (on scratch that the caller restores)."""
    B, C = logits.shape
    base = choose_config(B, C)
    if not (autotune_enabled() and logits.device.type == "cuda" and not torch.compiler.is_compiling()):
        return base
    key = (logits.device.index, logits.dtype, _next_pow2(max(B, 1)), C) + key
    if key not in _tuned:
        best, best_ms = None, float("inf")
        for candidate in _candidates(base):
            try:
                ms = triton.testing.do_bench(functools.partial(run, candidate), warmup=5, rep=20)
            except Exception:  # a config that does not compile (registers, shared memory) is skipped
                continue
            if ms < best_ms:
                best, best_ms = candidate, ms
        _tuned[key] = best or base
    return _tuned[key]


# --------------------------------------------------------------------------------------------------
# 2. Launchers
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


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_args(logits, labels, class_bias, weight, reduction, label_smoothing):
    """The launchers' own checks (the public functions check more, with friendlier messages);
    plain ``if``s: a launcher runs on real tensors, and a short GPU step pays every microsecond."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, C), got {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"reduction code must be 0, 1 or 2, got {reduction}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    math_dtype = reference.compute_dtype(logits.dtype)
    for name, tensor in (("class_bias", class_bias), ("weight", weight)):
        if tensor is not None:
            if tensor.dim() != 1 or tensor.shape[0] != logits.shape[1]:
                shape = tuple(tensor.shape)
                raise ValueError(f"{name} must have shape (C,) = ({logits.shape[1]},), got {shape}")
            if tensor.dtype != math_dtype:
                raise TypeError(f"{name} must be {math_dtype} for {logits.dtype} logits, got {tensor.dtype}")


@dataclass
class _LossLaunch:
    """Everything one call of the loss kernels reads and writes (pointers the call does not use get
    ``labels``, which nothing writes: a tensor passed twice, once written, would alias a mutated
    argument when torch.compile functionalizes the launch)."""

    logits: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor
    bias_mode: int
    weight: Optional[torch.Tensor]
    grad: torch.Tensor
    loss: torch.Tensor
    raw: torch.Tensor  # (3C,) float32, or labels without statistics
    slots: torch.Tensor  # (8,) float32
    pairwise: Optional[torch.Tensor]
    counts: Optional[torch.Tensor]
    label_error: Optional[torch.Tensor]
    state_tensors: Optional[List[torch.Tensor]]  # pos, neg, cls, run_pos, run_neg, run_cls, steps, nonfinite
    reduction: int
    ignore_index: int
    label_smoothing: float
    lambda1: float = 0.0
    eps: float = 0.0
    accumulation: int = 0
    ema_beta: float = 0.0
    fold: bool = False
    row_offset: int = 0


def _launch_loss_kernels(call: _LossLaunch, config: KernelConfig) -> None:
    """The rows kernel (with the count kernel for large batches), or the two passes for long rows."""
    logits, labels = call.logits, call.labels
    B, C = logits.shape
    fp64 = logits.dtype == torch.float64
    dummy = labels
    weight = call.weight if call.weight is not None else dummy
    state_tensors = call.state_tensors or [dummy] * 8
    pairwise = call.pairwise if call.pairwise is not None else dummy
    counts = call.counts if call.counts is not None else dummy
    label_error = call.label_error if call.label_error is not None else dummy
    switches = dict(
        REDUCTION=call.reduction,
        BIAS_MODE=call.bias_mode,
        HAS_WEIGHT=call.weight is not None,
        HAS_SMOOTHING=call.label_smoothing > 0.0,
        COMPUTE_STATS=call.raw is not labels,
        TRACK_PAIRWISE=call.pairwise is not None,
        WRITE_COUNTS=call.counts is not None,
        RECORD_BAD_LABELS=call.label_error is not None,
        FOLD=call.fold,
        ACCUMULATION=call.accumulation,
        COMPUTE_FP64=fp64,
        BLOCK_C=config.block_c,
        ROWS_PER_TILE=config.rows_per_tile,
        FOLD_BLOCK=FOLD_BLOCK,
        num_warps=config.num_warps,
    )
    scalars = (
        call.ignore_index,
        call.lambda1,
        call.eps,
        call.label_smoothing,
        call.ema_beta,
        call.row_offset,
    )
    # the loss sum: in the slots (float32); float64 math (the interpreter) keeps it, and takes its
    # float scalars, in float64 tensors
    loss_acc = call.slots[state_layout.SCRATCH_LOSS : state_layout.SCRATCH_LOSS + 1]
    fp64_scalars = dummy
    if fp64:
        loss_acc = torch.zeros((), dtype=torch.float64, device=logits.device)
        fp64_scalars = torch.tensor(
            [call.lambda1, call.eps, call.label_smoothing], dtype=torch.float64, device=logits.device
        )
    slices, groups = grid(B, C, logits.element_size(), logits.device, config)
    if config.single_block:
        count_in_kernel = B <= COUNT_IN_KERNEL_MAX_ROWS
        if not count_in_kernel:
            kernels.gala_count_rows_kernel[(triton.cdiv(B, LABEL_BLOCK),)](
                labels,
                weight,
                call.slots,
                B,
                C,
                call.ignore_index,
                HAS_WEIGHT=call.weight is not None,
                COMPUTE_FP64=fp64,
                LABEL_BLOCK=LABEL_BLOCK,
            )
        kernels.gala_ce_rows_kernel[(groups,)](
            logits,
            labels,
            call.bias,
            weight,
            call.grad,
            call.loss,
            call.raw,
            call.slots,
            loss_acc,
            pairwise,
            counts,
            label_error,
            fp64_scalars,
            *state_tensors,
            B,
            C,
            logits.stride(0),
            call.grad.stride(0),
            *scalars,
            COUNT_IN_KERNEL=count_in_kernel,
            LABEL_BLOCK=LABEL_BLOCK,
            **switches,
        )
        return
    math_dtype = reference.compute_dtype(logits.dtype)
    partials = torch.empty((3 * slices + 1) * B, dtype=math_dtype, device=logits.device)
    slice_weight = torch.empty(slices, dtype=math_dtype, device=logits.device)
    kernels.gala_ce_partials_kernel[(slices, groups)](
        logits,
        labels,
        call.bias,
        weight,
        partials,
        slice_weight,
        call.slots,
        fp64_scalars,
        B,
        C,
        logits.stride(0),
        call.ignore_index,
        call.lambda1,
        call.eps,
        BIAS_MODE=call.bias_mode,
        HAS_WEIGHT=call.weight is not None,
        HAS_SMOOTHING=call.label_smoothing > 0.0,
        COMPUTE_FP64=fp64,
        BLOCK_C=config.block_c,
        ROWS_PER_TILE=config.rows_per_tile,
        num_warps=config.num_warps,
    )
    kernels.gala_ce_columns_kernel[(slices, groups)](
        logits,
        labels,
        call.bias,
        weight,
        call.grad,
        call.loss,
        partials,
        slice_weight,
        call.raw,
        call.slots,
        loss_acc,
        pairwise,
        counts,
        label_error,
        fp64_scalars,
        *state_tensors,
        B,
        C,
        logits.stride(0),
        call.grad.stride(0),
        *scalars,
        SLICE_BLOCK=min(MAX_SLICE_BLOCK, _next_pow2(slices)),
        **switches,
    )


def _unit_columns(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(1) == 1 else logits.contiguous()  # rows may be strided


def _unused_output(device) -> torch.Tensor:
    # a (0,) tensor on a storage of its own: two plain empties share the null data pointer and
    # custom ops refuse outputs that look aliased
    return torch.empty((1,), dtype=torch.float32, device=device)[:0]


def _reference_fallback(
    logits,
    labels,
    class_bias,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    compute_stats,
    track_pairwise,
    inplace_backward,
):
    """float64 on CUDA: the reference math, with the op's outputs (see the module docstring)."""
    names = {REDUCTION_NONE: "none", REDUCTION_MEAN: "mean", REDUCTION_SUM: "sum"}
    loss, grad, stats = reference.forward_and_grad(
        logits,
        labels,
        class_bias,
        None,
        reduction=names[reduction],
        ignore_index=ignore_index,
        compute_stats=True,
        track_pairwise=bool(compute_stats and track_pairwise),
        weight=weight,
        label_smoothing=label_smoothing,
    )
    raw = stats.raw.to(torch.float32) if compute_stats else _unused_output(logits.device)
    pair = stats.raw_pairwise
    raw_pairwise = (
        pair.to(torch.float32) if compute_stats and pair is not None else _unused_output(logits.device)
    )
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
    """``gala::fused_ce_fwd``: ``(loss, grad, raw_stats, raw_pairwise, counts)``.

    ``inplace_backward=True`` writes the gradient into ``logits`` (and returns it as ``grad``),
    saving a ``B x C`` buffer; the caller's logits are then overwritten. ``config`` overrides the
    launch rule. No host synchronisation happens here.
    """
    _check_args(logits, labels, class_bias, weight, reduction, label_smoothing)
    if inplace_backward and logits.stride(1) != 1:
        raise ValueError("inplace_backward=True needs logits with unit column stride")
    if logits.dtype == torch.float64 and logits.device.type == "cuda":
        return _reference_fallback(
            logits,
            labels,
            class_bias,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            compute_stats,
            track_pairwise,
            inplace_backward,
        )
    logits, labels = _unit_columns(logits), labels.contiguous()
    B, C = logits.shape
    device = logits.device
    f32 = dict(dtype=torch.float32, device=device)
    track_pairwise = bool(compute_stats and track_pairwise)

    def launch(config):
        raw = torch.zeros(3 * C, **f32) if compute_stats else labels
        call = _LossLaunch(
            logits=logits,
            labels=labels,
            bias=class_bias if class_bias is not None else labels,
            bias_mode=BIAS_GIVEN if class_bias is not None else BIAS_NONE,
            weight=None if weight is None else weight.contiguous(),
            grad=logits if inplace_backward else torch.empty((B, C), dtype=logits.dtype, device=device),
            loss=torch.empty((B,) if reduction == REDUCTION_NONE else (), dtype=logits.dtype, device=device),
            raw=raw,
            slots=torch.zeros(state_layout.SCRATCH_SLOTS, **f32),
            pairwise=torch.zeros((C, C), **f32) if track_pairwise else None,
            counts=torch.empty((2,), dtype=torch.int64, device=device),
            label_error=None,
            state_tensors=None,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=float(label_smoothing),
        )
        _launch_loss_kernels(call, config)
        return call

    if config is None:
        config = _config_for(logits, ("fwd", reduction, compute_stats, track_pairwise), launch)
    call = launch(config)
    raw_stats = call.raw.view(3, C) if compute_stats else _unused_output(device)
    raw_pairwise = call.pairwise if track_pairwise else _unused_output(device)
    return call.loss, call.grad, raw_stats, raw_pairwise, call.counts


def fused_ce_step(
    logits,
    labels,
    weight,
    stats,
    running,
    steps,
    nonfinite_rows,
    scratch,
    raw_pairwise,
    label_error,
    lambda1,
    eps,
    ignore_index,
    reduction,
    label_smoothing,
    accumulation,
    ema_beta,
    fold,
    row_offset,
    *,
    inplace_backward: bool = False,
    config: Optional[KernelConfig] = None,
):
    """``fused_ce_step_``: one training step on the device (the contract: backends/step.py).
    Returns ``(loss, grad)``; ``grad`` is ``logits`` with ``inplace_backward``."""
    _check_args(logits, labels, None, weight, reduction, label_smoothing)
    logits, labels = _unit_columns(logits), labels.contiguous()
    B, C = logits.shape
    torch._check(not (raw_pairwise is not None and fold), lambda: "pairwise sums are folded by fold_step_")
    pos, neg, cls = stats
    run_pos, run_neg, run_cls = running if len(running) == 3 else (labels, labels, labels)
    call = _LossLaunch(
        logits=logits,
        labels=labels,
        bias=pos,
        bias_mode=BIAS_FROM_STATE,
        weight=None if weight is None else weight.contiguous(),
        grad=logits if inplace_backward else torch.empty((B, C), dtype=logits.dtype, device=logits.device),
        loss=torch.empty(
            (B,) if reduction == REDUCTION_NONE else (), dtype=logits.dtype, device=logits.device
        ),
        raw=scratch[: 3 * C],
        slots=scratch[3 * C :],
        pairwise=raw_pairwise,
        counts=None,
        label_error=label_error,
        state_tensors=[pos, neg, cls, run_pos, run_neg, run_cls, steps, nonfinite_rows],
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        lambda1=float(lambda1),
        eps=float(eps),
        accumulation=accumulation,
        ema_beta=float(ema_beta),
        fold=bool(fold),
        row_offset=int(row_offset),
    )
    _launch_loss_kernels(call, config or choose_config(B, C))
    return call.loss, call.grad


def fold_step(
    scratch,
    raw_pairwise,
    stats,
    running,
    pairwise,
    running_pairwise,
    steps,
    nonfinite_rows,
    accumulation,
    ema_beta,
) -> None:
    """``fold_step_``: the fold of the sums a step left in ``scratch`` (and ``raw_pairwise``)."""
    C = stats[0].shape[0]
    dummy = steps
    run = list(running) if len(running) == 3 else [dummy] * 3
    track_pairwise = pairwise is not None and raw_pairwise is not None
    programs = 1
    if track_pairwise:
        programs = max(1, min(triton.cdiv(C * C, PAIRWISE_FOLD_BLOCK), sm_count(scratch.device) * 4))
    kernels.gala_fold_kernel[(programs,)](
        scratch[: 3 * C],
        scratch[3 * C :],
        raw_pairwise if track_pairwise else dummy,
        *stats,
        *run,
        pairwise if track_pairwise else dummy,
        running_pairwise if (track_pairwise and running_pairwise is not None) else dummy,
        steps,
        nonfinite_rows,
        C,
        float(ema_beta),
        ACCUMULATION=accumulation,
        TRACK_PAIRWISE=track_pairwise,
        FOLD_BLOCK=FOLD_BLOCK,
        PAIRWISE_BLOCK=PAIRWISE_FOLD_BLOCK,
        num_warps=16,
    )


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``scale_grad_``: ``grad *= grad_output`` in place, nothing done on the device when it is 1."""
    n = grad.numel()
    programs = max(1, min(triton.cdiv(n, SCALE_BLOCK), sm_count(grad.device) * 4))
    kernels.scale_grad_kernel[(programs,)](
        grad, grad_output, n, COMPUTE_FP64=grad.dtype == torch.float64, BLOCK=SCALE_BLOCK
    )


# --------------------------------------------------------------------------------------------------
# 3. Registration (torch.library.custom_op): what torch.compile traces
# --------------------------------------------------------------------------------------------------
def _fused_ce_inplace(*args):
    """``fused_ce_fwd_inplace``: the gradient written into the logits; ``(loss, raw_stats,
    raw_pairwise, counts)``."""
    return _without_grad(fused_ce_forward(*args, inplace_backward=True))


def _step_inplace(*args):
    """``fused_ce_step_inplace_``: the step with the gradient written into the logits; the loss."""
    return fused_ce_step(*args, inplace_backward=True)[0]


def _register_ops():
    """The ops of this backend: ``gala_triton::fused_ce_fwd``, ``fused_ce_step_`` and ``fold_step_``
    (the schemas of the compiled ops) and the in-place twins ``fused_ce_fwd_inplace`` and
    ``fused_ce_step_inplace_``, implemented by the launchers for every device (CPU tensors: the
    interpreter), each with its fake implementation."""
    fused = f"(Tensor logits, {schemas.FUSED_CE_ARGUMENTS})"
    fused_inplace = f"(Tensor(z!) logits, {schemas.FUSED_CE_ARGUMENTS})"
    step_args = f"(Tensor logits, {schemas.STEP_ARGUMENTS})"
    step_inplace_args = f"(Tensor(z!) logits, {schemas.STEP_ARGUMENTS})"
    inplace_outputs = "(Tensor loss, Tensor raw_stats, Tensor raw_pairwise, Tensor counts)"

    outputs = schemas.FUSED_CE_OUTPUTS
    fwd = schemas.define("gala_triton", f"fused_ce_fwd{fused} -> {outputs}", fused_ce_forward)
    ops.register_fused_ce(fwd)
    fwd_inplace = schemas.define(
        "gala_triton", f"fused_ce_fwd_inplace{fused_inplace} -> {inplace_outputs}", _fused_ce_inplace
    )
    torch.library.register_fake(fwd_inplace)(lambda *args: _without_grad(ops.fused_ce_fake(*args)))
    step = schemas.define("gala_triton", f"fused_ce_step_{step_args} -> (Tensor loss, Tensor grad)",
                          fused_ce_step)
    torch.library.register_fake(step)(step_fake)
    step_inplace = schemas.define(
        "gala_triton", f"fused_ce_step_inplace_{step_inplace_args} -> Tensor loss", _step_inplace
    )
    torch.library.register_fake(step_inplace)(lambda *args: step_fake(*args)[0])
    fold = schemas.define("gala_triton", schemas.FOLD_SCHEMA, fold_step)
    torch.library.register_fake(fold)(lambda *args: None)
    return fwd, fwd_inplace, step, step_inplace, fold


def _without_grad(outputs):
    """``fused_ce_fwd``'s outputs less the gradient: those of its in-place twin."""
    loss, _grad, raw_stats, raw_pairwise, counts = outputs
    return loss, raw_stats, raw_pairwise, counts


# Registered at import (never while torch.compile traces a caller); TRITON_INTERPRET is fixed by then.
_FUSED_CE_OP, _FUSED_CE_INPLACE_OP, _STEP_OP, _STEP_INPLACE_OP, _FOLD_OP = (
    _register_ops() if HAS_TRITON else (None,) * 5
)


def fused_ce_op():
    """The forward op of this backend (``gala_triton::fused_ce_fwd``), for ``backends.fused_ce_op``."""
    return _FUSED_CE_OP


def fused_ce_inplace_op():
    """``gala_triton::fused_ce_fwd_inplace``: ``(loss, raw_stats, raw_pairwise, counts)``, grad in logits."""
    return _FUSED_CE_INPLACE_OP


def _eager_or_traced(traced, eager):
    """The custom op while torch.compile traces, the launcher itself in eager calls."""

    def call(*args):
        return traced(*args) if torch.compiler.is_compiling() else eager(*args)

    return call


def _eager_step_inplace(*args):
    loss = _step_inplace(*args)
    torch.autograd.graph.increment_version(args[0])  # the logits now hold the gradient
    return loss


def step_ops():
    """The device-step ops of this backend, for gala_kernels/backends/step.py."""
    return StepOps(
        step=_eager_or_traced(_STEP_OP, fused_ce_step),
        step_inplace=_eager_or_traced(_STEP_INPLACE_OP, _eager_step_inplace),
        fold=_eager_or_traced(_FOLD_OP, fold_step),
        scale=scale_grad,
    )


class InplaceFusedCE(torch.autograd.Function):
    """Autograd around the in-place ``fused_ce_fwd``: forward overwrites ``logits`` with the gradient.

    Safe when nothing else needs the logits' values for its own backward (e.g. logits straight out
    of a linear layer: its backward uses the input and weight, not the output). If something does,
    autograd raises "modified by an inplace operation" instead of computing a wrong gradient.
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        class_bias,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        compute_stats,
        track_pairwise,
    ):
        loss, raw_stats, raw_pairwise, counts = fused_ce_inplace_op()(
            logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
            track_pairwise,
        )
        # not mark_dirty: the logits are not returned; their version counter is bumped, so autograd
        # still catches any other node that saved their old values
        if not torch.compiler.is_compiling():
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(logits)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(raw_stats, raw_pairwise, counts)
        return loss, raw_stats, raw_pairwise, counts

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_statistics):
        (grad,) = ctx.saved_tensors
        scale_op = scale_grad if grad.device.type == "cuda" else None
        return (ops.scale_saved_grad(ctx, grad, grad_loss, ctx.reduction, scale_op),) + (None,) * 8


def fused_ce_inplace(
    logits,
    labels,
    class_bias=None,
    weight=None,
    ignore_index=-100,
    reduction=REDUCTION_MEAN,
    label_smoothing=0.0,
    compute_stats=False,
    track_pairwise=False,
):
    """``(loss, raw_stats, raw_pairwise, counts)`` with autograd; the logits' storage receives the
    gradient (what ``fused_gala_ce(..., inplace_backward=True)`` calls without a training state)."""
    return InplaceFusedCE.apply(
        logits,
        labels,
        class_bias,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        compute_stats,
        track_pairwise,
    )


class InplaceTrainingStep(torch.autograd.Function):
    """Autograd around the in-place training step: the forward leaves the gradient in ``logits``
    (their version counter bumped, so autograd catches any other node that saved their values)."""

    @staticmethod
    def forward(ctx, logits, labels, state, step_ops_, options):
        loss, grad = run_step_op(step_ops_, logits, labels, state, inplace=True, **options)
        ctx.save_for_backward(grad)
        ctx.ops = step_ops_
        ctx.reduction = options["reduction"]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_logits = ops.scale_saved_grad(ctx, grad, grad_loss, ctx.reduction, ctx.ops.scale)
        return grad_logits, None, None, None, None
