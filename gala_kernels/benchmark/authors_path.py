"""A faithful port of the authors' per-step GALA statistics path: a baseline, not library code.

The GALA authors' training code shifts the logits by the accumulated statistics, computes the
cross-entropy, then collects the statistics from the gradient of the loss taken on a detached
copy of the (adjusted) logits: a Python loop over the batch adds each sample's gradient
magnitudes into column ``y_i`` of a ``C x C`` matrix, the matrix is added into a running matrix,
and every step the diagonal / off-diagonal row and column sums of the running matrix (masked with
``eye``) are added to the state ("cumulative" folding, docs/contract.md).

It is slow on purpose (a Python loop and ``C x C`` matrices): it is the "authors' path" that
``python -m gala_kernels bench step`` times the fused step against, and the oracle of
``tests/test_parity_authors.py``. It lives in the benchmark package because the installed
``gala-kernels bench`` command times it; the library itself never uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AuthorsGALA:
    """The authors' GALA step. ``step(logits, labels)`` returns the (differentiable) mean loss."""

    def __init__(self, num_classes: int, lambda1: float = 1.2, lambda2: float = 0.9, eps: float = 1e-3,
                 dtype: torch.dtype = torch.float32, device=None):
        C = num_classes
        self.num_classes, self.lambda1, self.lambda2, self.eps = C, lambda1, lambda2, eps
        zeros = dict(dtype=dtype, device=device)
        self.pos_grad = torch.zeros(C, **zeros)
        self.neg_grad = torch.zeros(C, **zeros)
        self.cls_neg_grad = torch.zeros(C, **zeros)
        self.running_matrix = torch.zeros(C, C, **zeros)  # the authors' accumulated |grad| matrix
        self.eye = torch.eye(C, **zeros)

    def adjusted_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        margin = self.lambda1 * torch.log(self.pos_grad + self.eps)
        row_shift = self.lambda2 * torch.log(self.neg_grad[labels] + self.eps)
        return logits + margin.to(logits.dtype) - row_shift.to(logits.dtype).unsqueeze(1)

    def collect_grad(self, adjusted: torch.Tensor, labels: torch.Tensor) -> None:
        """Statistics from the gradient of the mean loss on a detached copy of the logits."""
        copy = adjusted.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(copy, labels), copy)
        step_matrix = torch.zeros_like(self.running_matrix)
        for i in range(labels.shape[0]):  # column y_i receives |dloss/dz_i|
            step_matrix[:, labels[i]] += grad[i].abs().to(step_matrix.dtype)
        self.running_matrix += step_matrix
        off_diagonal = self.running_matrix * (1 - self.eye)
        self.pos_grad += (self.running_matrix * self.eye).sum(0)  # diagonal: positive part
        self.neg_grad += off_diagonal.sum(0)  # per sample class k: sum_{j != k} Phi[j, k]
        self.cls_neg_grad += off_diagonal.sum(1)  # per column j: sum_{k != j} Phi[j, k]

    def step(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adjusted = self.adjusted_logits(logits, labels)
        loss = F.cross_entropy(adjusted, labels)
        self.collect_grad(adjusted, labels)
        return loss
