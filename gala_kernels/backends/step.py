"""The GPU training step: no host synchronisation, at most three launches, capturable in a CUDA graph.

A training step of ``fused_gala_ce`` on the ``triton`` or ``cuda`` backend (and on CPU tensors with
Triton's interpreter) is one op, ``fused_ce_step_`` (``torch.ops.gala`` for CUDA C++,
``torch.ops.gala_triton`` for Triton; the schema is in csrc/torch_bindings.cpp), that reads the
state and writes it back on the device:

1. the class bias ``lambda1 * log(pos_grad + eps)`` is computed inside the kernel, from the state
   as it was before the call;
2. loss, gradient (with ``weight`` and ``label_smoothing``) and the raw statistics, as
   ``fused_ce_fwd``; the raw sums and the step's counts go to ``state.step_scratch``, a
   persistent float32 buffer (layout in gala_kernels/state.py);
3. the last program of the launch (a ticket counter) folds the scratch into the state ("cumulative",
   "sum" or "ema"), adds 1 to ``steps`` and the non-finite rows to ``nonfinite_rows``, and zeroes
   the scratch, so no memset is needed before the next step.

Launches per training step (forward + backward): the step kernel (two for rows too long for one
on-chip pass) and the backward's scaling kernel, which reads ``grad_output`` on the device and
returns at once when it is 1. Under ``torch.distributed`` (a state that syncs) or with pairwise
tracking, the kernel leaves its sums in the scratch; then the scratch is all-reduced over the
ranks and ``fold_step_`` folds it: kernel, all-reduce, fold. No path reads a device value on the
host: labels outside ``[0, C)`` are handled on the device (gala_kernels/label_errors.py).

The backward scales the saved gradient in place (it is the op's own output, used by nothing else).
A second backward through the same graph (``retain_graph=True``) rescales out of place by the
ratio of the two ``grad_output`` values; under torch.compile the backward is a plain product.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, distributed, label_errors
from ..ops import scale_saved_grad
from ..state import ACCUMULATIONS, GALAState
from . import triton_gala
from .step_ops import StepOps, run_step_op, state_tensors, step_fake

__all__ = ["StepOps", "applies", "ops_for", "run_step_op", "state_tensors", "step_fake", "folds_in_kernel",
           "fold_pending", "training_step", "scale_op_for"]


def applies(name: str, logits: torch.Tensor) -> bool:
    """Whether a training step of backend ``name`` on ``logits`` runs as the device step."""
    if name == "cuda":
        return _extension.has_kernel("fused_ce_step_", "CUDA")
    if name == "triton":
        # float64 on a GPU: Triton's fp64 transcendentals are not relied upon (fused_ce_fwd's fallback)
        return triton_gala.HAS_TRITON and not (logits.dtype == torch.float64 and logits.device.type == "cuda")
    return False


_native_fakes_registered = False


def _register_native_fakes() -> None:
    """Fake implementations of the compiled step ops, so that torch.compile traces through them."""
    global _native_fakes_registered
    if _native_fakes_registered:
        return
    torch.library.register_fake("gala::fused_ce_step_")(step_fake)
    torch.library.register_fake("gala::fold_step_")(lambda *args: None)
    torch.library.register_fake("gala::scale_grad_")(lambda grad, grad_output: None)
    _native_fakes_registered = True


def scale_op_for(name: str, device: torch.device):
    """The in-place ``scale_grad_`` of backend ``name`` for a backward on ``device``, or None (CPU
    tensors, and backends without one: their backward reads ``grad_output`` on the host, free
    there)."""
    if device.type != "cuda":
        return None
    if name == "cuda" and _extension.has_kernel("scale_grad_", "CUDA"):
        _register_native_fakes()
        return torch.ops.gala.scale_grad_.default
    if name == "triton" and triton_gala.HAS_TRITON:
        return triton_gala.scale_grad
    return None


def ops_for(name: str) -> StepOps:
    if name == "cuda":
        _register_native_fakes()
        gala = torch.ops.gala
        return StepOps(gala.fused_ce_step_.default, None, gala.fold_step_.default, gala.scale_grad_.default)
    return triton_gala.step_ops()


def folds_in_kernel(state: GALAState) -> bool:
    """Whether the step kernel can fold (no sum over ranks to wait for, no pairwise matrix)."""
    return distributed.sync_group(state) is None and state.pairwise is None


def fold_pending(ops: StepOps, state: GALAState) -> None:
    """Fold the sums a step left in ``state.step_scratch``: first summed over ranks when the state
    syncs (one all-reduce of ``3C + 3`` floats, ``C * C`` more with pairwise tracking)."""
    distributed.sync_step_scratch(state)
    running = state.running_vectors if state.accumulation == "cumulative" else []
    ops.fold(
        state.step_scratch,
        state.raw_pairwise_scratch,
        state.stat_vectors,
        running,
        state.pairwise,
        state.running_pairwise,
        state.steps,
        state.nonfinite_rows,
        ACCUMULATIONS.index(state.accumulation),
        float(state.ema_beta),
    )


class _TrainingStep(torch.autograd.Function):
    """Autograd of the device step: the gradient is made in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, logits, labels, state, ops, options):
        loss, grad = run_step_op(ops, logits, labels, state, **options)
        ctx.save_for_backward(grad)
        ctx.ops = ops
        ctx.reduction = options["reduction"]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return scale_saved_grad(ctx, grad, grad_loss, ctx.reduction, ctx.ops.scale), None, None, None, None


def training_step(
    name: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    state: GALAState,
    *,
    weight: Optional[torch.Tensor],
    lambda1: float,
    eps: float,
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """A whole training step on the device: the loss, with autograd; the state updated."""
    label_errors.raise_pending(state)  # a bad label of an earlier step, if its record has landed
    if not label_errors.deferred(logits.device):
        label_errors.check_now(labels, logits.shape[1], ignore_index)
    ops = ops_for(name)
    fold = folds_in_kernel(state)
    options = dict(
        weight=weight,
        lambda1=lambda1,
        eps=eps,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        fold=fold,
    )
    if inplace_backward:
        loss = triton_gala.InplaceTrainingStep.apply(logits, labels, state, ops, options)
    elif torch.is_grad_enabled() and logits.requires_grad:
        loss = _TrainingStep.apply(logits, labels, state, ops, options)
    else:
        loss, _grad = run_step_op(ops, logits, labels, state, **options)
    if not fold:
        fold_pending(ops, state)
    label_errors.start_copy(state)
    return loss
