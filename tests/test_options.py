"""``weight=`` and ``label_smoothing=``: torch's semantics in every backend, the statistics unchanged.

With ``state=None`` (no margins) ``fused_gala_ce`` must equal ``F.cross_entropy(..., weight=,
label_smoothing=)`` in float64, forward and backward; with a state, the GALA statistics must be
those of the plain call (the options change the loss and its gradient only). Every backend that
runs here is compared with the float64 truth on odd shapes, ignored rows, zero weights and all
dtypes; CUDA variants run where a GPU is.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA  # noqa: E402
from gala_testing import TOLERANCES, make_inputs, run_step, warmed_state  # noqa: E402

import gala_kernels as gk
from gala_kernels import backends

SHAPES = [(7, 1), (5, 2), (9, 37), (6, 300)]
OPTIONS = [
    dict(label_smoothing=0.1),
    dict(weight="random"),
    dict(weight="random", label_smoothing=0.25),
    dict(weight="with_zeros", label_smoothing=1.0),
]


def _backends():
    out = []
    for name in ("torch", "cpu", "triton", "cuda"):
        for device in ("cpu", "cuda"):
            if device == "cuda" and not HAS_CUDA:
                continue
            if backends.availability(name, torch.device(device))[0]:
                out.append((name, device))
    return out


BACKENDS = _backends()


def class_weights(kind, C, device, seed=5):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1
    if kind == "with_zeros":
        w[::3] = 0.0
    return w.to(device)


def resolved(options, C, device, dtype=torch.float64):
    options = dict(options)
    if "weight" in options:
        options["weight"] = class_weights(options["weight"], C, device).to(dtype)
    return options


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("B,C", SHAPES)
def test_reference_equals_torch_cross_entropy(B, C, options, reduction):
    """The oracle itself: float64, no state, against torch (forward and backward)."""
    logits, labels = make_inputs(B, C, torch.float64, ignore_every=3)
    kw = resolved(options, C, "cpu")
    z = logits.clone().requires_grad_(True)
    loss = gk.reference.gala_ce(z, labels, None, reduction=reduction, **kw)
    t = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(t, labels, reduction=reduction, **kw)
    g = torch.rand(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    loss.backward(g)
    expected.backward(g)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(z.grad, t.grad, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("B,C", SHAPES)
def test_backend_equals_torch_cross_entropy(backend, device, B, C, options, reduction):
    """No state, lambda1 = 0: every backend equals F.cross_entropy with the same options, float64."""
    logits, labels = make_inputs(B, C, torch.float64, device, ignore_every=3)
    kw = resolved(options, C, device)
    got = run_step(logits, labels, None, backend=backend, reduction=reduction, lambda1=0.0,
                   grad_output=torch.full((B,) if reduction == "none" else (), 0.75, dtype=torch.float64,
                                          device=device), **kw)
    t = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(t, labels, reduction=reduction, **kw)
    expected.backward(torch.full_like(expected, 0.75))
    torch.testing.assert_close(got.loss, expected.detach(), **TOLERANCES[torch.float64], equal_nan=True)
    torch.testing.assert_close(got.grad, t.grad, **TOLERANCES[torch.float64], equal_nan=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("options", OPTIONS[1:3], ids=["weight", "weight-smoothing"])
def test_backend_with_state_matches_the_float64_reference(backend, device, dtype, options):
    """With a state: loss, gradient and statistics against the float64 reference, every dtype."""
    B, C = 11, 45
    logits, labels = make_inputs(B, C, dtype, device, ignore_every=4)
    state = warmed_state(C, device)
    truth_state = copy.deepcopy(state)
    kw = resolved(options, C, device)
    got = run_step(logits, labels, state, backend=backend, **kw)
    truth = run_step(logits.double(), labels, truth_state, backend="torch", **kw)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.loss.double(), truth.loss, **tol)
    torch.testing.assert_close(got.grad.double(), truth.grad, **tol)
    for name, value in truth.state.items():
        if value.is_floating_point():
            torch.testing.assert_close(got.state[name], value, atol=2e-6, rtol=2e-5, msg=name)
        else:
            assert torch.equal(got.state[name], value), name


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_options_leave_the_statistics_alone(backend, device):
    """The GALA statistics of a step do not depend on weight or label_smoothing."""
    B, C = 13, 29
    logits, labels = make_inputs(B, C, torch.float32, device, ignore_every=5)
    plain, optioned = warmed_state(C, device), warmed_state(C, device)
    run_step(logits, labels, plain, backend=backend)
    run_step(logits, labels, optioned, backend=backend, weight=class_weights("with_zeros", C, device).float(),
             label_smoothing=0.3)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(optioned.state_dict()[name], value, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mean_over_zero_total_weight_is_nan_as_in_torch(backend, device):
    """Every present label has weight 0: the mean is 0/0 (NaN) with NaN gradients, as torch."""
    B, C = 6, 8
    logits, labels = make_inputs(B, C, torch.float64, device)
    labels = labels % 4
    weight = torch.ones(C, dtype=torch.float64, device=device)
    weight[:4] = 0.0
    got = run_step(logits, labels, None, backend=backend, weight=weight)
    t = logits.clone().requires_grad_(True)
    F.cross_entropy(t, labels, weight=weight).backward()
    assert torch.isnan(got.loss) and torch.isnan(got.grad).all() and torch.isnan(t.grad).all()


@pytest.mark.parametrize("bad,message", [
    (dict(weight=torch.ones(5)), r"weight must be a 1-D tensor of shape \(C,\) = \(6,\)"),
    (dict(weight=torch.ones(6, 1)), r"weight must be a 1-D tensor"),
    (dict(weight=torch.ones(6, dtype=torch.int64)), "weight must be a floating-point tensor"),
    (dict(weight=torch.tensor([1.0, 2.0, -0.5, 1.0, 1.0, 1.0])),
     r"weight must be non-negative, got weight\[2\]"),
    (dict(weight=torch.ones(6, requires_grad=True)), "weight must not require grad"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be a float in \[0, 1\]"),
    (dict(label_smoothing=1.5), r"label_smoothing must be a float in \[0, 1\]"),
    (dict(label_smoothing="0.1"), r"label_smoothing must be a float in \[0, 1\]"),
])
def test_bad_options_raise_before_anything_runs(bad, message):
    logits, labels = make_inputs(4, 6, torch.float32)
    state = gk.GALAState(6)
    error = TypeError if "floating-point" in message else ValueError
    with pytest.raises(error, match=message):
        gk.fused_gala_ce(logits, labels, state, **bad)
    assert int(state.steps) == 0
    with pytest.raises(error, match=message):
        gk.GALALoss(6, **bad)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_weight_on_another_device_is_rejected():
    logits, labels = make_inputs(4, 6, torch.float32, "cuda")
    with pytest.raises(ValueError, match="weight is on cpu but logits is on cuda"):
        gk.fused_gala_ce(logits, labels, None, weight=torch.ones(6))


def test_a_weight_changed_in_place_is_checked_again():
    logits, labels = make_inputs(4, 6, torch.float32)
    weight = torch.ones(6)
    gk.fused_gala_ce(logits, labels, None, weight=weight, backend="torch")
    weight[1] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        gk.fused_gala_ce(logits, labels, None, weight=weight, backend="torch")


def test_gala_loss_keeps_its_weight_as_a_buffer():
    weight = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    criterion = gk.GALALoss(6, weight=weight, label_smoothing=0.2, backend="torch")
    assert criterion.weight.dtype == torch.float32 and "weight" in criterion.state_dict()
    assert "label_smoothing=0.2" in repr(criterion)
    logits, labels = make_inputs(8, 6, torch.float32, ignore_every=3)
    criterion.eval()
    torch.testing.assert_close(criterion(logits, labels),
                               F.cross_entropy(logits, labels, weight=weight.float(), label_smoothing=0.2))
    restored = gk.GALALoss(6, weight=torch.ones(6), backend="torch")
    restored.load_state_dict(criterion.state_dict())
    torch.testing.assert_close(restored.weight, criterion.weight)
