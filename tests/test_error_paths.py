"""Bad input to the compiled ops raises a Python exception; it never kills the process.

Each case calls an op of the extension with one bad argument in a fresh Python process (with
``-X faulthandler``, so a fatal signal prints its Python stack): a C++ error that the toolchain
turns into an abort, a segfault or an uncaught exception would end the process, where a test in
this process would die with it. CPU cases run everywhere the extension is built; CUDA cases need
a GPU.
"""

import subprocess
import sys

import pytest
from conftest import devices_for

from gala_kernels import _extension

PRELUDE = """
import torch, gala_kernels
from gala_kernels import ops
op = ops.native_fused_ce()
dev = {device!r}
z = torch.randn(6, 10, device=dev); y = torch.randint(0, 10, (6,), device=dev)
"""

# name: (statement, the exception it must raise)
CASES = {
    "1-D logits": ("op(z[0], y, None, None, -100, 1, 0.0, True, False)", "ValueError"),
    "int32 labels": ("op(z, y.int(), None, None, -100, 1, 0.0, True, False)", "TypeError"),
    "label out of range": ("y[4] = 10; op(z, y, None, None, -100, 1, 0.0, True, False)", "ValueError"),
    "reduction code 3": ("op(z, y, None, None, -100, 3, 0.0, True, False)", "ValueError"),
    "weight of the wrong size": ("op(z, y, None, torch.ones(9, device=dev), -100, 1, 0.0, True, False)",
                                 "ValueError"),
    "label_smoothing above 1": ("op(z, y, None, None, -100, 1, 1.5, True, False)", "ValueError"),
    "TORCH_CHECK in an aten op": ("torch.empty(2, device=dev).view(3)", "RuntimeError"),
    "mass: out of the wrong size": (
        "torch.ops.gala.softmax_colsum_add_(z, torch.zeros(9, device=dev, dtype=torch.float64))",
        "ValueError"),
    "mass: int logits": ("torch.ops.gala.softmax_colsum(z.long())", "TypeError"),
    "mass: 1-D logits, or an unknown kernel variant on CUDA": (
        "torch.ops.gala.softmax_colsum_add_(z, torch.zeros(10, device=dev, dtype=torch.float64), 't9_e9', 0) "
        "if dev == 'cuda' else torch.ops.gala.softmax_colsum(z[0])", "ValueError"),
}

requires_extension = pytest.mark.skipif(not _extension.load(), reason="the compiled extension is not built")


def outcome(device: str, statement: str) -> subprocess.CompletedProcess:
    script = PRELUDE.format(device=device) + (
        "try:\n"
        f"    {statement}\n"
        "    print('NO ERROR RAISED')\n"
        "except Exception as error:\n"
        "    print('raised', type(error).__name__ + ':', str(error).splitlines()[0][:200])\n"
    )
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True,
                          text=True, timeout=300)


@requires_extension
@pytest.mark.parametrize("device", devices_for())
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_python_exception(device, name):
    if device == "cuda" and not _extension.has_kernel("fused_ce_fwd", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels")
    statement, expected = CASES[name]
    done = outcome(device, statement)
    assert done.returncode == 0, (
        f"the process died (exit status {done.returncode}) instead of raising:\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"raised {expected}:"), last


def test_a_crash_is_told_apart_from_an_exception():
    """The harness itself: a process killed by a signal fails the check above, it is not read as a raise."""
    done = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and not done.stdout
