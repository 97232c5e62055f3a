"""Old command line of the GPU step benchmark, kept for its callers: it runs
``python -m gala_kernels bench step`` with the same shapes and implementations and writes the old
JSON layout (``{"environment", "results": [{"impl", "median_ms", ...}]}``) under ``--out``.

New work should call ``python -m gala_kernels bench step`` (docs/performance.md).
"""

import argparse
import json
import os
import sys

from gala_kernels.benchmark import step

OLD_NAMES = {
    "triton": "fused_triton", "triton op": "fused_op_triton", "triton op inplace": "fused_op_triton_inplace",
    "cuda": "fused_cuda", "eager GALA": "eager", "torch.compile(eager)": "eager_compiled",
    "F.cross_entropy": "cross_entropy", "Liger CE": "liger_ce", "copy floor": "copy_floor",
    "authors' path": "authors",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--only", nargs="*", default=None, choices=list(OLD_NAMES))
    parser.add_argument("--shapes", nargs="*", default=None)
    parser.add_argument("--compile-max-elements", type=int, default=None)
    parser.add_argument("--rep-ms", type=int, default=None)
    args = parser.parse_args(argv)
    new_args = argparse.Namespace(
        device=args.device, shapes=",".join(args.shapes) if args.shapes else None, dtype=None, classes=None,
        batch=None, quick=False, dry_run=args.dry_run, out=None, class_freq=None,
        implementations=",".join(OLD_NAMES[name] for name in args.only) if args.only else None,
        compile_max_elements=args.compile_max_elements, threads=None, seed=0, no_progress=True)
    result = step.run(new_args)
    old_of = {new: old for old, new in OLD_NAMES.items()}
    results = [dict(impl=old_of[r["implementation"]], shape=f"{r['batch']} x {r['classes']}",
                    dtype=r["dtype"],
                    median_ms=r.get("median_ms"), p20_ms=r.get("p20_ms"), p80_ms=r.get("p80_ms"),
                    note=r.get("reason", r.get("notes", "")))
               for r in result["results"] if r["implementation"] in old_of]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"environment": result["meta"], "results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
