"""The Triton backend against the float64 reference (gala_kernels.reference).

CPU tensors run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no
GPU is present), so every shape here is tiny; the same tests run on CUDA tensors when a GPU is
present. The multi-block (two-sweep) path is forced at small C by lowering the block-size rule's
constants, so it is exercised without a 32k-column row.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gala_kernels as gk
from gala_kernels import reference

triton_gala = pytest.importorskip("gala_kernels.backends.triton_gala")
if not triton_gala.HAS_TRITON:  # pragma: no cover
    pytest.skip("Triton is not installed", allow_module_level=True)

from conftest import devices_for, requires_cuda  # noqa: E402
from gala_testing import make_inputs, run_step, warmed_state  # noqa: E402

INTERPRETER = triton_gala.availability(torch.device("cpu"))[0]
DEVICES = devices_for(cpu=INTERPRETER)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Against the float64 truth computed from the same rounded inputs: the kernel's math is fp32 and
# the gradient and loss are rounded once to the input dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.bfloat16: dict(atol=4e-3, rtol=1e-2),
    torch.float16: dict(atol=5e-4, rtol=2e-3),
}
STATE_TOLERANCE = dict(atol=2e-6, rtol=2e-5)  # float32 state, fp32 atomics in any order


@pytest.fixture
def multi_block(monkeypatch):
    """Force the two-sweep path (rows longer than a block) at small C: 16-column blocks."""
    monkeypatch.setattr(triton_gala, "MAX_SINGLE_BLOCK_C", 16)
    monkeypatch.setattr(triton_gala, "MULTI_BLOCK_C", 16)


def plain_ce_truth(logits, labels, reduction, grad_output):
    """Cross-entropy without margins in float64, straight from reference.forward_and_grad."""
    loss, grad, _ = reference.forward_and_grad(
        logits.double(), labels, None, None, reduction=reduction, ignore_index=-100,
        compute_stats=False, track_pairwise=False,
    )
    if grad_output is not None:
        grad = grad * (grad_output.unsqueeze(1) if reduction == "none" else grad_output)
    return loss, grad, {}


def assert_state_close(state, truth_state):
    assert state.keys() == truth_state.keys()
    for name, value in truth_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[name], value, **STATE_TOLERANCE, msg=name)
        else:
            assert torch.equal(state[name], value), name


def check_once(B, C, dtype, device, *, reduction="mean", ignore_every=3, scale=3.0, state_kwargs=None,
               grad_output_seed=None, steps=1, with_state=True, logits=None, labels=None):
    """Run ``steps`` steps of backend="triton" and of the float64 reference; compare everything."""
    if logits is None:
        logits, labels = make_inputs(B, C, dtype, device, scale=scale, ignore_every=ignore_every)
    state = warmed_state(C, device, **(state_kwargs or {})) if with_state else None
    truth_state = copy.deepcopy(state)
    for step in range(steps):
        grad_output = None
        if grad_output_seed is not None:
            shape = (B,) if reduction == "none" else ()
            g = torch.Generator().manual_seed(grad_output_seed + step)
            grad_output = torch.randn(shape, generator=g, dtype=torch.float64)
        loss, grad, snap = run_step(
            logits, labels, state, backend="triton", reduction=reduction,
            grad_output=None if grad_output is None else grad_output.to(dtype).to(device),
        )
        t_grad_output = None if grad_output is None else grad_output.to(dtype).double().to(device)
        if with_state:
            t_loss, t_grad, t_snap = run_step(logits.double(), labels, truth_state, backend="torch",
                                              reduction=reduction, grad_output=t_grad_output)
        else:
            t_loss, t_grad, t_snap = plain_ce_truth(logits, labels, reduction, t_grad_output)
        assert loss.dtype == dtype and grad.dtype == dtype
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(loss.double(), t_loss, equal_nan=True, **tol)
        torch.testing.assert_close(grad.double(), t_grad, equal_nan=True, **tol)
        assert_state_close(snap, t_snap)
        if with_state:  # next step from the same state: see test_cuda_backend's accumulation test
            truth_state.load_state_dict(state.state_dict())
    return loss, grad, state


# ------------------------------------------------------------------------------------------------
# correctness against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("B, C", [(5, 1), (6, 2), (7, 37)])
def test_single_block_matches_reference(device, dtype, B, C):
    check_once(B, C, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("B, C", [(7, 37), (9, 64)])
def test_multi_block_matches_reference(device, dtype, B, C, multi_block):
    assert not triton_gala.choose_config(B, C).single_block
    check_once(B, C, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path", ["single", "multi"])
def test_reductions_with_random_grad_output(device, reduction, path, request):
    if path == "multi":
        request.getfixturevalue("multi_block")
    check_once(6, 23, torch.float32, device, reduction=reduction, grad_output_seed=7)


def max_error(got, truth):
    return (got.double() - truth).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_extreme_logits(device, dtype):
    """+-1e4 logits: exp overflows unless the row max is subtracted first.

    With margins, ``z + class_bias`` is rounded in fp32 at magnitude 1e4 (an ulp of ~1e-3), an
    error every fp32 implementation makes; so the bound is the torch backend's own error at the
    same input dtype (the CCE rule) plus the dtype tolerance.
    """
    logits, labels = make_inputs(6, 19, torch.float64, device, ignore_every=4)
    logits = (torch.sign(logits) * 1e4).to(dtype)
    logits[1, 3] = 0.0
    state = warmed_state(19, device)
    results = {}
    for name, z, backend in (("triton", logits, "triton"), ("torch", logits, "torch"),
                             ("truth", logits.double(), "torch")):
        results[name] = run_step(z, labels, copy.deepcopy(state), backend=backend)
    tol = TOLERANCES[dtype]["atol"]
    for part in (0, 1):  # loss, gradient
        truth = results["truth"][part]
        assert torch.isfinite(results["triton"][part]).all()
        assert max_error(results["triton"][part], truth) <= 2 * max_error(results["torch"][part], truth) + tol
    for name, value in results["truth"][2].items():
        if value.is_floating_point():
            err = max_error(results["triton"][2][name], value)
            assert err <= 2 * max_error(results["torch"][2][name], value) + 1e-6, name
    # without margins nothing is rounded away: the dtype tolerance holds as is
    check_once(6, 19, dtype, device, logits=logits, labels=labels, with_state=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(device, reduction):
    logits, _ = make_inputs(4, 9, torch.float32, device)
    labels = torch.full((4,), -100, device=device)
    loss, grad, state = check_once(4, 9, torch.float32, device, reduction=reduction, logits=logits,
                                   labels=labels)
    if reduction == "mean":
        assert torch.isnan(loss)  # 0/0, as F.cross_entropy
    else:
        assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["single", "multi"])
def test_custom_ignore_index(device, path, request):
    if path == "multi":
        request.getfixturevalue("multi_block")
    logits, labels = make_inputs(7, 21, torch.float32, device)
    labels[2] = 5
    labels[4] = 5
    z = logits.clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, None, ignore_index=5, backend="triton", reduction="none")
    truth = reference.gala_ce(logits.double(), labels, None, ignore_index=5, reduction="none")
    torch.testing.assert_close(loss.double(), truth, atol=2e-6, rtol=2e-5)
    loss.sum().backward()
    assert torch.all(z.grad[[2, 4]] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["single", "multi"])
def test_pairwise_tracking(device, path, request):
    if path == "multi":
        request.getfixturevalue("multi_block")
    check_once(8, 21, torch.float32, device, state_kwargs=dict(track_pairwise=True), steps=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("accumulation", ["cumulative", "sum", "ema"])
def test_accumulation_over_steps(device, accumulation):
    check_once(6, 13, torch.float32, device, state_kwargs=dict(accumulation=accumulation), steps=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["single", "multi"])
def test_nonfinite_rows(device, path, request):
    """Non-finite valid rows: loss NaN, gradient row NaN, no statistics, counted; ignored: zero."""
    if path == "multi":
        request.getfixturevalue("multi_block")
    B, C = 7, 20
    logits, labels = make_inputs(B, C, torch.float32, device)
    logits[1, 4] = float("inf")
    logits[3, 0] = float("-inf")
    logits[4, 19] = float("nan")
    logits[6, 2] = float("nan")
    labels[6] = -100  # ignored row with a NaN: loss 0, gradient 0
    state = warmed_state(C, device)
    truth_state = copy.deepcopy(state)
    before = state.nonfinite_rows.clone()

    loss, grad, snap = run_step(logits, labels, state, backend="triton", reduction="none")
    finite_rows = [0, 2, 5]
    # the reference on the finite rows only (rows are independent for reduction="none"), and the
    # state the reference reaches from them plus the three non-finite rows it must skip
    t_loss, t_grad, t_snap = run_step(logits.double(), labels, truth_state, backend="torch", reduction="none")
    torch.testing.assert_close(loss[finite_rows].double(), t_loss[finite_rows], atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad[finite_rows].double(), t_grad[finite_rows], atol=2e-6, rtol=2e-5)
    assert torch.isnan(loss[[1, 3, 4]]).all()
    assert torch.isnan(grad[[1, 3, 4]]).all()
    assert loss[6] == 0 and torch.all(grad[6] == 0)
    assert int(state.nonfinite_rows - before) == 3
    assert_state_close(snap, t_snap)


@pytest.mark.parametrize("device", DEVICES)
def test_plain_cross_entropy_without_state(device):
    logits, labels = make_inputs(6, 11, torch.float32, device, ignore_every=4)
    loss, grad, _ = check_once(6, 11, torch.float32, device, with_state=False, logits=logits, labels=labels)
    z = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(z, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, z.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_row_strided_logits(device):
    """Rows may be strided (a slice of a wider buffer); columns unit-stride."""
    wide, labels = make_inputs(5, 30, torch.float32, device, ignore_every=3)
    logits = wide[:, 4:21]
    labels = torch.where(labels == -100, labels, labels % 17)
    assert logits.stride(0) == 30
    out = triton_gala.fused_ce_forward(logits, labels, None, None, -100, 2, 0.0, True, False)
    truth = triton_gala.fused_ce_forward(logits.contiguous(), labels, None, None, -100, 2, 0.0, True, False)
    assert torch.isfinite(out[0])
    for got, expected in zip(out, truth):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_labels_are_never_read(device):
    """The launcher itself (no label check before it): such rows give a NaN loss and a zero
    gradient, nothing is read or written out of bounds."""
    logits, labels = make_inputs(4, 6, torch.float32, device)
    labels[1] = 6
    labels[2] = -3
    loss, grad, raw, _pairwise, counts = triton_gala.fused_ce_forward(
        logits, labels, None, None, -100, 0, 0.0, True, False
    )
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert (grad[[1, 2]] == 0).all() and torch.isfinite(grad).all() and torch.isfinite(raw).all()
    assert counts.tolist() == [4, 0]


# ------------------------------------------------------------------------------------------------
# launcher, in-place gradient, registration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_launcher(device, dtype):
    logits, labels = make_inputs(6, 25, dtype, device, ignore_every=4)
    bias = torch.randn(25, device=device)
    expected = triton_gala.fused_ce_forward(logits, labels, bias, None, -100, 1, 0.0, True, False)
    buffer = logits.clone()
    got = triton_gala.fused_ce_forward(buffer, labels, bias, None, -100, 1, 0.0, True, False,
                                       inplace_backward=True)
    assert got[1].data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, expected[1])
    for got_part, expected_part in zip(got, expected):
        torch.testing.assert_close(got_part, expected_part)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_autograd_function(device):
    """The in-place op under autograd: logits made by another op receive their gradient."""
    logits, labels = make_inputs(5, 12, torch.float32, device, ignore_every=3)
    weight = torch.randn(12, 12, dtype=torch.float32, device=device, requires_grad=True)
    x = logits.clone()
    loss, raw, _pairwise, counts = triton_gala.fused_ce_inplace(
        x @ weight, labels, None, None, -100, 1, 0.0, True, False
    )
    loss.backward()
    weight_ref = weight.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(x @ weight_ref, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(weight.grad, weight_ref.grad)
    assert counts.tolist() == [int((labels != -100).sum()), 0]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gala_ce_inplace_backward(device):
    """``fused_gala_ce(..., inplace_backward=True)``: same loss, gradients and state as the
    out-of-place call, with the gradient written into the logits' storage."""
    C = 12
    x, labels = make_inputs(6, C, torch.float32, device, ignore_every=4)
    weight = torch.randn(C, C, device=device)
    results = []
    for inplace in (False, True):
        w = weight.clone().requires_grad_(True)
        state = warmed_state(C, device)
        logits = x @ w
        loss = gk.fused_gala_ce(logits, labels, state, backend="triton", inplace_backward=inplace)
        loss.backward()
        results.append((loss.detach(), w.grad, state.pos_grad.clone(), state.cls_neg_grad.clone()))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="inplace_backward=True needs backend 'triton'"):
        gk.fused_gala_ce(x, labels, backend="torch", inplace_backward=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, labels = make_inputs(4, 10, torch.float32, device, ignore_every=3)
    bias = torch.randn(10, device=device)
    torch.library.opcheck(
        triton_gala.fused_ce_op(), (logits, labels, bias, None, -100, 1, 0.0, True, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_step(device):
    """A training step (margins, kernel, fold into the state) traced whole by torch.compile."""
    torch._dynamo.reset()
    B, C = 6, 13
    logits, labels = make_inputs(B, C, torch.float32, device, ignore_every=3)
    state = warmed_state(C, device)
    truth_state = copy.deepcopy(state)

    def step(z, y, st):
        return gk.fused_gala_ce(z, y, st, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        z = logits.clone().requires_grad_(True)
        loss = compiled(z, labels, state)
        loss.backward()
        t_loss, t_grad, _ = run_step(logits.double(), labels, truth_state, backend="torch")
        torch.testing.assert_close(loss.double(), t_loss, atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(z.grad.double(), t_grad, atol=2e-6, rtol=2e-5)
    assert_state_close(state.state_dict(), truth_state.state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(device, reduction, request):
    """float64 through the op and its autograd (the kernel in fp64 under the interpreter; the
    documented reference fallback on CUDA). The state is not updated, so the margins stay fixed."""
    state = warmed_state(5, device)
    logits, labels = make_inputs(3, 5, torch.float64, device)
    labels[1] = -100

    def loss_fn(z):
        return gk.fused_gala_ce(z, labels, state, update_state=False, reduction=reduction, backend="triton")

    assert torch.autograd.gradcheck(loss_fn, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_million_classes(device):
    """C = 1,000,000 (the two-sweep path at its default block size): ~15 s in the interpreter."""
    C = 1_000_000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, C, generator=g).to(device)
    labels = torch.tensor([5, C - 1], device=device)
    loss, _grad, raw, _pairwise, counts = triton_gala.fused_ce_forward(
        logits, labels, None, None, -100, 2, 0.0, True, False
    )
    expected = F.cross_entropy(logits.double(), labels, reduction="sum")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # every statistic sums, over the 2 rows, sum_{j != y} p = 1 - p_y (p_y ~ 1e-6 here)
    p_target = torch.softmax(logits.double(), dim=1).gather(1, labels[:, None])
    expected_sums = (1 - p_target).sum().expand(3)
    torch.testing.assert_close(raw.sum(dim=1).double(), expected_sums, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == [2, 0]


def test_availability_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = triton_gala.availability(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = triton_gala.availability(torch.device("cuda"))
    assert not ok and "TRITON_INTERPRET" in reason


def test_block_size_rule():
    limit = triton_gala.MAX_SINGLE_BLOCK_C
    for C in (1, 2, 37, 8142, limit):
        config = triton_gala.choose_config(512, C)
        assert config.single_block and config.block_c >= C and config.block_c & (config.block_c - 1) == 0
        assert 4 <= config.num_warps <= 32 and config.rows_per_tile >= 1
    for C in (limit + 1, 32768, 131072, 1_000_000):
        config = triton_gala.choose_config(2048, C)
        assert not config.single_block and config.block_c < C
    assert triton_gala.choose_config(3, 10).rows_per_tile <= 4  # never more rows per tile than B


def _ptx_resources(*args):
    """``(kernel, registers, stack, spill stores, spill loads)`` rows of tools/ptx_resources.py."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(repo / "tools" / "ptx_resources.py"), "--quick", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "nvidia" in proc.stderr.lower() and "backend" in proc.stderr.lower():
        pytest.skip(f"Triton's NVIDIA backend is unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    usages = re.findall(r"^\| (\w+) \|.*REG:(\d+) STACK:(\d+) SPILL:(\d+)/(\d+) \|$", proc.stdout, re.M)
    # (rows, partials, columns) x (plain, weight + smoothing), then count, fold, scale
    assert len(usages) == 9, proc.stdout
    assert [kernel for kernel, *_ in usages].count("gala_ce_columns_kernel") == 2, proc.stdout
    return [(kernel, *map(int, numbers)) for kernel, *numbers in usages], proc.stdout


def test_compiles_for_sm90_without_a_gpu():
    """The real Triton compiler (not the interpreter) lowers the kernels for sm_90: catches what the
    interpreter cannot (types of loop-carried values, registers). The two-pass kernels of long rows
    spill no register (no local-memory instruction at all), with or without weight and smoothing;
    the others keep their stack small."""
    usages, report = _ptx_resources()
    for kernel, registers, stack, stores, loads in usages:
        if kernel in ("gala_ce_partials_kernel", "gala_ce_columns_kernel"):
            assert (stores, loads) == (0, 0), report
        assert stack <= 128 and registers <= 255, report


@pytest.mark.parametrize("capability", [80, 100])
def test_compiles_for_other_architectures(capability):
    """A100 (sm_80) and B200 (sm_100): every kernel compiles (spills are tuned on sm_90)."""
    usages, report = _ptx_resources("--capability", str(capability))
    assert all(stack <= 256 for _kernel, _registers, stack, _stores, _loads in usages), report


# ------------------------------------------------------------------------------------------------
# large shapes: CUDA only
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("C", [32769, 131072, 1_000_000])
def test_cuda_long_rows(C):
    check_once(3, C, torch.bfloat16, "cuda", scale=2.0, ignore_every=0)


@requires_cuda
@pytest.mark.parametrize("B, C", [(4096, 8142), (512, 32768)])
def test_cuda_benchmark_shapes(B, C):
    check_once(B, C, torch.bfloat16, "cuda", ignore_every=7)


@requires_cuda
def test_cuda_autotune_opt_in(monkeypatch):
    """GALA_TRITON_AUTOTUNE=1 picks a config by timing; the results must not depend on it."""
    logits, labels = make_inputs(64, 3000, torch.bfloat16, "cuda", ignore_every=5)
    bias = torch.randn(3000, device="cuda")
    expected = triton_gala.fused_ce_forward(logits, labels, bias, None, -100, 1, 0.0, True, False)
    monkeypatch.setenv("GALA_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(triton_gala, "_tuned", {})
    got = triton_gala.fused_ce_forward(logits, labels, bias, None, -100, 1, 0.0, True, False)
    assert len(triton_gala._tuned) == 1
    for got_part, expected_part in zip(got, expected):
        torch.testing.assert_close(got_part, expected_part, atol=1e-5, rtol=1e-4)


@requires_cuda
def test_cuda_int64_offsets():
    """B x C above 2^31: the last rows (offsets past 2^31) against the reference."""
    C = 131072
    B = (2**31) // C + 4
    assert B * C > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 3 * B * C * 2:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, C, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, C, (B,), device="cuda", generator=g)
    loss, grad, raw, _pairwise, counts = triton_gala.fused_ce_forward(
        logits, labels, None, None, -100, 0, 0.0, True, False
    )
    tail = slice(B - 3, B)
    t_loss, t_grad, _ = reference.forward_and_grad(
        logits[tail].double(), labels[tail], None, None, reduction="none", ignore_index=-100,
        compute_stats=False, track_pairwise=False,
    )
    torch.testing.assert_close(loss[tail].double(), t_loss, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(grad[tail].double(), t_grad.double(), atol=2e-3, rtol=1e-2)
    assert counts.tolist() == [B, 0]
    torch.testing.assert_close(raw[0].sum().double(), raw[2].sum().double(), rtol=1e-4, atol=1e-3)
