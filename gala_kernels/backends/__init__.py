"""Which backend computes a call, and why a backend asked for by name is unavailable.

Backends (docs/contract.md): ``"torch"`` (the reference), ``"cpu"`` (C++ op), ``"triton"`` (GPU, or CPU
tensors under ``TRITON_INTERPRET=1``), ``"cuda"`` (CUDA C++ op). ``"auto"`` picks the fastest
one built for the tensor's device: ``cpu`` for CPU tensors (else ``torch``); on CUDA tensors the
rule in :func:`auto_cuda_backend`.

Every backend is a custom op with the schema of ``gala::fused_ce_fwd`` (``torch``: the reference
wrapped by :mod:`.reference_op`). The GPU backends (``triton``, ``cuda``) also have the training
step ops of :mod:`.step` (no host synchronisation, the fold on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch

from .. import _extension, ops
from . import cuda_rule, reference_op
from .interpret import triton_interpret_enabled  # noqa: F401 (re-exported)

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and how to get it."""


try:  # imported eagerly: torch.compile cannot trace a lazy importlib call
    from . import triton_gala as _triton_gala  # never raises when triton itself is missing
except ImportError:  # pragma: no cover
    _triton_gala = None


def _triton_module():
    return _triton_gala


@dataclass(frozen=True)
class OpFamily:
    """Where the backends of one op come from, for :func:`availability` and :func:`resolve`.

    ``native_op`` names ``torch.ops.gala.<native_op>`` (the C++ op), ``load_native`` returns it
    (registering its fake) or None, ``triton`` is the module of its Triton kernel (with an
    ``availability(device)`` function) or None, ``cuda_kernel`` says whether a CUDA C++ kernel
    exists at all, and ``prefer_cuda(batch, num_classes, dtype)`` is the rule by which ``"auto"``
    picks it over Triton on a CUDA tensor.
    """

    native_op: str
    load_native: Callable[[], Optional[Callable]]
    triton: Optional[ModuleType]
    cuda_kernel: bool = True
    prefer_cuda: Callable[[int, int, torch.dtype], bool] = cuda_rule.prefer_cuda


FUSED_CE = OpFamily("fused_ce_fwd", ops.native_fused_ce, _triton_gala)


def availability(name: str, device: torch.device, family: OpFamily = FUSED_CE) -> Tuple[bool, str]:
    """``(available, reason_if_not)`` for backend ``name`` of ``family`` on ``device``."""
    rebuild = "build it with `pip install --no-build-isolation -e .`"
    if name == "torch":
        return True, ""
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the 'cpu' backend runs on CPU tensors, got a tensor on {device}"
        if family.load_native() is None:
            if not _extension.load():
                reason = _extension.unavailable_reason()
                return False, f"the compiled extension gala_kernels._C is not loaded ({reason}); {rebuild}"
            return False, f"gala_kernels._C was built without gala::{family.native_op}; {rebuild}"
        return True, ""
    if name == "cuda":
        if not family.cuda_kernel:
            return False, (
                f"there is no CUDA C++ kernel of gala::{family.native_op}; use backend='triton' (or 'auto')"
            )
        if device.type != "cuda":
            return False, f"the 'cuda' backend runs on CUDA tensors, got a tensor on {device}"
        family.load_native()
        if not _extension.has_kernel(family.native_op, "CUDA"):
            return False, (
                "gala_kernels._C was built without CUDA kernels; rebuild with a CUDA build of torch "
                "and nvcc on PATH: `pip install --no-build-isolation -e .`"
            )
        return True, ""
    if name == "triton":
        if family.triton is None:
            return False, "Triton is not installed (`pip install triton`)"
        return family.triton.availability(device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def auto_cuda_backend(logits: torch.Tensor, family: OpFamily = FUSED_CE,
                      shape: Optional[Tuple[int, int]] = None) -> str:
    """The backend ``"auto"`` uses for a CUDA tensor: the CUDA C++ op where the family's
    ``prefer_cuda`` (for the fused loss, :func:`cuda_rule.prefer_cuda`) says it is faster for the
    ``(B, C)`` logits shape (``shape``, else ``logits.shape``), else Triton; the reference when
    neither is built."""
    cuda_ok = availability("cuda", logits.device, family)[0]
    triton_ok = availability("triton", logits.device, family)[0]
    rows, classes = shape if shape is not None else logits.shape
    if cuda_ok and (not triton_ok or family.prefer_cuda(rows, classes, logits.dtype)):
        return "cuda"
    return "triton" if triton_ok else "torch"


def resolve(backend: str, logits: torch.Tensor, family: OpFamily = FUSED_CE,
            shape: Optional[Tuple[int, int]] = None) -> str:
    """The concrete backend for ``logits``; raises with the reason if a named one cannot run.

    ``shape`` is the ``(B, C)`` of the logits the op will see when ``logits`` is another tensor
    of the same device and dtype (``fused_linear_gala_ce`` passes ``x``, whose columns are not
    classes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = logits.device
    if backend == "auto":
        if device.type == "cuda":
            return auto_cuda_backend(logits, family, shape)
        if device.type == "cpu" and availability("cpu", device, family)[0]:
            return "cpu"
        return "torch"
    ok, reason = availability(backend, device, family)
    if not ok:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
    return backend


def fused_ce_op(name: str) -> Callable:
    """The forward op of backend ``name``."""
    if name == "torch":
        return reference_op.reference_fused_ce
    if name in ("cpu", "cuda"):
        op: Optional[Callable] = ops.native_fused_ce()
    elif name == "triton":
        op = _triton_module().fused_ce_op()
    else:
        raise ValueError(f"no fused op for backend {name!r}")
    assert op is not None
    return op


def triton_inplace_fused_ce(*args):
    """The Triton op that writes the gradient into the logits: ``(loss, raw, raw_pairwise, counts)``."""
    return _triton_module().fused_ce_inplace(*args)
