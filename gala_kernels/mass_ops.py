"""The mass pass of post-hoc re-balancing, one implementation per backend.

docs/rebalancing.md::

    mass[j] = sum_i softmax(z[i, :])[j]

Every backend computes one call's share, ``colsum[j] = sum_{i < B} softmax(z[i, :])[j]``, as a
``(C,)`` tensor in the math dtype (float32 for float32 / bfloat16 / float16 logits, float64 for
float64 logits); :class:`gala_kernels.PredictionRebalancer` adds it into its float64 ``mass``.
A row holding NaN or +inf, or -inf everywhere, adds NaN to every column (as ``torch.softmax``);
a -inf entry has probability 0.

Backends: ``"torch"`` (eager reference), ``"cpu"`` and ``"cuda"`` (``torch.ops.gala.softmax_colsum``,
the C++ ops of csrc/cpu and csrc/cuda), ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``"auto"`` picks ``cpu`` for CPU tensors; for CUDA tensors the CUDA op
(:func:`prefer_cuda_mass`), else Triton; ``torch`` when nothing is built.
The C++ ops are deterministic (bitwise, for a given device and thread count or GPU); the Triton
kernel adds its programs' partial sums with atomics.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from . import _extension, backends
from .reference import compute_dtype as math_dtype  # float64 for float64 logits, else float32

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_logits(logits: torch.Tensor, num_classes: Optional[int] = None, *, what: str = "logits") -> None:
    """Raise ValueError / TypeError naming the problem with a ``(B, C)`` logits tensor."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{what} must be 2-D (B, C), got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"{what} have {logits.shape[1]} columns but num_classes={num_classes}; "
            f"pass (B, {num_classes}) logits"
        )
    if logits.shape[1] < 1:
        raise ValueError(f"{what} must have at least one class, got shape {tuple(logits.shape)}")


def softmax_colsum_torch(logits: torch.Tensor) -> torch.Tensor:
    """Eager reference: ``softmax(z, 1).sum(0)`` in the math dtype."""
    return torch.softmax(logits, dim=1, dtype=math_dtype(logits.dtype)).sum(0)


def softmax_colsum_fake(logits: torch.Tensor) -> torch.Tensor:
    """Shape and dtype of ``softmax_colsum`` (used by torch.compile / FakeTensor)."""
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D (B, C)")
    return logits.new_empty((logits.shape[1],), dtype=math_dtype(logits.dtype))


def softmax_colsum_add_fake(logits: torch.Tensor, out: torch.Tensor, variant: str = "",
                            ctas_per_sm: int = 0) -> None:
    """``softmax_colsum_add_`` mutates ``out`` and returns nothing."""
    torch._check(logits.dim() == 2, lambda: "logits must be 2-D (B, C)")


_registered_native = False


def native_softmax_colsum() -> Optional[Callable]:
    """``torch.ops.gala.softmax_colsum`` from the compiled extension (its fake registered on
    first use), or None when the extension is not built or predates the op."""
    global _registered_native
    if not _extension.has_kernel("softmax_colsum", "CPU"):
        return None
    if not _registered_native:
        torch.library.register_fake("gala::softmax_colsum")(softmax_colsum_fake)
        if _extension.has_kernel("softmax_colsum_add_", "CPU"):
            torch.library.register_fake("gala::softmax_colsum_add_")(softmax_colsum_add_fake)
        _registered_native = True
    return torch.ops.gala.softmax_colsum


try:  # imported eagerly: torch.compile cannot trace a lazy importlib call
    from .backends import triton_mass as _triton_mass  # never raises when triton itself is missing
except ImportError:  # pragma: no cover
    _triton_mass = None

def prefer_cuda_mass(batch: int, num_classes: int, dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` runs the mass pass of CUDA logits with the CUDA C++ op (else Triton).

    Always, where it is built: on an H200, over 24,426 x 8,142 fp32 logits, the CUDA op beat
    Triton both streamed in batches of 512 rows and in one call (docs/performance.md, "mass").
    """
    del batch, num_classes, dtype
    return True


MASS = backends.OpFamily("softmax_colsum", native_softmax_colsum, _triton_mass, prefer_cuda=prefer_cuda_mass)


def availability(name: str, device: torch.device) -> Tuple[bool, str]:
    """``(available, reason_if_not)`` for the mass pass of backend ``name`` on ``device``."""
    return backends.availability(name, device, MASS)


def softmax_colsum(logits: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``colsum[j] = sum_i softmax(logits[i, :])[j]`` as a ``(C,)`` tensor in the math dtype."""
    check_logits(logits)
    return _colsum(logits, backends.resolve(backend, logits, MASS))


def _colsum(logits: torch.Tensor, name: str) -> torch.Tensor:
    if name == "torch":
        return softmax_colsum_torch(logits)
    if name in ("cpu", "cuda"):  # one op, dispatched on the logits' device
        return native_softmax_colsum()(logits)
    return _triton_mass.softmax_colsum_op()(logits)


def accumulate_softmax_colsum(logits: torch.Tensor, out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``out += softmax_colsum(logits)`` for a contiguous float32/float64 ``(C,)`` ``out``.

    Outside ``torch.compile`` the C++ ops (``gala::softmax_colsum_add_``) and the Triton kernel
    add into ``out`` themselves: no temporary and no extra launch (a streamed evaluation calls
    this once per batch, where launch and allocation overheads dominate a GPU's few microseconds
    of work).
    """
    check_logits(logits)
    name = backends.resolve(backend, logits, MASS)
    if name in ("cpu", "cuda") and not torch.compiler.is_compiling():
        native_softmax_colsum()  # registers the fakes on first use
        torch.ops.gala.softmax_colsum_add_(logits, out)
        return out
    if name == "triton" and not torch.compiler.is_compiling():
        return _triton_mass.softmax_colsum_triton(logits, out)
    return out.add_(_colsum(logits, name).to(out.dtype))
