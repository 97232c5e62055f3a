"""Do the compiled ops raise Python errors for bad input, or does the process die?

Each case calls an op of the extension with one bad argument in a fresh Python process (with
``-X faulthandler``, so a fatal signal prints its Python stack) and reports how the process
ended: the error it raised, or the signal / exit status and the tail of its stderr. Used by
bench/gpu_check.sh, where a test of these paths crashed its pytest worker (2026-11-27, H200):

    python bench/gpu_error_paths.py            # CUDA cases when a GPU is present, CPU cases always
"""

from __future__ import annotations

import subprocess
import sys

PRELUDE = """
import torch, gala_kernels
from gala_kernels import ops
op = ops.native_fused_ce()
dev = {device!r}
z = torch.randn(6, 10, device=dev); y = torch.randint(0, 10, (6,), device=dev)
"""

CASES = {
    "1-D logits": "op(z[0], y, None, -100, 1, True, False)",
    "int32 labels": "op(z, y.int(), None, -100, 1, True, False)",
    "label out of range": "y[4] = 10; op(z, y, None, -100, 1, True, False)",
    "reduction code 3": "op(z, y, None, -100, 3, True, False)",
    "TORCH_CHECK in an aten op": "torch.empty(2, device=dev).view(3)",
    "mass: out of the wrong size": (
        "torch.ops.gala.softmax_colsum_add_(z, torch.zeros(9, device=dev, dtype=torch.float64))"),
    "mass: int logits": "torch.ops.gala.softmax_colsum(z.long())",
    "mass: unknown kernel variant": (
        "torch.ops.gala.softmax_colsum_add_(z, torch.zeros(10, device=dev, dtype=torch.float64), 't9_e9', 0) "
        "if dev == 'cuda' else torch.ops.gala.softmax_colsum(z[0])"),
}


def run_case(device: str, name: str, statement: str) -> str:
    script = PRELUDE.format(device=device) + (
        "try:\n"
        f"    {statement}\n"
        "    print('NO ERROR RAISED')\n"
        "except Exception as error:\n"
        "    print('raised', type(error).__name__ + ':', str(error).splitlines()[0][:120])\n"
    )
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True,
                          text=True, timeout=300)
    if done.returncode == 0:
        return done.stdout.strip().splitlines()[-1]
    tail = "\n      ".join(done.stderr.strip().splitlines()[-25:])
    return f"PROCESS DIED (exit status {done.returncode}):\n      {tail}"


def main() -> int:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    died = 0
    for device in devices:
        for name, statement in CASES.items():
            outcome = run_case(device, name, statement)
            died += outcome.startswith("PROCESS DIED")
            print(f"[{device}] {name}: {outcome}", flush=True)
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
