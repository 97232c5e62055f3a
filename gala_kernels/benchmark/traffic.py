"""Modelled memory traffic of the Triton kernels, counted under the Triton interpreter.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) every load, store and atomic of a
kernel goes through the interpreter's builder. :func:`count_traffic` wraps those calls and counts,
per kernel and in all, the launches and the bytes loaded, stored and updated atomically (only the
lanes a mask lets through). It is a model with no cache: a value read twice counts twice, as it
costs twice from HBM unless the L2 keeps it. The interpreter's own work (copying the arguments of
a launch to and from the host) runs under the profiler label :data:`INTERPRETER_RUN`, so that a
profile of a step can leave it out: a GPU launch does not do it.

:func:`model_step` runs one training step of ``fused_gala_ce(..., backend="triton")`` on CPU
tensors and returns the figures the benchmark prints next to its timings (``python -m
gala_kernels.benchmark.traffic --batch 128 --classes 20000 --dtype bfloat16`` prints them too):

    logit reads      bytes loaded from the logits / their size
    bytes / floor    all bytes moved by the loss kernels / (read the logits once + write the
                     gradient once, 2 * B * C * itemsize)
    atomics          elements updated atomically
    fold bytes       what the fold of the statistics into the state moves (O(C), any B): counted on
                     its own by letting the step leave its sums for gala_fold_kernel, as a
                     distributed step does; the loss kernels' figures above exclude it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from typing import Dict, Optional

import numpy as np

INTERPRETER_RUN = "triton_interpreter_run"
FOLD_KERNEL = "gala_fold_kernel"


@dataclasses.dataclass
class KernelTraffic:
    launches: int = 0
    loaded_bytes: int = 0
    stored_bytes: int = 0
    atomic_elements: int = 0
    atomic_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.loaded_bytes + self.stored_bytes + self.atomic_bytes


@dataclasses.dataclass
class Traffic:
    """What the kernels launched inside a :func:`count_traffic` block did to memory."""

    kernels: Dict[str, KernelTraffic] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(KernelTraffic))
    # per watched tensor: bytes loaded, stored, updated atomically inside its storage
    watched: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)

    def total(self, exclude=()) -> KernelTraffic:
        out = KernelTraffic()
        for name, k in self.kernels.items():
            if name in exclude:
                continue
            for field in dataclasses.fields(KernelTraffic):
                setattr(out, field.name, getattr(out, field.name) + getattr(k, field.name))
        return out

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels.values())


def _element_bytes(handle) -> int:
    ty = handle.get_element_ty() if hasattr(handle, "get_element_ty") else handle.dtype
    return max(1, getattr(ty, "primitive_bitwidth", 32) // 8)


def _lanes(handle, mask=None) -> np.ndarray:
    addresses = np.asarray(getattr(handle, "data", 0)).astype(np.uint64).ravel()
    if mask is not None and getattr(mask, "data", None) is not None:
        addresses = addresses[np.asarray(mask.data).ravel().astype(bool)]
    return addresses


@contextlib.contextmanager
def count_traffic(watch: Optional[dict] = None):
    """Count the global-memory traffic of every Triton kernel launched inside the block.

    ``watch``: optional ``{name: tensor}``; the traffic inside each tensor's storage is also
    counted on its own (e.g. how many times the logits are read).
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("count_traffic needs TRITON_INTERPRET=1 set before triton is imported")
    import torch
    import triton.runtime.interpreter as interpreter

    builder = interpreter.InterpreterBuilder
    traffic = Traffic()
    ranges = []
    for name, tensor in (watch or {}).items():
        start = tensor.data_ptr()
        ranges.append((name, start, start + tensor.numel() * tensor.element_size()))
        traffic.watched[name] = {"load": 0, "store": 0, "atomic": 0}
    current = {"kernel": None}
    saved = {}

    def note(kind, handle, mask=None):
        lanes = _lanes(handle, mask)
        size = _element_bytes(handle)
        k = traffic.kernels[current["kernel"]]
        if kind == "load":
            k.loaded_bytes += lanes.size * size
        elif kind == "store":
            k.stored_bytes += lanes.size * size
        else:
            k.atomic_elements += lanes.size
            k.atomic_bytes += lanes.size * size
        for name, lo, hi in ranges:
            traffic.watched[name][kind] += int(np.count_nonzero((lanes >= lo) & (lanes < hi))) * size

    def wrap(method, kind, pointer_position, mask_position=None):
        saved[method] = getattr(builder, method)

        def counted(self, *args, **kwargs):
            mask = args[mask_position] if mask_position is not None else None
            note(kind, args[pointer_position], mask)
            return saved[method](self, *args, **kwargs)

        setattr(builder, method, counted)

    wrap("create_load", "load", 0)
    wrap("create_masked_load", "load", 0, 1)
    wrap("create_store", "store", 0)
    wrap("create_masked_store", "store", 0, 2)
    wrap("create_atomic_rmw", "atomic", 1, 3)
    wrap("create_atomic_cas", "atomic", 0)

    original_run = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if kwargs.get("warmup", False):
            return original_run(self, *args, **kwargs)
        current["kernel"] = self.__name__
        traffic.kernels[self.__name__].launches += 1
        with torch.profiler.record_function(INTERPRETER_RUN):
            return original_run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        yield traffic
    finally:
        interpreter.InterpretedFunction.run = original_run
        for method, fn in saved.items():
            setattr(builder, method, fn)


def model_step(batch: int, classes: int, dtype: str = "float32", *, with_state: bool = True,
               weight: bool = False, label_smoothing: float = 0.0, seed: int = 0) -> dict:
    """The modelled traffic of one training step (forward + backward) of the Triton backend.

    Runs in this process, which must have TRITON_INTERPRET=1 set before triton was imported; see
    :func:`model_step_in_subprocess` otherwise.
    """
    import torch

    import gala_kernels as gk
    from gala_kernels import label_errors
    from gala_kernels.backends import step as device_step

    torch.manual_seed(seed)
    logits = torch.randn(batch, classes, dtype=getattr(torch, dtype))
    labels = torch.randint(0, classes, (batch,))
    class_weight = torch.rand(classes) + 0.5 if weight else None
    state = gk.GALAState(classes) if with_state else None
    kwargs = dict(backend="triton", weight=class_weight, label_smoothing=label_smoothing)

    saved = label_errors.deferred_on_cpu, device_step.folds_in_kernel
    label_errors.deferred_on_cpu = True  # as on a GPU: no look at the labels before the kernel
    device_step.folds_in_kernel = lambda _state: False  # the fold on its own, in gala_fold_kernel
    try:
        z = logits.clone().requires_grad_(True)
        with count_traffic({"logits": z}) as traffic:
            gk.fused_gala_ce(z, labels, state, **kwargs).backward()
    finally:
        label_errors.deferred_on_cpu, device_step.folds_in_kernel = saved
    floor = 2 * logits.numel() * logits.element_size()
    loss_kernels = traffic.total(exclude=(FOLD_KERNEL, "scale_grad_kernel"))
    fold = traffic.kernels.get(FOLD_KERNEL, KernelTraffic())
    return {
        "batch": batch, "classes": classes, "dtype": dtype, "with_state": with_state,
        "launches": traffic.launches,
        "kernels": {name: k.launches for name, k in traffic.kernels.items()},
        "logit_reads": traffic.watched["logits"]["load"] / (logits.numel() * logits.element_size()),
        "bytes_over_floor": loss_kernels.total_bytes / floor,
        "atomics": loss_kernels.atomic_elements,
        "fold_bytes": fold.total_bytes,
        "floor_bytes": floor,
    }


def model_step_in_subprocess(batch: int, classes: int, dtype: str = "float32", **kwargs) -> dict:
    """:func:`model_step` in a fresh Python with TRITON_INTERPRET=1 (usable from a GPU process)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    arguments = ["--batch", str(batch), "--classes", str(classes), "--dtype", dtype, "--json"]
    if not kwargs.get("with_state", True):
        arguments.append("--no-state")
    out = subprocess.run([sys.executable, "-m", "gala_kernels.benchmark.traffic", *arguments], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no output")
    return json.loads(out.stdout.strip().splitlines()[-1])


# The interpreter runs a kernel in numpy, tile by tile: beyond this many logits a benchmark models
# fewer rows of the same width (the traffic per row hardly depends on B; the grid does, a little).
MODEL_MAX_ELEMENTS = 1 << 22


def model_case(batch: int, classes: int, dtype: str) -> dict:
    """The modelled traffic of one benchmark case's Triton training step, with the batch it was
    modelled at (``model_batch``: ``batch``, or fewer rows for a large case, see
    MODEL_MAX_ELEMENTS). In this process under the interpreter, else in a subprocess."""
    model_batch = max(1, min(batch, MODEL_MAX_ELEMENTS // max(classes, 1)))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        figures = model_step(model_batch, classes, dtype)
    else:
        figures = model_step_in_subprocess(model_batch, classes, dtype)
    return {"model_batch": model_batch, "model_logit_reads": figures["logit_reads"],
            "model_bytes_over_floor": figures["bytes_over_floor"], "model_atomics": figures["atomics"],
            "model_fold_bytes": figures["fold_bytes"], "model_launches": figures["launches"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20000)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-state", action="store_true", help="plain cross-entropy (state=None)")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        parser.error("set TRITON_INTERPRET=1 (the model runs the kernels in Triton's interpreter)")
    figures = model_step(args.batch, args.classes, args.dtype, with_state=not args.no_state)
    if args.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key:>17}  {value}")


if __name__ == "__main__":
    main()
