"""What ``weight=`` and ``label_smoothing=`` cost the fused CPU training step, against the plain call.

One process, one build: the training step ``fused_gala_ce(z, labels, state, backend="cpu",
...).backward()`` (each variant with its own GALAState) plain, with class weights, with label
smoothing and with both, interleaved in a new random order every round (a step runs slower right
after some neighbours), each on the next of several logits buffers that together exceed twice
the last-level cache. Ratios are the medians of per-round ratios to the plain step, with their
20th and 80th percentiles; the file written starts with the machine, versions and date.

    python tools/options_cost_cpu.py [--batch 512 --classes 8142 --dtype float32 --rounds 200
                                      --runs 3 --out options_cost.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import gala_kernels as gk
from gala_kernels.benchmark.machine import machine_info
from gala_kernels.benchmark.rotation import Rotation, last_level_cache_bytes, rotation_count
from gala_kernels.benchmark.timing import Budget, quantile, time_interleaved

VARIANTS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "label_smoothing=0.1": dict(label_smoothing=0.1),
    "weight + label_smoothing=0.1": dict(weight=True, label_smoothing=0.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="independent runs (each: warm-up, then rounds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="append the report to this file too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    B, C, dtype = args.batch, args.classes, getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    count = rotation_count(B * C * dtype.itemsize, last_level_cache_bytes(torch.device("cpu")))
    rotation = Rotation([(torch.randn(B, C, generator=generator) * 2).to(dtype).requires_grad_(True)
                         for _ in range(count)])
    labels = torch.randint(0, C, (B,), generator=generator)
    class_weight = torch.rand(C, generator=generator) * 2 + 0.1

    def step_of(options, state):
        kwargs = dict(options)
        if kwargs.pop("weight", False):
            kwargs["weight"] = class_weight

        def step():
            z = rotation.next()
            gk.fused_gala_ce(z, labels, state, backend="cpu", **kwargs).backward()
            z.grad = None
        return step

    info = machine_info(torch.device("cpu"))
    lines = [f"# {info['date_utc']}; {info['cpu_model']}, {info['cpu_cores']} cores, {info['torch_threads']} "
             f"threads; torch {info['torch']}; commit {info['git_commit']}; load average "
             f"{info['load_average_start']}",
             f"# {' '.join(sys.argv)}",
             f"{B} x {C} {args.dtype}, training step (forward + backward + statistics), {count} logits "
             f"buffers; ratio = median [20th-80th percentile] of {args.rounds} per-round ratios to 'plain'"]
    print("\n".join(lines), flush=True)
    for run in range(args.runs):
        steps = {name: step_of(options, gk.GALAState(C)) for name, options in VARIANTS.items()}
        # Every variant gets the same number of rounds, so samples_ms[k] of each is round k's call.
        timings = time_interleaved(steps, {name: Budget.rounds(args.rounds, warmup=3) for name in steps},
                                   torch.device("cpu"), seed=run)
        samples = {name: timing.samples_ms for name, timing in timings.items()}
        cells = []
        for name, values in samples.items():
            ratios = sorted(a / b for a, b in zip(values, samples["plain"]))
            median_ms = quantile(sorted(values), 0.5)
            cells.append(f"{name} {median_ms:.3f} ms ({quantile(ratios, 0.5):.3f}x "
                         f"[{quantile(ratios, 0.2):.3f}-{quantile(ratios, 0.8):.3f}])")
        lines.append(f"run {run + 1}: " + "; ".join(cells))
        print(lines[-1], flush=True)
    if args.out:
        with Path(args.out).open("a") as out:
            out.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
