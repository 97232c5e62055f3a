"""The public loss API: ``fused_gala_ce`` and ``GALALoss`` (docs/contract.md, "Public API")."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _extension, backends, folding, label_errors, reference
from .backends import step as device_step
from .distributed import sync_group
from .ops import REDUCTION_CODES, backward_from_saved_grad, call_fused_ce, save_grad_for_backward
from .state import GALAState

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, state: Optional[GALAState], reduction: str,
                 ignore_index: int, label_smoothing: float = 0.0) -> None:
    """Validate every argument before anything runs, naming the argument that is wrong."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D tensor (B, C), got {shape}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    check_labels_state_reduction(labels, state, reduction, logits.shape[0], logits.shape[1], logits.device,
                                 "logits")
    check_label_smoothing(label_smoothing)


def check_labels_state_reduction(labels, state: Optional[GALAState], reduction: str, batch: int,
                                 num_classes: int, device: torch.device, source: str) -> None:
    """The checks every GALA entry point shares; ``source`` names the tensor that fixed ``B``,
    ``C`` and the device (``"logits"``, or ``"x"`` for the fused linear layer)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != batch:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape (B,) = ({batch},), got {shape}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {source} is on {device}")
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {tuple(REDUCTION_CODES)}, got {reduction!r}")
    if state is not None:
        if not isinstance(state, GALAState):
            raise TypeError(f"state must be a GALAState or None, got {type(state).__name__}")
        if state.num_classes != num_classes:
            raise ValueError(
                f"state has num_classes={state.num_classes} but {source} has C={num_classes} classes"
            )
        if state.pos_grad.device != device:
            raise ValueError(f"state is on {state.pos_grad.device} but {source} is on {device}")


def check_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")


# attribute set on a weight tensor checked for negative entries: its version counter then
_CHECKED_VERSION = "_gala_checked_version"


def prepare_weight(weight: Optional[torch.Tensor], num_classes: int, device: torch.device,
                   math_dtype: torch.dtype, source: str = "logits") -> Optional[torch.Tensor]:
    """``weight`` checked (a float ``(C,)`` tensor on ``device``, no negative entry) and converted to
    the math dtype, contiguous; None stays None.

    Finding a negative entry reads the tensor's values, a host synchronisation on a GPU, so it is
    done once per tensor and version (an in-place change is checked again); under torch.compile it
    is left out (the values are not known while tracing).
    """
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != num_classes:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 1-D tensor of shape (C,) = ({num_classes},), got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but {source} is on {device}")
    if weight.requires_grad:
        raise ValueError("weight must not require grad: the class weights are not differentiated")
    if not torch.compiler.is_compiling() and type(weight) is torch.Tensor:
        if getattr(weight, _CHECKED_VERSION, None) != weight._version:
            if bool((weight < 0).any()):
                index = int((weight < 0).nonzero()[0, 0])
                raise ValueError(f"weight must be non-negative, got weight[{index}] = {float(weight[index])}")
            setattr(weight, _CHECKED_VERSION, weight._version)
    return weight.to(math_dtype).contiguous()


def fused_gala_ce(
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
    backend: str = "auto",
    inplace_backward: bool = False,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """GALA cross-entropy with the per-class statistics update, fused in one pass over the logits.

    ``state=None`` gives plain cross-entropy through the same kernel (evaluation semantics). With a
    state, the logits are shifted by ``lambda1 * log(state.pos_grad + eps)`` (the state as it was
    before this call) and, if ``update_state``, the step's statistics are folded in afterwards.

    ``lambda2`` multiplies ``log(neg_grad[y_i] + eps)``, a term constant along each row: it changes
    neither the loss nor any gradient (softmax is shift-invariant), as in the authors' formulation.
    It is kept for parity; the fused kernels skip it.

    ``weight`` (a ``(C,)`` float tensor of non-negative class weights) and ``label_smoothing``
    (in ``[0, 1]``) mean exactly what they mean in ``torch.nn.functional.cross_entropy``; with
    ``a`` the adjusted logits and ``lse_i = logsumexp(a[i, :])``::

        loss_i = (1 - ls) * weight[y_i] * (lse_i - a[i, y_i]) + (ls / C) * sum_j weight[j] * (lse_i - a[i, j])

    and the mean divides by ``sum of weight[y_i]`` over the non-ignored rows. They change the loss
    and its gradient only: the GALA statistics stay those of the contract (from the softmax and the
    one-hot label, scaled by ``1/N``). With ``state=None`` and ``lambda1=0`` the call equals
    ``F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)``.

    ``inplace_backward=True`` (Triton backend only) writes the gradient into the logits' own
    storage instead of a new ``B x C`` buffer, saving that much memory. The logits' values are
    gone after the call: use it only when nothing else needs them, such as logits straight out of
    a linear layer (autograd raises "modified by an inplace operation" otherwise).

    Labels outside ``[0, C)`` that are not ``ignore_index`` raise ``ValueError``: at once for CPU
    tensors; for a CUDA training step without stopping the host (see ``GALAState.check_errors``).
    """
    check_inputs(logits, labels, state, reduction, ignore_index, label_smoothing)
    C = logits.shape[1]
    weight = prepare_weight(weight, C, logits.device, reference.compute_dtype(logits.dtype))
    label_smoothing = float(label_smoothing)
    name = backends.resolve(backend, logits)
    if inplace_backward and name != "triton":
        raise ValueError(f"inplace_backward=True needs backend 'triton', but the call resolved to {name!r}")
    compute_stats = state is not None and update_state
    code = REDUCTION_CODES[reduction]
    if compute_stats and device_step.applies(name, logits):
        return device_step.training_step(
            name, logits, labels, state, weight=weight, lambda1=lambda1, eps=eps, ignore_index=ignore_index,
            reduction=code, label_smoothing=label_smoothing, inplace_backward=inplace_backward,
        )
    if name != "cpu":  # the C++ CPU op checks the labels itself, with the same message
        label_errors.check_now(labels, C, ignore_index)
    pairwise = compute_stats and state.pairwise is not None
    if name == "torch":
        bias = row_shift = None
        if state is not None:
            bias = reference.class_bias(state, lambda1, eps, reference.compute_dtype(logits.dtype))
            row_shift = lambda2 * torch.log(state.neg_grad.to(bias.dtype) + eps)
        loss, _grad, raw, raw_pairwise, counts = call_fused_ce(
            backends.fused_ce_op("torch"), logits, labels, bias, weight, ignore_index, code, label_smoothing,
            compute_stats, pairwise, row_shift,
        )
    elif name == "cpu" and compute_stats and _one_call_cpu_step(logits, state):
        return _cpu_step(logits, labels, state, weight, lambda1, eps, ignore_index, code, label_smoothing)
    else:
        bias = None
        if state is not None:
            bias = reference.class_bias(state, lambda1, eps, reference.compute_dtype(logits.dtype))
        args = (logits, labels, bias, weight, ignore_index, code, label_smoothing, compute_stats, pairwise)
        if inplace_backward:
            loss, raw, raw_pairwise, counts = backends.triton_inplace_fused_ce(*args)
        else:
            loss, _grad, raw, raw_pairwise, counts = call_fused_ce(
                backends.fused_ce_op(name), *args, scale_op=device_step.scale_op_for(name, logits.device))
    if compute_stats:
        folding.fold_step(state, reference.StepStatistics(raw, raw_pairwise if pairwise else None, counts))
    return loss


def _one_call_cpu_step(logits: torch.Tensor, state: GALAState) -> bool:
    """Whether this CPU step can run as one call of ``gala::fused_ce_step_cpu_`` (class bias,
    fused op and fold in C++, the same operations and bits): an eager step on a plain tensor, a
    state whose fold the C++ code covers (cumulative or sum, no pairwise tracking) and that is not
    synced over ranks.

    Why: each call from Python costs far more right after a memory-heavy neighbour than in a tight
    loop (docs/kernels.md, "CPU host path").
    """
    return (folding.folds_in_cpp(state) and type(logits) is torch.Tensor
            and not torch.compiler.is_compiling() and sync_group(state) is None
            and _extension.has_kernel("fused_ce_step_cpu_", "CPU"))


def _cpu_step_op(logits, labels, state, weight, lambda1, eps, ignore_index, reduction_code, label_smoothing,
                 op=None):
    """``(loss, grad)`` of ``gala::fused_ce_step_cpu_`` (``op``: another build's, for benchmarks)."""
    targets, running, mode = folding.cpp_fold_arguments(state)
    op = torch.ops.gala.fused_ce_step_cpu_ if op is None else op
    return op(logits, labels, weight, targets, running, state.steps, state.nonfinite_rows, lambda1, eps,
              ignore_index, reduction_code, label_smoothing, mode)


class _EagerCpuStep(torch.autograd.Function):
    """Autograd of the one-call CPU step: the backward of every fused op (ops.py)."""

    @staticmethod
    def forward(ctx, logits, labels, state, weight, lambda1, eps, ignore_index, reduction_code,
                label_smoothing):
        with torch._C._AutoDispatchBelowAutograd():
            loss, grad = _cpu_step_op(logits, labels, state, weight, lambda1, eps, ignore_index,
                                      reduction_code, label_smoothing)
        save_grad_for_backward(ctx, grad, reduction_code, num_inputs=9)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return backward_from_saved_grad(ctx, grad_loss)


def _cpu_step(logits, labels, state, weight, lambda1, eps, ignore_index, reduction_code,
              label_smoothing) -> torch.Tensor:
    args = (logits, labels, state, weight, lambda1, eps, ignore_index, reduction_code, label_smoothing)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _EagerCpuStep.apply(*args)
    return _cpu_step_op(*args)[0]


class GALALoss(nn.Module):
    """GALA loss as a module that owns its :class:`GALAState` (``self.state``).

    Training mode: margins from the state, statistics updated every call. Evaluation mode: plain
    ``cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)``, no margins,
    the state untouched (docs/contract.md).

    ``weight`` (class weights, kept as a float32 buffer ``self.weight`` that moves and saves with
    the module, as in ``nn.CrossEntropyLoss``) and ``label_smoothing`` are those of
    :func:`fused_gala_ce`.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        lambda1: float = 1.2,
        lambda2: float = 0.9,
        eps: float = 1e-3,
        reduction: str = "mean",
        ignore_index: int = -100,
        accumulation: str = "cumulative",
        ema_beta: float = 0.99,
        track_pairwise: bool = False,
        backend: str = "auto",
        inplace_backward: bool = False,
        sync: Optional[str] = "auto",
        process_group=None,
        weight: Optional[torch.Tensor] = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if reduction not in REDUCTION_CODES:
            raise ValueError(f"reduction must be one of {tuple(REDUCTION_CODES)}, got {reduction!r}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        self.state = GALAState(
            num_classes, accumulation=accumulation, ema_beta=ema_beta, track_pairwise=track_pairwise,
            sync=sync, process_group=process_group,
        )
        self.lambda1, self.lambda2, self.eps = float(lambda1), float(lambda2), float(eps)
        self.reduction, self.ignore_index, self.backend = reduction, int(ignore_index), backend
        self.inplace_backward = bool(inplace_backward)
        check_label_smoothing(label_smoothing)
        self.label_smoothing = float(label_smoothing)
        if weight is not None:
            weight = prepare_weight(weight, num_classes, weight.device if isinstance(weight, torch.Tensor)
                                    else torch.device("cpu"), torch.float32)
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_gala_ce(
            logits, labels, self.state if self.training else None, lambda1=self.lambda1,
            lambda2=self.lambda2, eps=self.eps, reduction=self.reduction, ignore_index=self.ignore_index,
            update_state=self.training, backend=self.backend, inplace_backward=self.inplace_backward,
            weight=self.weight, label_smoothing=self.label_smoothing,
        )

    def extra_repr(self) -> str:
        extra = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        return (
            f"lambda1={self.lambda1}, lambda2={self.lambda2}, eps={self.eps}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}{extra}"
        )
