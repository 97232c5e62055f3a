"""The device training step (gala_kernels/backends/step.py): no host synchronisation, at most three
launches, the fold on the device, bad labels without a sync, CUDA-graph capture.

On this machine the Triton kernels run on CPU tensors in the interpreter; ``label_errors.deferred_on_cpu``
gives them the CUDA behaviour (no look at the labels before the kernel). The CUDA-only tests (graph
capture, torch.compile with CUDA graphs, the sync debug mode) run on a GPU, for both GPU backends.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gala_kernels as gk
from gala_kernels import label_errors, reference
from gala_kernels.backends import step as device_step

triton_gala = pytest.importorskip("gala_kernels.backends.triton_gala")
if not triton_gala.HAS_TRITON:  # pragma: no cover
    pytest.skip("Triton is not installed", allow_module_level=True)

from conftest import HAS_CUDA, requires_cuda  # noqa: E402
from gala_testing import STATE_TOLERANCE, TOLERANCES, make_inputs, warmed_state  # noqa: E402

INTERPRETER = triton_gala.availability(torch.device("cpu"))[0]
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="CPU tensors need TRITON_INTERPRET=1")
# operations that read a device value on the host (a synchronisation on a GPU)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
            "aten::allclose", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# operations that launch no kernel themselves: allocation, views, metadata (when one of them does
# copy, e.g. aten::to or aten::contiguous, its nested aten::copy_ is counted)
NO_KERNEL_OPS = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::slice",
                 "aten::as_strided", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::t",
                 "aten::detach", "aten::alias", "aten::lift_fresh", "aten::result_type", "aten::expand",
                 "aten::reshape", "aten::_reshape_alias", "aten::resolve_conj", "aten::resolve_neg",
                 "aten::contiguous", "aten::to", "detach")


@pytest.fixture
def deferred(monkeypatch):
    """Bad labels as on CUDA: recorded by the kernel, raised later, no look at the labels first."""
    monkeypatch.setattr(label_errors, "deferred_on_cpu", True)


@pytest.fixture
def unfolded(monkeypatch):
    """The step leaves its sums in the scratch for gala_fold_kernel (as a distributed step does)."""
    monkeypatch.setattr(device_step, "folds_in_kernel", lambda _state: False)


@pytest.fixture
def multi_block(monkeypatch):
    monkeypatch.setattr(triton_gala, "MAX_SINGLE_BLOCK_C", 16)
    monkeypatch.setattr(triton_gala, "MULTI_BLOCK_C", 16)


def step_both(logits, labels, state, truth_state, *, backend="triton", grad_output=None, **kwargs):
    """One step of ``backend`` and of the float64 reference; returns ((loss, grad), (loss, grad))."""
    out = []
    for st, name, z in ((state, backend, logits), (truth_state, "torch", logits.double())):
        leaf = z.detach().clone().requires_grad_(True)
        loss = gk.fused_gala_ce(leaf, labels, st, backend=name, **kwargs)
        g = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
        (grad,) = torch.autograd.grad(loss, leaf, g)
        out.append((loss.detach(), grad))
    return out


def assert_states_close(state, truth_state):
    for name, value in truth_state.state_dict().items():
        got = state.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(got, value.to(got.dtype), **STATE_TOLERANCE, msg=name)
        else:
            assert torch.equal(got, value), name


def assert_scratch_clean(state):
    assert torch.count_nonzero(state.step_scratch) == 0, state.step_scratch[-8:]
    assert torch.count_nonzero(state.label_error) == 0
    if state.raw_pairwise_scratch is not None:
        assert torch.count_nonzero(state.raw_pairwise_scratch) == 0


# ------------------------------------------------------------------------------------------------
# the fold on the device
# ------------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("accumulation", ["cumulative", "sum", "ema"])
@pytest.mark.parametrize("path", ["single", "multi", "unfolded", "count_kernel"])
def test_steps_fold_on_the_device_as_the_reference(accumulation, path, request, monkeypatch):
    """Several steps: loss, gradient and state equal the reference's; the scratch is zero after each."""
    if path == "multi":
        request.getfixturevalue("multi_block")
    elif path == "unfolded":
        request.getfixturevalue("unfolded")
    elif path == "count_kernel":  # N and W counted by gala_count_rows_kernel before the rows kernel
        monkeypatch.setattr(triton_gala, "COUNT_IN_KERNEL_MAX_ROWS", 4)
    C = 37
    state = warmed_state(C, accumulation=accumulation, ema_beta=0.8)
    truth_state = copy.deepcopy(state)
    for step in range(3):
        logits, labels = make_inputs(11, C, torch.float32, ignore_every=4, seed=step)
        logits[5, 3] = float("nan") if step == 1 else logits[5, 3]
        (loss, grad), (t_loss, t_grad) = step_both(logits, labels, state, truth_state)
        torch.testing.assert_close(loss.double(), t_loss, **TOLERANCES[torch.float32], equal_nan=True)
        torch.testing.assert_close(grad.double(), t_grad, **TOLERANCES[torch.float32], equal_nan=True)
        assert_states_close(state, truth_state)
        assert_scratch_clean(state)
    assert int(state.steps) == 5 and int(state.nonfinite_rows) == 1


@needs_interpreter
@pytest.mark.parametrize("path", ["single", "multi"])
def test_pairwise_is_folded_by_the_fold_kernel(path, request):
    if path == "multi":
        request.getfixturevalue("multi_block")
    C = 21
    state = warmed_state(C, track_pairwise=True)
    truth_state = copy.deepcopy(state)
    assert not device_step.folds_in_kernel(state)
    for step in range(2):
        logits, labels = make_inputs(9, C, torch.float32, ignore_every=3, seed=step)
        step_both(logits, labels, state, truth_state)
        assert_states_close(state, truth_state)
        assert_scratch_clean(state)


@needs_interpreter
@pytest.mark.parametrize("path", ["single", "multi"])
def test_inplace_training_step(path, request):
    """inplace_backward with a state: the gradient lands in the logits' storage, the state folds."""
    if path == "multi":
        request.getfixturevalue("multi_block")
    C = 30
    weight = torch.randn(C, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 8, dtype=torch.float64)
    labels = torch.randint(0, C, (7,))
    state, truth_state = gk.GALAState(C), gk.GALAState(C)
    loss = gk.fused_gala_ce(x @ weight.t(), labels, state, backend="triton", inplace_backward=True)
    loss.backward()
    truth_weight = weight.detach().clone().requires_grad_(True)
    gk.fused_gala_ce(x @ truth_weight.t(), labels, truth_state, backend="torch").backward()
    torch.testing.assert_close(weight.grad, truth_weight.grad, **TOLERANCES[torch.float64])
    assert_states_close(state, truth_state)


# ------------------------------------------------------------------------------------------------
# backward: the scaling kernel, retain_graph
# ------------------------------------------------------------------------------------------------
@needs_interpreter
def test_backward_scales_in_place_and_twice_with_retain_graph():
    """The first backward scales the saved gradient in place; later ones (retain_graph) rescale by
    the ratio of the grad_outputs. After a first grad_output of 0 nothing is left to rescale: the
    ratio gives NaN, never a wrong value."""
    C = 13
    logits, labels = make_inputs(6, C, torch.float32)
    z = logits.clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, gk.GALAState(C), backend="triton")
    (g1,) = torch.autograd.grad(loss, z, torch.tensor(1.0), retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss, z, torch.tensor(0.5), retain_graph=True)
    torch.testing.assert_close(g2, g1 * 0.5)
    (g3,) = torch.autograd.grad(loss, z, torch.tensor(2.0), retain_graph=True)
    torch.testing.assert_close(g3, g1 * 2.0)
    (g4,) = torch.autograd.grad(loss, z, torch.tensor(0.0), retain_graph=True)
    assert torch.count_nonzero(g4) == 0
    (g5,) = torch.autograd.grad(loss, z, torch.tensor(1.0))
    torch.testing.assert_close(g5, g1)
    z0 = logits.clone().requires_grad_(True)
    loss0 = gk.fused_gala_ce(z0, labels, gk.GALAState(C), backend="triton")
    (first,) = torch.autograd.grad(loss0, z0, torch.tensor(0.0), retain_graph=True)
    assert torch.count_nonzero(first) == 0
    (second,) = torch.autograd.grad(loss0, z0, torch.tensor(1.0))
    assert torch.isnan(second[labels != -100]).all()
    t = logits.double().requires_grad_(True)
    (truth,) = torch.autograd.grad(gk.fused_gala_ce(t, labels, gk.GALAState(C), backend="torch"), t)
    torch.testing.assert_close(g1.double(), truth, **TOLERANCES[torch.float32])


@needs_interpreter
def test_scale_kernel_skips_one_and_scales_otherwise():
    grad = torch.randn(5, 33, dtype=torch.bfloat16)
    original = grad.clone()
    triton_gala.scale_grad(grad, torch.tensor(1.0))
    assert torch.equal(grad, original)
    triton_gala.scale_grad(grad, torch.tensor(0.25, dtype=torch.bfloat16))
    torch.testing.assert_close(grad, original * 0.25)


# ------------------------------------------------------------------------------------------------
# no host synchronisation, at most three launches
# ------------------------------------------------------------------------------------------------
def _profile_step(criterion, logits, labels):
    """Launches and sync ops of one training step (forward + backward), the interpreter's own
    argument copies left out."""
    from gala_kernels.benchmark.traffic import INTERPRETER_RUN, count_traffic

    z = logits.clone().requires_grad_(True)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with count_traffic() as traffic, torch.profiler.profile(activities=cpu) as prof:
        criterion(z, labels).backward()
    events = sorted(prof.events(), key=lambda e: (e.time_range.start, -e.time_range.end))
    skip_until = -1
    kernel_ops, sync_ops = [], []
    open_until = []  # end times of the counted ops enclosing the current one (nested ops count once)
    for event in events:
        start, end = event.time_range.start, event.time_range.end
        if start < skip_until:
            continue
        if event.name == INTERPRETER_RUN:
            skip_until = end
            continue
        if event.name in SYNC_OPS:
            sync_ops.append(event.name)
        open_until = [t for t in open_until if t > start]
        if event.name.startswith("aten::") and event.name not in NO_KERNEL_OPS and not open_until:
            kernel_ops.append(event.name)
            open_until.append(end)
    return traffic, kernel_ops, sync_ops


@needs_interpreter
@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, weight=True)],
                         ids=["plain", "options"])
def test_a_training_step_makes_no_sync_and_at_most_three_launches(path, options, deferred, request):
    """GALALoss forward + backward: no operation that reads a device value on the host, and at most
    three launches of the loss (Triton kernels + torch operations that would launch a GPU kernel):
    two when the rows fit on chip, three for the two-pass kernels. ``loss.backward()`` itself adds
    autograd's one-element fill of the root gradient (``aten::ones_like``, as for F.cross_entropy):
    with it, two-pass steps launch four kernels."""
    if path == "multi":
        request.getfixturevalue("multi_block")
    C = 40
    weight = torch.rand(C) + 0.5 if options.get("weight") else None
    criterion = gk.GALALoss(C, backend="triton", weight=weight,
                            label_smoothing=options.get("label_smoothing", 0.0))
    logits, labels = make_inputs(12, C, torch.float32, ignore_every=5)
    _profile_step(criterion, logits, labels)  # first call: the interpreter's set-up
    traffic, kernel_ops, sync_ops = _profile_step(criterion, logits, labels)
    assert sync_ops == []
    assert kernel_ops == ["aten::ones_like"]  # autograd's root gradient of loss.backward()
    assert traffic.launches == {"single": 2, "multi": 3}[path], dict(traffic.kernels)
    expected = {"single": {"gala_ce_rows_kernel", "scale_grad_kernel"},
                "multi": {"gala_ce_partials_kernel", "gala_ce_columns_kernel", "scale_grad_kernel"}}[path]
    assert set(traffic.kernels) == expected
    assert int(criterion.state.steps) == 2


# ------------------------------------------------------------------------------------------------
# bad labels: no sync, a NaN loss, zero gradient rows, the state untouched, the error raised later
# ------------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("path", ["single", "multi", "unfolded"])
def test_a_bad_label_is_recorded_and_raised_by_the_next_call(path, deferred, request):
    if path == "multi":
        request.getfixturevalue("multi_block")
    elif path == "unfolded":
        request.getfixturevalue("unfolded")
    C = 19
    state = warmed_state(C)
    before = copy.deepcopy(state.state_dict())
    logits, labels = make_inputs(8, C, torch.float32)
    labels[5], labels[6] = C + 3, -7
    z = logits.clone().requires_grad_(True)
    loss = gk.fused_gala_ce(z, labels, state, backend="triton")  # no error here
    loss.backward()
    assert torch.isnan(loss)
    assert (z.grad[[5, 6]] == 0).all() and torch.isfinite(z.grad).all() and (z.grad[0] != 0).any()
    for name, value in before.items():
        assert torch.equal(state.state_dict()[name], value), name
    assert state.label_error.tolist()[:5] == [1, 5, C + 3, 2, -100]
    good_logits, good_labels = make_inputs(8, C, torch.float32, seed=4)
    message = rf"labels\[5\] = {C + 3} is out of range: labels must be in \[0, {C}\)"
    with pytest.raises(ValueError, match=message):
        gk.fused_gala_ce(good_logits, good_labels, state, backend="triton")
    assert int(state.steps) == 2  # the call that raised ran nothing
    state.check_errors()  # nothing pending any more
    truth_state = copy.deepcopy(state)
    step_both(good_logits, good_labels, state, truth_state)
    assert int(state.steps) == 3
    assert_states_close(state, truth_state)
    assert_scratch_clean(state)


@needs_interpreter
def test_check_errors_raises_what_a_step_recorded(deferred):
    C = 9
    state = gk.GALAState(C)
    state.check_errors()  # a no-op when nothing is pending
    logits, labels = make_inputs(4, C, torch.float32)
    labels[2] = 99
    gk.fused_gala_ce(logits, labels, state, backend="triton")
    with pytest.raises(ValueError, match=r"labels\[2\] = 99 is out of range"):
        state.check_errors()
    state.check_errors()


def test_cpu_tensors_raise_at_once_by_default():
    C = 9
    state = gk.GALAState(C)
    logits, labels = make_inputs(4, C, torch.float32)
    labels[1] = -3
    for backend in [b for b in ("torch", "cpu", "triton") if gk.backends.availability(b, logits.device)[0]]:
        with pytest.raises(ValueError, match=r"labels\[1\] = -3 is out of range"):
            gk.fused_gala_ce(logits, labels, state, backend=backend)
    assert int(state.steps) == 0


@needs_interpreter
def test_synchronous_check_on_request(deferred, monkeypatch):
    """GALA_SYNC_LABEL_CHECK=1: a bad label raises at once, before anything runs."""
    monkeypatch.setattr(label_errors, "deferred_on_cpu", False)
    monkeypatch.setenv("GALA_SYNC_LABEL_CHECK", "1")
    assert not label_errors.deferred(torch.device("cuda"))
    C = 9
    state = gk.GALAState(C)
    logits, labels = make_inputs(4, C, torch.float32)
    labels[3] = C
    with pytest.raises(ValueError, match=r"labels\[3\] = 9 is out of range"):
        gk.fused_gala_ce(logits, labels, state, backend="triton")
    assert int(state.steps) == 0 and torch.count_nonzero(state.label_error) == 0


# ------------------------------------------------------------------------------------------------
# the fused linear layer: one device step per chunk, folded by the last chunk's kernel
# ------------------------------------------------------------------------------------------------
def _linear_inputs(B=13, D=5, C=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    weight = torch.randn(C, D, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[::4] = -100
    return x, weight, bias, labels


@needs_interpreter
@pytest.mark.parametrize("chunk_size", [4, 64])
@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.2, class_weight="w")],
                         ids=["plain", "options"])
def test_fused_linear_chunks_share_one_device_step(chunk_size, folded, options, request):
    from gala_kernels.linear import fused_linear_gala_ce

    if not folded:
        request.getfixturevalue("unfolded")
    x, weight, bias, labels = _linear_inputs()
    C = weight.shape[0]
    if "class_weight" in options:
        options = dict(options, class_weight=torch.rand(C, dtype=torch.float64) + 0.5)
    state, truth_state = warmed_state(C), warmed_state(C)
    results = []
    for backend, st in (("triton", state), ("torch", truth_state)):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        loss = fused_linear_gala_ce(*leaves[:2], labels, st, leaves[2], backend=backend,
                                    chunk_size=chunk_size, **options)
        loss.backward(torch.tensor(0.7, dtype=loss.dtype))
        results.append((loss.detach(), [t.grad for t in leaves]))
    (loss, grads), (t_loss, t_grads) = results
    torch.testing.assert_close(loss, t_loss, **TOLERANCES[torch.float64])
    for got, want in zip(grads, t_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    assert_states_close(state, truth_state)
    assert_scratch_clean(state)


@needs_interpreter
def test_fused_linear_bad_label_is_recorded_with_its_batch_row(deferred):
    from gala_kernels.linear import fused_linear_gala_ce

    x, weight, bias, labels = _linear_inputs()
    labels[9] = 500
    state = gk.GALAState(weight.shape[0])
    loss = fused_linear_gala_ce(x, weight, labels, state, bias, backend="triton", chunk_size=4)
    assert torch.isnan(loss) and int(state.steps) == 0
    with pytest.raises(ValueError, match=r"labels\[9\] = 500 is out of range"):
        state.check_errors()


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
@needs_interpreter
def test_torch_compile_fullgraph_training_step():
    """A model's forward with GALALoss on the Triton step, compiled with fullgraph=True (the
    backward through AOT autograd): same loss, gradients and state as eager."""
    C, D = 17, 6
    torch.manual_seed(0)
    eager = torch.nn.Linear(D, C)
    compiled_model = copy.deepcopy(eager)
    crit_eager, crit_compiled = gk.GALALoss(C, backend="triton"), gk.GALALoss(C, backend="triton")

    def forward(model, crit, x, y):
        return crit(model(x), y)

    compiled_forward = torch.compile(forward, fullgraph=True)
    for _ in range(2):
        x, y = torch.randn(10, D), torch.randint(0, C, (10,))
        a = forward(eager, crit_eager, x, y)
        b = compiled_forward(compiled_model, crit_compiled, x, y)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(eager.weight.grad, compiled_model.weight.grad)
    for name, value in crit_eager.state.state_dict().items():
        torch.testing.assert_close(crit_compiled.state.state_dict()[name], value, msg=name)


# ------------------------------------------------------------------------------------------------
# GPU only: sync debug mode, CUDA graphs, torch.compile(mode="reduce-overhead")
# ------------------------------------------------------------------------------------------------
GPU_BACKENDS = [b for b in ("triton", "cuda")
                if HAS_CUDA and gk.backends.availability(b, torch.device("cuda"))[0]]


def _train_setup(backend, C=1000, D=64, B=256, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, C).cuda()
    criterion = gk.GALALoss(C, backend=backend).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(B, D, device="cuda"), torch.randint(0, C, (B,), device="cuda")) for _ in range(6)]
    return model, criterion, optimizer, data


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_step_makes_no_host_sync(backend):
    model, criterion, optimizer, data = _train_setup(backend)
    x, y = data[0]
    criterion(model(x), y).backward()  # compile / load outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data[1:]:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert int(criterion.state.steps) == len(data)


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_replay_matches_eager(backend):
    """A whole training step (model, GALALoss, backward, optimizer) captured in a CUDA graph and
    replayed gives the losses and the state of the same steps run eagerly."""
    eager = _train_setup(backend)
    graphed = _train_setup(backend)
    model, criterion, optimizer, data = graphed
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def train_step():
        optimizer.zero_grad(set_to_none=False)
        loss = criterion(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs requires
        train_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step()
    # the eager twin replays the warm-up step, then the same steps
    e_model, e_criterion, e_optimizer, _ = eager
    losses_eager, losses_graph = [], []
    for x, y in data:
        e_optimizer.zero_grad(set_to_none=False)
        loss = e_criterion(e_model(x), y)
        loss.backward()
        e_optimizer.step()
        losses_eager.append(loss.item())
    for x, y in data[1:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        losses_graph.append(static_loss.item())
    torch.testing.assert_close(torch.tensor(losses_graph), torch.tensor(losses_eager[1:]), rtol=1e-4,
                               atol=1e-5)
    for name, value in e_criterion.state.state_dict().items():
        torch.testing.assert_close(criterion.state.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)
    criterion.state.check_errors()


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_compile_reduce_overhead(backend):
    model, criterion, optimizer, data = _train_setup(backend)
    e_model, e_criterion, e_optimizer, _ = _train_setup(backend)

    def forward_backward(model, criterion, x, y):
        loss = criterion(model(x), y)
        loss.backward()
        return loss

    compiled = torch.compile(forward_backward, mode="reduce-overhead")
    for x, y in data:
        losses = []
        for m, c, o, fn in ((model, criterion, optimizer, compiled),
                            (e_model, e_criterion, e_optimizer, forward_backward)):
            o.zero_grad(set_to_none=False)
            losses.append(fn(m, c, x, y).detach().clone())
            o.step()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for name, value in e_criterion.state.state_dict().items():
        torch.testing.assert_close(criterion.state.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_bad_label_is_deferred(backend):
    C = 50
    state = gk.GALAState(C, device="cuda")
    logits = torch.randn(8, C, device="cuda", requires_grad=True)
    labels = torch.randint(0, C, (8,), device="cuda")
    labels[3] = C
    loss = gk.fused_gala_ce(logits, labels, state, backend=backend)
    loss.backward()
    assert torch.isnan(loss).item() and (logits.grad[3] == 0).all().item()
    assert int(state.steps) == 0
    with pytest.raises(ValueError, match=rf"labels\[3\] = {C} is out of range"):
        state.check_errors()


def test_reference_is_pure_pytorch():
    """gala_kernels.reference uses no compiled code and registers no op."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reference))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert imported <= {"__future__", "dataclasses", "typing", "torch", "state"}, imported
    assert "torch.ops" not in inspect.getsource(reference) and "custom_op" not in inspect.getsource(reference)


@needs_interpreter
def test_opcheck_of_the_triton_step_ops():
    """Schema, fake implementation and mutation annotations of gala_triton::fused_ce_step_ / fold_step_."""
    C = 11
    state = warmed_state(C, track_pairwise=False)
    logits, labels = make_inputs(5, C, torch.float32, ignore_every=3)
    stats, running, steps, nonfinite, scratch, raw_pairwise, label_error = device_step.state_tensors(state)
    args = (logits, labels, None, stats, running, steps, nonfinite, scratch, raw_pairwise, label_error, 1.2,
            1e-3, -100, 1, 0.0, 0, 0.99, True, 0)
    torch.library.opcheck(torch.ops.gala_triton.fused_ce_step_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_the_compiled_step_ops_have_fake_implementations():
    """gala::fused_ce_step_ and friends trace under FakeTensorMode (what torch.compile needs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gala_kernels import _extension

    if not _extension.load():
        pytest.skip("gala_kernels._C is not built")
    device_step._register_native_fakes()
    with FakeTensorMode():
        state = gk.GALAState(7)
        logits, labels = torch.empty(4, 7), torch.zeros(4, dtype=torch.int64)
        state_args = device_step.state_tensors(state)
        scalars = (1.2, 1e-3, -100, 0, 0.0, 0, 0.99, True, 0)
        loss, grad = torch.ops.gala.fused_ce_step_(logits, labels, None, *state_args, *scalars)
        assert loss.shape == (4,) and grad.shape == (4, 7)
        torch.ops.gala.scale_grad_(grad, loss.sum())


@needs_interpreter
@pytest.mark.parametrize("with_state", [True, False])
def test_inplace_gradient_over_saved_logits_is_refused(with_state):
    """inplace_backward overwrites the logits: a node that saved them (here exp) makes autograd
    raise instead of computing a wrong gradient; logits out of a matmul are fine."""
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    labels = torch.randint(0, 6, (4,))
    state = gk.GALAState(6) if with_state else None
    loss = gk.fused_gala_ce((x @ w).exp(), labels, state, backend="triton", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    gk.fused_gala_ce(x @ w, labels, state, backend="triton", inplace_backward=True).backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
