// The fold of a step's raw statistics into a GALAState, one element at a time (nvcc only), shared
// by the training step's last CTA (gala_ce_kernel.cu) and fold_step_ (gala_step_kernel.cu).
//
// With s = 1 / max(N, 1) (N: non-ignored rows of the step) and d = s * raw (fp32, as
// reference.fold_increments on float32 raw sums):
//   cumulative:  running += d;  state += running
//   sum:         state += d
//   ema:         state = beta * state + (1 - beta) * d
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gala_ce_kernel.cuh"

namespace gala::cuda {

// 1 / max(N, 1) rounded to fp32 once (the reference multiplies the fp32 sums by it in fp32).
__device__ __forceinline__ float fold_scale(float rows) {
  return static_cast<float>(__drcp_rn(fmax(static_cast<double>(rows), 1.0)));
}

// The new value of one state element, given its old value, its increment d and (cumulative mode
// only) its running sum, which is updated in place.
__device__ __forceinline__ float fold_value(float state, float& running, float d, AccumulationCode mode,
                                            float ema_beta, float ema_keep) {
  switch (mode) {
    case AccumulationCode::Cumulative:
      running = __fadd_rn(running, d);
      return __fadd_rn(state, running);
    case AccumulationCode::Sum:
      return __fadd_rn(state, d);
    default:
      return __fmaf_rn(ema_keep, d, __fmul_rn(state, ema_beta));
  }
}

// Reads raw[k] through L2 (written by other CTAs' atomics in this launch, or by an earlier
// launch) and leaves 0 in its place.
__device__ __forceinline__ float take_raw(float* raw) {
  const float value = __ldcg(raw);
  *raw = 0.0f;
  return value;
}

// One state vector of n elements folded from raw[0, n) by `threads` threads; this one handles
// elements first, first + threads, ... The raw sums are zeroed on the way. Each thread loads
// kUnroll elements (raw, state, running) before storing any, to keep many loads in flight: in a
// training step this loop runs on one CTA, after everything else, and its time is about one
// memory latency per iteration (see prefetch_fold_state for the other half of that).
__device__ __forceinline__ void fold_vector(float* raw, float* state, float* running, int64_t n, float s,
                                            AccumulationCode mode, float ema_beta, float ema_keep, int64_t first,
                                            int64_t threads) {
  constexpr int kUnroll = 8;
  const bool cumulative = mode == AccumulationCode::Cumulative;
  for (int64_t base = first; base < n; base += kUnroll * threads) {
    float d[kUnroll], old[kUnroll], run[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * threads;
      d[u] = old[u] = run[u] = 0.0f;
      if (k < n) {
        d[u] = __fmul_rn(take_raw(raw + k), s);
        old[u] = state[k];
        if (cumulative) run[u] = running[k];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * threads;
      if (k < n) {
        state[k] = fold_value(old[u], run[u], d[u], mode, ema_beta, ema_keep);
        if (cumulative) running[k] = run[u];
      }
    }
  }
}

// The three state vectors (pos_grad, neg_grad, cls_neg_grad; C each) folded from
// raw = scratch[0, 3C) (see fold_vector). The vector index is a compile-time constant after
// unrolling, so the pointer arrays stay in registers.
__device__ __forceinline__ void fold_state_vectors(float* raw, float* const (&state)[3], float* const (&running)[3],
                                                   int64_t C, float s, AccumulationCode mode, float ema_beta,
                                                   float ema_keep, int64_t first, int64_t threads) {
#pragma unroll
  for (int v = 0; v < 3; ++v) {
    fold_vector(raw + v * C, state[v], running[v], C, s, mode, ema_beta, ema_keep, first, threads);
  }
}

// Fetches the 128-byte line at `ptr` into L2 (no register written, no wait).
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}

// The state vectors (and running sums) a fold will read, fetched into L2 by `threads` threads
// (this one: lines first, first + threads, ...). A training step's CTAs call it before their
// ticket, so that its last CTA, which folds alone, finds them in L2 rather than in memory.
__device__ __forceinline__ void prefetch_fold_state(float* const (&state)[3], float* const (&running)[3], int64_t C,
                                                    bool cumulative, int64_t first, int64_t threads) {
  constexpr int kLineFloats = 32;
  const int64_t lines = (C + kLineFloats - 1) / kLineFloats;
  for (int64_t k = first; k < lines; k += threads) {
#pragma unroll
    for (int v = 0; v < 3; ++v) {
      prefetch_l2(state[v] + k * kLineFloats);
      if (cumulative) prefetch_l2(running[v] + k * kLineFloats);
    }
  }
}

}  // namespace gala::cuda
