"""Python side of the fused ops: fake (meta) implementations and autograd registrations.

Every backend's forward op has the schema of ``gala::fused_ce_fwd`` (csrc/torch_bindings.cpp)::

    (logits, labels, class_bias?, weight?, ignore_index, reduction, label_smoothing, compute_stats,
     track_pairwise) -> (loss, grad, raw_stats, raw_pairwise, counts)

The gradient is computed in the forward; backward only scales it by ``grad_output`` and skips
even that, in eager mode, when ``grad_output`` is 1.
"""

from __future__ import annotations

import torch

from . import _extension

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_NONE = REDUCTION_CODES["none"]
REDUCTION_ARG = 5  # position of `reduction` among the fused op's inputs


def fused_ce_fake(logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing, compute_stats,
                  track_pairwise, *extra_inputs):
    """Shapes and dtypes of the fused forward's outputs (used by torch.compile / FakeTensor)."""
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D")
    torch._check(labels.dim() == 1 and labels.shape[0] == logits.shape[0], lambda: "labels must be (B,)")
    B, C = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    loss = logits.new_empty((B,) if reduction == _NONE else ())
    grad = logits.new_empty((B, C))
    raw_stats = torch.empty((3, C) if compute_stats else (0,), **f32)
    raw_pairwise = torch.empty((C, C) if compute_stats and track_pairwise else (0,), **f32)
    counts = torch.empty((2,), dtype=torch.int64, device=logits.device)
    return loss, grad, raw_stats, raw_pairwise, counts


def _is_eager(t: torch.Tensor) -> bool:
    """True for a real tensor outside any tracing (dynamo, AOT autograd, fake or functional
    tensors), where reading its value to skip work is allowed."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, *, applied=None, scale_op=None):
    """``(grad * grad_output, scaled_in_place)`` for a backward whose gradient was made in the forward.

    The common ``grad_output`` of 1 costs nothing in eager calls: with a backend's in-place scaling
    op (``scale_op``, ``scale_grad_``) a kernel reads it on the device, without a host
    synchronisation, and scales ``grad`` in place, returning at once when it is 1; without one, a
    CPU tensor's value is read on the host (free there). ``applied``: the ``grad_output`` an
    earlier backward of the same graph (``retain_graph``) scaled ``grad`` by in place; then the
    ratio is applied, out of place.
    """
    if not _is_eager(grad_output) or type(grad) is not torch.Tensor:
        return grad * grad_output.to(grad.dtype), False
    if applied is not None:
        return grad * (grad_output / applied).to(grad.dtype), False
    if scale_op is not None and grad.is_contiguous():
        scale_op(grad, grad_output)
        return grad, True
    if grad.device.type == "cpu":  # item: ~1 us on CPU, `== 1` ~15 us
        return (grad if grad_output.item() == 1 else grad * grad_output.to(grad.dtype)), False
    return grad * grad_output.to(grad.dtype), False


def scale_saved_grad(ctx, grad: torch.Tensor, grad_output: torch.Tensor, reduction: int,
                     scale_op=None) -> torch.Tensor:
    """``dloss/dlogits = grad * grad_output`` (per row for reduction "none"), by :func:`scale_grad`;
    records on ``ctx`` what an in-place scaling applied."""
    if reduction == _NONE:
        return grad * grad_output.unsqueeze(1).to(grad.dtype)
    result, in_place = scale_grad(grad, grad_output, applied=getattr(ctx, "applied_grad_output", None),
                                  scale_op=scale_op)
    if in_place:
        ctx.applied_grad_output = grad_output.detach()  # a reference: autograd does not reuse it
    return result


def save_grad_for_backward(ctx, grad: torch.Tensor, reduction: int, num_inputs: int) -> None:
    """What the backward of every fused op needs: the gradient its forward wrote, the reduction
    code and how many inputs get a gradient slot (only the logits, the first, gets one)."""
    ctx.reduction = reduction
    ctx.num_inputs = num_inputs
    ctx.save_for_backward(grad)
    # The other outputs (grad, statistics) are never differentiated: without this, autograd would
    # fill a B x C zero tensor for the unused `grad` output on every backward.
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    save_grad_for_backward(ctx, output[1], inputs[REDUCTION_ARG], len(inputs))


def backward_from_saved_grad(ctx, grad_loss, *_grads_of_other_outputs):
    """The backward of every fused op: the saved gradient, scaled by ``grad_output`` when needed."""
    (grad,) = ctx.saved_tensors
    scale_op = getattr(ctx, "scale_op", None)
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    grad_logits = scale_saved_grad(ctx, grad, grad_loss, ctx.reduction, scale_op)
    return (grad_logits,) + (None,) * (ctx.num_inputs - 1)  # nothing else is differentiable


def register_fused_ce(op) -> None:
    """Give a forward op with the fused_ce_fwd schema its fake implementation and autograd."""
    torch.library.register_fake(op)(fused_ce_fake)
    torch.library.register_autograd(op, backward_from_saved_grad, setup_context=_setup_context)


class _EagerFusedCE(torch.autograd.Function):
    """The autograd of :func:`register_fused_ce` for eager calls, without its Python dispatch.

    An op's registered autograd (``torch.library.register_autograd``) is what ``torch.compile``
    traces, but in eager mode its Python wrapper and redispatch cost ~0.1 ms per call (measured:
    100 us for a 2-row call that takes 33 us without autograd, 2-core EPYC), a host cost that a
    short GPU step pays in full. This Function computes the same thing with the same pieces: the
    forward calls the op below the Autograd dispatch key (straight to its device kernel) and
    :func:`_setup_context`, the backward is :func:`backward_from_saved_grad` (plus no gradient for
    ``op``).
    """

    @staticmethod
    def forward(ctx, op, scale_op, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            outputs = op(*inputs)
        _setup_context(ctx, inputs, outputs)
        ctx.scale_op = scale_op
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *grads_of_other_outputs):
        return (None, None) + backward_from_saved_grad(ctx, grad_loss, *grads_of_other_outputs)


def call_fused_ce(op, *inputs, scale_op=None):
    """``op(*inputs)`` with autograd: the registered autograd under ``torch.compile`` (and for
    tensor subclasses), the same backward through :class:`_EagerFusedCE` in plain eager calls,
    where ``scale_op`` (the backend's ``scale_grad_``, for GPU tensors) scales the gradient in place
    without a host synchronisation."""
    logits = inputs[0]
    if torch.compiler.is_compiling() or type(logits) is not torch.Tensor or not (
            torch.is_grad_enabled() and logits.requires_grad):
        return op(*inputs)
    return _EagerFusedCE.apply(op, scale_op, *inputs)


_registered_native = False


def native_fused_ce():
    """``torch.ops.gala.fused_ce_fwd`` from the compiled extension, registered on first use."""
    global _registered_native
    if not _extension.load():
        return None
    if not _registered_native:
        register_fused_ce("gala::fused_ce_fwd")
        _registered_native = True
    return torch.ops.gala.fused_ce_fwd
