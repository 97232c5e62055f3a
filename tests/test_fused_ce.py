"""Every backend present on CPU (``cpu`` = the C++ op, ``torch`` = the reference) against the
float64 reference: shapes, dtypes, ignored rows, reductions, accumulation modes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gala_testing import TOLERANCES, assert_close_to_truth, make_inputs, run_step, warmed_state

import gala_kernels as gk
from gala_kernels import backends

CPU_BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(
        not backends.availability("cpu", torch.device("cpu"))[0], reason="gala_kernels._C not built")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_against_truth(backend, logits, labels, state, *, grad_output=None, **kwargs):
    """Run ``backend`` and the float64 reference on the same rounded inputs and compare."""
    truth_state = copy.deepcopy(state)
    result = run_step(logits, labels, state, backend=backend, grad_output=grad_output, **kwargs)
    truth = run_step(logits.double(), labels, truth_state, backend="torch",
                     grad_output=None if grad_output is None else grad_output.double(), **kwargs)
    assert result.loss.dtype == logits.dtype and result.grad.dtype == logits.dtype
    assert_close_to_truth(result, truth, logits.dtype)
    return result


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 3, 127, 1000, 8142])
@pytest.mark.parametrize("B", [1, 7, 256])
def test_shapes_and_dtypes(backend, dtype, C, B):
    logits, labels = make_inputs(B, C, dtype, seed=B * 10_000 + C)
    check_against_truth(backend, logits, labels, warmed_state(C))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_reductions_ignored_rows_and_grad_output(backend, reduction, dtype):
    B, C = 37, 2500  # C larger than one 2048-column block of the CPU kernel
    logits, labels = make_inputs(B, C, dtype, ignore_every=3, seed=7)
    shape = (B,) if reduction == "none" else ()
    grad_output = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = check_against_truth(backend, logits, labels, warmed_state(C), reduction=reduction,
                                 grad_output=(grad_output * 4 - 2).to(dtype))
    assert torch.all(result.grad[labels == -100] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch(backend, reduction):
    logits, labels = make_inputs(5, 11, torch.float32)
    labels[:] = -100
    state = warmed_state(11)
    before = copy.deepcopy(state.state_dict())
    result = check_against_truth(backend, logits, labels, state, reduction=reduction)
    expected = F.cross_entropy(logits, labels, reduction=reduction)
    torch.testing.assert_close(result.loss, expected, equal_nan=True)  # mean: NaN, like torch
    assert torch.all(result.grad == 0)
    # nothing learnt: the increments are 0; cumulative folding still adds the running sums
    torch.testing.assert_close(state.running_pos_grad, before["running_pos_grad"])
    assert int(state.steps) == int(before["steps"]) + 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(backend, dtype):
    """Logits of +-1e4: adding the margins to 1e4 in fp32 already costs ~1e-3 (one fp32 ulp), so
    the bound is torch's own error at fp32 math (the reference run on the same inputs) plus the
    usual tolerance, as in Cut Cross-Entropy's tolerance rule."""
    B, C = 9, 300
    logits, labels = make_inputs(B, C, torch.float64, seed=5)
    logits = torch.where(logits > 0, 1e4, -1e4).to(dtype)
    logits[0] = 1e4  # a row of ties at the top
    logits[1] = -1e4
    state = warmed_state(C)
    torch_fp32 = run_step(logits.float(), labels, copy.deepcopy(state), backend="torch")
    truth = run_step(logits.double(), labels, copy.deepcopy(state), backend="torch")
    result = run_step(logits, labels, state, backend=backend)
    tol = TOLERANCES[dtype]
    for name in ("loss", "grad"):
        got, want, torch_err = (getattr(r, name).double() for r in (result, truth, torch_fp32))
        bound = 2 * (torch_err - want).abs().max() + tol["atol"] + tol["rtol"] * want.abs()
        assert torch.all((got - want).abs() <= bound), name
    assert torch.isfinite(result.grad).all() and torch.isfinite(result.loss)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_rows_are_counted_and_leave_the_state_finite(backend):
    B, C = 6, 50
    logits, labels = make_inputs(B, C, torch.float32, seed=11)
    logits[1, 3] = float("inf")
    logits[2, 0] = float("nan")
    logits[4, 7] = float("-inf")
    labels[4] = -100  # an ignored non-finite row is not counted
    state = warmed_state(C)
    result = check_against_truth(backend, logits, labels, state, reduction="none")
    assert int(state.nonfinite_rows) == 2
    assert torch.isnan(result.loss[1]) and torch.isnan(result.loss[2]) and result.loss[4] == 0
    assert torch.isnan(result.grad[1]).all() and torch.all(result.grad[4] == 0)
    assert torch.isfinite(result.loss[[0, 3, 5]]).all()
    for name, value in state.state_dict().items():
        assert torch.isfinite(value.double()).all(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("accumulation", ["cumulative", "sum", "ema"])
@pytest.mark.parametrize("track_pairwise", [False, True])
def test_accumulation_modes_over_several_steps(backend, accumulation, track_pairwise):
    C = 129
    state = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9, track_pairwise=track_pairwise)
    truth_state = copy.deepcopy(state)
    for step in range(5):
        logits, labels = make_inputs(24, C, torch.float32, ignore_every=5, seed=100 + step)
        result = run_step(logits, labels, state, backend=backend)
        truth = run_step(logits.double(), labels, truth_state, backend="torch")
        assert_close_to_truth(result, truth, torch.float32)
    assert int(state.steps) == 5
    assert float(state.pos_grad.sum()) > 0 and float(state.cls_neg_grad.sum()) > 0
    if track_pairwise:  # the diagonal of Phi is the positive part, its column sums the negative
        step_state = gk.GALAState(C, accumulation="sum", track_pairwise=True)
        run_step(*make_inputs(24, C, torch.float64, seed=9), step_state, backend=backend)
        phi = step_state.pairwise.double()
        off = phi - torch.diag(torch.diag(phi))
        torch.testing.assert_close(torch.diag(phi), step_state.pos_grad.double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(off.sum(0), step_state.neg_grad.double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(off.sum(1), step_state.cls_neg_grad.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lambda2_changes_nothing(backend):
    C = 40
    logits, labels = make_inputs(16, C, torch.float32, seed=21)
    results = []
    for lambda2 in (0.0, 0.9, 5.0):
        state = warmed_state(C)
        results.append(run_step(logits, labels, state, backend=backend, lambda2=lambda2))
    for other in results[1:]:
        torch.testing.assert_close(other.loss, results[0].loss)
        torch.testing.assert_close(other.grad, results[0].grad)
        for name in ("pos_grad", "neg_grad", "cls_neg_grad"):
            torch.testing.assert_close(other.state[name], results[0].state[name])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_margins_match_cross_entropy_on_shifted_logits(backend):
    """Independent of the reference: GALA = F.cross_entropy(z + lambda1 * log(pos_grad + eps))."""
    C = 77
    state = warmed_state(C)
    logits, labels = make_inputs(20, C, torch.float64, seed=3)
    shifted = logits + 1.2 * torch.log(state.pos_grad.double() + 1e-3)
    z = shifted.clone().requires_grad_(True)
    expected = F.cross_entropy(z, labels)
    expected.backward()
    result = run_step(logits, labels, state, backend=backend)
    torch.testing.assert_close(result.loss, expected.detach(), **TOLERANCES[torch.float64])
    torch.testing.assert_close(result.grad, z.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eval_mode_is_plain_cross_entropy(backend):
    C = 33
    criterion = gk.GALALoss(C, backend=backend)
    criterion.state.load_state_dict(warmed_state(C).state_dict())
    before = copy.deepcopy(criterion.state.state_dict())
    logits, labels = make_inputs(12, C, torch.float32, ignore_every=4)
    criterion.eval()
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels))
    for name, value in criterion.state.state_dict().items():
        assert torch.equal(value, before[name]), name
    criterion.train()
    assert not torch.allclose(criterion(logits, labels), F.cross_entropy(logits, labels))
    assert int(criterion.state.steps) == int(before["steps"]) + 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_state_false_keeps_margins_and_state(backend):
    C = 20
    state = warmed_state(C)
    before = copy.deepcopy(state.state_dict())
    logits, labels = make_inputs(8, C, torch.float32)
    check_against_truth(backend, logits, labels, state, update_state=False)
    for name, value in state.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_round_trip_resumes_identically(backend):
    C = 64
    criterion = gk.GALALoss(C, backend=backend)
    batches = [make_inputs(16, C, torch.float32, seed=s) for s in range(6)]
    for logits, labels in batches[:3]:
        criterion(logits, labels)
    saved = copy.deepcopy(criterion.state_dict())
    resumed = gk.GALALoss(C, backend=backend)
    resumed.load_state_dict(saved)
    for logits, labels in batches[3:]:
        torch.testing.assert_close(resumed(logits, labels), criterion(logits, labels), rtol=0, atol=0)
    for name, value in criterion.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_state_of_the_wrong_size_is_rejected():
    with pytest.raises(ValueError, match="num_classes=10"):
        gk.GALAState(10).load_state_dict(gk.GALAState(12).state_dict())
    with pytest.raises(ValueError, match="pairwise"):
        gk.GALAState(10).load_state_dict(gk.GALAState(10, track_pairwise=True).state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad_label", [-1, 10, 1 << 40])
def test_label_out_of_range_raises_and_changes_nothing(backend, bad_label):
    C = 10
    state = warmed_state(C)
    before = copy.deepcopy(state.state_dict())
    logits, labels = make_inputs(6, C, torch.float32)
    labels[4] = bad_label
    with pytest.raises(ValueError, match=rf"labels\[4\] = {bad_label}"):
        gk.fused_gala_ce(logits, labels, state, backend=backend)
    for name, value in state.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_arguments_name_the_argument(backend):
    C = 10
    state = warmed_state(C)
    before = copy.deepcopy(state.state_dict())
    logits, labels = make_inputs(6, C, torch.float32)
    cases = [
        (dict(logits=logits[0]), ValueError, "logits must be a 2-D"),
        (dict(logits=logits.to(torch.int32)), TypeError, "logits must be float"),
        (dict(labels=labels[:3]), ValueError, r"labels must have shape \(B,\) = \(6,\)"),
        (dict(labels=labels.to(torch.int32)), TypeError, "labels must be int64"),
        (dict(labels=labels.to("meta")), ValueError, "labels are on meta"),
        (dict(state=gk.GALAState(C + 1)), ValueError, "state has num_classes=11"),
        (dict(state=gk.GALAState(C, device="meta")), ValueError, "state is on meta"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ]
    for override, error, message in cases:
        args = dict(logits=logits, labels=labels, state=state, reduction="mean", backend=backend)
        args.update(override)
        with pytest.raises(error, match=message):
            gk.fused_gala_ce(args.pop("logits"), args.pop("labels"), args.pop("state"), **args)
    for name, value in state.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_named_backend_that_is_unavailable_says_why():
    with pytest.raises(backends.BackendUnavailableError, match="'cuda' backend runs on CUDA tensors"):
        gk.fused_gala_ce(*make_inputs(2, 3, torch.float32), backend="cuda")


def test_auto_picks_the_cpu_op_when_built():
    expected = "cpu" if backends.availability("cpu", torch.device("cpu"))[0] else "torch"
    assert backends.resolve("auto", torch.zeros(1, 1)) == expected


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_million_classes(backend):
    C = 1_000_000
    logits, labels = make_inputs(3, C, torch.float32, seed=42)
    labels[1] = C - 1
    check_against_truth(backend, logits, labels, gk.GALAState(C), reduction="sum")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("C", [1, 3, 17, 1030, 2100])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_logit_anywhere_in_the_row(backend, C, bad):
    """In a full vector, in the scalar tail, in a row shorter than one vector, in a second block."""
    logits, labels = make_inputs(3, C, torch.float32, seed=C)
    logits[0, C - 1] = bad
    logits[2, C // 2] = bad
    state = warmed_state(C)
    result = check_against_truth(backend, logits, labels, state, reduction="none")
    assert int(state.nonfinite_rows) == 2 and torch.isfinite(result.loss[1])
    assert torch.isnan(result.loss[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plain_pytorch_eager_step_matches_the_oracle(dtype):
    """reference.eager_gala_loss (the benchmarks' eager and torch.compile baseline) computes what
    the oracle computes: loss, gradient and state, over several steps with ignored rows."""
    C = 301
    state, truth_state = warmed_state(C), warmed_state(C)
    for step in range(3):
        logits, labels = make_inputs(19, C, dtype, ignore_every=4, seed=50 + step)
        z = logits.clone().requires_grad_(True)
        loss = gk.reference.eager_gala_loss(z, labels, state)
        (grad,) = torch.autograd.grad(loss, z)
        truth = run_step(logits, labels, truth_state, backend="torch")
        torch.testing.assert_close(loss, truth.loss, **TOLERANCES[dtype])
        torch.testing.assert_close(grad, truth.grad, **TOLERANCES[dtype])
        for name, value in truth_state.state_dict().items():
            torch.testing.assert_close(state.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_whose_max_lies_far_past_their_first_vector(backend, dtype):
    """The kernels take the first vector's max as the exp reference and move it up only when a
    block needs it (the max more than 60 above it, or on AVX-512 a block sum past kBlock * e^60,
    kBlock = 2048 columns): blocks below, at and past those limits, in the second and in the last
    block."""
    B, C = 8, 5000
    logits, labels = make_inputs(B, C, torch.float64, scale=1.0, seed=77)
    logits[:, :16] -= 20.0  # a low first vector in every row
    logits[0, 4900] = 200.0  # far past: exp would overflow without a new reference
    logits[1, 2100] = 45.0  # one value e^65 above: no new reference needed
    logits[2, 2048:4096] += 45.0  # a whole block 65 above: its sum passes 2048 * e^60
    logits[3, 3000] = 68.0  # e^88 above the reference: just under fp32 overflow
    logits[4, 4999] = 70.0  # e^90 above: overflows fp32 without a new reference
    logits[5, 2048:] += 30.0  # 50 above, everywhere past the first block
    logits[6, 4096:] += 100.0  # the last block alone, 120 above
    labels[0], labels[4], labels[6] = 4900, 3, 4100
    check_against_truth(backend, logits.to(dtype), labels, warmed_state(C), reduction="none")


requires_cpu_op = pytest.mark.skipif(not backends.availability("cpu", torch.device("cpu"))[0],
                                     reason="gala_kernels._C not built")

CPU_OP_CHECK = """
import torch, gala_kernels as gk
from gala_kernels import backends, reference
assert backends.availability("cpu", torch.device("cpu"))[0]
g = torch.Generator().manual_seed(3)
for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-9)):
    for C in (1, 17, 1030, 2500):
        z = (torch.randn(9, C, generator=g, dtype=torch.float64) * 3).to(dtype)
        z[2, C // 2] = float("-inf")
        y = torch.randint(0, C, (9,), generator=g)
        y[4] = -100
        states = [gk.GALAState(C), gk.GALAState(C)]
        got = gk.fused_gala_ce(z.clone().requires_grad_(True), y, states[0], backend="cpu", reduction="none")
        want = gk.fused_gala_ce(z.double(), y, states[1], backend="torch", reduction="none")
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True)
        for a, b in zip(states[0].stat_vectors, states[1].stat_vectors):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
        weight[::3] = 0.0
        for options in (dict(label_smoothing=0.1), dict(weight=weight),
                        dict(weight=weight, label_smoothing=0.3)):
            math = torch.float64 if dtype == torch.float64 else torch.float32
            mine = {k: v.to(math) if torch.is_tensor(v) else v for k, v in options.items()}
            results = []
            for backend, logits, kw in (("cpu", z, mine), ("torch", z.double(), options)):
                logits = logits.clone().requires_grad_(True)
                loss = gk.fused_gala_ce(logits, y, None, backend=backend, reduction="none", **kw)
                loss.sum().backward()
                results.append((loss.double(), logits.grad.double()))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
print("ok", torch.backends.cpu.get_cpu_capability())
"""


@requires_cpu_op
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_the_cpu_op_compiled_for_each_vector_isa(capability):
    """The C++ kernel is compiled for DEFAULT, AVX2 and AVX-512 and picked at run time by
    ATEN_CPU_CAPABILITY (as PyTorch's own kernels): each build against the float64 reference,
    with a -inf row, an ignored row and odd C (the AVX-512 fp32 path has its own exp and its own
    non-finite test), plain and with weight and label_smoothing."""
    import subprocess
    import sys

    env = dict(__import__("os").environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", CPU_OP_CHECK], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ran_on = out.stdout.split()[-1].lower()
    if ran_on != capability:  # this CPU lacks the ISA: torch caps the capability it reports
        pytest.skip(f"this CPU runs {ran_on}, not {capability}")


@requires_cpu_op
def test_freed_gradients_are_reused_and_can_be_released():
    """The CPU op's B x C gradient (>= 1 MiB) comes from a cache of freed blocks: a training loop
    gets the previous step's block back instead of faulting fresh pages in. A block still in use
    is never handed out, every value of a reused block is rewritten, and
    ``release_cpu_buffers`` frees what the cache holds. (A block is a page larger than the
    gradient, which starts where ``test_the_gradient_is_placed_off_the_next_logits_row`` says.)"""
    gk.release_cpu_buffers()
    B, C = 64, 8142  # 2 MiB of fp32 gradient
    state = gk.GALAState(C)
    seen = []
    for step in range(3):
        logits, labels = make_inputs(B, C, torch.float32, ignore_every=5, seed=step)
        logits[3, 10] = float("nan")  # a non-finite row: its gradient row is NaN, not stale
        truth = run_step(logits.double(), labels, copy.deepcopy(state), backend="torch").grad
        z = logits.clone().requires_grad_(True)
        gk.fused_gala_ce(z, labels, state, backend="cpu").backward()
        seen.append(z.grad.untyped_storage().data_ptr())
        torch.testing.assert_close(z.grad.double(), truth, equal_nan=True, **TOLERANCES[torch.float32])
        z.grad = None  # freed: into the cache
        assert gk.cached_cpu_buffer_bytes() == B * C * 4 + 4096
    assert seen[1] == seen[0] and seen[2] == seen[0]

    logits, labels = make_inputs(B, C, torch.float32, seed=9)
    z1, z2 = (logits.clone().requires_grad_(True) for _ in range(2))
    g1 = torch.autograd.grad(gk.fused_gala_ce(z1, labels, backend="cpu"), z1)[0]
    g2 = torch.autograd.grad(gk.fused_gala_ce(z2, labels, backend="cpu"), z2)[0]
    assert g1.untyped_storage().data_ptr() != g2.untyped_storage().data_ptr() and torch.equal(g1, g2)
    del g1, g2
    assert gk.cached_cpu_buffer_bytes() == 2 * (B * C * 4 + 4096)  # at most two blocks are kept
    assert gk.release_cpu_buffers() == 2 * (B * C * 4 + 4096)
    assert gk.cached_cpu_buffer_bytes() == 0


@requires_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_gradient_is_placed_off_the_next_logits_row(dtype):
    """A gradient of >= 1 MiB starts 2 KB before the logits' next row, modulo 4 KB, so that the
    kernel's loads of row i + 1 never trail its stores of gradient row i by a few bytes modulo
    4 KB (4K aliasing: measured 15-17% slower). It is an ordinary contiguous tensor: no view,
    nothing but the storage offset shows the placement."""
    B, C = 128, 8142  # >= 1 MiB of gradient in each dtype
    wide, labels = make_inputs(B, C + 10, dtype, seed=4)
    labels = labels.clamp(max=C - 1)
    for logits in (wide[:, :C].contiguous(), wide[:, 5:C + 5]):  # contiguous, and a strided view
        z = logits.detach().requires_grad_(True)
        gk.fused_gala_ce(z, labels, backend="cpu").backward()
        g = z.grad
        assert g.is_contiguous() and g._base is None and g.shape == (B, C)
        assert (z.data_ptr() + z.stride(0) * z.element_size() - g.data_ptr()) % 4096 == 2048
        expected = torch.softmax(logits.double(), 1) - F.one_hot(labels, C).double()
        torch.testing.assert_close(g.double(), (expected / B).to(dtype).double(), **TOLERANCES[dtype])
    small = torch.randn(4, 100, requires_grad=True)  # under 1 MiB: a plain allocation
    gk.fused_gala_ce(small, torch.zeros(4, dtype=torch.long), backend="cpu").backward()
    assert small.grad.storage_offset() == 0


@requires_cpu_op
def test_the_gradient_cache_can_be_turned_off():
    """GALA_CPU_BUFFER_CACHE=0: nothing is kept after the gradient is freed; the gradient is still
    placed 2 KB before the next logits row, modulo 4 KB."""
    import subprocess
    import sys

    code = ("import torch, gala_kernels as gk\n"
            "z = torch.randn(128, 8142, requires_grad=True)\n"
            "gk.fused_gala_ce(z, torch.zeros(128, dtype=torch.long), backend='cpu').backward()\n"
            "placement = (z.data_ptr() + 8142 * 4 - z.grad.data_ptr()) % 4096\n"
            "z.grad = None\n"
            "print(placement, gk.cached_cpu_buffer_bytes())\n")
    env = dict(__import__("os").environ, GALA_CPU_BUFFER_CACHE="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["2048", "0"]


@requires_cpu_op
@pytest.mark.parametrize("accumulation", ["cumulative", "sum", "ema"])
@pytest.mark.parametrize("track_pairwise", [False, True])
def test_the_cpp_fold_gives_the_pure_folds_bits(accumulation, track_pairwise):
    """Eager CPU steps fold their statistics with ``gala::fold_stats_`` (cumulative and sum, no
    pairwise tracking; gala_kernels.folding) and otherwise with the pure reference fold; both must
    leave the very same state as the reference fold."""
    from gala_kernels import folding, reference

    C = 1030
    cpp_state = gk.GALAState(C, accumulation=accumulation, track_pairwise=track_pairwise)
    python_state = copy.deepcopy(cpp_state)
    for step in range(3):
        logits, labels = make_inputs(33, C, torch.float32, ignore_every=6, seed=step)
        logits[4, 9] = float("inf")
        bias = reference.class_bias(cpp_state, 1.2, 1e-3)
        _, _, raw, raw_pairwise, counts = torch.ops.gala.fused_ce_fwd(logits, labels, bias, None, -100, 1,
                                                                      0.0, True, track_pairwise)
        stats = reference.StepStatistics(raw, raw_pairwise if track_pairwise else None, counts)
        expected_cpp = accumulation != "ema" and not track_pairwise
        assert folding.cpp_fold_applies(cpp_state, stats) == expected_cpp
        folding.fold_step(cpp_state, stats)
        reference.fold_increments(python_state, stats)
    for (name, got), (_, want) in zip(cpp_state.state_dict().items(), python_state.state_dict().items()):
        assert torch.equal(got, want), name
    assert int(cpp_state.steps) == 3 and int(cpp_state.nonfinite_rows) == 3


@requires_cpu_op
def test_the_cpp_fold_rejects_what_it_cannot_fold():
    state = gk.GALAState(10)
    good = dict(raw=torch.zeros(3, 10), scale=0.5, targets=state.stat_vectors, running=state.running_vectors,
                mode=0, steps=state.steps, nonfinite_rows=state.nonfinite_rows, nonfinite=0)
    for change, message in ((dict(raw=torch.zeros(3, 11)), "targets must be contiguous float32"),
                            (dict(raw=torch.zeros(3, 10, dtype=torch.float64)), "raw must be"),
                            (dict(mode=2), "mode must be 0"),
                            (dict(running=[]), "expected 3 running vectors")):
        with pytest.raises(ValueError, match=message):
            torch.ops.gala.fold_stats_(**{**good, **change})
    assert torch.count_nonzero(torch.stack(state.stat_vectors)) == 0 and int(state.steps) == 0


@requires_cpu_op
@pytest.mark.parametrize("accumulation", ["cumulative", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_one_call_cpu_step_gives_the_bits_of_its_three_calls(accumulation, dtype, reduction, monkeypatch):
    """An eager CPU step of a cumulative or sum state runs as one call (gala::fused_ce_step_cpu_:
    class bias, fused op and fold in C++); it must give exactly the loss, gradient and state of
    the three calls it replaces, ignored and non-finite rows included."""
    from gala_kernels import loss as loss_module
    from gala_kernels import reference
    from gala_kernels.ops import REDUCTION_CODES

    calls = []
    one_call = loss_module._cpu_step_op
    monkeypatch.setattr(loss_module, "_cpu_step_op", lambda *args: calls.append(1) or one_call(*args))
    C = 1000
    state = warmed_state(C, accumulation=accumulation)
    three_call_state = copy.deepcopy(state)
    for step in range(3):
        logits, labels = make_inputs(37, C, dtype, ignore_every=5, seed=step)
        logits[3, 17] = float("inf")  # a non-finite row: NaN loss and gradient, counted, no statistics
        z = logits.clone().requires_grad_(True)
        loss = gk.fused_gala_ce(z, labels, state, reduction=reduction, backend="cpu")
        loss.sum().backward()

        bias = reference.class_bias(three_call_state, 1.2, 1e-3, reference.compute_dtype(dtype))
        expected_loss, expected_grad, raw, _, counts = torch.ops.gala.fused_ce_fwd(
            logits, labels, bias, None, -100, REDUCTION_CODES[reduction], 0.0, True, False)
        reference.fold_increments(three_call_state, reference.StepStatistics(raw, None, counts))

        exact = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(loss.detach(), expected_loss, **exact)
        torch.testing.assert_close(z.grad, expected_grad, **exact)
        mine = state.state_dict()
        for name, value in three_call_state.state_dict().items():
            torch.testing.assert_close(mine[name], value, **exact, msg=lambda m, n=name: f"{n}: {m}")
    assert len(calls) == 3
    with torch.no_grad():  # without autograd too
        gk.fused_gala_ce(logits, labels, state, reduction=reduction, backend="cpu")
    assert len(calls) == 4 and int(state.steps) == int(three_call_state.steps) + 1


@requires_cpu_op
def test_states_the_one_call_cpu_step_does_not_cover_take_the_three_calls(monkeypatch):
    from gala_kernels import loss as loss_module

    monkeypatch.setattr(loss_module, "_cpu_step_op", lambda *args: pytest.fail("one-call step taken"))
    logits, labels = make_inputs(8, 50, torch.float32)
    for state in (gk.GALAState(50, accumulation="ema"), gk.GALAState(50, track_pairwise=True)):
        gk.fused_gala_ce(logits.clone().requires_grad_(True), labels, state, backend="cpu").backward()
        assert int(state.steps) == 1
    gk.fused_gala_ce(logits, labels, gk.GALAState(50), update_state=False, backend="cpu")


# ---------------------------------------------------------------- weight and label_smoothing, the op itself


def _class_weights(C, kind, dtype, seed=2):
    """None, positive random weights, or the same with every third class at 0."""
    if kind is None:
        return None
    weight = torch.rand(C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 0.1
    if kind == "with_zeros":
        weight[::3] = 0.0
    return weight.to(dtype)


def reference_math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op_outputs(logits, labels, bias, weight, reduction, label_smoothing, pairwise):
    return torch.ops.gala.fused_ce_fwd(logits, labels, bias, weight, -100, reduction, label_smoothing, True,
                                       pairwise)


@requires_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("C", [1, 2, 37, 2100, 5000])
@pytest.mark.parametrize("weight_kind,label_smoothing", [
    ("random", 0.0), (None, 0.1), ("with_zeros", 0.1), ("random", 1.0), (None, 1.0)])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_the_cpu_op_with_weight_and_label_smoothing(dtype, C, weight_kind, label_smoothing, reduction):
    """gala::fused_ce_fwd called directly with weight / label_smoothing, against the float64 oracle
    (reference.forward_and_grad): C = 1, 2, not a power of two, larger than the kernel's
    2048-column block, a row whose exp reference moves up in a later block; ignored and non-finite
    rows; zero weights. The statistics are those of the plain call, bit for bit."""
    from gala_kernels import reference

    B = 23
    math_dtype = reference.compute_dtype(dtype)
    logits, labels = make_inputs(B, C, dtype, ignore_every=4, seed=C)
    if C > 2048:
        logits[1, C - 3] = 90.0  # past the first block, e^90 above its reference
        logits[5, 2050:] += 50.0
    logits[6, C // 2] = float("inf")
    bias = torch.randn(C, generator=torch.Generator().manual_seed(1), dtype=math_dtype)
    weight = _class_weights(C, weight_kind, math_dtype)
    pairwise = C <= 2100
    loss, grad, raw, raw_pairwise, counts = _op_outputs(logits, labels, bias, weight, reduction,
                                                        label_smoothing, pairwise)
    want_loss, want_grad, _ = reference.forward_and_grad(
        logits.double(), labels, bias.double(), None, reduction=("none", "mean", "sum")[reduction],
        ignore_index=-100, compute_stats=False, track_pairwise=False,
        weight=None if weight is None else weight.double(), label_smoothing=label_smoothing)
    tol = TOLERANCES[dtype]
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, equal_nan=True, **tol)
    torch.testing.assert_close(grad.double(), want_grad, equal_nan=True, **tol)
    assert torch.isnan(grad[6]).all() and torch.all(grad[labels == -100] == 0)

    _, _, plain_raw, plain_pairwise, plain_counts = _op_outputs(logits, labels, bias, None, reduction, 0.0,
                                                                pairwise)
    assert torch.equal(raw, plain_raw) and torch.equal(raw_pairwise, plain_pairwise)
    assert torch.equal(counts, plain_counts)


@requires_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_the_cpu_op_mean_over_zero_total_weight(dtype, label_smoothing):
    """Every non-ignored label has weight 0: the mean is NaN and so is the gradient of the
    non-ignored rows, as in F.cross_entropy (with smoothing too, where torch's unsmoothed part is
    0 / 0); ignored rows keep a zero gradient."""
    B, C = 8, 12
    logits, labels = make_inputs(B, C, dtype, seed=4)
    labels = labels % 4
    labels[::3] = -100
    weight = torch.ones(C, dtype=reference_math_dtype(dtype))
    weight[:4] = 0.0
    loss, grad, *_ = _op_outputs(logits, labels, None, weight, 1, label_smoothing, False)
    expected = F.cross_entropy(logits, labels, weight=weight.to(dtype), label_smoothing=label_smoothing)
    assert torch.isnan(loss) and torch.isnan(expected)
    assert torch.isnan(grad[labels != -100]).all() and torch.all(grad[labels == -100] == 0)


@requires_cpu_op
@pytest.mark.parametrize("options", [
    dict(weight="random"), dict(label_smoothing=0.1), dict(weight="with_zeros", label_smoothing=0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_one_call_cpu_step_with_options_gives_the_bits_of_its_three_calls(options, dtype, reduction):
    """gala::fused_ce_step_cpu_ with weight / label_smoothing: the loss, gradient and state of
    class bias, fused_ce_fwd and the fold, bit for bit."""
    from gala_kernels import reference
    from gala_kernels.ops import REDUCTION_CODES

    C = 1000
    weight = _class_weights(C, options.get("weight"), reference_math_dtype(dtype))
    label_smoothing = options.get("label_smoothing", 0.0)
    state = warmed_state(C)
    three_call_state = copy.deepcopy(state)
    for step in range(2):
        logits, labels = make_inputs(37, C, dtype, ignore_every=5, seed=step)
        logits[3, 17] = float("inf")
        z = logits.clone().requires_grad_(True)
        loss = gk.fused_gala_ce(z, labels, state, reduction=reduction, backend="cpu", weight=weight,
                                label_smoothing=label_smoothing)
        loss.sum().backward()

        bias = reference.class_bias(three_call_state, 1.2, 1e-3, reference.compute_dtype(dtype))
        expected_loss, expected_grad, raw, _, counts = torch.ops.gala.fused_ce_fwd(
            logits, labels, bias, weight, -100, REDUCTION_CODES[reduction], label_smoothing, True, False)
        reference.fold_increments(three_call_state, reference.StepStatistics(raw, None, counts))

        exact = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(loss.detach(), expected_loss, **exact)
        torch.testing.assert_close(z.grad, expected_grad, **exact)
        for name, value in three_call_state.state_dict().items():
            torch.testing.assert_close(state.state_dict()[name], value, **exact, msg=name)


@requires_cpu_op
def test_bad_weight_and_label_smoothing_from_the_ops_themselves():
    """The C++ ops check weight and label_smoothing themselves (a caller need not come through
    fused_gala_ce), naming the argument, before anything is written."""
    logits, labels = make_inputs(4, 6, torch.float32)
    cases = [
        (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(C,\) = \(6,\), got \[5\]"),
        (dict(weight=torch.ones(6, 1)), ValueError, r"weight must have shape \(C,\) = \(6,\), got \[6, 1\]"),
        (dict(weight=torch.ones(6, dtype=torch.float64)), TypeError, "weight must be Float for Float logits"),
        (dict(weight=torch.ones(6, dtype=torch.int64)), TypeError, "weight must be Float"),
        (dict(weight=torch.tensor([1.0, 2.0, -0.5, 1.0, 1.0, 1.0])), ValueError,
         r"weight must be non-negative, got weight\[2\] = -0.5"),
        (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    ]
    state = warmed_state(6)
    before = copy.deepcopy(state.state_dict())
    for bad, error, message in cases:
        options = dict(dict(weight=None, label_smoothing=0.0), **bad)
        with pytest.raises(error, match=message):
            torch.ops.gala.fused_ce_fwd(logits, labels, None, options["weight"], -100, 1,
                                        options["label_smoothing"], False, False)
        with pytest.raises(error, match=message):
            torch.ops.gala.fused_ce_step_cpu_(logits, labels, options["weight"], state.stat_vectors,
                                              state.running_vectors, state.steps, state.nonfinite_rows, 1.2,
                                              1e-3, -100, 1, options["label_smoothing"], 0)
    for name, value in state.state_dict().items():
        assert torch.equal(value, before[name]), name
