"""Parity with the authors' code: 20 steps of their per-step statistics path (a Python loop into
a C x C matrix, eye masks, row and column sums, cumulative folding, the loss's gradient taken on a
detached copy; gala_kernels/benchmark/authors_path.py) against our fused step, C = 37, repeated labels."""

import pytest
import torch
from test_fused_ce import CPU_BACKENDS

import gala_kernels as gk
from gala_kernels.benchmark.authors_path import AuthorsGALA

RTOL = 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_twenty_steps_match_the_authors_path(backend):
    C, B, steps = 37, 48, 20
    g = torch.Generator().manual_seed(2024)
    authors = AuthorsGALA(C, lambda1=1.2, lambda2=0.9, eps=1e-3, dtype=torch.float64)
    state = gk.GALAState(C, accumulation="cumulative")
    for _ in range(steps):
        logits = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
        labels = torch.randint(0, C // 3, (B,), generator=g)  # repeated labels, absent classes

        z_authors = logits.clone().requires_grad_(True)
        loss_authors = authors.step(z_authors, labels)
        (grad_authors,) = torch.autograd.grad(loss_authors, z_authors)

        z_ours = logits.clone().requires_grad_(True)
        loss_ours = gk.fused_gala_ce(z_ours, labels, state, lambda1=1.2, lambda2=0.9, eps=1e-3,
                                     backend=backend)
        (grad_ours,) = torch.autograd.grad(loss_ours, z_ours)

        torch.testing.assert_close(loss_ours, loss_authors.detach(), rtol=RTOL, atol=0)
        torch.testing.assert_close(grad_ours, grad_authors, rtol=RTOL, atol=1e-12)
    for ours, theirs in ((state.pos_grad, authors.pos_grad), (state.neg_grad, authors.neg_grad),
                         (state.cls_neg_grad, authors.cls_neg_grad)):
        assert float(theirs.abs().max()) > 1.0  # the statistics have grown over the 20 steps
        torch.testing.assert_close(ours.double(), theirs, rtol=RTOL, atol=1e-9)
