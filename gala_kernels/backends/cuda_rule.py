"""Which fused backend ``backend="auto"`` should use for a CUDA tensor: ``cuda`` or ``triton``.

Both backends compute the same op (``gala::fused_ce_fwd``). Where they differ is fixed cost
against streaming speed:

- the CUDA C++ op (csrc/cuda) is dispatched from C++, launches two kernels (prepare + forward)
  and keeps each row in registers, so it should win where a step is short and launch overhead
  dominates (a classifier step: B 256 to 1024, C 1,000 to 8,142);
- the Triton kernel is tuned per shape and is the reference GPU backend for large steps.

Measured (bench/results/cuda_vs_triton_nvidia_h200.md, NVIDIA H200, torch 2.11, Triton 3.6,
2026-11-27): over B in 128..8192, C in {1000, 8142, 32768}, fp32 and bf16 (42 shapes), the full
step with ``cuda`` was faster than with ``triton`` at every shape (0.52-1.90 ms against
0.90-5.06 ms). At C = 131,072 (2048 rows, bf16, bench/results/gpu_bench_nvidia-h200_*.md, three
runs) the whole step was still faster with ``cuda`` (4.91-5.03 ms against 5.21-5.32 ms), and the
Triton op alone took 4.37 ms (the CUDA op was not timed alone there). Past the C that fits its
shared-memory column accumulators (~56K classes on sm_90, ~40K on sm_80) the CUDA op adds every
probability to the statistics with a global atomic, and the fused-linear measurements at
C = 100,000 (bench/results/linear_cuda.md) were made with Triton. Hence the rule: ``cuda`` up to
``CUDA_SHARED_STATS_MAX_CLASSES`` classes, any batch; ``triton`` beyond. That bound is a choice
(the sm_80 shared-memory limit), not a measured crossover: no measured shape had Triton ahead for
the whole step, and nothing between 32,768 and 131,072 classes was measured.
Re-measure with ``bench/bench_cuda.py`` (``bench/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import torch

# Classes up to which the CUDA op keeps its statistics' column sums in shared memory on every
# supported GPU (sm_80: ~40K fp32 per CTA with the padding; sm_90: ~56K).
CUDA_SHARED_STATS_MAX_CLASSES = 40_000


def prefer_cuda(batch: int, num_classes: int, dtype: torch.dtype) -> bool:
    """True when the CUDA C++ op is expected to beat the Triton kernel for ``(batch, num_classes)``.

    ``dtype`` is part of the signature because a crossover could differ between fp32 and 16-bit
    logits; on the H200 it did not (the same winner for fp32 and bf16 at every measured shape).
    """
    if batch < 1 or num_classes < 1:
        return False  # an empty step: nothing to win either way
    del dtype
    return num_classes <= CUDA_SHARED_STATS_MAX_CLASSES
