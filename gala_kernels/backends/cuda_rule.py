"""Which fused backend ``backend="auto"`` should use for a CUDA tensor: ``cuda`` or ``triton``.

Both backends compute the same ops. Where they differ:

- rows that fit on chip (``C <= SINGLE_PASS_MAX_CLASSES``): the CUDA C++ op keeps each row in
  registers, is dispatched from C++ and was the faster of the two on every measured classifier
  shape (docs/performance.md has the measurements and how to repeat them: the ``crossover``
  benchmark);
- longer rows: the Triton backend's two-pass kernels read the logits twice and keep the column
  sums of a ``(column slice, row group)`` in registers (one atomic per column per row group); the
  CUDA op streams each row twice with a CTA per row and, above its shared-memory capacity, one
  global atomic per probability. So ``auto`` routes long rows to Triton.
"""

from __future__ import annotations

import torch

# Classes up to which a row fits in one on-chip block in both backends' single-pass kernels
# (the Triton rows kernel: gala_kernels/backends/triton_gala.py, MAX_SINGLE_BLOCK_C).
SINGLE_PASS_MAX_CLASSES = 8192


def prefer_cuda(batch: int, num_classes: int, dtype: torch.dtype) -> bool:
    """True when the CUDA C++ op is expected to beat the Triton kernels for ``(batch, num_classes)``.

    ``dtype`` is part of the signature because a crossover could differ between fp32 and 16-bit
    logits; the rule does not use it.
    """
    if batch < 1 or num_classes < 1:
        return False  # an empty step: nothing to win either way
    del dtype
    return num_classes <= SINGLE_PASS_MAX_CLASSES
