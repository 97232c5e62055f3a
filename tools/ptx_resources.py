"""Development tool: compile the Triton GALA kernels for a GPU target without a GPU; print their resources.

The real Triton compiler (not the interpreter) lowers each kernel to PTX and a cubin for the target
(default sm_90, H100/H200); Triton's bundled ``cuobjdump`` then gives registers per thread and
stack bytes (``--dump-resource-usage``), and the SASS, whose local-memory stores and loads
(``STL`` / ``LDL``, counted in the code, not executed) are the register spills. This is how the
launch rule in ``gala_kernels/backends/triton_gala.py`` is sized, and a compile check that runs
on any machine: it catches what the interpreter cannot (types of loop-carried values,
unsupported operations, registers, spills).

    python tools/ptx_resources.py                 # every kernel, the configs the rule picks
    python tools/ptx_resources.py --quick         # plain and weight+smoothing, two shapes (the tests)
    python tools/ptx_resources.py --dtype bf16 fp32 --out bench/results
                                                  # also ptx_resources_sm90_<machine>.md / .json

TRITON_INTERPRET must be unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gala_kernels.backends import triton_ce_kernels as kernels
from gala_kernels.backends import triton_gala
from gala_kernels.benchmark import machine, report

# pointer arguments of the kernels that are not float32, by name ({dtype} = the logits dtype)
POINTER_TYPES = {
    "logits_ptr": "*{dtype}",
    "grad_ptr": "*{dtype}",
    "loss_ptr": "*{dtype}",
    "labels_ptr": "*i64",
    "counts_ptr": "*i64",
    "label_error_ptr": "*i64",
    "steps_ptr": "*i64",
    "nonfinite_ptr": "*i64",
    "grad_output_ptr": "*fp32",
}
FLOAT_SCALARS = ("lambda1", "eps", "label_smoothing", "ema_beta")


def compile_kernel(fn, constexprs, *, dtype="bf16", num_warps=4, capability=90):
    """``triton.compile`` of one kernel for one set of compile-time switches."""
    signature = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*fp32").format(dtype=dtype)
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def resource_usage(compiled) -> str:
    """``REG:n STACK:m SPILL:stores/loads`` of the compiled cubin, from Triton's bundled cuobjdump:
    registers per thread, stack bytes, and the SASS's local-memory store and load instructions."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        def dump(flag):
            return subprocess.run([cuobjdump, flag, cubin.name], capture_output=True, text=True)

        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    match = re.search(r"REG:\d+ STACK:\d+", usage.stdout)
    if not match or sass.returncode != 0:
        return "unknown"
    stores = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass.stdout))
    loads = len(re.findall(r"\bLDL(?:\.\w+)*\b", sass.stdout))
    return f"{match.group(0)} SPILL:{stores}/{loads}"


def loss_switches(config, *, training=True, weight=False, smoothing=False, reduction=1, pairwise=False):
    """The constexprs of a loss kernel: a training step (bias from the state, fold) or plain CE."""
    return dict(
        REDUCTION=reduction,
        BIAS_MODE=triton_gala.BIAS_FROM_STATE if training else triton_gala.BIAS_NONE,
        HAS_WEIGHT=weight,
        HAS_SMOOTHING=smoothing,
        COMPUTE_STATS=training,
        TRACK_PAIRWISE=pairwise,
        WRITE_COUNTS=not training,
        RECORD_BAD_LABELS=training,
        FOLD=training and not pairwise,
        ACCUMULATION=0,
        COMPUTE_FP64=False,
        BLOCK_C=config.block_c,
        ROWS_PER_TILE=config.rows_per_tile,
        FOLD_BLOCK=triton_gala.FOLD_BLOCK,
    )


def variants(quick: bool):
    """``(description, kernel, constexprs, num_warps)`` of what to compile."""
    shapes = (
        [(512, 8142), (8192, 32768)]
        if quick
        else [(4096, 37), (4096, 1000), (512, 8142), (8192, 32768), (2048, 131072)]
    )
    options = (
        [dict(), dict(weight=True, smoothing=True)]
        if quick
        else [
            dict(),
            dict(weight=True, smoothing=True),
            dict(training=False, reduction=0),
            dict(pairwise=True, reduction=2),
        ]
    )
    for B, C in shapes:
        config = triton_gala.choose_config(B, C)
        for flags in options:
            switches = loss_switches(config, **flags)
            label = f"{B} x {C} rows={config.rows_per_tile} block={config.block_c} "
            label += f"warps={config.num_warps} {flags}"
            if config.single_block:
                yield (
                    label,
                    kernels.gala_ce_rows_kernel,
                    dict(switches, COUNT_IN_KERNEL=True, LABEL_BLOCK=triton_gala.LABEL_BLOCK),
                    config.num_warps,
                )
            else:
                yield (
                    label,
                    kernels.gala_ce_partials_kernel,
                    {
                        k: switches[k]
                        for k in (
                            "BIAS_MODE",
                            "HAS_WEIGHT",
                            "HAS_SMOOTHING",
                            "COMPUTE_FP64",
                            "BLOCK_C",
                            "ROWS_PER_TILE",
                        )
                    },
                    config.num_warps,
                )
                yield (
                    label,
                    kernels.gala_ce_columns_kernel,
                    dict(switches, SLICE_BLOCK=min(triton_gala.MAX_SLICE_BLOCK, C // config.block_c)),
                    config.num_warps,
                )
    yield (
        "count rows",
        kernels.gala_count_rows_kernel,
        dict(HAS_WEIGHT=True, COMPUTE_FP64=False, LABEL_BLOCK=triton_gala.LABEL_BLOCK),
        4,
    )
    yield (
        "fold (pairwise)",
        kernels.gala_fold_kernel,
        dict(
            ACCUMULATION=0,
            TRACK_PAIRWISE=True,
            FOLD_BLOCK=triton_gala.FOLD_BLOCK,
            PAIRWISE_BLOCK=triton_gala.PAIRWISE_FOLD_BLOCK,
        ),
        16,
    )
    yield (
        "scale grad",
        kernels.scale_grad_kernel,
        dict(COMPUTE_FP64=False, BLOCK=triton_gala.SCALE_BLOCK),
        4,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few variants only")
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"],
                        help="logits dtypes, one column each")
    parser.add_argument("--out", help="also write the table as a result file under this folder")
    args = parser.parse_args(argv)
    if triton_gala.triton_interpret_enabled():
        print("TRITON_INTERPRET is set: unset it to run the compiler", file=sys.stderr)
        return 2
    started = time.time()
    meta = machine.machine_info(torch.device("cpu"))
    target = f"sm_{args.capability}"
    header = "| kernel | variant | " + " | ".join(f"{target} usage ({dtype})" for dtype in args.dtype) + " |"
    lines = [header, "|---|---|" + "---|" * len(args.dtype)]
    print("\n".join(lines), flush=True)
    records = []
    for label, fn, constexprs, num_warps in variants(args.quick):
        usages = {
            dtype: resource_usage(compile_kernel(fn, constexprs, dtype=dtype, num_warps=num_warps,
                                                 capability=args.capability))
            for dtype in args.dtype
        }
        records.append({"kernel": fn.__name__, "variant": label, "usage": usages})
        lines.append(f"| {fn.__name__} | {label} | " + " | ".join(usages.values()) + " |")
        print(lines[-1], flush=True)
    if args.out:
        meta.update(load_average_end=machine.load_average(), total_seconds=round(time.time() - started, 1))
        markdown = report.document(
            f"Triton kernels compiled for {target}: registers and spills",
            f"Every Triton kernel of the GALA step compiled by Triton {triton.__version__} for {target} "
            "with the real compiler (no GPU), at the launch configurations `choose_config` picks. "
            "`REG`: registers per thread; `STACK`: stack bytes per thread; `SPILL: stores/loads`: the "
            "local-memory store and load instructions in the SASS (counted in the code, not executed): "
            "the register spills.",
            meta, [("", "\n".join(lines))])
        paths = report.write_result(args.out, f"ptx_resources_{target.replace('_', '')}", torch.device("cpu"),
                                    markdown, {"meta": meta, "target": target, "records": records})
        print(f"wrote {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
