"""Which fused backend ``backend="auto"`` should use for a CUDA tensor: ``cuda`` or ``triton``.

Both backends compute the same op (``gala::fused_ce_fwd``). Where they differ is fixed cost
against streaming speed:

- the CUDA C++ op (csrc/cuda) is dispatched from C++, launches two kernels (prepare + forward)
  and keeps each row in registers, so it should win where a step is short and launch overhead
  dominates (a classifier step: B 256 to 1024, C 1,000 to 8,142);
- the Triton kernel is tuned per shape and is the reference GPU backend for large steps.

PROVISIONAL: no GPU was available when this rule was written, so the threshold below is a
guess, not a measurement. ``bench/gpu_check_cuda.sh`` (bench/bench_cuda.py) measures both
backends side by side and prints the measured crossover (the largest B x C where ``cuda`` is
still faster); replace ``SMALL_STEP_ELEMENTS`` with it and record the numbers in
bench/results/cuda_vs_triton_*.md.
"""

from __future__ import annotations

import torch

# Logit elements (B x C) up to which the CUDA op is preferred. 16M covers 512 x 8142 (4.2M) and
# 1024 x 1000 (1M), the small shapes of issue 4, and leaves 4096 x 8142 (33M) and 8192 x 32768
# (268M) to Triton. Awaiting the GPU measurement.
SMALL_STEP_ELEMENTS = 16 * 1024 * 1024

# Rows longer than this leave the CUDA op's register kernels for its streamed kernel (two reads
# of each row), where Triton's tiled two-sweep kernel is expected to be at least as fast.
CUDA_REGISTER_MAX_CLASSES = 16381


def prefer_cuda(batch: int, num_classes: int, dtype: torch.dtype) -> bool:
    """True when the CUDA C++ op is expected to beat the Triton kernel for ``(batch, num_classes)``.

    ``dtype`` is part of the signature because the measured crossover may differ between fp32
    and 16-bit logits; the provisional rule does not use it yet.
    """
    if batch < 1 or num_classes < 1:
        return False  # an empty step: nothing to win either way
    del dtype  # provisional: the same threshold for every dtype
    if num_classes > CUDA_REGISTER_MAX_CLASSES:
        return False
    return batch * num_classes <= SMALL_STEP_ELEMENTS
