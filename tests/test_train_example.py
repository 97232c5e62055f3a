"""examples/train.py: an interrupted and resumed run ends exactly where an uninterrupted one does;
the data paths (synthetic, features files, CIFAR-100-LT) load; a wrong-size checkpoint is rejected."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("gala_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--num-classes", "10", "--dim", "8", "--samples-max", "60", "--imbalance", "10",
         "--batch-size", "16", "--lr", "0.2", "--log-every", "1000"]


def checkpoint_of(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=False)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("loss", ["gala", "fused-linear"])
def test_resume_ends_with_the_uninterrupted_state_and_weights(train, tmp_path, loss):
    common = SMALL + ["--loss", loss, "--steps", "7", "--checkpoint-every", "3"]
    train.main(common + ["--checkpoint-dir", str(tmp_path / "straight")])
    # killed after step 5: the last checkpoint is that of step 3; the resumed run redoes 4 and 5
    train.main(common + ["--checkpoint-dir", str(tmp_path / "resumed"), "--stop-after", "5"])
    assert checkpoint_of(tmp_path / "resumed")["step"] == 3
    result = train.main(common + ["--checkpoint-dir", str(tmp_path / "resumed"), "--resume", "auto"])
    assert result["step"] == 7
    straight, resumed = checkpoint_of(tmp_path / "straight"), checkpoint_of(tmp_path / "resumed")
    assert resumed["step"] == straight["step"] == 7
    assert resumed["gala_state"]["steps"] == 7
    assert float(resumed["gala_state"]["pos_grad"].abs().sum()) > 0
    for part in ("model", "optimizer", "gala_state"):
        assert_same_tensors(resumed[part], straight[part], part)


def test_checkpoint_with_a_wrong_size_state_is_rejected(train, tmp_path):
    train.main(SMALL + ["--steps", "2", "--checkpoint-dir", str(tmp_path)])
    wider = [a if a != "10" else "12" for a in SMALL]
    with pytest.raises(ValueError, match=r"does not fit this run.*num_classes=12"):
        train.main(wider + ["--steps", "4", "--checkpoint-dir", str(tmp_path), "--resume", "auto"])


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".npz"])
def test_features_files(train, tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(90, 6, generator=g), torch.arange(90) % 7
    path = tmp_path / f"features{suffix}"
    extra = []
    if suffix == ".pt":
        torch.save({"features": features, "labels": labels}, path)
    elif suffix == ".npz":
        np.savez(path, features=features.numpy(), labels=labels.numpy())
    else:
        np.save(path, features.numpy())
        np.save(tmp_path / "labels.npy", labels.numpy())
        extra = ["--labels", str(tmp_path / "labels.npy")]
    data = train.load_features(str(path), extra[1] if extra else None)
    assert data.num_classes == 7 and torch.equal(data.y, labels)
    result = train.main(["--features", str(path), *extra, "--steps", "3", "--batch-size", "16", "--loss",
                         "fused-linear"])
    assert result["step"] == 3 and np.isfinite(result["loss"])


def test_cifar100_lt_from_a_local_copy(train, tmp_path):
    """A fake CIFAR-100 copy in the python pickle format: 6 training images per class."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name, per_class in (("train", 6), ("test", 1)):
        labels = [k for k in range(100) for _ in range(per_class)]
        data = rng.randint(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels}, f)
    data = train.load_cifar100_lt(str(tmp_path), imbalance=6.0)
    expected = torch.tensor(train.exponential_profile(100, 6, 6.0))
    assert torch.equal(data.class_counts(), expected) and expected[0] == 6 and expected[-1] == 1
    assert data.x.shape[1:] == (3, 32, 32) and data.test.x.shape[0] == 100
    args = ["--data-root", str(tmp_path), "--imbalance", "6", "--steps", "2", "--batch-size", "8"]
    result = train.main(args)
    assert result["step"] == 2 and 0.0 <= result["accuracy"]["overall"] <= 1.0
    with pytest.raises(FileNotFoundError, match="never downloads"):
        train.load_cifar100_lt(str(tmp_path / "missing"), imbalance=10.0)


def _aborted_at_exit_after_finishing(done: subprocess.CompletedProcess) -> bool:
    """A known failure of 2-rank gloo runs, outside this package: after the whole run (its last
    line, the test accuracy, printed), one rank's interpreter can abort during exit with
    "terminate called without an active exception". While the main thread is in Py_FinalizeEx, a
    ProcessGroupGloo worker thread destroys a finished work whose saved thread-local state
    releases a Python object; a thread that takes the GIL during finalization is ended with
    pthread_exit, and the forced unwind through a noexcept destructor calls std::terminate. The
    example collects its DDP wrapper and destroys the process group before it exits, which avoids
    it; such a run is still retried once. Any other failure, or a second abort, fails the test."""
    output = done.stdout + done.stderr
    return (done.returncode != 0 and "terminate called without an active exception" in output
            and "test accuracy" in done.stdout)


def test_torchrun_ddp_matches_a_single_process_on_the_global_batch(tmp_path):
    """2 gloo ranks with batch 8 each = one process with batch 16: same weights and GALA state."""
    common = SMALL + ["--steps", "4", "--loss", "fused-linear"]  # a later --batch-size overrides
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(EXAMPLE), *common, "--batch-size", "8"],
        "single": [sys.executable, str(EXAMPLE), *common, "--batch-size", "16"],
    }
    for name, command in runs.items():
        for _attempt in range(2):
            done = subprocess.run(command + ["--checkpoint-dir", str(tmp_path / name)], env=env,
                                  capture_output=True, text=True, timeout=240)
            if not (name == "ddp" and _aborted_at_exit_after_finishing(done)):
                break
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ddp, single = checkpoint_of(tmp_path / "ddp"), checkpoint_of(tmp_path / "single")
    for part in ("model", "gala_state"):
        for key, value in single[part].items():
            torch.testing.assert_close(ddp[part][key], value, atol=1e-6, rtol=1e-5,
                                       msg=lambda m, k=key: f"{k}: {m}")


def test_the_torchrun_retry_covers_only_an_abort_at_exit_after_a_finished_run():
    finished = "step 4/4 loss 3.4183 lr 0.02929\ntest accuracy overall 0.283\n"
    abort = "terminate called without an active exception\n"

    def run(returncode, stdout, stderr=""):
        return subprocess.CompletedProcess([], returncode, stdout, stderr)

    assert _aborted_at_exit_after_finishing(run(1, finished + abort))
    assert _aborted_at_exit_after_finishing(run(1, finished, abort))
    assert not _aborted_at_exit_after_finishing(run(0, finished + abort))  # nothing to retry
    assert not _aborted_at_exit_after_finishing(run(1, "step 2/4 loss 3.5\n" + abort))  # died mid-run
    assert not _aborted_at_exit_after_finishing(run(1, finished, "RuntimeError: ...\n"))  # another error
