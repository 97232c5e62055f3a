"""GPU benchmark of the fused GALA step (issue 3): forward + backward + statistics, side by side.

One run times every implementation on every shape on the same GPU and prints one Markdown table;
the table and the raw numbers (JSON, with GPU name, versions and date) go under ``--out``
(default ``bench/results/``) and also under ``$OUT`` when that is set.

Implementations (each a training step on logits ``(B, C)``: loss, ``backward()`` to the logits,
and for the GALA ones the statistics folded into a persistent state):

- ``triton``: ``fused_gala_ce(..., backend="triton")`` + backward (the public API, end to end);
- ``triton op``: the launcher alone (``triton_gala.fused_ce_forward``): loss, gradient and raw
  statistics in one kernel, no autograd and no fold: the kernel's own cost;
- ``triton op inplace``: the same with ``inplace_backward=True`` (gradient written into the logits);
- ``cuda``: ``fused_gala_ce(..., backend="cuda")`` when that backend is available (the hook for the
  CUDA C++ backend: it joins the table as soon as it is built);
- ``eager GALA``: the plain-PyTorch step ``reference.eager_gala_loss`` (autograd through
  ``F.cross_entropy`` on the adjusted logits, statistics from the softmax);
- ``torch.compile(eager)``: that step compiled (only on the shapes where it compiles
  quickly: ``--compile-max-elements``);
- ``F.cross_entropy``: forward + backward, no GALA work at all;
- ``Liger CE``: ``LigerCrossEntropyLoss`` when liger_kernel is importable;
- ``copy floor``: ``out.copy_(logits)``, one read and one write of ``B x C``;
- ``authors' path``: ``gala_kernels.authors_port.AuthorsGALA`` at 512 x 8142 only.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls), median and 20/80
quantiles, with the logits cycled through several buffers whose total exceeds the L2 cache. GB/s
counts the floor's bytes (``2 * B * C * itemsize``: read the logits, write the gradient). Peak extra
memory is ``max_memory_allocated`` during one step minus the memory before it, minus the gradient
buffer (``B * C * itemsize``) for the implementations that produce one.

    python bench/bench_gpu.py                       # on a GPU: the 4 shapes of issue 3
    python bench/bench_gpu.py --dry-run             # CPU, TRITON_INTERPRET=1, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gala_kernels as gk  # noqa: E402
from gala_kernels import backends, reference  # noqa: E402

GPU_SHAPES = [(512, 8142, torch.float32), (4096, 8142, torch.bfloat16), (8192, 32768, torch.bfloat16),
              (2048, 131072, torch.bfloat16)]
DRY_RUN_SHAPES = [(8, 37, torch.float32), (6, 70, torch.bfloat16)]
AUTHORS_SHAPE = (512, 8142)
ROTATION_BYTES = 256 * 2**20  # cycle logits buffers until their total exceeds this (L2 is 50-60 MB)


@dataclass
class Result:
    shape: str
    dtype: str
    impl: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    gbps: Optional[float] = None
    x_copy_floor: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    setup_s: Optional[float] = None
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)


class Rotation:
    """Several logits buffers (total beyond L2), handed out in turn."""

    def __init__(self, B, C, dtype, device, *, requires_grad, dry_run):
        nbytes = B * C * dtype.itemsize
        count = 1 if dry_run else max(2, min(8, -(-ROTATION_BYTES // nbytes)))
        g = torch.Generator(device=device).manual_seed(0)
        self.buffers = [
            (torch.randn(B, C, device=device, generator=g, dtype=torch.float32) * 3).to(dtype)
            .requires_grad_(requires_grad) for _ in range(count)
        ]
        self.index = 0

    def next(self) -> torch.Tensor:
        self.index = (self.index + 1) % len(self.buffers)
        return self.buffers[self.index]


# ------------------------------------------------------------------------------------------------
# implementations: each returns a zero-argument step, or raises Skip with the reason
# ------------------------------------------------------------------------------------------------
class Skip(Exception):
    pass


def autograd_step(loss_fn, rotation, labels):
    def step():
        logits = rotation.next()
        loss_fn(logits, labels).backward()
        logits.grad = None

    return step


def gala_step(backend):
    def setup(B, C, dtype, device, rotation, labels, args):
        ok, reason = True, ""
        if backend != "torch":
            ok, reason = backends.availability(backend, torch.device(device))
        if not ok:
            raise Skip(reason)
        state = gk.GALAState(C, device=device)
        return autograd_step(lambda z, y: gk.fused_gala_ce(z, y, state, backend=backend), rotation, labels)

    return setup


def triton_op_step(inplace):
    def setup(B, C, dtype, device, rotation, labels, args):
        from gala_kernels.backends import triton_gala

        ok, reason = triton_gala.availability(torch.device(device))
        if not ok:
            raise Skip(reason)
        bias = torch.zeros(C, device=device, dtype=reference.compute_dtype(dtype))

        def step():
            logits = rotation.next().detach()
            triton_gala.fused_ce_forward(logits, labels, bias, None, -100, 1, 0.0, True, False,
                                         inplace_backward=inplace)

        return step

    return setup


def compiled_eager_step(B, C, dtype, device, rotation, labels, args):
    if B * C > args.compile_max_elements:
        raise Skip(f"B x C > {args.compile_max_elements} (--compile-max-elements): compiles too slowly")
    state = gk.GALAState(C, device=device)
    compiled = torch.compile(lambda z, y: reference.eager_gala_loss(z, y, state))
    return autograd_step(compiled, rotation, labels)


def eager_step(B, C, dtype, device, rotation, labels, args):
    state = gk.GALAState(C, device=device)
    return autograd_step(lambda z, y: reference.eager_gala_loss(z, y, state), rotation, labels)


def cross_entropy_step(B, C, dtype, device, rotation, labels, args):
    return autograd_step(F.cross_entropy, rotation, labels)


def liger_step(B, C, dtype, device, rotation, labels, args):
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError as exc:
        raise Skip(f"liger_kernel is not importable ({exc})") from None
    if device != "cuda":
        raise Skip("Liger runs on CUDA only")
    loss = LigerCrossEntropyLoss()
    return autograd_step(loss, rotation, labels)


def copy_floor_step(B, C, dtype, device, rotation, labels, args):
    out = torch.empty(B, C, device=device, dtype=dtype)

    def step():
        out.copy_(rotation.next().detach())

    return step


def authors_step(B, C, dtype, device, rotation, labels, args):
    if (B, C) != AUTHORS_SHAPE and not args.dry_run:
        raise Skip("timed at 512 x 8142 only (tens of ms per step)")
    try:
        from gala_kernels.authors_port import AuthorsGALA
    except ImportError as exc:
        raise Skip(f"gala_kernels.authors_port is not importable ({exc})") from None
    authors = AuthorsGALA(C, lambda1=1.2, lambda2=0.9, eps=1e-3, device=device)
    return autograd_step(authors.step, rotation, labels)


# (name, setup, produces a B x C gradient buffer)
IMPLEMENTATIONS: List = [
    ("triton", gala_step("triton"), True),
    ("triton op", triton_op_step(inplace=False), True),
    ("triton op inplace", triton_op_step(inplace=True), False),
    ("cuda", gala_step("cuda"), True),
    ("eager GALA", eager_step, True),
    ("torch.compile(eager)", compiled_eager_step, True),
    ("F.cross_entropy", cross_entropy_step, True),
    ("Liger CE", liger_step, False),  # Liger writes the gradient into its input buffer
    ("copy floor", copy_floor_step, False),
    ("authors' path", authors_step, True),
]


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------
def time_step(step: Callable[[], None], device: str, args) -> List[float]:
    """[median, p20, p80] in ms."""
    if device == "cuda":
        import triton.testing

        quantiles = [0.5, 0.2, 0.8]
        bench = triton.testing.do_bench
        return list(bench(step, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=quantiles))
    samples = []
    for _ in range(args.cpu_repeats):
        started = time.perf_counter()
        step()
        samples.append((time.perf_counter() - started) * 1e3)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * (len(samples) - 1) + 0.5))]
    return [statistics.median(samples), q(0.2), q(0.8)]


def peak_extra_bytes(step: Callable[[], None], device: str) -> Optional[int]:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_case(B, C, dtype, device, args) -> List[Result]:
    shape, dname = f"{B} x {C}", str(dtype).replace("torch.", "")
    labels = torch.randint(0, C, (B,), device=device, generator=torch.Generator(device=device).manual_seed(1))
    grad_bytes = B * C * dtype.itemsize
    results = []
    for name, setup, makes_grad_buffer in IMPLEMENTATIONS:
        if args.only and name not in args.only:
            continue
        result = Result(shape, dname, name)
        results.append(result)
        rotation = None
        try:
            needs_grad = name not in ("copy floor", "triton op", "triton op inplace")
            rotation = Rotation(B, C, dtype, device, requires_grad=needs_grad, dry_run=args.dry_run)
            started = time.perf_counter()
            step = setup(B, C, dtype, device, rotation, labels, args)
            step()  # compile / JIT outside the timing
            if device == "cuda":
                torch.cuda.synchronize()
            result.setup_s = round(time.perf_counter() - started, 2)
            result.median_ms, result.p20_ms, result.p80_ms = time_step(step, device, args)
            peak = peak_extra_bytes(step, device)
            if peak is not None:
                result.peak_extra_mb = (peak - (grad_bytes if makes_grad_buffer else 0)) / 2**20
            result.gbps = 2 * grad_bytes / (result.median_ms * 1e-3) / 1e9
        except Skip as reason:
            result.note = f"skipped: {reason}"
        except Exception as exc:  # one failing implementation must not cost the others their numbers
            result.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        finally:
            del rotation
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        shown = result.note if result.median_ms is None else f"{result.median_ms:.4f} ms"
        print(f"  {shape:>14} {dname:>8} {name:<22} {shown}", flush=True)
    by_name = {r.impl: r for r in results}
    floor, eager = by_name.get("copy floor"), by_name.get("eager GALA")
    for r in results:
        if r.median_ms is None:
            continue
        if floor is not None and floor.median_ms:
            r.x_copy_floor = r.median_ms / floor.median_ms
        if eager is not None and eager.median_ms:
            r.speedup_vs_eager = eager.median_ms / r.median_ms
    return results


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def environment(device: str) -> Dict[str, str]:
    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()})",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "autotune": os.environ.get("GALA_TRITON_AUTOTUNE", "0"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    env["auto_backend_cuda"] = "-"
    if device == "cuda":
        env["auto_backend_cuda"] = backends.auto_cuda_backend(torch.empty(1, 1, device=device))
    return env


def fmt(value, pattern):
    return "-" if value is None else pattern % value


def markdown(results: List[Result], env: Dict[str, str]) -> str:
    lines = [
        f"# GALA fused step, forward + backward + statistics ({env['device']})",
        "",
        f"{env['date_utc']} UTC; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, "
        f"Python {env['python']}, commit {env['commit']}; backend='auto' on CUDA picks "
        f"{env['auto_backend_cuda']!r}. Median of triton.testing.do_bench (p20-p80), logits rotated "
        "beyond L2; GB/s counts 2 x B x C x itemsize; peak extra = max_memory_allocated during a step "
        "minus the gradient buffer.",
        "",
        "| B x C | dtype | implementation | ms (p20-p80) | GB/s | x copy floor | speed-up vs eager | "
        "peak extra MB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        timing = "-" if r.median_ms is None else f"{r.median_ms:.4f} ({r.p20_ms:.4f}-{r.p80_ms:.4f})"
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.impl} | {timing} | {fmt(r.gbps, '%.0f')} | "
            f"{fmt(r.x_copy_floor, '%.2f')} | {fmt(r.speedup_vs_eager, '%.1f')} | "
            f"{fmt(r.peak_extra_mb, '%.1f')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: List[Result], env: Dict[str, str], out_dirs: List[Path], stem: str) -> None:
    table = markdown(results, env)
    payload = {"environment": env, "results": [asdict(r) for r in results]}
    for out_dir in out_dirs:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(table)
        (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, few repeats: checks the script itself (CPU: TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--only", nargs="*", help="implementation names to run (default: all)")
    parser.add_argument("--shapes", nargs="*", help="BxC:dtype entries, e.g. 512x8142:float32")
    parser.add_argument("--compile-max-elements", type=int, default=4096 * 8142)
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--cpu-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shapes:
        shapes = []
        for entry in args.shapes:
            dims, _, dtype_name = entry.partition(":")
            B, C = (int(v) for v in dims.lower().split("x"))
            shapes.append((B, C, getattr(torch, dtype_name or "bfloat16")))
    else:
        shapes = DRY_RUN_SHAPES if args.dry_run or device == "cpu" else GPU_SHAPES
    if args.dry_run:
        args.compile_max_elements = 0 if device == "cpu" else args.compile_max_elements

    env = environment(device)
    print(f"GALA benchmark on {env['device']}: torch {env['torch']}, Triton {env['triton']}", flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()[:40]
    stem = f"gpu_bench_{slug}_{stamp}{'_dry-run' if args.dry_run else ''}"
    out_dirs = [Path(args.out)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    results: List[Result] = []
    for B, C, dtype in shapes:
        results.extend(run_case(B, C, dtype, device, args))
        write_results(results, env, out_dirs, stem)  # after every shape: a timeout keeps what was measured

    print()
    print(markdown(results, env))
    print(f"wrote {stem}.md/.json under {', '.join(str(d) for d in out_dirs)}")
    if shutil.which("nvidia-smi") and device == "cuda":
        subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,power.draw", "--format=csv"],
                       check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
