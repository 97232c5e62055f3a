"""Multi-process tests (gloo, 2 CPU processes): statistics sync and the class-parallel loss.

One launch of 2 worker processes (this file run as a script, ``--worker``) runs every scenario
and saves its results; the tests below compare them with a single process on the concatenated
batch / the unsplit computation. A hang is caught by a timeout, which kills the workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import gala_kernels as gk
from gala_kernels import reference
from gala_kernels.linear import fused_linear_gala_ce

WORLD = 2
B_LOCAL, C, D, HIDDEN, STEPS = 12, 11, 6, 16, 3
C_SPLIT = 13  # classes of the class-parallel scenarios: 7 + 6 columns
TIMEOUT_S = 240
STATE_TOL = dict(atol=1e-6, rtol=1e-5)
ACCUMULATIONS = ("cumulative", "sum", "ema")


# ----------------------------------------------------------------------------- shared data
def global_batch(step: int, *, C=C, dtype=torch.float64, ignore=True):
    """The global batch of ``step``: logits (B, C), features (B, D), labels (B,)."""
    g = torch.Generator().manual_seed(100 + step)
    B = WORLD * B_LOCAL
    logits = (torch.randn(B, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    features = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    if ignore:
        labels[step::7] = -100
    return logits, features, labels


def rows(rank: int) -> slice:
    return slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(D, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, C)]
    return torch.nn.Sequential(*layers).to(dtype)


def train_model(model, rank_rows: slice, forward=None):
    """STEPS of SGD with GALALoss on the rows ``rank_rows`` of each global batch."""
    criterion = gk.GALALoss(C, backend="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    forward = forward or model
    for step in range(STEPS):
        _, features, labels = global_batch(step, dtype=torch.float32, ignore=False)
        loss = criterion(forward(features[rank_rows]), labels[rank_rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return criterion.state


def state_of(state) -> dict:
    return {k: v.detach().clone() for k, v in state.state_dict().items()}


# ----------------------------------------------------------------------------- workers
def _scenario_direct(rank):
    """The reduction by hand (begin_sync) between the reference forward and a fold that does not sync."""
    from gala_kernels import distributed

    out = {}
    for accumulation in ACCUMULATIONS:
        state = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9, track_pairwise=True)
        distributed.configure_sync(state, None)  # this fold must not sync a second time
        for step in range(STEPS):
            logits, _, labels = global_batch(step)
            bias = reference.class_bias(state, 1.2, 1e-3, torch.float64)
            _, _, stats = reference.forward_and_grad(
                logits[rows(rank)], labels[rows(rank)], bias, None, reduction="mean", ignore_index=-100,
                compute_stats=True, track_pairwise=True,
            )
            reference.fold_increments(state, distributed.begin_sync(stats).wait())
        out[accumulation] = state_of(state)
    return out


def _scenario_loss_and_linear(rank):
    """GALALoss (cpu op) and fused_linear_gala_ce through the fold hook; a custom group; opt-out."""
    import torch.distributed as dist

    from gala_kernels import distributed

    state, linear_state = gk.GALAState(C), gk.GALAState(C)
    custom = distributed.configure_sync(gk.GALAState(C), "auto", dist.new_group([0, 1]))
    local = distributed.configure_sync(gk.GALAState(C), None)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(C, D, generator=g)
    for step in range(STEPS):
        logits, features, labels = global_batch(step, dtype=torch.float32)
        for st in (state, custom, local):
            gk.fused_gala_ce(logits[rows(rank)], labels[rows(rank)], st, backend="cpu")
        fused_linear_gala_ce(features[rows(rank)], weight, labels[rows(rank)], linear_state, chunk_size=8)
    return {"loss": state_of(state), "linear": state_of(linear_state), "custom_group": state_of(custom),
            "opt_out": state_of(local)}


def _scenario_device_step(rank):
    """The Triton device step (the interpreter on these CPU workers) with a synced state: the kernel
    leaves its sums in the scratch, which is all-reduced, then folded by gala_fold_kernel."""
    from gala_kernels.backends import triton_gala

    if not triton_gala.availability(torch.device("cpu"))[0]:
        return {"error": triton_gala.availability(torch.device("cpu"))[1]}
    out = {}
    for accumulation in ACCUMULATIONS:
        state = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9, track_pairwise=True)
        linear_state = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9)
        weight = torch.randn(C, D, generator=torch.Generator().manual_seed(7))
        for step in range(STEPS):
            logits, features, labels = global_batch(step, dtype=torch.float32)
            gk.fused_gala_ce(logits[rows(rank)], labels[rows(rank)], state, backend="triton")
            fused_linear_gala_ce(features[rows(rank)], weight, labels[rows(rank)], linear_state, chunk_size=8,
                                 backend="triton")
        scratch = state.step_scratch.abs().sum() + linear_state.step_scratch.abs().sum()
        out[accumulation] = {"loss": state_of(state), "linear": state_of(linear_state),
                             "scratch": float(scratch)}
    return out


def _scenario_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel

    model = make_model()
    state = train_model(model, rows(rank), forward=DistributedDataParallel(model))
    return {"state": state_of(state), "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def _scenario_fsdp(rank):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = make_model()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = train_model(model, rows(rank))
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in model.state_dict().items()}
        return {"state": state_of(state), "weights": weights}
    except Exception as exc:  # reported by the test as a skip with the exact reason
        return {"error": f"{type(exc).__name__}: {exc}"}


def _scenario_mismatch(rank):
    from gala_kernels import distributed

    messages = {}
    cases = {
        "num_classes": lambda: gk.GALAState(5 + 7 * rank),
        "accumulation": lambda: gk.GALAState(5, accumulation=("cumulative", "ema")[rank]),
        "ema_beta": lambda: gk.GALAState(5, accumulation="ema", ema_beta=(0.9, 0.99)[rank]),
        "track_pairwise": lambda: gk.GALAState(5, track_pairwise=bool(rank)),
    }
    for name, make in cases.items():
        state = make()
        zeros = torch.zeros(3, state.num_classes)
        stats = reference.StepStatistics(zeros, None, torch.zeros(2, dtype=torch.int64))
        try:
            distributed.sync_step_statistics(state, stats)
            messages[name] = None
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


def _scenario_class_parallel(rank):
    from gala_kernels import class_parallel as cp

    start, stop = cp.class_range(C_SPLIT)
    out = {"range": (start, stop)}
    state = cp.class_parallel_state(stop - start)
    per_step = []
    for step in range(STEPS):
        logits, _, labels = global_batch(step, C=C_SPLIT)
        if step == 1:
            logits[3, 10] = float("inf")  # a non-finite logit in rank 1's columns only
        z = logits[:, start:stop].clone().requires_grad_(True)
        loss = cp.class_parallel_gala_ce(z, labels, state, class_start=start, num_classes=C_SPLIT,
                                         reduction="none")
        loss.backward(torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype))
        per_step.append((loss.detach(), z.grad))
    out["none"] = {"steps": per_step, "state": state_of(state)}

    # the linear variant, reduction "mean", fp32: grads of x (summed over ranks), W and b slices
    state = cp.class_parallel_state(stop - start)
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(C_SPLIT, D, generator=g)
    bias = torch.randn(C_SPLIT, generator=g)
    per_step = []
    for step in range(STEPS):
        _, features, labels = global_batch(step, C=C_SPLIT, dtype=torch.float32)
        x = features.clone().requires_grad_(True)
        w = weight[start:stop].clone().requires_grad_(True)
        b = bias[start:stop].clone().requires_grad_(True)
        loss = cp.class_parallel_linear_gala_ce(x, w, labels, state, b, class_start=start,
                                                num_classes=C_SPLIT)
        loss.backward()
        per_step.append((loss.detach(), x.grad, w.grad, b.grad))
    out["linear"] = {"steps": per_step, "state": state_of(state)}

    try:  # a state that would sum over the class group (sync="auto" default) is rejected
        logits, _, labels = global_batch(0, C=C_SPLIT)
        cp.class_parallel_gala_ce(logits[:, start:stop], labels, gk.GALAState(stop - start),
                                  class_start=start, num_classes=C_SPLIT)
        out["synced_state_error"] = None
    except ValueError as exc:
        out["synced_state_error"] = str(exc)
    return out


def worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {
        "direct": _scenario_direct(rank),
        "loss_and_linear": _scenario_loss_and_linear(rank),
        "device_step": _scenario_device_step(rank),
        "ddp": _scenario_ddp(rank),
        "fsdp": _scenario_fsdp(rank),
        "mismatch": _scenario_mismatch(rank),
        "class_parallel": _scenario_class_parallel(rank),
    }
    dist.barrier()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def results():
    """Runs both workers once; returns ``[rank0_results, rank1_results]``."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
        procs = [
            subprocess.Popen([sys.executable, __file__, "--worker", str(rank), init_file, tmp], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(WORLD)
        ]
        logs = []
        try:
            for proc in procs:
                logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s (hang?)")
        for rank, proc in enumerate(procs):
            if proc.returncode != 0:
                pytest.fail(f"worker {rank} failed:\n{logs[rank][-4000:]}")
        return [torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_states_equal(got: dict, expected: dict, **tol):
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **(tol or STATE_TOL),
                                   msg=lambda m, k=key: f"{k}: {m}")


# ----------------------------------------------------------------------------- tests: sync
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_synced_state_equals_single_process_on_the_global_batch(results, accumulation):
    single = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9, track_pairwise=True)
    for step in range(STEPS):
        logits, _, labels = global_batch(step)
        reference.gala_ce(logits, labels, single)
    for rank in range(WORLD):
        assert_states_equal(results[rank]["direct"][accumulation], state_of(single))


def test_gala_loss_and_fused_linear_sync_through_the_fold(results):
    single, single_linear = gk.GALAState(C), gk.GALAState(C)
    weight = torch.randn(C, D, generator=torch.Generator().manual_seed(7))
    for step in range(STEPS):
        logits, features, labels = global_batch(step, dtype=torch.float32)
        gk.fused_gala_ce(logits, labels, single, backend="cpu")
        gk.fused_gala_ce(features @ weight.t(), labels, single_linear, backend="cpu")
    for rank in range(WORLD):
        assert_states_equal(results[rank]["loss_and_linear"]["loss"], state_of(single))
        assert_states_equal(results[rank]["loss_and_linear"]["custom_group"], state_of(single))
        assert_states_equal(results[rank]["loss_and_linear"]["linear"], state_of(single_linear))


@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_device_step_syncs_its_scratch_over_ranks(results, accumulation):
    """The device step's sums are all-reduced in the scratch and folded on the device: every rank
    holds the state of one process on the global batch (pairwise tracking included)."""
    if "error" in results[0]["device_step"]:
        pytest.skip(results[0]["device_step"]["error"])
    single = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9, track_pairwise=True)
    single_linear = gk.GALAState(C, accumulation=accumulation, ema_beta=0.9)
    weight = torch.randn(C, D, generator=torch.Generator().manual_seed(7))
    for step in range(STEPS):
        logits, features, labels = global_batch(step, dtype=torch.float32)
        reference.gala_ce(logits, labels, single)
        reference.gala_ce(features @ weight.t(), labels, single_linear)
    for rank in range(WORLD):
        run = results[rank]["device_step"][accumulation]
        assert_states_equal(run["loss"], state_of(single))
        assert_states_equal(run["linear"], state_of(single_linear))
        assert run["scratch"] == 0.0


def test_sync_none_keeps_the_statistics_local(results):
    for rank in range(WORLD):
        local = gk.GALAState(C)
        for step in range(STEPS):
            logits, _, labels = global_batch(step, dtype=torch.float32)
            gk.fused_gala_ce(logits[rows(rank)], labels[rows(rank)], local, backend="cpu")
        assert_states_equal(results[rank]["loss_and_linear"]["opt_out"], state_of(local))


def _check_data_parallel_run(run):
    model = make_model()
    single = train_model(model, slice(None))
    assert_states_equal(run["state"], state_of(single))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(run["weights"][key], value, atol=1e-5, rtol=1e-4)


def test_ddp_matches_single_process(results):
    for rank in range(WORLD):
        _check_data_parallel_run(results[rank]["ddp"])


def test_fsdp_matches_single_process(results):
    if "error" in results[0]["fsdp"]:
        pytest.skip(f"FSDP2 (fully_shard) on CPU with gloo failed in torch {torch.__version__}: "
                    f"{results[0]['fsdp']['error']}")
    for rank in range(WORLD):
        _check_data_parallel_run(results[rank]["fsdp"])


@pytest.mark.parametrize(
    "setting, values",
    [("num_classes", ("5", "12")), ("accumulation", ("'cumulative'", "'ema'")), ("ema_beta", ("0.9", "0.99")),
     ("track_pairwise", ("False", "True"))],
)
def test_mismatched_settings_fail_on_every_rank_naming_both_values(results, setting, values):
    for rank in range(WORLD):
        message = results[rank]["mismatch"][setting]
        assert message is not None, f"rank {rank} did not raise for a {setting} mismatch"
        assert f"{setting} is {values[0]} on rank 0 but {values[1]} on rank 1" in message


# ----------------------------------------------------------------------------- tests: class-parallel
def test_class_parallel_matches_unsplit_reference(results):
    state = gk.GALAState(C_SPLIT)
    expected = []
    for step in range(STEPS):
        logits, _, labels = global_batch(step, C=C_SPLIT)
        if step == 1:
            logits[3, 10] = float("inf")
        z = logits.clone().requires_grad_(True)
        loss = reference.gala_ce(z, labels, state, reduction="none")
        loss.backward(torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype))
        expected.append((loss.detach(), z.grad))
    full_state = state_of(state)
    assert full_state["nonfinite_rows"] == 1
    for rank in range(WORLD):
        run = results[rank]["class_parallel"]
        start, stop = run["range"]
        assert (start, stop) == ((0, 7), (7, 13))[rank]
        for step, ((loss, grad), (want_loss, want_grad)) in enumerate(zip(run["none"]["steps"], expected)):
            # float64 math; from step 1 on, the margins come from the float32 state, whose last bit
            # may differ (sum_{j != y} p here, 1 - p_y in the reference): a 1e-7 relative wobble.
            tol = dict(atol=1e-10, rtol=1e-9) if step == 0 else dict(atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(loss, want_loss, **tol, equal_nan=True)
            torch.testing.assert_close(grad, want_grad[:, start:stop], **tol, equal_nan=True)
        sliced = {k: (v[start:stop] if v.dim() == 1 else v) for k, v in full_state.items()}
        assert_states_equal(run["none"]["state"], sliced)


def test_class_parallel_linear_matches_unsplit(results):
    state = gk.GALAState(C_SPLIT)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(C_SPLIT, D, generator=g), torch.randn(C_SPLIT, generator=g)
    expected = []
    for step in range(STEPS):
        _, features, labels = global_batch(step, C=C_SPLIT, dtype=torch.float32)
        x, w, b = (t.clone().requires_grad_(True) for t in (features, weight, bias))
        loss = gk.fused_gala_ce(torch.addmm(b, x, w.t()), labels, state, backend="torch")
        loss.backward()
        expected.append((loss.detach(), x.grad, w.grad, b.grad))
    for rank in range(WORLD):
        run = results[rank]["class_parallel"]
        start, stop = run["range"]
        for got, want in zip(run["linear"]["steps"], expected):
            want = (want[0], want[1], want[2][start:stop], want[3][start:stop])
            for name, a, b_ in zip(("loss", "grad x", "grad W", "grad b"), got, want):
                torch.testing.assert_close(a, b_, atol=2e-6, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
        sliced = {k: (v[start:stop] if v.dim() == 1 else v) for k, v in state_of(state).items()}
        assert_states_equal(run["linear"]["state"], sliced)


def test_class_parallel_rejects_a_state_synced_over_the_class_group(results):
    for rank in range(WORLD):
        message = results[rank]["class_parallel"]["synced_state_error"]
        assert message is not None and "OTHER class slices" in message


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
