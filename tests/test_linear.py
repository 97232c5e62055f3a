"""``fused_linear_gala_ce`` against the unchunked ``fused_gala_ce(x @ W.T + b)``: loss, gradients of
x, W and b, and the state; plus the memory bound, measured in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import devices_for
from gala_testing import STATE_TOLERANCE, TOLERANCES, warmed_state

import gala_kernels as gk
from gala_kernels import backends
from gala_kernels.linear import default_chunk_rows, fused_linear_gala_ce

# (B, D, C, chunk rows): C = 1, 2, odd, larger than a kernel block; B not a multiple of the chunk
# (B, D, C, chunk rows); the last: one chunk holds the batch (the kernel's own reduction, grad_W
# in one matmul)
SHAPES = [(5, 3, 1, 2), (9, 4, 2, 4), (37, 5, 13, 8), (130, 7, 300, 64), (37, 5, 13, 40)]


def make_linear_inputs(B, D, C, dtype, *, seed=0, ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    weight = torch.randn(C, D, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return [t.to(dtype).to(device) for t in (x, weight, bias)] + [labels.to(device)]


def run_both(x, weight, bias, labels, state, *, backend, chunk_size, grad_output_seed=3, **kwargs):
    """One step chunked and one unchunked, from copies of ``state``; returns both results."""
    results = []
    for chunked in (True, False):
        st = copy.deepcopy(state)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        xx, ww, bb = leaves
        if chunked:
            loss = fused_linear_gala_ce(xx, ww, labels, st, bb, backend=backend, chunk_size=chunk_size,
                                        **kwargs)
        else:
            loss = gk.fused_gala_ce(torch.addmm(bb, xx, ww.t()), labels, st, backend=backend, **kwargs)
        g = torch.Generator().manual_seed(grad_output_seed)
        grad_output = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
        grads = torch.autograd.grad(loss, leaves, grad_output.to(loss.device))
        state_dict = {k: v.clone() for k, v in st.state_dict().items()} if st is not None else {}
        results.append((loss.detach(), grads, state_dict))
    return results


def assert_same(chunked, unchunked, dtype, state_tolerance=STATE_TOLERANCE):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(chunked[0], unchunked[0], **tol, equal_nan=True)
    for name, a, b in zip(("x", "weight", "bias"), chunked[1], unchunked[1]):
        torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m, n=name: f"grad {n}: {m}")
    assert chunked[2].keys() == unchunked[2].keys()
    for key in chunked[2]:
        torch.testing.assert_close(chunked[2][key], unchunked[2][key], **state_tolerance)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B, D, C, chunk", SHAPES)
def test_matches_unchunked(backend, dtype, reduction, B, D, C, chunk):
    x, weight, bias, labels = make_linear_inputs(B, D, C, dtype)
    state = warmed_state(C)
    chunked, unchunked = run_both(x, weight, bias, labels, state, backend=backend, chunk_size=chunk,
                                  reduction=reduction)
    assert_same(chunked, unchunked, dtype)
    assert chunked[2]["steps"] == state.steps + 1


@pytest.mark.parametrize("chunk_size", [16, 64])  # 4 chunks (fp32 accumulation), one chunk
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_unchunked(dtype, chunk_size):
    """The logits are rounded to the input dtype in both paths; the gradients of W and b are
    accumulated in fp32 over chunks here, so agreement is within the dtype's rounding."""
    x, weight, bias, labels = make_linear_inputs(64, 8, 37, dtype)
    chunked, unchunked = run_both(x, weight, bias, labels, warmed_state(37), backend="cpu",
                                  chunk_size=chunk_size)
    loose = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(chunked[0].float(), unchunked[0].float(), **loose)
    for a, b in zip(chunked[1], unchunked[1]):
        torch.testing.assert_close(a.float(), b.float(), **loose)
    for key in chunked[2]:
        torch.testing.assert_close(chunked[2][key], unchunked[2][key], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("accumulation", ["cumulative", "sum", "ema"])
def test_pairwise_and_accumulations_fold_once(accumulation):
    x, weight, bias, labels = make_linear_inputs(41, 4, 9, torch.float64)
    state = warmed_state(9, accumulation=accumulation, track_pairwise=True, ema_beta=0.8)
    chunked, unchunked = run_both(x, weight, bias, labels, state, backend="torch", chunk_size=8)
    assert_same(chunked, unchunked, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_edge_rows_all_ignored_and_non_finite(backend):
    x, weight, bias, labels = make_linear_inputs(20, 3, 6, torch.float32)
    ignored = torch.full_like(labels, -100)
    chunked, unchunked = run_both(x, weight, bias, ignored, gk.GALAState(6), backend=backend, chunk_size=8)
    assert torch.isnan(chunked[0]) and chunked[2]["steps"] == 1
    assert_same(chunked, unchunked, torch.float32)

    x[13, 1] = float("inf")  # one row with a non-finite logit, in the second chunk
    chunked, unchunked = run_both(x, weight, bias, labels, gk.GALAState(6), backend=backend, chunk_size=8,
                                  reduction="none")
    assert torch.isnan(chunked[0][13]) and chunked[2]["nonfinite_rows"] == 1
    assert_same(chunked, unchunked, torch.float32)


def test_no_state_no_bias_and_frozen_inputs():
    x, weight, _, labels = make_linear_inputs(33, 5, 7, torch.float64)
    loss = fused_linear_gala_ce(x, weight.requires_grad_(True), labels, chunk_size=8)  # x needs no grad
    (grad_w,) = torch.autograd.grad(loss, weight)
    w2 = weight.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(x @ w2.t(), labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_w, torch.autograd.grad(expected, w2)[0])
    with torch.no_grad():  # evaluation: no gradient buffers, the plain cross-entropy
        eval_loss = fused_linear_gala_ce(x, weight, labels, chunk_size=8)
    assert not eval_loss.requires_grad
    torch.testing.assert_close(eval_loss, expected.detach())
    state = warmed_state(7)
    before = copy.deepcopy(state.state_dict())
    fused_linear_gala_ce(x, weight, labels, state, update_state=False)
    assert all(torch.equal(before[k], v) for k, v in state.state_dict().items())


def test_default_chunk_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # 64 MiB / (4 B * 100,000) = 167 -> 160 rows fit; 52 chunks of 158 -> 160
    assert default_chunk_rows(8192, 100_000, cpu) == 160
    assert default_chunk_rows(8192, 100_000, cuda) == 2048  # 1 GiB -> 2680 fit; 4 equal chunks
    assert default_chunk_rows(8192, 10_000_000, cpu) == 8  # at least 8 rows
    assert default_chunk_rows(30, 10, cpu) == 32  # small problems: one chunk
    assert default_chunk_rows(4096, 32_000, cuda) == 4096  # fits: one chunk
    for B, C in [(1, 1), (100, 7), (4096, 50_000), (1000, 30_000), (8191, 100_000)]:
        for device, budget in ((cpu, 64 * 2**20), (cuda, 2**30)):
            rows = default_chunk_rows(B, C, device)
            assert rows % 8 == 0 and ((rows - 7) * C * 4 <= budget or rows == 8)
            chunks = -(-B // rows)
            last = B - (chunks - 1) * rows
            assert last > rows - 8 * chunks  # equal chunks: no small last chunk


def test_bad_inputs_name_the_argument():
    x, weight, bias, labels = make_linear_inputs(6, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        fused_linear_gala_ce(x, weight[:, :2], labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_gala_ce(x, weight, labels, bias=bias[:3])
    with pytest.raises(ValueError, match="num_classes=5"):
        fused_linear_gala_ce(x, weight, labels, gk.GALAState(5))
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_gala_ce(x, weight, torch.full_like(labels, 4), backend="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_gala_ce(x, weight, labels, chunk_size=0)


@pytest.mark.parametrize("device", devices_for())
def test_fused_backend_on_device(device):
    """The auto backend on each device (the CPU op; triton/cuda on a GPU) against the reference."""
    x, weight, bias, labels = make_linear_inputs(70, 16, 130, torch.float32, device=device)
    state = warmed_state(130, device=device)
    chunked, _ = run_both(x, weight, bias, labels, state, backend="auto", chunk_size=24)
    _, truth = run_both(x, weight, bias, labels, state, backend="torch", chunk_size=24)
    assert_same(chunked, truth, torch.float32)


def test_triton_backend_if_available():
    ok, reason = backends.availability("triton", torch.device("cpu"))
    if not ok:
        pytest.skip(f"triton backend unavailable on CPU: {reason}")
    x, weight, bias, labels = make_linear_inputs(12, 4, 10, torch.float32)
    chunked, _ = run_both(x, weight, bias, labels, warmed_state(10), backend="triton", chunk_size=8)
    _, truth = run_both(x, weight, bias, labels, warmed_state(10), backend="torch", chunk_size=8)
    assert_same(chunked, truth, torch.float32)


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, torch, gala_kernels as gk
    from gala_kernels.linear import fused_linear_gala_ce
    B, D, C, chunked = 1024, 16, 20000, sys.argv[1] == "chunked"
    x = torch.randn(B, D, requires_grad=True); w = torch.randn(C, D, requires_grad=True)
    y = torch.randint(0, C, (B,)); state = gk.GALAState(C)
    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    tiny = torch.randn(8, D, requires_grad=True)  # first call: loads the op (one-time, not per step)
    fused_linear_gala_ce(tiny, w[:10], y[:8] % 10, gk.GALAState(10)).backward()
    gk.fused_gala_ce(tiny @ w[:10].t(), y[:8] % 10, gk.GALAState(10)).backward()
    w.grad = None
    open("/proc/self/clear_refs", "w").write("5")
    before = hwm()
    if chunked:
        loss = fused_linear_gala_ce(x, w, y, state, chunk_size=32)
    else:
        loss = gk.fused_gala_ce(x @ w.t(), y, state)
    loss.backward()
    print(json.dumps({"added": hwm() - before, "logits": B * C * 4}))
    """
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_is_bounded_by_the_chunk():
    """Scaled-down target: 1024 x 20,000 fp32 logits (78 MiB), chunks of 32 rows (2.4 MiB). The peak
    resident memory a step adds (VmHWM, fresh process) must stay far below the full logits.
    MALLOC_MMAP_THRESHOLD_ makes glibc return every large buffer to the OS when it is freed, so the
    resident size follows the live buffers instead of the allocator's retained heap."""
    measured = {}
    for mode in ("chunked", "full"):
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        measured[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    logits = measured["full"]["logits"]
    assert measured["full"]["added"] > logits  # the probe sees the full logits (and their gradient)
    assert measured["chunked"]["added"] < 0.25 * logits, measured
