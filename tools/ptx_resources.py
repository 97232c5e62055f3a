"""Development tool: compile the Triton GALA kernel for a GPU target without a GPU; print its resources.

The real Triton compiler (not the interpreter) lowers the kernel to PTX and a cubin for the target
(default sm_90, H100/H200); ``cuobjdump --dump-resource-usage`` (shipped with Triton) then gives
registers per thread and stack (spill) bytes. This is how the block-size rule in
``gala_kernels/backends/triton_gala.py`` was sized, and a compile check that runs on any machine.

    python tools/ptx_resources.py                 # the configs the rule picks for typical shapes
    python tools/ptx_resources.py --quick         # a few variants (used by tests/test_triton.py)

TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gala_kernels.backends import triton_gala

POINTER_ARGS = ("logits_ptr", "labels_ptr", "class_bias_ptr", "grad_ptr", "loss_ptr", "raw_stats_ptr",
                "raw_pairwise_ptr", "workspace_ptr", "counts_ptr", "n_valid_ptr")
INT_ARGS = ("B", "C", "logits_row_stride", "grad_row_stride", "ignore_index")


def compile_kernel(config, dtype="bf16", *, reduction=1, stats=True, pairwise=False, count_in_kernel=True,
                   has_bias=True, capability=90):
    """The compiled kernel (``triton.compile``) for one config and one set of switches."""
    pointer_types = dict(zip(POINTER_ARGS, (f"*{dtype}", "*i64", "*fp32", f"*{dtype}", f"*{dtype}", "*fp32",
                                            "*fp32", "*fp32", "*i64", "*i64")))
    signature = {**pointer_types, **{name: "i32" for name in INT_ARGS}}
    constexprs = dict(
        REDUCTION=reduction, HAS_BIAS=has_bias, COMPUTE_STATS=stats, TRACK_PAIRWISE=pairwise,
        COUNT_IN_KERNEL=count_in_kernel, COMPUTE_FP64=False, SINGLE_BLOCK=config.single_block,
        BLOCK_C=config.block_c, ROWS_PER_TILE=config.rows_per_tile, LABEL_BLOCK=triton_gala.LABEL_BLOCK,
    )
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=triton_gala._gala_ce_fwd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps})


def resource_usage(compiled) -> str:
    """``REG:n STACK:m`` of the compiled cubin, from Triton's bundled cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    match = re.search(r"REG:\d+ STACK:\d+", out.stdout)
    return match.group(0) if match else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few variants only")
    parser.add_argument("--capability", type=int, default=90)
    args = parser.parse_args(argv)
    if triton_gala.triton_interpret_enabled():
        print("TRITON_INTERPRET is set: unset it to run the compiler", file=sys.stderr)
        return 2
    shapes = [(4096, 37), (512, 8142), (8192, 32768)] if args.quick else [
        (4096, 1), (4096, 37), (4096, 1000), (4096, 8142), (8192, 32768), (2048, 131072), (4, 1_000_000)]
    dtypes = ("bf16",) if args.quick else ("bf16", "fp32")
    switches = [dict(reduction=1, stats=True), dict(reduction=0, stats=False, count_in_kernel=False)]
    if not args.quick:
        switches.append(dict(reduction=2, stats=True, pairwise=True))
    print(f"| B x C | dtype | config | switches | sm_{args.capability} usage |")
    print("|---|---|---|---|---|")
    for B, C in shapes:
        config = triton_gala.choose_config(B, C)
        for dtype in dtypes:
            for flags in switches:
                usage = resource_usage(compile_kernel(config, dtype, capability=args.capability, **flags))
                path = "single" if config.single_block else "two-sweep"
                described = f"{path} rows={config.rows_per_tile} block={config.block_c}"
                described += f" warps={config.num_warps}"
                print(f"| {B} x {C} | {dtype} | {described} | {flags} | {usage} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
