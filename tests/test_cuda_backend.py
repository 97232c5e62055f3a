"""The CUDA C++ backend (csrc/cuda, ``backend="cuda"``) against the float64 reference.

The GPU tests are skipped without a GPU (tests/conftest.py ``requires_cuda``); on a GPU machine
they fail, rather than skip, when the extension was built without its CUDA kernels. Shapes are
chosen to reach every kernel variant of csrc/cuda/gala_ce_kernel.cu ("Choosing a kernel"):
one warp per row (C <= 1021), one CTA per row (C <= 16381), and the streamed kernel (longer rows,
with and without the shared-memory raw_clsneg, and every float64 row).

On any machine with nvcc, the CPU tests run the CUDA compile check (GALA_CUDA_COMPILE_CHECK) and
a syntax check of the torch binding against torch's headers.
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
from gala_testing import TOLERANCES, assert_close_to_truth, make_inputs, run_step, warmed_state

import gala_kernels as gk
from gala_kernels import _extension, backends, ops
from gala_kernels.backends import cuda_rule

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# One C per kernel variant (the largest C of each register variant for a misaligned row start,
# then one past it), and the odd sizes of the issue: 1, 2, 1000, 8142, > 64K.
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


def op_outputs(logits, labels, bias=None, *, reduction=1, stats=True, pairwise=False, ignore_index=-100):
    op = ops.native_fused_ce()
    return op(logits, labels, bias, None, ignore_index, reduction, 0.0, stats, pairwise)


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
# bad input
# ------------------------------------------------------------------------------------------------
@gpu_test
@pytest.mark.parametrize("bad_label", [-1, 10, 1 << 40])
def test_label_out_of_range_raises_and_changes_nothing(cuda, bad_label):
    C = 10
    state = warmed_state(C, device=cuda)
    before = copy.deepcopy(state.state_dict())
    logits, labels = cuda_inputs(6, C, torch.float32, cuda)
    labels[4] = bad_label
    with pytest.raises(ValueError, match=rf"labels\[4\] = {bad_label}"):
        gk.fused_gala_ce(logits, labels, state, backend="cuda")
    with pytest.raises(ValueError, match=rf"labels\[4\] = {bad_label} is out of range"):
        op_outputs(logits, labels)  # the op's own check (ValueError from TORCH_CHECK_VALUE)
    for name, value in state.state_dict().items():
        assert torch.equal(value, before[name]), name


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
    logits.requires_grad_(True)
    for class_bias in (bias, None):
        torch.library.opcheck(op, (logits, labels, class_bias, None, -100, reduction, 0.0, compute_stats,
                                   pairwise))


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
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """The binding is only built with a CUDA torch; its syntax and types are checked here against
    the headers every torch wheel ships (the one generated CUDA config header is stubbed)."""
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
               str(ROOT / "csrc" / "cuda" / "gala_ce_cuda_binding.cpp")]
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
