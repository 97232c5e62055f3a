"""Shared helpers for the backend tests: inputs, the float64 truth and per-dtype tolerances."""

from __future__ import annotations

from typing import NamedTuple

import torch

import gala_kernels as gk
from gala_kernels import reference

# Tolerances against the float64 truth computed from the same (rounded) inputs. The fused
# kernels do their math in fp32 and round the gradient once to the input dtype, so the bound is
# that rounding (half an ulp of the dtype) plus fp32 noise.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-3, rtol=1e-2),
    torch.float16: dict(atol=3e-4, rtol=2e-3),
}
STATE_TOLERANCE = dict(atol=1e-6, rtol=1e-5)  # the state is float32 whatever the input dtype


def make_inputs(B, C, dtype, device="cpu", *, scale=3.0, ignore_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, C, (B,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return logits, labels.to(device)


def warmed_state(C, device="cpu", *, steps=2, seed=1, **kwargs):
    """A state that has seen a few reference steps, so the margins are not all equal."""
    state = gk.GALAState(C, device=device, **kwargs)
    for k in range(steps):
        z, y = make_inputs(16, C, torch.float64, seed=seed + k, device=device)
        reference.gala_ce(z, y, state)
    return state


class StepResult(NamedTuple):
    """``(loss, grad, state)``: unpacks and indexes like a tuple."""

    loss: torch.Tensor
    grad: torch.Tensor
    state: dict


def run_step(logits, labels, state, *, backend, grad_output=None, **kwargs) -> StepResult:
    """One forward + backward through ``fused_gala_ce``; returns loss, dlogits and the state."""
    z = logits.detach().clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, state, backend=backend, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    (grad,) = torch.autograd.grad(loss, z, grad_output)
    snapshot = {k: v.clone() for k, v in state.state_dict().items()} if state is not None else {}
    return StepResult(loss.detach(), grad, snapshot)


def assert_close_to_truth(result: StepResult, truth: StepResult, dtype):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(result.loss.double(), truth.loss.double(), equal_nan=True, **tol)
    torch.testing.assert_close(result.grad.double(), truth.grad.double(), equal_nan=True, **tol)
    assert result.state.keys() == truth.state.keys()
    for name, value in truth.state.items():
        if value.is_floating_point():
            torch.testing.assert_close(result.state[name], value, **STATE_TOLERANCE, msg=name)
        else:
            assert torch.equal(result.state[name], value), name
