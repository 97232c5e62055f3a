"""The CUDA C++ backend (csrc/cuda, ``backend="cuda"``) against the float64 reference.

The GPU tests are skipped without a GPU (tests/conftest.py ``requires_cuda``); on a GPU machine
they fail, rather than skip, when the extension was built without its CUDA kernels. Shapes are
chosen to reach every kernel variant of csrc/cuda/gala_ce_kernel.cu ("Choosing a kernel"):
one warp per row (C <= 1021), one CTA per row (C <= 16381), and the streamed kernel (longer rows,
with and without the shared-memory raw_clsneg, and every float64 row).

Sections: the fused op (fused_ce_fwd, with weight and label smoothing); the training step's ops
(fused_ce_step_, fold_step_, scale_grad_: loss, gradient and state against the reference, bad
labels, no host synchronisation, CUDA-graph capture); bad input; registration. On any machine with
nvcc, the CPU tests run the CUDA compile check (GALA_CUDA_COMPILE_CHECK) and a syntax check of the
torch bindings against torch's headers.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from gala_testing import (
    STATE_TOLERANCE,
    TOLERANCES,
    assert_close_to_truth,
    make_inputs,
    run_step,
    warmed_state,
)

import gala_kernels as gk
from gala_kernels import _extension, backends, ops, reference
from gala_kernels.backends import cuda_rule
from gala_kernels.backends import step as device_step
from gala_kernels.state import ACCUMULATIONS, SCRATCH_SLOTS

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# One C per kernel variant (the largest C of each register variant for a misaligned row start,
# then one past it), and odd sizes: 1, 2, 1000, 8142, > 64K.
VARIANT_C = [1, 2, 253, 254, 509, 1000, 1021, 2045, 4093, 8142, 16381, 16389, 70001]


@pytest.fixture
def cuda():
    """The CUDA device, after checking that the CUDA op is built (a GPU test, skipped without one)."""
    ok, reason = backends.availability("cuda", torch.device("cuda"))
    assert ok, reason
    return torch.device("cuda")


def gpu_test(fn):
    return requires_cuda(pytest.mark.cuda(fn))


def cuda_inputs(B, C, dtype, device, **kwargs):
    logits, labels = make_inputs(B, C, dtype, **kwargs)
    return logits.to(device), labels.to(device)


def check_against_truth(logits, labels, state, *, grad_output=None, **kwargs):
    """``backend="cuda"`` and the float64 reference on the same rounded inputs and state."""
    truth_state = copy.deepcopy(state)
    result = run_step(logits, labels, state, backend="cuda", grad_output=grad_output, **kwargs)
    truth = run_step(logits.double(), labels, truth_state, backend="torch",
                     grad_output=None if grad_output is None else grad_output.double(), **kwargs)
    assert result.loss.dtype == logits.dtype and result.grad.dtype == logits.dtype
    assert_close_to_truth(result, truth, logits.dtype)
    return result


def op_outputs(logits, labels, bias=None, *, reduction=1, stats=True, pairwise=False, ignore_index=-100,
               weight=None, label_smoothing=0.0):
    op = ops.native_fused_ce()
    return op(logits, labels, bias, weight, ignore_index, reduction, label_smoothing, stats, pairwise)


REDUCTION_NAMES = ("none", "mean", "sum")  # by reduction code


def class_weights(C, device, dtype=torch.float32, seed=0):
    """Positive class weights in [0.25, 2) (the math dtype: float64 for float64 logits)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(C, generator=g, dtype=torch.float64) * 1.75 + 0.25).to(dtype).to(device)


def math_dtype(dtype):
    return reference.compute_dtype(dtype)


# ---- the training step's ops, called as gala_kernels/backends/step.py calls them ----
def step_ops():
    return device_step.ops_for("cuda")


def step_call(logits, labels, state, *, weight=None, lambda1=1.2, eps=1e-3, ignore_index=-100, reduction=1,
              label_smoothing=0.0, fold=None, row_offset=0):
    """One fused_ce_step_ launch on ``state``: ``(loss, grad)``. ``fold=None``: as the glue decides
    (in the kernel unless the state tracks pairwise sums)."""
    if fold is None:
        fold = device_step.folds_in_kernel(state)
    return device_step.run_step_op(step_ops(), logits, labels, state, weight=weight, lambda1=lambda1, eps=eps,
                                   ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing, fold=fold, row_offset=row_offset)


def step_and_fold(logits, labels, state, **kwargs):
    """A whole training step of the ops: the step launch, then fold_step_ when it did not fold."""
    fold = device_step.folds_in_kernel(state)
    loss, grad = step_call(logits, labels, state, fold=fold, **kwargs)
    if not fold:
        device_step.fold_pending(step_ops(), state)
    return loss, grad


def truth_step(logits, labels, state, *, weight=None, lambda1=1.2, eps=1e-3, ignore_index=-100, reduction=1,
               label_smoothing=0.0):
    """The float64 reference of one step on ``state`` (folded into it): ``(loss, grad)``. The class
    bias is rounded to the kernel's math dtype first (the kernel computes it in fp32 for fp32 and
    16-bit logits), the rest is float64."""
    bias = reference.class_bias(state, lambda1, eps, math_dtype(logits.dtype)).double()
    loss, grad, stats = reference.forward_and_grad(
        logits.double(), labels, bias, None, reduction=REDUCTION_NAMES[reduction], ignore_index=ignore_index,
        compute_stats=True, track_pairwise=state.pairwise is not None,
        weight=None if weight is None else weight.double(), label_smoothing=label_smoothing)
    reference.fold_increments(state, stats)
    return loss, grad


def assert_step_close(loss, grad, truth_loss, truth_grad, dtype):
    assert loss.dtype == dtype and grad.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), truth_loss.double(), equal_nan=True, **tol)
    torch.testing.assert_close(grad.double(), truth_grad.double(), equal_nan=True, **tol)


def assert_states_close(state, truth_state):
    """Every saved buffer at fp32 tolerance (counters exactly); the step's working memory idle."""
    got = state.state_dict()
    for name, value in truth_state.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, **STATE_TOLERANCE, msg=name)
        else:
            assert torch.equal(got[name], value), (name, got[name], value)
    assert torch.all(state.step_scratch == 0), state.step_scratch[-SCRATCH_SLOTS:]
    if state.raw_pairwise_scratch is not None:
        assert torch.all(state.raw_pairwise_scratch == 0)


def snapshot(state):
    return {name: value.clone() for name, value in state.state_dict().items()}


def assert_state_unchanged(state, before):
    for name, value in state.state_dict().items():
        assert torch.equal(value, before[name]), name


# ------------------------------------------------------------------------------------------------
# correctness on the GPU
# ------------------------------------------------------------------------------------------------
@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", VARIANT_C)
def test_shapes_and_dtypes(cuda, dtype, C):
    logits, labels = cuda_inputs(7, C, dtype, cuda, seed=C)
    check_against_truth(logits, labels, warmed_state(C, device=cuda))


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,C", [(20000, 100), (3000, 8142), (700, 20000)])
def test_many_rows_per_cta(cuda, dtype, B, C):
    """More rows than the persistent grid holds: every CTA loops over several rows and flushes
    its shared-memory raw_clsneg once."""
    logits, labels = cuda_inputs(B, C, dtype, cuda, ignore_every=11, seed=B)
    check_against_truth(logits, labels, warmed_state(C, device=cuda))


@gpu_test
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1500, 20000])
def test_reductions_ignored_rows_and_grad_output(cuda, reduction, dtype, C):
    B = 37
    logits, labels = cuda_inputs(B, C, dtype, cuda, ignore_every=3, seed=7)
    shape = (B,) if reduction == "none" else ()
    g = torch.Generator().manual_seed(3)
    grad_output = (torch.rand(shape, dtype=torch.float64, generator=g) * 4 - 2).to(dtype).to(cuda)
    result = check_against_truth(logits, labels, warmed_state(C, device=cuda), reduction=reduction,
                                 grad_output=grad_output)
    assert torch.all(result.grad[labels == -100] == 0)


@gpu_test
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("C", [11, 20000])
def test_all_ignored_batch(cuda, reduction, C):
    logits, labels = cuda_inputs(5, C, torch.float32, cuda)
    labels[:] = -100
    state = warmed_state(C, device=cuda)
    result = check_against_truth(logits, labels, state, reduction=reduction)
    expected = F.cross_entropy(logits, labels, reduction=reduction)
    torch.testing.assert_close(result.loss, expected, equal_nan=True)  # mean: NaN, like torch
    assert torch.all(result.grad == 0)
    loss, _grad, raw, _pairwise, counts = op_outputs(logits, labels, reduction=1)
    assert counts.tolist() == [0, 0] and torch.all(raw == 0) and torch.isnan(loss)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("C", [300, 20000])
def test_extreme_logits(cuda, dtype, C):
    """+-1e4 logits; the bound is torch's own fp32 error on the same inputs plus the tolerance
    (Cut Cross-Entropy's rule), as in tests/test_fused_ce.py."""
    logits, labels = make_inputs(9, C, torch.float64, seed=5)
    logits = torch.where(logits > 0, 1e4, -1e4).to(dtype).to(cuda)
    labels = labels.to(cuda)
    logits[0] = 1e4  # a row of ties at the top
    logits[1] = -1e4
    state = warmed_state(C, device=cuda)
    torch_fp32 = run_step(logits.float(), labels, copy.deepcopy(state), backend="torch")
    truth = run_step(logits.double(), labels, copy.deepcopy(state), backend="torch")
    result = run_step(logits, labels, state, backend="cuda")
    tol = TOLERANCES[dtype]
    for name in ("loss", "grad"):
        got, want, torch_err = (getattr(r, name).double() for r in (result, truth, torch_fp32))
        bound = 2 * (torch_err - want).abs().max() + tol["atol"] + tol["rtol"] * want.abs()
        assert torch.all((got - want).abs() <= bound), name
    assert torch.isfinite(result.grad).all() and torch.isfinite(result.loss)


@gpu_test
@pytest.mark.parametrize("C", [50, 20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_non_finite_rows_are_counted_and_leave_the_state_finite(cuda, C, dtype):
    logits, labels = cuda_inputs(6, C, dtype, cuda, seed=11)
    logits[1, 3] = float("inf")
    logits[2, C - 1] = float("nan")
    logits[4, 7] = float("-inf")
    labels[4] = -100  # an ignored non-finite row is not counted
    state = warmed_state(C, device=cuda)
    result = check_against_truth(logits, labels, state, reduction="none")
    assert int(state.nonfinite_rows) == 2
    assert torch.isnan(result.loss[1]) and torch.isnan(result.loss[2]) and result.loss[4] == 0
    assert torch.isnan(result.grad[1]).all() and torch.all(result.grad[4] == 0)
    assert torch.isfinite(result.loss[[0, 3, 5]]).all()
    for name, value in state.state_dict().items():
        assert torch.isfinite(value.double()).all(), name
    loss = op_outputs(logits, labels, reduction=1)[0]
    assert torch.isnan(loss)  # the mean over rows that include a NaN row


@gpu_test
@pytest.mark.parametrize("accumulation", ["cumulative", "sum", "ema"])
@pytest.mark.parametrize("track_pairwise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # float64: streamed kernel
def test_accumulation_and_pairwise_over_steps(cuda, accumulation, track_pairwise, dtype):
    C = 129
    state = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9, track_pairwise=track_pairwise,
                         device=cuda)
    truth_state = copy.deepcopy(state)
    for step in range(4):
        logits, labels = cuda_inputs(24, C, dtype, cuda, ignore_every=5, seed=100 + step)
        result = run_step(logits, labels, state, backend="cuda")
        truth = run_step(logits.double(), labels, truth_state, backend="torch")
        assert_close_to_truth(result, truth, dtype)  # the state at fp32 tolerance (STATE_TOLERANCE)
        # The state is fp32 and its increments are fp32 sums in atomic (arbitrary) order, so the
        # two states differ by a few fp32 ulps after a step; the next step's margins would carry
        # that ~1e-7 relative difference into a float64 gradient. Each step starts from one state.
        truth_state.load_state_dict(state.state_dict())
    assert int(state.steps) == 4


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [5, 1000, 8142, 20000])
@pytest.mark.parametrize("offset", [0, 1])
def test_strided_and_misaligned_rows(cuda, dtype, C, offset):
    """Rows that do not start on a 16-byte boundary (a strided slice starting at column 1)."""
    wide, labels = cuda_inputs(9, C + 3, dtype, cuda, ignore_every=4, seed=C)
    logits = wide[:, offset:offset + C]
    labels = torch.where(labels == -100, labels, labels % C)
    assert logits.stride(0) == C + 3
    bias = torch.randn(C, device=cuda)
    for reduction in (0, 1, 2):
        got = op_outputs(logits, labels, bias, reduction=reduction)
        expected = op_outputs(logits.contiguous(), labels, bias, reduction=reduction)
        for got_part, expected_part in zip(got, expected):
            # other thread mappings sum in another order: compare at the dtype's tolerance
            torch.testing.assert_close(got_part, expected_part, equal_nan=True, **TOLERANCES[dtype])
    check_against_truth(logits, labels, warmed_state(C, device=cuda))


@gpu_test
def test_custom_ignore_index(cuda):
    logits, labels = cuda_inputs(8, 40, torch.float32, cuda)
    labels[::3] = 7  # rows labelled 7 are ignored
    check_against_truth(logits, labels, warmed_state(40, device=cuda), ignore_index=7)


@gpu_test
def test_eval_mode_is_plain_cross_entropy(cuda):
    C = 33
    criterion = gk.GALALoss(C, backend="cuda").to(cuda)
    criterion.state.load_state_dict(warmed_state(C, device=cuda).state_dict())
    before = copy.deepcopy(criterion.state.state_dict())
    logits, labels = cuda_inputs(12, C, torch.float32, cuda, ignore_every=4)
    criterion.eval()
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels))
    for name, value in criterion.state.state_dict().items():
        assert torch.equal(value, before[name]), name


# ------------------------------------------------------------------------------------------------
# the fused op with weight and label smoothing
# ------------------------------------------------------------------------------------------------
# (weighted, label_smoothing): the plain path, each option alone, both
OPTION_CASES = [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.25), (True, 1.0)]
OPTION_IDS = ["plain", "weight", "ls", "weight+ls", "weight+ls1"]


def check_fused_op_options(logits, labels, *, weighted, label_smoothing, reduction, pairwise=False, seed=0):
    """fused_ce_fwd with a class bias, weight and smoothing against reference.forward_and_grad."""
    C = logits.shape[1]
    mdt = math_dtype(logits.dtype)
    g = torch.Generator().manual_seed(seed)
    bias = (torch.randn(C, generator=g, dtype=torch.float64) * 2).to(mdt).to(logits.device)
    weight = class_weights(C, logits.device, mdt, seed) if weighted else None
    loss, grad, raw, raw_pairwise, counts = op_outputs(
        logits, labels, bias, reduction=reduction, pairwise=pairwise, weight=weight,
        label_smoothing=label_smoothing)
    t_loss, t_grad, t_stats = reference.forward_and_grad(
        logits.double(), labels, bias.double(), None, reduction=REDUCTION_NAMES[reduction], ignore_index=-100,
        compute_stats=True, track_pairwise=pairwise, weight=None if weight is None else weight.double(),
        label_smoothing=label_smoothing)
    assert_step_close(loss, grad, t_loss, t_grad, logits.dtype)
    # the statistics never depend on weight or smoothing
    torch.testing.assert_close(raw.double(), t_stats.raw, **STATE_TOLERANCE)
    assert torch.equal(counts.cpu(), t_stats.counts.cpu())
    if pairwise:
        torch.testing.assert_close(raw_pairwise.double(), t_stats.raw_pairwise, **STATE_TOLERANCE)


@gpu_test
@pytest.mark.parametrize("weighted,label_smoothing", OPTION_CASES, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 2, 37, 1000, 4093, 16389, 70001])
def test_fused_op_weight_and_smoothing(cuda, weighted, label_smoothing, dtype, C):
    """Every kernel variant, with and without its smoothing twin, every reduction."""
    logits, labels = cuda_inputs(11, C, dtype, cuda, ignore_every=4, seed=C)
    for reduction in (0, 1, 2):
        check_fused_op_options(logits, labels, weighted=weighted, label_smoothing=label_smoothing,
                               reduction=reduction, seed=reduction)


@gpu_test
@pytest.mark.parametrize("weighted,label_smoothing", OPTION_CASES, ids=OPTION_IDS)
@pytest.mark.parametrize("B,C,dtype", [(3000, 500, torch.float32), (600, 20000, torch.bfloat16),
                                       (20000, 40, torch.float16)])
def test_fused_op_options_many_rows(cuda, weighted, label_smoothing, B, C, dtype):
    """Persistent CTAs over many rows, and (B = 20000) several prepare blocks counting N and W."""
    logits, labels = cuda_inputs(B, C, dtype, cuda, ignore_every=7, seed=B)
    for reduction in (1, 2):
        check_fused_op_options(logits, labels, weighted=weighted, label_smoothing=label_smoothing,
                               reduction=reduction, pairwise=C <= 500)


@gpu_test
@pytest.mark.parametrize("weighted,label_smoothing", OPTION_CASES, ids=OPTION_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("C", [10, 3000, 30000])
def test_plain_cross_entropy_matches_torch(cuda, weighted, label_smoothing, reduction, C):
    """state=None: F.cross_entropy(weight=, label_smoothing=) in float64, forward and backward."""
    logits, labels = cuda_inputs(13, C, torch.float64, cuda, ignore_every=5, seed=C)
    weight = class_weights(C, cuda, torch.float64) if weighted else None
    z = logits.clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, None, backend="cuda", reduction=reduction, weight=weight,
                            label_smoothing=label_smoothing)
    z_ref = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(z_ref, labels, weight=weight, reduction=reduction,
                               label_smoothing=label_smoothing)
    go = torch.linspace(-1, 2, 13, dtype=torch.float64, device=cuda) if reduction == "none" else None
    loss.backward(go)
    expected.backward(go)
    torch.testing.assert_close(loss, expected, **TOLERANCES[torch.float64])
    torch.testing.assert_close(z.grad, z_ref.grad, **TOLERANCES[torch.float64])


@gpu_test
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_zero_total_weight(cuda, label_smoothing):
    """Every non-ignored label has weight 0: W = 0, a NaN (or inf) mean and NaN gradient rows, as
    the reference (and torch)."""
    C = 8
    logits, labels = cuda_inputs(6, C, torch.float32, cuda)
    labels[:] = torch.tensor([1, 1, -100, 3, 1, -100], device=cuda)
    weight = torch.ones(C, device=cuda)
    weight[[1, 3]] = 0
    for reduction in (0, 1, 2):
        check_fused_op_options(logits, labels, weighted=False, label_smoothing=label_smoothing,
                               reduction=reduction)  # (no weight: W = N, the usual case)
        loss, grad, *_ = op_outputs(logits, labels, None, reduction=reduction, weight=weight,
                                    label_smoothing=label_smoothing)
        t_loss, t_grad, _ = reference.forward_and_grad(
            logits.double(), labels, None, None, reduction=REDUCTION_NAMES[reduction], ignore_index=-100,
            compute_stats=False, track_pairwise=False, weight=weight.double(),
            label_smoothing=label_smoothing)
        torch.testing.assert_close(loss.double(), t_loss, equal_nan=True, **TOLERANCES[torch.float32])
        torch.testing.assert_close(grad.double(), t_grad, equal_nan=True, **TOLERANCES[torch.float32])
        if reduction == 1:
            assert torch.isnan(grad[labels != -100]).all() and torch.all(grad[labels == -100] == 0)


# ------------------------------------------------------------------------------------------------
# the training step's ops: fused_ce_step_, fold_step_, scale_grad_
# ------------------------------------------------------------------------------------------------
STEP_C = [1, 2, 37, 1000, 8193, 40001]  # 8193: one CTA per row; 40001: streamed (shared-memory stats)


@gpu_test
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", STEP_C)
def test_step_matches_reference_over_steps(cuda, accumulation, dtype, C):
    """Loss, gradient and the whole state after each of three steps, folded by the step's last CTA."""
    state = warmed_state(C, device=cuda, accumulation=accumulation, ema_beta=0.9)
    truth_state = copy.deepcopy(state)
    for k in range(3):
        logits, labels = cuda_inputs(9, C, dtype, cuda, ignore_every=4, seed=10 * C + k)
        loss, grad = step_call(logits, labels, state)
        truth_loss, truth_grad = truth_step(logits, labels, truth_state)
        assert_step_close(loss, grad, truth_loss, truth_grad, dtype)
        assert_states_close(state, truth_state)
        assert torch.all(state.label_error == 0)
        # fp32 atomics sum in any order: each step starts from the same state (see
        # test_accumulation_and_pairwise_over_steps)
        truth_state.load_state_dict(state.state_dict())
    assert int(state.steps) == 2 + 3  # warmed_state's two reference steps, then three


@gpu_test
@pytest.mark.parametrize("weighted,label_smoothing", OPTION_CASES, ids=OPTION_IDS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype,C", [(torch.float32, 37), (torch.bfloat16, 1000), (torch.float32, 8193),
                                     (torch.float16, 20000), (torch.float64, 300)], ids=str)
def test_step_options_ignored_and_non_finite_rows(cuda, weighted, label_smoothing, reduction, dtype, C):
    state = warmed_state(C, device=cuda)
    truth_state = copy.deepcopy(state)
    logits, labels = cuda_inputs(10, C, dtype, cuda, ignore_every=3, seed=C)
    logits[1, C // 2] = float("inf")
    logits[2, 0] = float("nan")
    logits[3, C - 1] = float("-inf")  # row 3 is ignored (ignore_every=3): not counted
    weight = class_weights(C, cuda, math_dtype(dtype)) if weighted else None
    options = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing, lambda1=0.8, eps=1e-2)
    loss, grad = step_call(logits, labels, state, **options)
    truth_loss, truth_grad = truth_step(logits, labels, truth_state, **options)
    assert_step_close(loss, grad, truth_loss, truth_grad, dtype)
    assert_states_close(state, truth_state)
    assert int(state.nonfinite_rows) == 2
    assert torch.isnan(grad[[1, 2]]).all() and torch.all(grad[labels == -100] == 0)


@gpu_test
@pytest.mark.parametrize("B,C", [(20000, 100), (3000, 1000), (700, 20000), (40, 100000)])
def test_step_many_rows(cuda, B, C):
    """Several prepare blocks (B > 8192), persistent CTAs over many rows, global-atomic stats
    (C = 100000)."""
    state = warmed_state(C, device=cuda)
    truth_state = copy.deepcopy(state)
    logits, labels = cuda_inputs(B, C, torch.float32, cuda, ignore_every=9, seed=B)
    weight = class_weights(C, cuda)
    loss, grad = step_call(logits, labels, state, weight=weight, label_smoothing=0.05)
    truth_loss, truth_grad = truth_step(logits, labels, truth_state, weight=weight, label_smoothing=0.05)
    assert_step_close(loss, grad, truth_loss, truth_grad, torch.float32)
    assert_states_close(state, truth_state)


@gpu_test
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_step_empty_batch_still_folds(cuda, accumulation, reduction):
    """B = 0: one CTA and no row; "mean" is NaN, "sum" 0; the fold runs (N = 0: s = 1)."""
    C = 21
    state = warmed_state(C, device=cuda, accumulation=accumulation)
    truth_state = copy.deepcopy(state)
    logits = torch.empty(0, C, device=cuda)
    labels = torch.empty(0, dtype=torch.int64, device=cuda)
    loss, grad = step_call(logits, labels, state, reduction=reduction)
    truth_loss, truth_grad = truth_step(logits, labels, truth_state, reduction=reduction)
    assert grad.shape == (0, C) and loss.shape == truth_loss.shape
    torch.testing.assert_close(loss.double(), truth_loss.double(), equal_nan=True)
    assert_states_close(state, truth_state)


@gpu_test
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
@pytest.mark.parametrize("track_pairwise", [False, True])
@pytest.mark.parametrize("dtype,C", [(torch.float32, 37), (torch.bfloat16, 1500), (torch.float64, 129),
                                     (torch.float32, 20000)], ids=str)
def test_step_in_chunks_then_fold_step(cuda, accumulation, track_pairwise, dtype, C):
    """fold=False: two launches over the two halves of a batch (row_offset, "sum") leave their sums
    in the scratch; fold_step_ folds them as one step of the whole batch and zeroes the scratch."""
    if track_pairwise and C > 2000:
        pytest.skip("C x C pairwise sums of 20000 classes: 1.6 GB")
    state = warmed_state(C, device=cuda, accumulation=accumulation, ema_beta=0.8,
                         track_pairwise=track_pairwise)
    truth_state = copy.deepcopy(state)
    logits, labels = cuda_inputs(14, C, dtype, cuda, ignore_every=5, seed=C)
    logits[9, 1 % C] = float("nan")
    parts = [step_call(logits[:6], labels[:6], state, reduction=2, fold=False),
             step_call(logits[6:], labels[6:], state, reduction=2, fold=False, row_offset=6)]
    rows = int((labels != -100).sum())
    scratch = state.step_scratch
    assert scratch[3 * C].item() == rows and scratch[3 * C + 1].item() == 1 and scratch[3 * C + 2].item() == 0
    assert torch.all(scratch[3 * C + 3:] == 0)  # the per-launch slots
    assert int(state.steps) == 2  # nothing folded yet
    device_step.fold_pending(step_ops(), state)
    truth_loss, truth_grad = truth_step(logits, labels, truth_state, reduction=2)
    loss = parts[0][0] + parts[1][0]
    grad = torch.cat([parts[0][1], parts[1][1]])
    assert_step_close(loss, grad, truth_loss, truth_grad, dtype)
    assert_states_close(state, truth_state)
    assert int(state.nonfinite_rows) == 1


@gpu_test
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
@pytest.mark.parametrize("C", [2, 300])
def test_step_with_pairwise_over_steps(cuda, accumulation, C):
    """A pairwise state: the glue's step (kernel with fold=False, then fold_step_) over three steps."""
    state = warmed_state(C, device=cuda, accumulation=accumulation, track_pairwise=True)
    truth_state = copy.deepcopy(state)
    assert not device_step.folds_in_kernel(state)
    for k in range(3):
        logits, labels = cuda_inputs(12, C, torch.float32, cuda, ignore_every=5, seed=k)
        loss, grad = step_and_fold(logits, labels, state)
        truth_loss, truth_grad = truth_step(logits, labels, truth_state)
        assert_step_close(loss, grad, truth_loss, truth_grad, torch.float32)
        assert_states_close(state, truth_state)
        truth_state.load_state_dict(state.state_dict())


@gpu_test
@pytest.mark.parametrize("dtype,C", [(torch.float32, 5), (torch.bfloat16, 1000), (torch.float32, 8193),
                                     (torch.float16, 20000), (torch.float64, 40)], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("bad_labels", [(-1,), (1 << 40,), (-(1 << 62), "C")], ids=["-1", "2^40", "two"])
def test_step_bad_labels_are_recorded_and_change_nothing(cuda, dtype, C, reduction, bad_labels):
    """Bad rows: NaN loss, zero gradient; the other rows as if the bad ones were ignored (W counts
    none of them); the state untouched (no fold, no count); the first bad row recorded for the host.
    A good step afterwards folds as usual and keeps the pending record."""
    state = warmed_state(C, device=cuda)
    before = snapshot(state)
    steps_before = int(state.steps)
    logits, labels = cuda_inputs(12, C, dtype, cuda, ignore_every=5, seed=C)
    bad_rows = [3, 8][:len(bad_labels)]
    for row, value in zip(bad_rows, bad_labels):
        labels[row] = C if value == "C" else value
    loss, grad = step_call(logits, labels, state, reduction=reduction, ignore_index=-100, row_offset=100)

    clean = labels.clone()
    clean[bad_rows] = -100
    truth_loss, truth_grad = truth_step(logits, clean, copy.deepcopy(state), reduction=reduction)
    assert torch.all(grad[bad_rows] == 0)
    good = torch.ones(12, dtype=torch.bool, device=cuda)
    good[bad_rows] = False
    torch.testing.assert_close(grad[good].double(), truth_grad[good].double(), **TOLERANCES[dtype])
    if reduction == 0:
        assert torch.isnan(loss[bad_rows]).all()
        torch.testing.assert_close(loss[good].double(), truth_loss[good].double(), **TOLERANCES[dtype])
    else:
        assert torch.isnan(loss)
    assert_state_unchanged(state, before)
    assert torch.all(state.step_scratch == 0)
    first = bad_rows[0]
    expected = [1, 100 + first, int(labels[first]), steps_before, -100, 0]
    assert state.label_error.tolist() == expected

    # a good step folds normally; the first record stays until the host raises it
    truth_state = copy.deepcopy(state)
    logits, labels = cuda_inputs(12, C, dtype, cuda, ignore_every=5, seed=C + 1)
    loss, grad = step_call(logits, labels, state, reduction=reduction)
    truth_loss, truth_grad = truth_step(logits, labels, truth_state, reduction=reduction)
    assert_step_close(loss, grad, truth_loss, truth_grad, dtype)
    assert_states_close(state, truth_state)
    assert state.label_error.tolist() == expected
    # another bad step: still the first record
    labels[0] = -7
    step_call(logits, labels, state, reduction=reduction)
    assert state.label_error.tolist() == expected
    with pytest.raises(ValueError, match=rf"labels\[{100 + first}\] = {expected[2]} is out of range"):
        state.check_errors()
    assert torch.all(state.label_error == 0)


@gpu_test
def test_step_bad_label_in_a_later_chunk_and_a_later_prepare_block(cuda):
    """The first bad row over label-counting blocks (B > 8192) and over chunks (fold=False):
    fold_step_ skips the fold when any chunk met a bad label, and zeroes the scratch."""
    C = 50
    state = warmed_state(C, device=cuda)
    before = snapshot(state)
    logits, labels = cuda_inputs(20000, C, torch.float32, cuda, ignore_every=13, seed=1)
    labels[17000] = C + 5
    labels[9000] = -3
    step_call(logits[:10000], labels[:10000], state, reduction=2, fold=False)
    step_call(logits[10000:], labels[10000:], state, reduction=2, fold=False, row_offset=10000)
    assert state.step_scratch[3 * C + 2].item() == 2
    assert state.label_error.tolist() == [1, 9000, -3, 2, -100, 0]
    device_step.fold_pending(step_ops(), state)
    assert_state_unchanged(state, before)
    assert torch.all(state.step_scratch == 0)


@gpu_test
@pytest.mark.parametrize("dtype,C", [(torch.float32, 1000), (torch.bfloat16, 5000), (torch.float32, 20000)],
                         ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_step_strided_and_misaligned_rows(cuda, dtype, C, offset):
    wide, labels = cuda_inputs(9, C + 3, dtype, cuda, ignore_every=4, seed=C)
    logits = wide[:, offset:offset + C]
    labels = torch.where(labels == -100, labels, labels % C)
    state = warmed_state(C, device=cuda)
    truth_state = copy.deepcopy(state)
    loss, grad = step_call(logits, labels, state, label_smoothing=0.1)
    truth_loss, truth_grad = truth_step(logits, labels, truth_state, label_smoothing=0.1)
    assert grad.is_contiguous()
    assert_step_close(loss, grad, truth_loss, truth_grad, dtype)
    assert_states_close(state, truth_state)


GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@gpu_test
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("go_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [1.0, 0.5, -3.0, 0.0, float("nan")])
@pytest.mark.parametrize("numel,offset", [(1, 0), (7, 0), (1000003, 0), (1000, 1), (0, 0)])
def test_scale_grad(cuda, grad_dtype, go_dtype, value, numel, offset):
    """grad *= grad_output in place (as grad * grad_output.to(grad.dtype)); 1 leaves it as it is.
    offset 1: a contiguous view off the 16-byte boundary (the element-wise path)."""
    base = torch.randn(numel + offset, device=cuda).to(grad_dtype)
    grad = base[offset:]
    original = grad.clone()
    head = base[:offset].clone()
    grad_output = torch.tensor(value, dtype=go_dtype, device=cuda)
    step_ops().scale(grad, grad_output)
    expected = original * grad_output.to(grad_dtype)
    torch.testing.assert_close(grad, expected, equal_nan=True, atol=0, rtol=0)
    if value == 1.0:
        assert torch.equal(grad, original)
    assert torch.equal(base[:offset], head)  # nothing before the view is touched


@gpu_test
def test_scale_grad_reads_grad_output_on_the_device(cuda):
    """A grad_output computed on the device, never read by the host, and a 2-D gradient."""
    grad = torch.randn(33, 77, device=cuda)
    original = grad.clone()
    grad_output = torch.ones(4, device=cuda).sum() / 8  # 0.5, made by a kernel
    step_ops().scale(grad, grad_output)
    torch.testing.assert_close(grad, original * 0.5, atol=0, rtol=0)


@gpu_test
def test_step_ops_make_no_host_sync(cuda):
    """Under torch.cuda.set_sync_debug_mode("error") a synchronising call raises: the step (folding
    in the kernel, and leaving its sums for fold_step_), fold_step_, scale_grad_."""
    C = 1000
    state = warmed_state(C, device=cuda)
    pairwise_state = warmed_state(C, device=cuda, track_pairwise=True)
    logits, labels = cuda_inputs(64, C, torch.bfloat16, cuda, ignore_every=7)
    labels[5] = C + 1  # a bad label is handled on the device too
    weight = class_weights(C, cuda)
    half = torch.full((), 0.5, device=cuda)
    one = torch.ones((), device=cuda)
    step_call(logits, labels, copy.deepcopy(state))  # warm-up: lazy initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in (state, pairwise_state):
            loss, grad = step_and_fold(logits, labels, s, weight=weight, label_smoothing=0.1)
            step_ops().scale(grad, half)
            step_ops().scale(grad, one)
        step_call(logits, labels, state, fold=False, reduction=0)
        device_step.fold_pending(step_ops(), state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu_test
@pytest.mark.parametrize("track_pairwise", [False, True])
def test_step_ops_replay_in_a_cuda_graph(cuda, track_pairwise):
    """The step's launches (and the backward's scaling) captured once and replayed on new inputs
    give the eager reference's losses, gradients and state."""
    C, B = 1000, 48
    state = warmed_state(C, device=cuda, track_pairwise=track_pairwise)
    truth_state = copy.deepcopy(state)
    static_logits, static_labels = cuda_inputs(B, C, torch.float32, cuda, ignore_every=7)
    static_go = torch.ones((), device=cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up with a throwaway state, as torch.cuda.graphs asks
        step_and_fold(static_logits, static_labels, copy.deepcopy(state))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step_and_fold(static_logits, static_labels, state)
        step_ops().scale(static_grad, static_go)
    assert int(state.steps) == 2  # capturing runs nothing
    for k in range(3):
        logits, labels = cuda_inputs(B, C, torch.float32, cuda, ignore_every=7, seed=100 + k)
        go = 1.0 if k == 0 else 0.25 * k
        static_logits.copy_(logits)
        static_labels.copy_(labels)
        static_go.fill_(go)
        graph.replay()
        truth_loss, truth_grad = truth_step(logits, labels, truth_state)
        assert_step_close(static_loss, static_grad, truth_loss, truth_grad * go, torch.float32)
        assert_states_close(state, truth_state)
        truth_state.load_state_dict(state.state_dict())
    assert int(state.steps) == 5


@gpu_test
def test_step_ops_schema(cuda):
    """The ops mutate exactly the arguments their schemas mark (torch.library.opcheck's schema test)."""
    C = 37
    state = warmed_state(C, device=cuda)
    logits, labels = cuda_inputs(6, C, torch.float32, cuda, ignore_every=4)
    stats, running, steps, nonfinite, scratch, _raw_pairwise, label_error = device_step.state_tensors(state)
    gala = torch.ops.gala
    torch.library.opcheck(gala.fused_ce_step_.default,
                          (logits, labels, None, stats, running, steps, nonfinite, scratch, None, label_error,
                           1.2, 1e-3, -100, 1, 0.0, 0, 0.99, False, 0), test_utils="test_schema")
    torch.library.opcheck(gala.fold_step_.default,
                          (scratch, None, stats, running, None, None, steps, nonfinite, 0, 0.99),
                          test_utils="test_schema")
    torch.library.opcheck(gala.scale_grad_.default,
                          (torch.randn(6, C, device=cuda), torch.tensor(0.5, device=cuda)),
                          test_utils="test_schema")


@gpu_test
def test_step_op_bad_arguments(cuda):
    C = 10
    state = gk.GALAState(C, device=cuda)
    pairwise_state = gk.GALAState(C, device=cuda, track_pairwise=True)
    logits, labels = cuda_inputs(6, C, torch.float32, cuda)
    stats, running, steps, nonfinite, scratch, _raw_pairwise, label_error = device_step.state_tensors(state)
    gala = torch.ops.gala

    def call(**override):
        a = dict(logits=logits, labels=labels, weight=None, stats=stats, running=running, steps=steps,
                 nonfinite=nonfinite, scratch=scratch, raw_pairwise=None, label_error=label_error,
                 accumulation=0, fold=True, ema_beta=0.99)
        a.update(override)
        gala.fused_ce_step_(a["logits"], a["labels"], a["weight"], a["stats"], a["running"], a["steps"],
                            a["nonfinite"], a["scratch"], a["raw_pairwise"], a["label_error"], 1.2, 1e-3,
                            -100, 1, 0.0, a["accumulation"], a["ema_beta"], a["fold"], 0)

    cases = [
        (dict(scratch=scratch[:-1]), ValueError, "scratch must be a contiguous tensor of 38 elements"),
        (dict(scratch=scratch.double()), TypeError, "scratch must be Float"),
        (dict(running=[]), ValueError, "expected 3 running vectors"),
        (dict(accumulation=1), ValueError, "expected 0 running vectors"),
        (dict(accumulation=3), ValueError, "accumulation code must be 0, 1 or 2"),
        (dict(stats=stats[:2]), ValueError, "expected 3 state vectors"),
        (dict(steps=steps.cpu()), ValueError, "steps is on cpu"),
        (dict(label_error=label_error[:5]), ValueError, "label_error must be a contiguous tensor of 6"),
        (dict(raw_pairwise=pairwise_state.raw_pairwise_scratch), ValueError, "fold must be false"),
        (dict(weight=torch.ones(C, device=cuda, dtype=torch.float64)), TypeError, "weight must be Float"),
        (dict(logits=logits.cpu(), labels=labels.cpu()), ValueError, "logits must be a CUDA tensor"),
        (dict(accumulation=2, running=[], ema_beta=1.0), ValueError, "ema_beta must be in"),
    ]
    for override, error, message in cases:
        with pytest.raises(error, match=message):
            call(**override)
    with pytest.raises(ValueError, match="grad_output must be a 0-dim tensor"):
        gala.scale_grad_(torch.ones(3, device=cuda), torch.ones(1, device=cuda))
    with pytest.raises(ValueError, match="grad_output must be a 0-dim tensor"):
        gala.scale_grad_(torch.ones(3, device=cuda), torch.ones(()))
    assert torch.all(state.step_scratch == 0) and int(state.steps) == 0  # nothing ran


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@gpu_test
@pytest.mark.parametrize("bad_label", [-1, 10, 1 << 40])
def test_label_out_of_range_raises_and_changes_nothing(cuda, bad_label):
    """A training step does not stop the host: NaN loss, zero gradient rows, the state untouched, and
    the ValueError from check_errors(); the op of an evaluation call checks at once."""
    C = 10
    state = warmed_state(C, device=cuda)
    before = snapshot(state)
    logits, labels = cuda_inputs(6, C, torch.float32, cuda)
    labels[4] = bad_label
    z = logits.clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, state, backend="cuda")
    loss.backward()
    assert torch.isnan(loss) and torch.all(z.grad[4] == 0) and torch.isfinite(z.grad).all()
    assert_state_unchanged(state, before)
    with pytest.raises(ValueError, match=rf"labels\[4\] = {bad_label}"):
        state.check_errors()
    state.check_errors()  # raised once: nothing pending any more
    with pytest.raises(ValueError, match=rf"labels\[4\] = {bad_label} is out of range"):
        op_outputs(logits, labels)  # the op's own check (ValueError from TORCH_CHECK_VALUE)
    assert_state_unchanged(state, before)


@gpu_test
def test_unchecked_bad_labels_are_never_used_as_an_index(cuda):
    """With GALA_CUDA_CHECK_LABELS=0 (no host sync) a bad row gets NaN and no statistics."""
    script = (
        "import torch, gala_kernels\n"
        "from gala_kernels import ops\n"
        "z = torch.randn(4, 300, device='cuda'); y = torch.tensor([1, 300, -3, 2], device='cuda')\n"
        "loss, grad, raw, _, counts = ops.native_fused_ce()(z, y, None, None, -100, 0, 0.0, True, False)\n"
        "assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all(), loss\n"
        "assert torch.isnan(grad[[1, 2]]).all() and torch.isfinite(grad[[0, 3]]).all()\n"
        "assert torch.isfinite(raw).all() and counts.tolist() == [4, 0], counts\n"
    )
    env = dict(os.environ, GALA_CUDA_CHECK_LABELS="0")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@gpu_test
def test_bad_arguments_name_the_argument(cuda):
    logits, labels = cuda_inputs(6, 10, torch.float32, cuda)
    bias = torch.zeros(10, device=cuda)
    cases = [
        (dict(logits=logits[0]), ValueError, "logits must be 2-D"),
        (dict(labels=labels.to(torch.int32)), TypeError, "labels must be int64"),
        (dict(labels=labels.cpu()), ValueError, "labels are on cpu"),
        (dict(bias=bias.double()), TypeError, "class_bias must be Float"),
        (dict(bias=bias[:5]), ValueError, r"class_bias must have shape \(C,\)"),
        (dict(reduction=3), ValueError, "reduction code must be 0, 1 or 2"),
    ]
    for override, error, message in cases:
        args = dict(logits=logits, labels=labels, bias=bias, reduction=1)
        args.update(override)
        with pytest.raises(error, match=message):
            op_outputs(args["logits"], args["labels"], args["bias"], reduction=args["reduction"])


# ------------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------
OPCHECK_CASES = [  # (dtype, compute_stats, track_pairwise, reduction): every flag and reduction once
    (torch.float32, False, False, 0), (torch.float32, True, False, 1), (torch.float32, True, True, 2),
    (torch.bfloat16, True, False, 1), (torch.float16, False, False, 2), (torch.float64, True, True, 0),
]


@gpu_test
@pytest.mark.parametrize("dtype,compute_stats,pairwise,reduction", OPCHECK_CASES)
def test_opcheck(cuda, dtype, compute_stats, pairwise, reduction):
    op = ops.native_fused_ce()
    logits, labels = cuda_inputs(6, 37, dtype, cuda, ignore_every=4)
    bias = torch.randn(37, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=cuda)
    weight = class_weights(37, cuda, bias.dtype)
    logits.requires_grad_(True)
    for class_bias, class_weight, smoothing in ((bias, None, 0.0), (None, None, 0.0), (bias, weight, 0.1)):
        torch.library.opcheck(op, (logits, labels, class_bias, class_weight, -100, reduction, smoothing,
                                   compute_stats, pairwise))


@gpu_test
def test_compile_fullgraph_step(cuda, monkeypatch):
    """A training step (margins, CUDA op, fold into the state) traced whole by torch.compile.

    ``_extension.has_kernel`` asks the dispatcher, which dynamo cannot trace; it is pinned to a
    constant-result function here (the change proposed for gala_kernels/_extension.py)."""
    answer = _extension.has_kernel("fused_ce_fwd", "CUDA")
    monkeypatch.setattr(_extension, "has_kernel",
                        torch.compiler.assume_constant_result(lambda op_name, dispatch_key: answer))
    torch._dynamo.reset()
    C = 1000
    logits, labels = cuda_inputs(64, C, torch.float32, cuda, ignore_every=9)
    state = warmed_state(C, device=cuda)
    truth_state = copy.deepcopy(state)

    def step(z, y, st):
        return gk.fused_gala_ce(z, y, st, backend="cuda")

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        z = logits.clone().requires_grad_(True)
        loss = compiled(z, labels, state)
        loss.backward()
        truth = run_step(logits.double(), labels, truth_state, backend="torch")
        torch.testing.assert_close(loss.double(), truth.loss, **TOLERANCES[torch.float32])
        torch.testing.assert_close(z.grad.double(), truth.grad, **TOLERANCES[torch.float32])
    for name, value in truth_state.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(state.state_dict()[name], value, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(state.state_dict()[name], value), name


# ------------------------------------------------------------------------------------------------
# CPU: the compile check, the binding against torch's headers, the auto rule
# ------------------------------------------------------------------------------------------------
def _nvcc():
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


needs_nvcc = pytest.mark.skipif(_nvcc() is None or shutil.which("cmake") is None,
                                reason="needs nvcc and cmake")


def _copy_sources(dst: Path) -> None:
    """CMakeLists.txt and csrc/ into a scratch source tree (so a file can be added to it)."""
    shutil.copy2(ROOT / "CMakeLists.txt", dst / "CMakeLists.txt")
    shutil.copytree(ROOT / "csrc", dst / "csrc")


@needs_nvcc
def test_cuda_compile_check_builds_and_catches_a_type_error(tmp_path):
    """`cmake -DGALA_CUDA_COMPILE_CHECK=ON` compiles every csrc/cuda/*.cu with nvcc (sm_90 only
    here, for time; the default also builds sm_80), and fails on a CUDA type error."""
    src, build = tmp_path / "src", tmp_path / "build"
    src.mkdir()
    _copy_sources(src)
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DGALA_CUDA_COMPILE_CHECK=ON",
                 "-DGALA_CUDA_CHECK_ARCHS=90"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    run = subprocess.run(configure, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert any(build.glob("*gala_cuda_compile_check*"))

    (src / "csrc" / "cuda" / "zz_type_error.cu").write_text(
        "__global__ void broken(float* out) { int* p = out; *p = 1; }\n"
    )
    run = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "zz_type_error.cu" in run.stdout + run.stderr


def _torch_include() -> Path:
    return Path(torch.__file__).resolve().parent / "include"


@needs_nvcc
@pytest.mark.skipif(shutil.which("g++") is None or not (_torch_include() / "c10/cuda/CUDAStream.h").exists(),
                    reason="needs g++ and torch's c10/cuda headers")
@pytest.mark.parametrize("binding", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*_binding.cpp")))
def test_cuda_binding_compiles_against_torch_headers(tmp_path, binding):
    """The bindings are only built with a CUDA torch; their syntax and types are checked here
    against the headers every torch wheel ships (the one generated CUDA config header is stubbed)."""
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    candidates = [Path(os.environ[k]) / "include" for k in ("CUDA_HOME", "CUDA_PATH") if k in os.environ]
    candidates += [Path(_nvcc()).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found (set CUDA_HOME)")
    include = _torch_include()
    command = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
               f"-isystem{tmp_path / 'stub'}", f"-isystem{include}",
               f"-isystem{include / 'torch/csrc/api/include'}", f"-isystem{cuda_include}",
               str(ROOT / "csrc" / "cuda" / binding)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-5000:]


def test_prefer_cuda_rule_is_a_shape_rule():
    small = cuda_rule.prefer_cuda(512, 8142, torch.float32)
    large = cuda_rule.prefer_cuda(8192, 32768, torch.bfloat16)
    assert isinstance(small, bool) and isinstance(large, bool)
    assert small and not large  # rows past one on-chip block go to Triton's two-pass kernels
    assert not cuda_rule.prefer_cuda(2048, 131072, torch.bfloat16)
    assert cuda_rule.prefer_cuda(1024, 1000, torch.float32)
    assert not cuda_rule.prefer_cuda(0, 10, torch.float32)  # an empty step prefers nothing
