"""Post-hoc prediction re-balancing (PredictionRebalancer, fit_tau) and lt_accuracy.

The truth is the pure-torch reference in float64: mass = softmax(z.double(), 1).sum(0), scores
z - tau * log(mass). Every mass-pass test runs on CPU with the C++ op ("cpu") and the eager
backend ("torch"), with Triton under TRITON_INTERPRET=1 on tiny shapes, and on CUDA when present.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

import gala_kernels  # noqa: F401  (loads the extension)
from gala_kernels import mass_ops
from gala_kernels.backends import BackendUnavailableError, triton_interpret_enabled
from gala_kernels.metrics import lt_accuracy
from gala_kernels.rebalance import DEFAULT_TAUS, PredictionRebalancer, fit_tau

NEG_INF = float("-inf")

# The Triton interpreter evaluates masked-out lanes with numpy too (log(0), -inf - -inf there);
# the kernels discard those lanes, so numpy's warnings about them are noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def _skip_unless_available(backend: str, device: str):
    ok, reason = mass_ops.availability(backend, torch.device(device))
    return pytest.mark.skipif(not ok, reason=reason)


def _case(device: str, backend: str):
    marks = [requires_cuda] if device == "cuda" else []
    if device == "cpu" or HAS_CUDA:
        marks.append(_skip_unless_available(backend, device))
    return pytest.param(device, backend, marks=marks, id=f"{device}-{backend}")


# (device, backend) pairs every behaviour test runs on.
CASES = [
    _case("cpu", "cpu"),
    _case("cpu", "torch"),
    _case("cpu", "triton"),
    _case("cuda", "triton"),
    _case("cuda", "cuda"),
    _case("cuda", "torch"),
]


def _interpreted(device: str, backend: str) -> bool:
    return device == "cpu" and backend == "triton"


def _num_classes(device: str, backend: str, large: int) -> int:
    """A class count larger than a CPU block (1024) for compiled backends, tiny for the interpreter."""
    return 37 if _interpreted(device, backend) else large


def reference_mass(z: torch.Tensor) -> torch.Tensor:
    """mass[j] = sum_i softmax(z[i, :])[j], float64."""
    return torch.softmax(z.double(), dim=1).sum(0)


def reference_scores(z: torch.Tensor, tau: float, mass: torch.Tensor) -> torch.Tensor:
    return z.double() - tau * torch.log(mass)


def assert_mass_close(actual: torch.Tensor, expected: torch.Tensor, rows: int, dtype: torch.dtype):
    # fp32 math: each row's probabilities carry ~1e-6 relative error (exp), summed over rows.
    if dtype == torch.float64:
        rtol, atol = 1e-12, 1e-13 * max(rows, 1)
    else:
        rtol, atol = 2e-5, 2e-6 * max(rows, 1)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


def random_logits(B, C, dtype=torch.float32, device="cpu", scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


# --- the mass pass -----------------------------------------------------------------------------

SHAPES = [(1, 1), (5, 2), (33, 7), (65, 1030), (70, 2500)]  # C = 1, 2, odd, > a 1024 block, 3 blocks
TINY_SHAPES = [(1, 1), (5, 2), (9, 37)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _check_colsum(device, backend, B, C, dtype, **launch):
    z = random_logits(B, C, dtype, device)
    if launch:  # Triton launch options (tests of both kernels and of several programs)
        from gala_kernels.backends.triton_mass import softmax_colsum_triton

        colsum = softmax_colsum_triton(z, **launch)
    else:
        colsum = mass_ops.softmax_colsum(z, backend=backend)
    assert colsum.shape == (C,)
    assert colsum.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert colsum.device == z.device
    assert_mass_close(colsum, reference_mass(z), B, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_colsum_matches_reference(device, backend, dtype):
    for B, C in TINY_SHAPES if _interpreted(device, backend) else SHAPES:
        _check_colsum(device, backend, B, C, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_triton_both_kernels_and_program_splits(device, dtype):
    if not mass_ops.availability("triton", torch.device(device))[0]:
        pytest.skip(mass_ops.availability("triton", torch.device(device))[1])
    # whole-row kernel with several programs (last one partial), then the tiled kernel
    # (forced by a small max_row_block) with C not a multiple of its column block
    _check_colsum(device, "triton", 11, 37, dtype, rows_per_program=3)
    _check_colsum(device, "triton", 19, 37, dtype, max_row_block=16)
    # tiles of 4 rows over programs of 3 and 5 rows: partial tiles at every program's end
    _check_colsum(device, "triton", 11, 37, dtype, rows_per_program=3, rows_per_tile=4)
    _check_colsum(device, "triton", 13, 37, dtype, rows_per_program=5, rows_per_tile=2, num_warps=2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_accumulate_adds_into_a_float64_mass(device):
    """``accumulate_softmax_colsum`` adds (the Triton kernel straight into ``out``), every backend."""
    z1, z2 = random_logits(6, 37, torch.float32, device), random_logits(9, 37, torch.bfloat16, device, seed=1)
    truth = reference_mass(z1) + reference_mass(z2)
    for backend in ("torch", "cpu", "triton", "cuda"):
        if not mass_ops.availability(backend, torch.device(device))[0]:
            continue
        mass = torch.zeros(37, dtype=torch.float64, device=device)
        mass_ops.accumulate_softmax_colsum(z1, mass, backend=backend)
        mass_ops.accumulate_softmax_colsum(z2, mass, backend=backend)
        assert mass.dtype == torch.float64
        assert_mass_close(mass, truth, 15, torch.bfloat16)
    if mass_ops.availability("triton", torch.device(device))[0]:
        from gala_kernels.backends.triton_mass import softmax_colsum_triton

        with pytest.raises(ValueError, match="out must be a contiguous"):
            softmax_colsum_triton(z1, torch.zeros(36, dtype=torch.float64, device=device))


def test_cpu_op_is_deterministic_across_thread_counts():
    if not mass_ops.availability("cpu", torch.device("cpu"))[0]:
        pytest.skip("C++ op not built")
    z = random_logits(200, 1500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mass_ops.softmax_colsum(z, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = mass_ops.softmax_colsum(z, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_cpu_op_strided_rows_and_opcheck():
    if not mass_ops.availability("cpu", torch.device("cpu"))[0]:
        pytest.skip("C++ op not built")
    z = random_logits(20, 300)
    assert_mass_close(mass_ops.softmax_colsum(z[::3], backend="cpu"), reference_mass(z[::3]), 7, z.dtype)
    assert_mass_close(mass_ops.softmax_colsum(z.t().contiguous().t(), backend="cpu"), reference_mass(z), 20,
                      z.dtype)
    op = mass_ops.native_softmax_colsum()
    torch.library.opcheck(op, (random_logits(9, 13),))
    torch.library.opcheck(op, (random_logits(4, 5, torch.bfloat16),))


def test_cpu_add_op_adds_checks_out_and_passes_opcheck():
    if not mass_ops.availability("cpu", torch.device("cpu"))[0]:
        pytest.skip("C++ op not built")
    z = random_logits(9, 13)
    out = torch.full((13,), 2.0, dtype=torch.float64)
    torch.ops.gala.softmax_colsum_add_(z, out)
    assert_mass_close(out, reference_mass(z) + 2.0, 9, z.dtype)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(C,\) = \(13,\)"):
        torch.ops.gala.softmax_colsum_add_(z, torch.zeros(12, dtype=torch.float64))
    with pytest.raises(TypeError, match="out must be float32 or float64"):
        torch.ops.gala.softmax_colsum_add_(z, torch.zeros(13, dtype=torch.float16))
    mass = torch.zeros(13, dtype=torch.float64)
    torch.library.opcheck(torch.ops.gala.softmax_colsum_add_.default, (z, mass),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_opcheck():
    if not mass_ops.availability("triton", torch.device("cpu"))[0]:
        pytest.skip("Triton interpreter not enabled")
    from gala_kernels.backends.triton_mass import softmax_colsum_op

    torch.library.opcheck(softmax_colsum_op(), (random_logits(5, 7),),
                          test_utils=("test_schema", "test_faketensor"))


# --- the CUDA op's kernel variants -----------------------------------------------------------------


def _cuda_variant(z: torch.Tensor, variant: str = "") -> str:
    return torch.ops.gala.softmax_colsum_cuda_variant(z, variant)


def _cuda_colsum(z: torch.Tensor, variant: str = "", ctas_per_sm: int = 0) -> torch.Tensor:
    out = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
    torch.ops.gala.softmax_colsum_add_(z, out, variant, ctas_per_sm)
    return out


requires_cuda_mass = _skip_unless_available("cuda", "cuda") if HAS_CUDA else requires_cuda

# (C, the variant the default rule picks for fp32, for bf16 / fp16 and for float64 logits)
CUDA_DEFAULT_VARIANTS = [
    (1, "t32_e4", "t32_e4", "t32_e4"),
    (128, "t32_e4", "t32_e4", "t32_e4"),
    (129, "t32_e16", "t32_e16", "t32_e8"),
    (300, "t32_e16", "t32_e16", "t64_e8"),
    (1000, "t64_e16", "t64_e16", "t128_e8"),
    (2049, "t256_e16", "t256_e16", "t512_e8"),
    (4096, "t256_e16", "t256_e16", "t512_e8"),
    (8142, "t512_e16", "t512_e16", "lse_then_tiles"),
    (16384, "t1024_e16", "t1024_e16", "lse_then_tiles"),
    (16385, "lse_then_tiles", "lse_then_tiles", "lse_then_tiles"),
]


@requires_cuda_mass
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,fp32,half,fp64", CUDA_DEFAULT_VARIANTS)
def test_cuda_default_variants_match_reference(C, fp32, half, fp64, dtype):
    """Every kernel the default rule picks, and the two-pass path past 16,384 columns; B = 45
    leaves CTAs with unequal row counts (and some, at small B, none)."""
    z = random_logits(45, C, dtype, "cuda", seed=C)
    expected = {torch.float32: fp32, torch.float64: fp64}.get(dtype, half)
    assert _cuda_variant(z) == expected
    assert_mass_close(_cuda_colsum(z), reference_mass(z), 45, dtype)


CUDA_ALL_VARIANTS = ["t32_e4", "t32_e16", "t64_e16", "t128_e16", "t256_e16", "t512_e16", "t1024_e16",
                     "t64_e8_async", "t128_e8_async", "t256_e8_async", "t512_e8_async", "t1024_e8_async",
                     "t512_e16_async", "lse_then_tiles"]


@requires_cuda_mass
@pytest.mark.parametrize("variant", CUDA_ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_every_variant_matches_reference(variant, dtype):
    """Each menu entry at a C that fills it but for a few columns, and at one far smaller (even C:
    16-bit rows then start on 4-byte words, as the pipelined kernel needs); ragged row splits,
    CTAs per SM forced, a -inf column."""
    threads, _, items = variant.partition("_e")
    capacity = 20_000 if variant == "lse_then_tiles" else int(threads[1:]) * int(items.split("_")[0])
    for C in sorted({max(1, capacity - 6), max(1, capacity // 7 // 2 * 2)}):
        z = random_logits(77, C, dtype, "cuda", seed=C)
        if C > 2:
            z[:, C // 2] = NEG_INF
        for ctas_per_sm in (0, 1, 3):
            colsum = _cuda_colsum(z, variant, ctas_per_sm)
            assert C <= 2 or colsum[C // 2] == 0
            assert_mass_close(colsum, reference_mass(z), 77, dtype)


@requires_cuda_mass
def test_cuda_pipelined_kernel_needs_word_aligned_rows():
    """The pipelined variants run 16-bit rows that start on 4-byte words; for others (odd C, or a
    view starting at column 1) asking for one raises, and the default rule's register kernel runs."""
    z = random_logits(50, 1001, torch.bfloat16, "cuda")
    shifted = z[:, 1:]  # 1000 columns, rows starting 2 bytes past a word
    aligned = z[:, :1000].contiguous()
    assert_mass_close(_cuda_colsum(aligned, "t128_e8_async"), reference_mass(aligned), 50, torch.bfloat16)
    assert _cuda_variant(shifted) == "t64_e16"
    colsum = mass_ops.softmax_colsum(shifted, backend="cuda")
    assert_mass_close(colsum, reference_mass(shifted), 50, torch.bfloat16)
    with pytest.raises(ValueError, match="variant 't128_e8_async'"):
        _cuda_colsum(shifted, "t128_e8_async")


@requires_cuda_mass
def test_cuda_op_is_deterministic_strided_and_checks_its_arguments():
    z = random_logits(3000, 1500, device="cuda")
    first = mass_ops.softmax_colsum(z, backend="cuda")
    assert all(torch.equal(first, mass_ops.softmax_colsum(z, backend="cuda")) for _ in range(3))
    for variant in ("", "lse_then_tiles"):
        a, b = _cuda_colsum(z, variant), _cuda_colsum(z, variant)
        assert torch.equal(a, b)
    wide = random_logits(40, 3 * 700, device="cuda")
    every_third_row, column_major = wide[::3], wide.t().contiguous().t()
    colsum = mass_ops.softmax_colsum(every_third_row, backend="cuda")
    assert_mass_close(colsum, reference_mass(every_third_row), 14, z.dtype)
    colsum = mass_ops.softmax_colsum(column_major, backend="cuda")
    assert_mass_close(colsum, reference_mass(wide), 40, z.dtype)
    empty = torch.empty(0, 10, device="cuda")
    assert torch.equal(mass_ops.softmax_colsum(empty, backend="cuda"), torch.zeros(10, device="cuda"))
    out = torch.ones(10, dtype=torch.float64, device="cuda")
    torch.ops.gala.softmax_colsum_add_(empty, out)
    assert torch.equal(out, torch.ones(10, dtype=torch.float64, device="cuda"))
    with pytest.raises(ValueError, match="variant 't999_e1'"):
        _cuda_colsum(z, "t999_e1")
    with pytest.raises(ValueError, match="variant 't32_e4'"):
        _cuda_colsum(z, "t32_e4")  # holds 128 columns, not 1500
    with pytest.raises(ValueError, match="on cpu"):
        torch.ops.gala.softmax_colsum_add_(z, torch.zeros(1500, dtype=torch.float64))
    with pytest.raises(ValueError, match="ctas_per_sm"):
        _cuda_colsum(z, "", 65)
    torch.library.opcheck(mass_ops.native_softmax_colsum(), (random_logits(9, 13, device="cuda"),))


@pytest.mark.parametrize("device,backend", CASES)
def test_neg_inf_column_has_zero_mass_and_no_nan(device, backend):
    C = _num_classes(device, backend, 1100)
    z = random_logits(23, C, device=device)
    z[:, 3] = NEG_INF
    if C > 1024:
        z[:, :1024] = NEG_INF  # a whole CPU block of -inf (every p of it is 0)
        z[:, 1030] = NEG_INF
    colsum = mass_ops.softmax_colsum(z, backend=backend)
    assert not torch.isnan(colsum).any()
    assert colsum[3] == 0
    assert_mass_close(colsum, reference_mass(z), 23, z.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_extreme_logit_ranges(device, backend, dtype):
    """Large spreads: the CPU kernel's running reference must move up (and recompute a block)
    when a later value exceeds it by far, start right after a -inf prefix, and never overflow."""
    C = _num_classes(device, backend, 2500)
    z = random_logits(6, C, torch.float64, seed=9)
    z[0, :16] = -50.0
    z[0, C - 3] = 80.0  # 130 above the first vector's max, in the last block
    z[1, :20] = NEG_INF  # the first vector is -inf only
    z[2] = z[2] * 1000.0  # nearly one-hot rows, references moving many times
    z[3, :] = 3e4  # huge but equal: uniform softmax
    z[4, 1:] = -3e4  # a single finite winner far above the rest
    z[5, C // 2:] += 70.0  # the second half 70 above the first
    z = z.to(dtype=dtype, device=device)
    colsum = mass_ops.softmax_colsum(z, backend=backend)
    assert torch.isfinite(colsum).all()
    assert_mass_close(colsum, reference_mass(z.cpu()), 6, dtype)


@pytest.mark.parametrize("device,backend", CASES)
def test_nan_rows_poison_the_mass_like_softmax(device, backend):
    C = _num_classes(device, backend, 1100)
    z = random_logits(6, C, device=device)
    z[1, 2] = float("nan")
    colsum = mass_ops.softmax_colsum(z, backend=backend)
    assert torch.isnan(colsum).all() and torch.isnan(reference_mass(z)).all()
    z = random_logits(6, C, device=device)
    z[4, :] = NEG_INF  # a row that is -inf everywhere has a NaN softmax
    assert torch.isnan(mass_ops.softmax_colsum(z, backend=backend)).all()
    z = random_logits(6, C, device=device)
    z[0, 1] = float("inf")
    assert torch.isnan(mass_ops.softmax_colsum(z, backend=backend)).all()


# --- PredictionRebalancer --------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CASES)
def test_streaming_uneven_batches_equals_one_batch(device, backend):
    C = _num_classes(device, backend, 1100)
    z = random_logits(83, C, device=device, seed=1)
    streamed = PredictionRebalancer(C, tau=1.5, backend=backend, device=device)
    start = 0
    for size in (0, 1, 7, 33, 2, 40):  # an empty batch, a single row, uneven sizes
        streamed.update(z[start:start + size])
        start += size
    assert start == z.shape[0]
    whole = PredictionRebalancer(C, tau=1.5, backend=backend, device=device)
    whole.update(z)
    assert int(streamed.num_rows) == int(whole.num_rows) == 83
    assert streamed.mass.dtype == torch.float64
    torch.testing.assert_close(streamed.mass, whole.mass, rtol=1e-6, atol=1e-6)
    assert_mass_close(streamed.mass, reference_mass(z), 83, z.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_predict_matches_reference(device, backend, dtype):
    C = _num_classes(device, backend, 1100)
    z = random_logits(50, C, dtype, device, seed=2)
    rb = PredictionRebalancer(C, tau=1.5, backend=backend, device=device)
    rb.update(z)
    scores = rb.adjust(z)
    assert scores.dtype == torch.float32 and scores.shape == z.shape
    expected = reference_scores(z.cpu(), 1.5, reference_mass(z.cpu()))
    torch.testing.assert_close(scores.double().cpu(), expected, rtol=1e-5, atol=1e-4)
    # predictions agree wherever the reference's top two scores are not a near-tie
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    preds = rb.predict(z).cpu()
    assert preds.dtype == torch.int64
    assert torch.equal(preds[clear], expected.argmax(1)[clear])
    assert clear.sum() > 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_tau_zero_gives_plain_argmax(device, backend, dtype):
    C = _num_classes(device, backend, 1100)
    z = random_logits(40, C, dtype, device, seed=3)
    z[:, 5] = NEG_INF  # a zero-mass class must not change tau = 0 either
    rb = PredictionRebalancer(C, tau=0.0, backend=backend, device=device)
    rb.update(z)
    assert torch.equal(rb.adjust(z), z.float())
    assert torch.equal(rb.predict(z), z.argmax(dim=1))


@pytest.mark.parametrize("device,backend", CASES)
def test_one_and_two_classes(device, backend):
    one = random_logits(9, 1, device=device)
    rb = PredictionRebalancer(1, tau=1.5, backend=backend, device=device)
    rb.update(one)
    assert rb.mass.cpu().tolist() == pytest.approx([9.0], rel=1e-6)
    assert torch.equal(rb.predict(one).cpu(), torch.zeros(9, dtype=torch.int64))

    two = random_logits(30, 2, device=device, seed=4)
    two[:, 0] += 2.0  # class 0 is the head
    rb = PredictionRebalancer(2, tau=1.0, backend=backend, device=device)
    rb.update(two)
    mass = reference_mass(two.cpu())
    assert_mass_close(rb.mass, mass, 30, two.dtype)
    expected = reference_scores(two.cpu(), 1.0, mass).argmax(1)
    assert torch.equal(rb.predict(two).cpu(), expected)


@pytest.mark.parametrize("device,backend", CASES)
def test_zero_mass_class_is_never_predicted(device, backend):
    C = _num_classes(device, backend, 1100)
    z = random_logits(30, C, device=device, seed=5)
    z[:, 3] = NEG_INF  # p = 0 everywhere: mass 0, and -inf - (-inf) would be NaN
    z[:, 7] = -1e4  # finite, but every p underflows to 0: z - tau * log(0) would be +inf
    rb = PredictionRebalancer(C, tau=1.2, backend=backend, device=device)
    rb.update(z)
    assert rb.mass[3] == 0 and rb.mass[7] == 0
    scores = rb.adjust(z)
    assert not torch.isnan(scores).any()
    assert (scores[:, 3] == NEG_INF).all() and (scores[:, 7] == NEG_INF).all()
    preds = rb.predict(z)
    assert not ((preds == 3) | (preds == 7)).any()
    rb.tau = -0.5  # a negative tau keeps them at -inf too
    assert (rb.adjust(z)[:, [3, 7]] == NEG_INF).all()


def test_state_dict_round_trip_and_reset():
    z = random_logits(25, 11, seed=6)
    rb = PredictionRebalancer(11, tau=1.7)
    rb.update(z)
    state = rb.state_dict()
    assert set(state) == {"mass", "num_rows", "_extra_state"}
    restored = PredictionRebalancer(11, tau=0.3)
    restored.load_state_dict(state)
    assert restored.tau == 1.7 and int(restored.num_rows) == 25
    assert torch.equal(restored.mass, rb.mass)
    assert torch.equal(restored.predict(z), rb.predict(z))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PredictionRebalancer(12).load_state_dict(state)
    rb.reset()
    assert int(rb.num_rows) == 0 and not rb.mass.any()
    with pytest.raises(RuntimeError, match=r"call update\(\)"):
        rb.predict(z)
    empty = PredictionRebalancer(11)
    empty.load_state_dict(PredictionRebalancer(11).state_dict())
    with pytest.raises(RuntimeError, match=r"call update\(\)"):
        empty.adjust(z)


def test_errors_say_what_to_do():
    rb = PredictionRebalancer(5)
    z = random_logits(4, 5)
    with pytest.raises(RuntimeError, match=r"call update\(\) on the held-out/eval logits"):
        rb.predict(z)
    with pytest.raises(RuntimeError, match=r"call update\(\)"):
        rb.adjust(z)
    with pytest.raises(ValueError, match="num_classes=5"):
        rb.update(random_logits(4, 6))
    rb.update(z)
    with pytest.raises(ValueError, match="num_classes=5"):
        rb.predict(random_logits(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        rb.update(z[0])
    with pytest.raises(TypeError, match="float32"):
        rb.update(z.long())
    with pytest.raises(ValueError, match="backend must be one of"):
        PredictionRebalancer(5, backend="gpu")
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        PredictionRebalancer(0)
    with pytest.raises(BackendUnavailableError, match="runs on CUDA tensors"):
        PredictionRebalancer(5, backend="cuda").update(z)
    nan_logits = z.clone()
    nan_logits[0, 0] = float("nan")
    poisoned = PredictionRebalancer(5)
    poisoned.update(nan_logits)
    with pytest.raises(ValueError, match="NaN"):
        poisoned.predict(z)


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_interpret_enabled()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        mass_ops.softmax_colsum(random_logits(2, 3), backend="triton")


# --- fit_tau ---------------------------------------------------------------------------------


def planted_two_class_case(head_rows=400, tail_rows=20, probes=10, lo=1.45, hi=1.55):
    """Held-out logits whose balanced accuracy is 1 exactly for tau in (lo, hi), below 1 outside.

    Filler rows (margin 40) fix the mass: class 0 is the head, D = log(mass0 / mass1) > 0.
    Rebalanced, a class-1 probe [d, 0] is right iff tau * D > d, and a class-0 probe [d, 0] iff
    tau * D < d; so class-1 probes at d = lo * D and class-0 probes at d = hi * D make exactly
    the taus in (lo, hi) perfect. D depends on the probes, so it is solved by fixed point.
    """
    head = torch.tensor([[40.0, 0.0]]).repeat(head_rows, 1)
    tail = torch.tensor([[0.0, 40.0]]).repeat(tail_rows, 1)
    D = math.log(head_rows / tail_rows)
    for _ in range(50):
        tail_probes = torch.tensor([[lo * D, 0.0]]).repeat(probes, 1)
        head_probes = torch.tensor([[hi * D, 0.0]]).repeat(probes, 1)
        logits = torch.cat([head, head_probes, tail, tail_probes]).double()
        mass = reference_mass(logits)
        D = float(torch.log(mass[0] / mass[1]))
    labels = torch.tensor([0] * (head_rows + probes) + [1] * (tail_rows + probes))
    # the planted flip points, from the exact float64 mass
    assert abs(float(tail_probes[0, 0]) / D - lo) < 1e-6
    assert abs(float(head_probes[0, 0]) / D - hi) < 1e-6
    return logits.float(), labels


@pytest.mark.parametrize("device,backend", CASES)
def test_fit_tau_finds_the_planted_tau(device, backend):
    logits, labels = planted_two_class_case()
    best, table = fit_tau(logits.to(device), labels.to(device), backend=backend)
    assert best == 1.5
    assert list(table) == list(DEFAULT_TAUS)
    assert table[1.5] == 1.0
    assert table[1.4] < 1.0 and table[1.6] < 1.0
    assert max(table.values()) == 1.0 and [t for t, a in table.items() if a == 1.0] == [1.5]
    # below the window the tail probes are wrong (class 1: 20 of 30), above it the head probes
    assert table[0.0] == pytest.approx((1.0 + 20 / 30) / 2)
    assert table[3.0] == pytest.approx((400 / 410 + 1.0) / 2)


@pytest.mark.parametrize("device,backend", CASES)
def test_fit_tau_table_equals_brute_force(device, backend):
    C = _num_classes(device, backend, 60)
    z = random_logits(120, C, device=device, seed=7)
    z[:, : C // 3] += 1.5  # a head
    labels = torch.randint(0, C, (120,), generator=torch.Generator().manual_seed(8))
    labels[labels == 2] = 1  # class 2 absent from the held-out labels: left out of the mean
    taus = [2.0, 0.0, 0.5, 1.0, 1.5]
    best, table = fit_tau(z, labels.to(device), taus, backend=backend)
    assert list(table) == sorted(taus)
    mass = reference_mass(z.cpu())
    for tau in taus:
        preds = reference_scores(z.cpu(), tau, mass).argmax(1)
        assert table[tau] == pytest.approx(lt_accuracy(preds, labels, torch.full((C,), 50))["overall"])
    assert table[best] == max(table.values())


def test_fit_tau_ties_go_to_the_smaller_tau():
    z = random_logits(10, 1)
    best, table = fit_tau(z, torch.zeros(10, dtype=torch.int64), taus=[2.0, 0.7, 1.0])
    assert best == 0.7 and set(table.values()) == {1.0}
    with pytest.raises(ValueError, match="labels must have shape"):
        fit_tau(z, torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\)"):
        fit_tau(z, torch.ones(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one"):
        fit_tau(z, torch.zeros(10, dtype=torch.int64), taus=[])


# --- lt_accuracy -----------------------------------------------------------------------------


def test_lt_accuracy_hand_computed():
    train = [500, 150, 60, 20, 19, 3, 101]  # many {0, 1, 6}, medium {2, 3}, few {4, 5}
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 4, 4])
    preds = torch.tensor([0, 0, 5, 0, 0, 3, 2, 4, 1])
    out = lt_accuracy(preds, labels, train)
    # per class: 0 -> 3/4, 1 -> 0/2, 2 -> 1/1, 4 -> 1/2; 3, 5 and 6 absent (NaN, left out)
    expected = torch.tensor([0.75, 0.0, 1.0, math.nan, 0.5, math.nan, math.nan], dtype=torch.float64)
    torch.testing.assert_close(out["per_class"], expected, equal_nan=True)
    assert out["overall"] == pytest.approx((0.75 + 0.0 + 1.0 + 0.5) / 4)
    assert out["many"] == pytest.approx((0.75 + 0.0) / 2)  # class 6 absent, not a 0
    assert out["medium"] == pytest.approx(1.0)  # class 3 absent, not a 0
    assert out["few"] == pytest.approx(0.5)
    # a group with no class present is NaN
    out = lt_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([200, 300, 5]))
    assert out["overall"] == 1.0 and out["many"] == 1.0
    assert math.isnan(out["medium"]) and math.isnan(out["few"])


def test_lt_accuracy_errors():
    with pytest.raises(ValueError, match="same shape"):
        lt_accuracy(torch.tensor([0, 1]), torch.tensor([0]), [10, 10])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        lt_accuracy(torch.tensor([0]), torch.tensor([2]), [10, 10])
    with pytest.raises(TypeError, match="integers"):
        lt_accuracy(torch.tensor([0.0]), torch.tensor([0]), [10, 10])
