"""The contract of the device training step's ops, shared by the backends that implement them.

``fused_ce_step_``, ``fold_step_`` and ``scale_grad_`` (schemas in csrc/torch_bindings.cpp; the
Triton backend registers the same ops as ``gala_triton::*``). What they compute and how a step
uses them: gala_kernels/backends/step.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..state import ACCUMULATIONS, GALAState


class StepOps(NamedTuple):
    """The device ops of one backend (schemas in csrc/torch_bindings.cpp)."""

    step: object  # fused_ce_step_ -> (loss, grad)
    step_inplace: Optional[object]  # the same, the gradient written into the logits -> loss
    fold: object  # fold_step_
    scale: object  # scale_grad_


def step_fake(logits, labels, weight, stats, running, steps, nonfinite_rows, scratch, raw_pairwise,
              label_error, lambda1, eps, ignore_index, reduction, label_smoothing, accumulation, ema_beta,
              fold, row_offset):
    """Shapes of ``fused_ce_step_``'s outputs: the loss ((B,) for reduction "none") and the gradient."""
    loss = logits.new_empty((logits.shape[0],) if reduction == 0 else ())
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format)


def state_tensors(state: GALAState):
    """The state's tensors in the order of ``fused_ce_step_``'s mutated arguments."""
    running = state.running_vectors if state.accumulation == "cumulative" else []
    return (
        state.stat_vectors,
        running,
        state.steps,
        state.nonfinite_rows,
        state.step_scratch,
        state.raw_pairwise_scratch,
        state.label_error,
    )


def run_step_op(
    ops: StepOps,
    logits,
    labels,
    state: GALAState,
    *,
    weight,
    lambda1,
    eps,
    ignore_index,
    reduction,
    label_smoothing,
    fold,
    row_offset=0,
    inplace=False,
):
    """One launch of the step op, no autograd: ``(loss, grad)`` (``grad`` is the logits if inplace)."""
    stats, running, steps, nonfinite, scratch, raw_pairwise, label_error = state_tensors(state)
    args = (
        logits,
        labels,
        weight,
        stats,
        running,
        steps,
        nonfinite,
        scratch,
        raw_pairwise,
        label_error,
        float(lambda1),
        float(eps),
        int(ignore_index),
        int(reduction),
        float(label_smoothing),
        ACCUMULATIONS.index(state.accumulation),
        float(state.ema_beta),
        bool(fold),
        int(row_offset),
    )
    if inplace:
        return ops.step_inplace(*args), logits
    return ops.step(*args)
