"""Rows longer than on-chip memory (the two-pass Triton kernels) and the traffic they model.

Under the interpreter, at the default launch rule (no block size forced), on odd shapes above the
single-block threshold; and the traffic budget counted by gala_kernels.benchmark.traffic: the
logits read at most twice (once when rows fit), bytes at most 1.6x the copy floor, atomics O(C + B).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import gala_kernels as gk

triton_gala = pytest.importorskip("gala_kernels.backends.triton_gala")
if not triton_gala.HAS_TRITON:  # pragma: no cover
    pytest.skip("Triton is not installed", allow_module_level=True)

from gala_testing import STATE_TOLERANCE, TOLERANCES, make_inputs, warmed_state  # noqa: E402

INTERPRETER = triton_gala.availability(torch.device("cpu"))[0]
pytestmark = pytest.mark.skipif(not INTERPRETER, reason="CPU tensors need TRITON_INTERPRET=1")
SHARED_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "kernel_traffic.py"


def _step(logits, labels, state, backend, grad_output, **kwargs):
    z = logits.detach().clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, state, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss, z, grad_output.to(loss.dtype))
    return loss.detach(), grad


@pytest.mark.parametrize("C", [8193, 20000, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_two_pass_kernels_match_the_reference(C, dtype, reduction):
    assert C > triton_gala.MAX_SINGLE_BLOCK_C  # the two-pass kernels, at their default block size
    B = 5
    logits, labels = make_inputs(B, C, dtype, ignore_every=4)
    logits[2, C // 3] = float("inf")  # a non-finite row
    state = warmed_state(C)
    truth_state = copy.deepcopy(state)
    g = torch.linspace(0.5, 1.5, B) if reduction == "none" else torch.tensor(0.8)
    for _ in range(2):
        loss, grad = _step(logits, labels, state, "triton", g, reduction=reduction)
        t_loss, t_grad = _step(logits.double(), labels, truth_state, "torch", g, reduction=reduction)
        torch.testing.assert_close(loss.double(), t_loss, **TOLERANCES[dtype], equal_nan=True)
        torch.testing.assert_close(grad.double(), t_grad, **TOLERANCES[dtype], equal_nan=True)
        logits = logits.roll(1, dims=0)
    for name, value in truth_state.state_dict().items():
        got = state.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(got, value, **STATE_TOLERANCE, msg=name)
        else:
            assert torch.equal(got, value), name
    assert int(state.nonfinite_rows) == 2


def test_two_pass_kernels_with_pairwise_and_options():
    C, B = 8193, 3
    logits, labels = make_inputs(B, C, torch.float32, ignore_every=3)
    state = gk.GALAState(C, track_pairwise=True, accumulation="sum")
    truth_state = copy.deepcopy(state)
    weight = torch.rand(C) + 0.5
    kwargs = dict(weight=weight, label_smoothing=0.1)
    loss, grad = _step(logits, labels, state, "triton", torch.tensor(1.0), **kwargs)
    t_loss, t_grad = _step(logits.double(), labels, truth_state, "torch", torch.tensor(1.0), **kwargs)
    torch.testing.assert_close(loss.double(), t_loss, **TOLERANCES[torch.float32])
    torch.testing.assert_close(grad.double(), t_grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(state.pairwise, truth_state.pairwise, **STATE_TOLERANCE)
    torch.testing.assert_close(state.cls_neg_grad, truth_state.cls_neg_grad, **STATE_TOLERANCE)


# ------------------------------------------------------------------------------------------------
# the traffic budget (modelled, no cache)
# ------------------------------------------------------------------------------------------------
def test_two_pass_traffic_budget():
    """B = 128, C = 20,000 bf16, a GALA state: the logits read twice, the loss kernels' bytes at most
    1.6x the copy floor, at most 4C + 4B atomic updates; the fold moves its 18 floats per class."""
    from gala_kernels.benchmark.traffic import model_step

    B, C = 128, 20000
    figures = model_step(B, C, "bfloat16")
    assert figures["kernels"] == {"gala_ce_partials_kernel": 1, "gala_ce_columns_kernel": 1,
                                  "gala_fold_kernel": 1, "scale_grad_kernel": 1}
    assert figures["logit_reads"] == 2.0
    assert figures["bytes_over_floor"] <= 1.6, figures
    assert figures["atomics"] <= 4 * C + 4 * B, figures
    # cumulative fold: read raw, running, state; write running, state and the zeroed raw: 18 x C floats
    assert 18 * C * 4 <= figures["fold_bytes"] <= 18 * C * 4 + 256, figures


def test_rows_kernel_traffic_budget():
    """B = 128, C = 4,000 fp32: the logits read once; all bytes, the fold included, at most 1.26x."""
    from gala_kernels.benchmark.traffic import model_step

    figures = model_step(128, 4000, "float32")
    assert figures["kernels"] == {"gala_ce_rows_kernel": 1, "gala_fold_kernel": 1, "scale_grad_kernel": 1}
    assert figures["logit_reads"] == 1.0
    assert figures["bytes_over_floor"] + figures["fold_bytes"] / figures["floor_bytes"] <= 1.26, figures


@pytest.mark.skipif(not SHARED_TOOL.exists(), reason="the shared kernel_traffic tool is not beside the repo")
def test_the_model_agrees_with_the_shared_traffic_tool():
    """Our counter and ../shared/tools/kernel_traffic.py count the same bytes for the same call."""
    from gala_kernels.benchmark.traffic import count_traffic

    spec = importlib.util.spec_from_file_location("kernel_traffic", SHARED_TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_traffic", tool)  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    assert os.environ.get("TRITON_INTERPRET") == "1"
    logits, labels = make_inputs(16, 9000, torch.bfloat16, ignore_every=5)
    counts = []
    for counter in (count_traffic, tool.count_traffic):
        state = gk.GALAState(9000)
        with counter() as traffic:
            gk.fused_gala_ce(logits, labels, state, backend="triton")
        counts.append(traffic)
    ours, theirs = counts
    total = ours.total()
    assert total.loaded_bytes == theirs.loaded_bytes
    assert total.stored_bytes == theirs.stored_bytes
    assert total.atomic_elements == theirs.atomic_elems
    assert dict((k, v.launches) for k, v in ours.kernels.items()) == dict(theirs.launches)
