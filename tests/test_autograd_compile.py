"""The op as PyTorch sees it: float64 gradcheck, torch.library.opcheck, torch.compile(fullgraph)."""

import copy
import subprocess
import sys

import pytest
import torch
from gala_testing import make_inputs, warmed_state
from test_fused_ce import CPU_BACKENDS

import gala_kernels as gk
from gala_kernels import backends, ops

HAS_CPU_OP = backends.availability("cpu", torch.device("cpu"))[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,C", [(1, 1), (3, 2), (5, 7), (4, 1030)])
def test_gradcheck_float64(backend, reduction, B, C):
    logits, labels = make_inputs(B, C, torch.float64, ignore_every=3 if B > 3 else 0, seed=C)
    state = warmed_state(C)
    z = logits.requires_grad_(True)
    fn = lambda t: gk.fused_gala_ce(t, labels, state, reduction=reduction, update_state=False,
                                    backend=backend)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.skipif(not HAS_CPU_OP, reason="gala_kernels._C not built")
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_eager_autograd_matches_the_registered_one(reduction):
    """ops.call_fused_ce (eager: an autograd.Function calling the op below Autograd) gives the
    outputs and gradient of the op's registered autograd (what torch.compile traces), bit for bit,
    and does not take that path when no gradient is needed."""
    op = ops.native_fused_ce()
    logits, labels = make_inputs(6, 37, torch.float32, ignore_every=4)
    bias = torch.randn(37)
    grad_out = torch.randn(6) if reduction == 0 else torch.tensor(0.7)
    results = []
    for call in (ops.call_fused_ce, lambda f, *a: f(*a)):
        z = logits.clone().requires_grad_(True)
        outputs = call(op, z, labels, bias, None, -100, reduction, 0.0, True, False)
        outputs[0].backward(grad_out)
        results.append((outputs, z.grad))
    (eager_out, eager_grad), (registered_out, registered_grad) = results
    for a, b in zip(eager_out, registered_out):
        assert torch.equal(a, b)
    assert torch.equal(eager_grad, registered_grad)
    assert not any(t.requires_grad for t in eager_out[1:])  # grad, statistics: not differentiable
    with torch.no_grad():
        assert not ops.call_fused_ce(op, logits.clone().requires_grad_(True), labels, bias, None, -100,
                                     reduction, 0.0, True, False)[0].requires_grad


@pytest.mark.skipif(not HAS_CPU_OP, reason="gala_kernels._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("compute_stats,pairwise", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(dtype, compute_stats, pairwise, reduction):
    op = ops.native_fused_ce()
    logits, labels = make_inputs(6, 37, dtype, ignore_every=4)
    bias = torch.randn(37, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    logits.requires_grad_(True)
    for class_bias in (bias, None):
        torch.library.opcheck(op, (logits, labels, class_bias, None, -100, reduction, 0.0, compute_stats,
                                   pairwise))


class TinyClassifier(torch.nn.Module):
    def __init__(self, dim, num_classes, backend):
        super().__init__()
        self.linear = torch.nn.Linear(dim, num_classes)
        self.criterion = gk.GALALoss(num_classes, backend=backend)

    def forward(self, x, y):
        return self.criterion(self.linear(x), y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dim, C = 16, 23
    eager = TinyClassifier(dim, C, backend)
    compiled_model = copy.deepcopy(eager)

    def step(model, x, y):
        loss = model(x, y)
        loss.backward()
        return loss

    # the whole forward (model + GALA loss + state update) in one graph; AOT autograd compiles
    # the backward that loss.backward() runs
    compiled_forward = torch.compile(compiled_model, fullgraph=True)
    compiled_step = lambda model, x, y: step(compiled_forward, x, y)
    for k in range(3):
        x = torch.randn(32, dim, generator=torch.Generator().manual_seed(k))
        y = torch.randint(0, C, (32,), generator=torch.Generator().manual_seed(100 + k))
        y[::7] = -100
        loss_eager = step(eager, x, y)
        loss_compiled = compiled_step(compiled_model, x, y)
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-6, msg=name)
            p_e.grad = p_c.grad = None
    for name, value in eager.criterion.state.state_dict().items():
        torch.testing.assert_close(compiled_model.criterion.state.state_dict()[name], value,
                                   rtol=1e-5, atol=1e-7, msg=name)
    assert int(compiled_model.criterion.state.steps) == 3


def test_import_without_the_extension_warns_once_and_falls_back_to_torch():
    code = (
        "import sys, warnings\n"
        "sys.modules['gala_kernels._C'] = None  # makes `from . import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import gala_kernels as gk\n"
        "    import torch\n"
        "    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])\n"
        "    gk.fused_gala_ce(z, y, gk.GALAState(5))\n"
        "    gk.fused_gala_ce(z, y, gk.GALAState(5))\n"
        "msgs = [str(w.message) for w in caught if 'gala_kernels._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert gk.backends.resolve('auto', z) == 'torch'\n"
        "try:\n"
        "    gk.fused_gala_ce(z, y, backend='cpu')\n"
        "except gk.backends.BackendUnavailableError as e:\n"
        "    assert 'pip install --no-build-isolation' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
