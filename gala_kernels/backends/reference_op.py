"""The ``"torch"`` backend: the pure-PyTorch reference as a custom op with the fused ops' schema.

``gala_ref::fused_ce_fwd`` wraps :func:`gala_kernels.reference.forward_and_grad` (plus
``row_shift``, the lambda2 term that the kernels skip), so that a call with ``backend="torch"``
goes through the same autograd and torch.compile path as every other backend. Empty tensors stand
for statistics that were not asked for.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import ops, reference

_REDUCTION_NAMES = {code: name for name, code in ops.REDUCTION_CODES.items()}


@torch.library.custom_op("gala_ref::fused_ce_fwd", mutates_args=())
def reference_fused_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_bias: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    compute_stats: bool,
    track_pairwise: bool,
    row_shift: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad, stats = reference.forward_and_grad(
        logits, labels, class_bias, row_shift, reduction=_REDUCTION_NAMES[reduction],
        ignore_index=ignore_index, compute_stats=compute_stats, track_pairwise=track_pairwise,
        weight=weight, label_smoothing=label_smoothing,
    )
    empty = lambda: torch.empty(0, dtype=torch.float32, device=logits.device)  # noqa: E731
    raw = stats.raw.float() if stats is not None else empty()
    raw_pairwise = stats.raw_pairwise.float() if stats is not None and track_pairwise else empty()
    counts = stats.counts if stats is not None else torch.zeros(2, dtype=torch.int64, device=logits.device)
    return loss.to(logits.dtype), grad, raw, raw_pairwise, counts


ops.register_fused_ce(reference_fused_ce)
