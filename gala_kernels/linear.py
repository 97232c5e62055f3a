"""``fused_linear_gala_ce``: the classifier matmul fused with the GALA loss, chunked over rows.

With ``C`` in the hundreds of thousands, the ``(B, C)`` logits (and their gradient, the same size
again) dominate training memory: at B = 8192, C = 100,000 fp32 they are 3.3 GB each. This module
never holds them at once. For each chunk of ``R`` rows (docs/contract.md formulas, ``a`` = adjusted logits):

    1. logits_c  = x_c @ W.T + b                                  (R, C), the only big buffer
    2. the backend's fused op (schema of gala::fused_ce_fwd) on logits_c, class_bias =
       lambda1 * log(pos_grad + eps), reduction "sum":
           loss rows, dlogits_c = (p - onehot) (w_i = 1), raw statistics of the chunk
    3. grad_x_c  = dlogits_c @ W          grad_W += dlogits_c.T @ x_c      grad_b += sum_rows dlogits_c
    4. drop logits_c and dlogits_c

``w_i = 1/N`` of the mean loss is over the WHOLE batch, so the chunks use reduction "sum" and the
accumulated gradients (and the loss) are scaled once by ``1/N`` at the end. The raw statistics are
summed over the chunks and folded ONCE with :func:`reference.fold_increments` (``s = 1/N`` of the
whole batch), so the state equals that of the unchunked call.

Backward (an autograd Function) scales the stored gradients by ``grad_output``. With reduction
``"none"`` the gradient of ``W`` depends on the per-row ``grad_output``, which is unknown in the
forward: then the forward stores nothing big, and the backward recomputes the chunks (the same
fused op, no statistics) with ``dlogits_c * grad_output_c``.

Default chunk rule (:func:`default_chunk_rows`): the chunk's logits take at most
``CHUNK_BYTES_CPU`` = 64 MiB on CPU and ``CHUNK_BYTES_CUDA`` = 1 GiB on CUDA (counted in fp32),
in chunks of equal size, a multiple of 8 rows (tensor-core friendly row counts), at least 8 rows,
at most B rows. The extra memory of a call is then a few chunk-sized buffers (logits, dlogits,
the op's scratch) plus the gradients of ``x``, ``W`` and ``b``. Why not smaller chunks on a GPU:
a few hundred long rows leave the GPU's SMs idle in the fused kernel (docs/performance.md has the
measurements, the ``linear`` benchmark repeats them).

When one chunk holds the whole batch, the fused op gets the call's own reduction (``w_i = 1/N``
inside the kernel) and ``grad_W = dlogits.T @ x`` is one matmul in the input dtype, exactly as
the unchunked step computes it: no fp32 accumulator, no rescaling pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import backends, folding, label_errors, reference
from .backends import step as device_step
from .loss import check_label_smoothing, check_labels_state_reduction, prepare_weight
from .ops import REDUCTION_CODES, scale_grad
from .state import GALAState

CHUNK_BYTES_CPU = 64 * 2**20
CHUNK_BYTES_CUDA = 2**30
CHUNK_ROW_MULTIPLE = 8
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def default_chunk_rows(batch: int, num_classes: int, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits fit in 64 MiB (CPU) / 1 GiB (CUDA), counted in fp32.

    The batch is cut into the fewest chunks that fit, of equal size (no small last chunk: a GPU
    kernel given a few hundred long rows leaves SMs idle), rounded up to a multiple of 8 rows: at
    least 8 rows, at most the budget + 7 rows, at most ``batch`` (rounded up to 8).
    """
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    fitting = budget // (4 * max(num_classes, 1)) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    fitting = max(CHUNK_ROW_MULTIPLE, fitting)
    batch = max(batch, 1)
    chunks = -(-batch // fitting)
    rows = -(-batch // chunks)
    return -(-rows // CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE


@dataclass(frozen=True)
class _Config:
    backend: str  # a concrete backend: "torch", "cpu", "triton" or "cuda"
    reduction: str
    ignore_index: int
    compute_stats: bool
    track_pairwise: bool
    chunk_rows: int
    grad_enabled: bool  # autograd records this call (ctx.needs_input_grad ignores no_grad mode)
    label_smoothing: float = 0.0


@dataclass
class _DeviceChunks:
    """A training call on a GPU backend: each chunk is one launch of the device step, whose kernel
    adds the chunk's statistics to ``state.step_scratch``; the last chunk's kernel folds them
    (``s = 1/N`` of the whole batch) when the state folds on the device, else ``fold_pending``
    does after the call. No host synchronisation."""

    ops: device_step.StepOps
    state: GALAState
    lambda1: float
    eps: float
    fold_in_kernel: bool


def _chunk_forward(config: _Config, logits, labels, class_bias, row_shift, weight, *, compute_stats,
                   reduction, device: Optional[_DeviceChunks] = None, row_offset=0, last=True):
    """One chunk through the backend: ``(loss, dlogits, raw (3,C) or None, raw_pairwise, counts)``."""
    pairwise = compute_stats and config.track_pairwise
    if device is not None and compute_stats:
        loss, grad = device_step.run_step_op(
            device.ops, logits, labels, device.state, weight=weight, lambda1=device.lambda1, eps=device.eps,
            ignore_index=config.ignore_index, reduction=REDUCTION_CODES[reduction],
            label_smoothing=config.label_smoothing, fold=device.fold_in_kernel and last,
            row_offset=row_offset)
        return loss, grad, None, None, None
    if config.backend == "torch":
        loss, grad, stats = reference.forward_and_grad(
            logits, labels, class_bias, row_shift, reduction=reduction, ignore_index=config.ignore_index,
            compute_stats=compute_stats, track_pairwise=pairwise, weight=weight,
            label_smoothing=config.label_smoothing,
        )
        if stats is None:
            return loss, grad, None, None, None
        return loss, grad, stats.raw, stats.raw_pairwise, stats.counts
    op = backends.fused_ce_op(config.backend)
    loss, grad, raw, raw_pairwise, counts = op(
        logits, labels, class_bias, weight, config.ignore_index, REDUCTION_CODES[reduction],
        config.label_smoothing, compute_stats, pairwise
    )
    if not compute_stats:
        return loss, grad, None, None, None
    return loss, grad, raw, raw_pairwise if pairwise else None, counts


def _chunk_logits(x_c, weight, bias):
    """``x_c @ W.T + b`` (the classifier's own bias; the GALA margin goes to the fused op)."""
    if bias is None:
        return x_c @ weight.t()
    return torch.addmm(bias, x_c, weight.t())


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients of W and b are accumulated over chunks in fp32 (fp64 for fp64 inputs)."""
    return reference.compute_dtype(dtype)


def _accumulate_grad_weight(grad_w: torch.Tensor, dlogits_c: torch.Tensor, x_c: torch.Tensor) -> None:
    """``grad_W += dlogits_c.T @ x_c``. fp32/fp64: in place. bf16/fp16: the chunk's product in the
    input dtype (tensor cores, fp32 accumulation inside the matmul, one rounding per chunk, as the
    unchunked matmul rounds once), summed over chunks in fp32."""
    if dlogits_c.dtype == grad_w.dtype:
        grad_w.addmm_(dlogits_c.t(), x_c)
    else:
        grad_w.add_(dlogits_c.t() @ x_c)


class _FusedLinearGALAFunction(torch.autograd.Function):
    """Chunked ``loss = GALA(x @ W.T + b)``; gradients made in the forward, scaled in backward.

    Outputs ``(loss, raw, raw_pairwise, counts)``; only ``loss`` is differentiable. Empty tensors
    stand for statistics that were not asked for.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, labels, class_bias, row_shift, class_weight, config: _Config,
                device: Optional[_DeviceChunks]):
        B, C = x.shape[0], weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        keep_grads = config.grad_enabled and config.reduction != "none" and (need_x or need_w or need_b)
        acc = _grad_dtype(x.dtype)
        one_chunk = 0 < B <= config.chunk_rows  # the whole batch at once: no accumulation over chunks
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if keep_grads and need_x else None
        accumulate = keep_grads and not one_chunk  # grad_W and grad_b summed over chunks, in fp32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if accumulate and need_w else None
        grad_b = torch.zeros(C, dtype=acc, device=x.device) if accumulate and need_b else None

        if config.reduction == "none":
            chunk_reduction = "none"
        else:  # one chunk: the kernel applies w_i = 1/N itself ("mean"); else the sums are scaled below
            chunk_reduction = config.reduction if one_chunk else "sum"
        losses = []
        raw = raw_pairwise = counts = None
        for start in range(0, B, config.chunk_rows):
            stop = min(start + config.chunk_rows, B)
            x_c = x[start:stop]
            logits_c = _chunk_logits(x_c, weight, bias)
            loss_c, dlogits_c, raw_c, pair_c, counts_c = _chunk_forward(
                config, logits_c, labels[start:stop], class_bias, row_shift, class_weight,
                compute_stats=config.compute_stats, reduction=chunk_reduction, device=device,
                row_offset=start, last=stop == B,
            )
            del logits_c
            losses.append(loss_c)
            if config.compute_stats and device is None:  # raw sums add over chunks, folded once
                raw = raw_c.clone() if raw is None else raw.add_(raw_c)
                counts = counts_c.clone() if counts is None else counts.add_(counts_c)
                if pair_c is not None:
                    raw_pairwise = pair_c.clone() if raw_pairwise is None else raw_pairwise.add_(pair_c)
            if keep_grads:
                if grad_x is not None:  # grad_x_c = dlogits_c @ W
                    torch.mm(dlogits_c, weight, out=grad_x[start:stop])
                if one_chunk:  # as the unchunked step: grad_W = dlogits.T @ x in the input dtype
                    grad_w = dlogits_c.t() @ x_c if need_w else None
                    grad_b = dlogits_c.sum(dim=0, dtype=acc) if need_b else None
                else:
                    if grad_w is not None:  # grad_W += dlogits_c.T @ x_c
                        _accumulate_grad_weight(grad_w, dlogits_c, x_c)
                    if grad_b is not None:  # grad_b += sum over rows of dlogits_c
                        grad_b.add_(dlogits_c.sum(dim=0, dtype=acc))
            del dlogits_c

        valid = labels != config.ignore_index
        if config.reduction == "none":
            loss = torch.cat(losses) if losses else x.new_zeros(0)
        elif one_chunk:  # already the call's mean or sum, gradients included
            loss = losses[0]
        else:
            total = torch.stack(losses).to(acc).sum() if losses else x.new_zeros((), dtype=acc)
            loss = total
            if config.reduction == "mean":  # r_i = 1/W, whole batch (W = 0 -> NaN, as F.cross_entropy)
                total_weight = _total_weight(labels, valid, class_weight, acc)
                loss = total / total_weight
                # 1/W; W = 0 with rows to weight gives NaN gradients (as torch), with none 0
                no_rows = torch.zeros((), dtype=acc, device=x.device).where(~valid.any(), float("nan"))
                inv_w = torch.where(total_weight > 0, 1.0 / total_weight, no_rows)
                for g in (grad_x, grad_w, grad_b):
                    if g is not None:
                        g.mul_(inv_w.to(g.dtype))

        if config.reduction == "none":
            ctx.save_for_backward(x, weight, bias, labels, class_bias, row_shift, class_weight)
        else:
            ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.config = config
        ctx.input_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.scale_ops = device.ops if device is not None else None
        ctx.applied = None

        empty = x.new_empty(0, dtype=torch.float32)
        raw = raw if raw is not None else empty
        raw_pairwise = raw_pairwise if raw_pairwise is not None else empty
        counts = counts if counts is not None else empty.to(torch.int64)
        if config.compute_stats and device is None and counts.numel() == 0:  # B = 0: nothing seen, N = 0
            raw = torch.zeros(3, C, dtype=torch.float32, device=x.device)
            counts = torch.zeros(2, dtype=torch.int64, device=x.device)
        ctx.mark_non_differentiable(raw, raw_pairwise, counts)
        return loss.to(x.dtype), raw, raw_pairwise, counts

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_statistics):
        config = ctx.config
        x_dtype, w_dtype, b_dtype = ctx.input_dtypes
        if config.reduction == "none":
            grad_x, grad_w, grad_b = _recompute_grads_for_none(ctx, grad_loss)
        else:
            scale_op = ctx.scale_ops.scale if ctx.scale_ops is not None else None
            scaled = [(None, False) if g is None else scale_grad(g, grad_loss, applied=ctx.applied,
                                                                 scale_op=scale_op)
                      for g in ctx.saved_tensors]
            (grad_x, _), (grad_w, _), (grad_b, _) = scaled
            if any(in_place for _, in_place in scaled):
                ctx.applied = grad_loss.detach()  # the saved gradients hold this multiple now
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _total_weight(labels, valid, class_weight, dtype) -> torch.Tensor:
    """``W``: the number of non-ignored rows, or the sum of their class weights (on the device)."""
    if class_weight is None:
        return valid.sum().to(dtype)
    label_weight = class_weight[torch.where(valid, labels, torch.zeros_like(labels))]
    return torch.where(valid, label_weight, torch.zeros_like(label_weight)).sum().to(dtype)


def _recompute_grads_for_none(ctx, grad_loss):
    """Reduction "none": dlogits_c = (p - onehot) * grad_output_i, recomputed chunk by chunk."""
    x, weight, bias, labels, class_bias, row_shift, class_weight = ctx.saved_tensors
    config = ctx.config
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    acc = _grad_dtype(x.dtype)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_b else None
    with torch.no_grad():
        for start in range(0, x.shape[0], config.chunk_rows):
            stop = min(start + config.chunk_rows, x.shape[0])
            x_c = x[start:stop]
            logits_c = _chunk_logits(x_c, weight, bias)
            _, dlogits_c, *_ = _chunk_forward(
                config, logits_c, labels[start:stop], class_bias, row_shift, class_weight,
                compute_stats=False, reduction="none",
            )
            del logits_c
            dlogits_c = dlogits_c * grad_loss[start:stop].unsqueeze(1).to(dlogits_c.dtype)
            if grad_x is not None:
                torch.mm(dlogits_c, weight, out=grad_x[start:stop])
            if grad_w is not None:
                _accumulate_grad_weight(grad_w, dlogits_c, x_c)
            if grad_b is not None:
                grad_b.add_(dlogits_c.sum(dim=0, dtype=acc))
    return grad_x, grad_w, grad_b


def _check_inputs(x, weight, labels, state, bias, reduction, chunk_size) -> None:
    """Validate every argument before anything runs, naming the argument that is wrong."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (B, D), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (C, D) with D = {x.shape[1]} (from x), got {shape}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one class (row), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}")
    C = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (C,):
            raise ValueError(f"bias must have shape (C,) = ({C},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias is {bias.dtype} on {bias.device} but x is {x.dtype} on {x.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_labels_state_reduction(labels, state, reduction, x.shape[0], C, x.device, "x")


def fused_linear_gala_ce(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    state: Optional[GALAState] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    lambda1: float = 1.2,
    lambda2: float = 0.9,
    eps: float = 1e-3,
    reduction: str = "mean",
    ignore_index: int = -100,
    update_state: bool = True,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    class_weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``fused_gala_ce(x @ weight.T + bias, labels, state, ...)`` without the ``(B, C)`` logits.

    ``x`` is ``(B, D)``, ``weight`` ``(C, D)`` (an ``nn.Linear``'s weight), ``bias`` ``(C,)`` or
    None, all of one dtype and device. The batch is processed ``chunk_size`` rows at a time
    (default: :func:`default_chunk_rows`, chunk logits <= 64 MiB on CPU, 1 GiB on CUDA); the loss,
    the gradients of ``x``, ``weight`` and ``bias`` and the state after the call equal those of the
    unchunked ``fused_gala_ce`` (up to the summation order of the chunks).

    The other arguments mean what they mean in ``fused_gala_ce`` (``class_weight`` is its
    ``weight``: here ``weight`` is the classifier's); ``state=None`` gives plain cross-entropy
    (evaluation semantics). ``lambda2`` is constant along a row and changes neither
    the loss nor a gradient (softmax is shift-invariant); the fused kernels skip it.
    """
    _check_inputs(x, weight, labels, state, bias, reduction, chunk_size)
    check_label_smoothing(label_smoothing)
    C = weight.shape[0]
    class_weight = prepare_weight(class_weight, C, x.device, reference.compute_dtype(x.dtype), source="x")
    name = backends.resolve(backend, x, shape=(x.shape[0], C))  # decided by the logits' shape
    compute_stats = state is not None and update_state
    device = None
    if compute_stats and x.shape[0] > 0 and device_step.applies(name, x):
        label_errors.raise_pending(state)
        device = _DeviceChunks(device_step.ops_for(name), state, float(lambda1), float(eps),
                               device_step.folds_in_kernel(state))
    if name != "cpu" and not (device is not None and label_errors.deferred(x.device)):
        label_errors.check_now(labels, C, ignore_index)  # the C++ CPU op checks the labels itself
    class_bias = row_shift = None
    if state is not None and device is None:
        class_bias = reference.class_bias(state, lambda1, eps, reference.compute_dtype(x.dtype))
        if name == "torch":  # the reference keeps the (gradient-free) lambda2 term, for parity
            row_shift = lambda2 * torch.log(state.neg_grad.to(class_bias.dtype) + eps)
    chunk_rows = chunk_size if chunk_size is not None else default_chunk_rows(x.shape[0], C, x.device)
    config = _Config(
        backend=name, reduction=reduction, ignore_index=int(ignore_index), compute_stats=compute_stats,
        track_pairwise=compute_stats and state.pairwise is not None, chunk_rows=chunk_rows,
        grad_enabled=torch.is_grad_enabled(), label_smoothing=float(label_smoothing),
    )
    loss, raw, raw_pairwise, counts = _FusedLinearGALAFunction.apply(
        x, weight, bias, labels, class_bias, row_shift, class_weight, config, device
    )
    if device is not None:
        if not device.fold_in_kernel:
            device_step.fold_pending(device.ops, state)
        label_errors.start_copy(state)
    elif compute_stats:
        stats = reference.StepStatistics(raw, raw_pairwise if config.track_pairwise else None, counts)
        folding.fold_step(state, stats)
    return loss
