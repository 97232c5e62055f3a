"""The ``"torch"`` backend: the pure-PyTorch reference as a custom op with the fused ops' schema.

``gala_ref::fused_ce_fwd`` wraps :func:`gala_kernels.reference.forward_and_grad` (plus
``row_shift``, the lambda2 term that the kernels skip), so that a call with ``backend="torch"``
goes through the same autograd and torch.compile path as every other backend. Empty tensors stand
for statistics that were not asked for.
"""

from __future__ import annotations

import torch

from .. import ops, reference
from . import schemas

_REDUCTION_NAMES = {code: name for name, code in ops.REDUCTION_CODES.items()}


def _reference_forward(logits, labels, class_bias, weight, ignore_index, reduction, label_smoothing,
                       compute_stats, track_pairwise, row_shift=None):
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


reference_fused_ce = schemas.define(
    "gala_ref",
    f"fused_ce_fwd(Tensor logits, {schemas.FUSED_CE_ARGUMENTS}, Tensor? row_shift=None) -> "
    f"{schemas.FUSED_CE_OUTPUTS}",
    _reference_forward,
)
ops.register_fused_ce(reference_fused_ce)
