// Fused GALA cross-entropy, CUDA: loss, gradient and per-class statistics in one pass per row.
//
// Per row i with label y (SPEC.md):
//   a[j]    = z[j] + class_bias[j]              class_bias = lambda1 * log(pos_grad + eps)
//   m       = max_j a[j]
//   S_other = sum_{j != y} exp(a[j] - m)        S = S_other + exp(a[y] - m)
//   loss_i  = lse - a[y] = log(S) - (a[y] - m)
//   p[j]    = exp(a[j] - m) / S
//   grad[j] = (p[j] - [j == y]) * w             w = 1/N ("mean") or 1; grad[y] = -(S_other / S) * w
//   raw_pos[y] += sum_{j != y} p[j] = S_other / S   (no 1 - p[y] cancellation)
//   raw_neg[y] += the same value
//   raw_clsneg[j] += p[j] for j != y
//   raw_pair[j, y] += |p[j] - [j == y]|         (optional)
// The lambda2 term is constant along a row and changes nothing, so it is skipped.
// Ignored rows: loss 0, grad 0. Rows holding a non-finite a[j]: loss NaN, grad NaN, no statistics,
// counted in counts[1]. Rows whose label is out of range (only reachable when the binding's
// host-side check is skipped, see gala_ce_cuda_binding.cpp): loss NaN, grad NaN, no statistics;
// such a label is never used as an index.
//
// Kernels (every one keeps math in fp32, fp64 for double logits):
//   gala_ce_prepare_kernel            N, the first bad label, zeroed scratch (one small launch)
//   gala_ce_rows_in_registers_kernel  a team (one warp, or the whole CTA) per row; the row is
//                                     read once with 16-byte loads into registers, so the
//                                     logits are read from memory exactly once and the gradient
//                                     written once: the copy floor's traffic.
//   gala_ce_rows_streamed_kernel      one CTA per row for rows longer than the register capacity
//                                     (and every double row): pass 1 streams the row (online
//                                     softmax), pass 2 re-reads it (from L2 when the rows in
//                                     flight fit there, else from memory: 1.5x the floor's traffic).
//                                     C up to at least 1,000,000 (limited only by int64 offsets).
//
// Softmax: each thread reduces its own elements (max, then sum of exp: two sweeps over registers
// or one online sweep when streaming), then the team merges (max, S_other) pairs online:
//   (m1, S1) + (m2, S2) = (m, S1 exp(m1 - m) + S2 exp(m2 - m)),  m = max(m1, m2),
// with warp shuffles and, for a CTA team, one shared-memory stage. The merge is commutative in
// IEEE arithmetic, so every thread of a team ends with bit-identical (m, S_other).
//
// Statistics: raw_clsneg is a column sum over the batch. The kernels accumulate it per CTA in
// shared memory over all rows the (persistent) CTA handles, then flush it with one coalesced
// atomicAdd per column: the number of global atomics is (CTAs x C), not (B x C). Only the
// streamed kernel with more columns than shared memory holds (C > ~56K on sm_90) adds into
// global memory directly (B x C atomics). raw_pos/raw_neg take one atomicAdd per row. The
// scratch is only written during the kernel and read after it (the fold runs in Python).
// The pairwise matrix (off by default, C x C) takes one atomicAdd per element of each row.
//
// The loss of "mean" and "sum" is summed per CTA, added into a double in the workspace, and the
// last CTA to finish (a ticket counter) writes sum / N or sum: no extra launch, no host sync.

#include "gala_ce_kernel.cuh"

#include "device_common.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace gala::cuda {
namespace {

constexpr int kVecBytes = 16;  // one 128-bit load or store per vector

// ------------------------------------------------------------------ row I/O

// A 16-byte vector of T as four 32-bit words; elements are read and written with register bit
// operations (reinterpreting a local uint4 through a T* would put it in local memory).
__device__ __forceinline__ uint32_t word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ auto unpack(const uint4& v, int e) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(word(v, e));
  } else if constexpr (std::is_same_v<T, double>) {
    return __hiloint2double(static_cast<int>(word(v, 2 * e + 1)), static_cast<int>(word(v, 2 * e)));
  } else {
    const auto bits = static_cast<unsigned short>(word(v, e / 2) >> (16 * (e % 2)));
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __bfloat162float(__ushort_as_bfloat16(bits));
    } else {
      return __half2float(__ushort_as_half(bits));
    }
  }
}

template <typename T, typename A, int kVec>
__device__ __forceinline__ uint4 pack(const A (&g)[kVec]) {
  uint32_t w[4];
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = __float_as_uint(g[e]);
  } else if constexpr (std::is_same_v<T, double>) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      w[2 * e] = static_cast<uint32_t>(__double2loint(g[e]));
      w[2 * e + 1] = static_cast<uint32_t>(__double2hiint(g[e]));
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint32_t lo, hi;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        lo = __bfloat16_as_ushort(__float2bfloat16_rn(g[2 * k]));
        hi = __bfloat16_as_ushort(__float2bfloat16_rn(g[2 * k + 1]));
      } else {
        lo = __half_as_ushort(__float2half_rn(g[2 * k]));
        hi = __half_as_ushort(__float2half_rn(g[2 * k + 1]));
      }
      w[k] = lo | (hi << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Vector e0 / kVec of a row viewed from the 16-byte boundary at or before its first element:
// columns j0 .. j0 + kVec - 1 with j0 = e0 - shift. Full vectors take one 16-byte load; the
// (at most two) partial vectors of a row load element by element. Columns outside [0, C) read
// as -inf and are never touched in memory.
template <typename T, typename A, int kVec, bool kLastUse, typename Index>
__device__ __forceinline__ void load_adjusted(const T* row, const A* bias, Index j0, Index C, A (&a)[kVec]) {
  if (j0 >= 0 && j0 + kVec <= C) {
    const uint4* src = reinterpret_cast<const uint4*>(row + j0);
    const uint4 raw = kLastUse ? __ldcs(src) : __ldg(src);  // evict-first on the last read
#pragma unroll
    for (int e = 0; e < kVec; ++e) a[e] = unpack<T>(raw, e) + (bias ? __ldg(bias + j0 + e) : A(0));
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const Index j = j0 + e;
      a[e] = (j >= 0 && j < C) ? to_math(row[j]) + (bias ? __ldg(bias + j) : A(0)) : negative_infinity<A>();
    }
  }
}

// Stores a vector of gradient values for columns j0 .. j0 + kVec - 1 (those inside [0, C)).
// `aligned` says that row + j0 is 16-byte aligned (true when grad and logits rows share a shift).
template <typename T, typename A, int kVec, typename Index>
__device__ __forceinline__ void store_grad(T* row, Index j0, Index C, bool aligned, const A (&g)[kVec]) {
  if (aligned && j0 >= 0 && j0 + kVec <= C) {
    *reinterpret_cast<uint4*>(row + j0) = pack<T, A, kVec>(g);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const Index j = j0 + e;
      if (j >= 0 && j < C) row[j] = from_math<T>(g[e]);
    }
  }
}

// Elements by which `ptr` sits after the previous 16-byte boundary.
template <typename T>
__device__ __forceinline__ int misalignment(const T* ptr) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(ptr) % kVecBytes) / sizeof(T));
}

// A whole gradient row set to one value (ignored rows: 0; non-finite or bad-label rows: NaN).
template <typename T, typename A>
__device__ __forceinline__ void fill_row(T* row, int64_t C, A value, int lane, int team_threads) {
  const T v = from_math<T>(value);
  for (int64_t j = lane; j < C; j += team_threads) row[j] = v;
}

// ------------------------------------------------------------------ loss epilogue

// Adds this CTA's share of the loss (the sum over its threads of loss_acc) into the workspace;
// the last CTA to finish writes the reduced loss: sum / N ("mean", NaN when N = 0) or sum.
template <typename T, int kBlockThreads>
__device__ void finish_reduced_loss(const GalaCeCudaParams& p, double loss_acc) {
  __shared__ double warp_loss[kBlockThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  loss_acc = warp_sum(loss_acc);
  if (lane == 0) warp_loss[warp] = loss_acc;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double block_sum = 0.0;
  for (int w = 0; w < kBlockThreads / kWarpSize; ++w) block_sum += warp_loss[w];
  double* total = reinterpret_cast<double*>(p.workspace + kLossSum);
  auto* done = reinterpret_cast<unsigned long long*>(p.workspace + kDoneCtas);
  atomicAdd(total, block_sum);
  __threadfence();  // the sum is visible before the ticket is taken
  if (atomicAdd(done, 1ull) != gridDim.x - 1) return;
  __threadfence();
  const double sum = atomicAdd(total, 0.0);  // read through L2, after every CTA's add
  const int64_t n_valid = p.counts[0];
  double value = sum;
  if (p.reduction == ReductionCode::Mean) {
    value = n_valid > 0 ? sum / static_cast<double>(n_valid) : quiet_nan<double>();
  }
  static_cast<T*>(p.loss)[0] = from_math<T>(value);
}

// Shared-memory raw_clsneg accumulators keep column j at index j + j / 32 (one padding float per
// 32 columns). A warp updates columns lane * kVec + e + c (kVec consecutive columns per lane):
// unpadded, lanes lane and lane + 32 / kVec share a bank (a kVec-way conflict on every update);
// padded, the 32 lanes of each update fall in 32 distinct banks.
__host__ __device__ __forceinline__ int64_t padded_column(int64_t j) { return j + (j >> 5); }
__device__ __forceinline__ int padded_column(int j) { return j + (j >> 5); }
__host__ __device__ __forceinline__ int64_t padded_columns(int64_t C) { return padded_column(C) + 1; }

// Flushes the per-team shared-memory raw_clsneg accumulators: one atomicAdd per column.
template <int kTeams, int kBlockThreads>
__device__ __forceinline__ void flush_cls_neg(const float* cls_neg_smem, float* raw_cls_neg, int64_t C) {
  __syncthreads();
  const int64_t team_stride = padded_columns(C);
  for (int64_t j = threadIdx.x; j < C; j += kBlockThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kTeams; ++t) sum += cls_neg_smem[t * team_stride + padded_column(j)];
    if (sum != 0.0f) atomicAdd(raw_cls_neg + j, sum);
  }
}

// ------------------------------------------------------------------ kernels

constexpr int kPrepareThreads = 512;

// N, the first out-of-range label, and the zeroed scratch. Block 0 scans the labels (B int64,
// a few KB for the batch sizes of interest); every block zeroes a share of raw_stats/raw_pairwise.
__global__ void __launch_bounds__(kPrepareThreads) gala_ce_prepare_kernel(const GalaCeCudaParams p) {
  const int64_t C = p.num_classes;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kPrepareThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kPrepareThreads + threadIdx.x;
  if (p.raw_stats) {
    for (int64_t k = tid; k < 3 * C; k += grid_threads) p.raw_stats[k] = 0.0f;
  }
  if (p.raw_pairwise) {
    for (int64_t k = tid; k < C * C; k += grid_threads) p.raw_pairwise[k] = 0.0f;
  }
  if (blockIdx.x != 0) return;

  constexpr long long kNoRow = INT64_MAX;
  long long n_valid = 0, first_bad = kNoRow;
  for (int64_t i = threadIdx.x; i < p.batch; i += kPrepareThreads) {
    const int64_t y = p.labels[i];
    if (y == p.ignore_index) continue;
    ++n_valid;
    if (y < 0 || y >= C) first_bad = min(first_bad, static_cast<long long>(i));
  }
  __shared__ long long warp_valid[kPrepareThreads / kWarpSize], warp_bad[kPrepareThreads / kWarpSize];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    n_valid += __shfl_xor_sync(0xffffffffu, n_valid, offset);
    first_bad = min(first_bad, __shfl_xor_sync(0xffffffffu, first_bad, offset));
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    warp_valid[warp] = n_valid;
    warp_bad[warp] = first_bad;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kPrepareThreads / kWarpSize; ++w) {
    n_valid += warp_valid[w];
    first_bad = min(first_bad, warp_bad[w]);
  }
  p.counts[0] = n_valid;
  p.counts[1] = 0;
  p.workspace[kLossSum] = 0;  // the bit pattern of 0.0
  p.workspace[kDoneCtas] = 0;
  p.workspace[kFirstBadRow] = first_bad == kNoRow ? -1 : first_bad;
  p.workspace[kBadLabel] = first_bad == kNoRow ? 0 : p.labels[first_bad];
}

// A team of kTeamThreads threads (one warp, or the whole CTA) handles one row at a time; the CTA
// loops over rows (persistent grid). Each thread holds kElemsPerThread adjusted logits in
// registers, kElemsPerThread / kVec 16-byte vectors. Rows up to kTeamThreads * kElemsPerThread
// - (kVec - 1) columns fit (the launcher checks; kVec - 1 covers a misaligned row start).
//
// Dynamic shared memory: kTeams * padded_columns(C) floats of raw_clsneg accumulators, when
// statistics are on.
template <typename T, int kTeamThreads, int kBlockThreads, int kElemsPerThread>
__global__ void __launch_bounds__(kBlockThreads)
    gala_ce_rows_in_registers_kernel(const GalaCeCudaParams p) {
  using A = float;
  constexpr int kVec = kVecBytes / sizeof(T);
  static_assert(kElemsPerThread % kVec == 0, "whole vectors per thread");
  constexpr int kItems = kElemsPerThread / kVec;
  constexpr int kTeams = kBlockThreads / kTeamThreads;
  constexpr bool kWarpTeam = kTeamThreads == kWarpSize;

  extern __shared__ float cls_neg_smem[];
  __shared__ SoftmaxPartial<A> reduce_scratch[kBlockThreads / kWarpSize];

  // shapes and constants
  const int64_t B = p.batch, C = p.num_classes;
  const int team = threadIdx.x / kTeamThreads, lane = threadIdx.x % kTeamThreads;
  const bool stats = p.raw_stats != nullptr;
  float* cls_neg_team = cls_neg_smem + team * padded_columns(C);
  float* raw_pos = p.raw_stats;
  float* raw_neg = stats ? p.raw_stats + C : nullptr;
  // data ptrs
  const T* logits = static_cast<const T*>(p.logits);
  const A* bias = static_cast<const A*>(p.class_bias);
  T* grad = static_cast<T*>(p.grad);
  T* loss_rows = static_cast<T*>(p.loss);

  if (stats) {
    for (int64_t k = threadIdx.x; k < kTeams * padded_columns(C); k += kBlockThreads) {
      cls_neg_smem[k] = 0.0f;
    }
    __syncthreads();
  }
  // w = 1/N for "mean" (N from the prepare kernel; N = 0: no row uses it), 1 otherwise
  const A w = p.reduction == ReductionCode::Mean ? A(1) / static_cast<A>(max(p.counts[0], int64_t(1))) : A(1);
  double loss_acc = 0.0;  // this thread's share of the summed loss (team leaders only)

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kTeams + team; row < B;
       row += static_cast<int64_t>(gridDim.x) * kTeams) {
    const int64_t y = p.labels[row];
    const T* z = logits + row * p.logits_row_stride;
    T* g = grad + row * C;
    A loss_row = A(0);
    if (y == p.ignore_index) {
      fill_row(g, C, A(0), lane, kTeamThreads);
    } else if (y < 0 || y >= C) {
      fill_row(g, C, quiet_nan<A>(), lane, kTeamThreads);
      loss_row = quiet_nan<A>();
    } else {
      // Row-local indices fit in 32 bits here (C <= 32768, checked by the launcher).
      const int Ci = static_cast<int>(C), yi = static_cast<int>(y);
      const int shift = misalignment(z);
      const bool grad_aligned = misalignment(g) == shift;
      const A a_y = to_math(z[yi]) + (bias ? bias[yi] : A(0));
      // first column of vector k of this thread: thread `lane` holds vectors lane, lane + kTeamThreads, ...
      const int lane_j0 = lane * kVec - shift;
      constexpr int kItemStride = kTeamThreads * kVec;

      // 1. Load the row into registers (padding columns read as -inf).
      A a[kItems][kVec];
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        load_adjusted<T, A, kVec, true>(z, bias, lane_j0 + k * kItemStride, Ci, a[k]);
      }

      // 2. This thread's max and sum_{j != y} exp(a[j] - max), then the team's (online merge).
      SoftmaxPartial<A> part{negative_infinity<A>(), A(0), 0};
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const int j = lane_j0 + k * kItemStride + e;
          const bool in_row = static_cast<unsigned>(j) < static_cast<unsigned>(Ci);
          part.max = fmaxf(part.max, a[k][e]);
          part.nonfinite |= in_row && !isfinite(a[k][e]);
        }
      }
      if (part.max != negative_infinity<A>()) {
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {  // -inf padding adds exp(-inf) = 0
            if (lane_j0 + k * kItemStride + e != yi) part.sum_other += softmax_exp(a[k][e] - part.max);
          }
        }
      }
      part = team_merge<A, kTeamThreads, kBlockThreads>(part, reduce_scratch);

      if (part.nonfinite) {  // NaN loss and gradient, no statistics, counted
        fill_row(g, C, quiet_nan<A>(), lane, kTeamThreads);
        loss_row = quiet_nan<A>();
        if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + 1), 1ull);
      } else {
        // 3. S = S_other + exp(a[y] - m); loss = log(S) - (a[y] - m); sum_{j != y} p = S_other / S
        const A m = part.max;
        const A S = part.sum_other + softmax_exp(a_y - m);
        const A inv_S = A(1) / S;
        const A sum_other = part.sum_other * inv_S;
        loss_row = logf(S) - (a_y - m);

        // 4. Gradient; raw_clsneg into shared memory; pairwise (global atomics) when tracked.
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
          const int j0 = lane_j0 + k * kItemStride;
          A gv[kVec];
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const int j = j0 + e;
            const A prob = softmax_exp(a[k][e] - m) * inv_S;
            gv[e] = j == yi ? -sum_other * w : prob * w;
            if (stats && j != yi && static_cast<unsigned>(j) < static_cast<unsigned>(Ci)) {
              cls_neg_team[padded_column(j)] += prob;
              if (p.raw_pairwise) atomicAdd(p.raw_pairwise + static_cast<int64_t>(j) * C + yi, prob);
            }
          }
          store_grad<T, A, kVec>(g, j0, Ci, grad_aligned, gv);
        }
        // 5. raw_pos[y], raw_neg[y] (+ the pairwise diagonal |p[y] - 1|), once per row.
        if (stats && lane == 0) {
          atomicAdd(raw_pos + yi, sum_other);
          atomicAdd(raw_neg + yi, sum_other);
          if (p.raw_pairwise) atomicAdd(p.raw_pairwise + y * C + y, sum_other);
        }
      }
    }
    if (lane == 0) {
      if (p.reduction == ReductionCode::None) {
        loss_rows[row] = from_math<T>(loss_row);
      } else {
        loss_acc += static_cast<double>(loss_row);
      }
    }
    // Orders this row's shared-memory writes (raw_clsneg, reduce scratch) before the next row's.
    if constexpr (kWarpTeam) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }

  if (stats) flush_cls_neg<kTeams, kBlockThreads>(cls_neg_smem, p.raw_stats + 2 * C, C);
  if (p.reduction != ReductionCode::None) finish_reduced_loss<T, kBlockThreads>(p, loss_acc);
}

// One CTA per row (persistent grid) for rows of any length: pass 1 streams the row once
// (online softmax per thread, then merged over the CTA), pass 2 reads it again to write the
// gradient. kSharedClsNeg: raw_clsneg is accumulated in C floats of dynamic shared memory and
// flushed once per CTA, as in the register kernel; otherwise (C too large for shared memory)
// it takes one global atomicAdd per column of each row.
constexpr int kStreamedThreads = 512;

template <typename T, bool kSharedClsNeg>
__global__ void __launch_bounds__(kStreamedThreads) gala_ce_rows_streamed_kernel(const GalaCeCudaParams p) {
  using A = typename MathType<T>::type;
  constexpr int kVec = kVecBytes / sizeof(T);
  __shared__ SoftmaxPartial<A> reduce_scratch[kStreamedThreads / kWarpSize];
  extern __shared__ float cls_neg_smem[];

  const int64_t B = p.batch, C = p.num_classes;
  const int lane = threadIdx.x;
  const bool stats = p.raw_stats != nullptr;
  float* raw_pos = p.raw_stats;
  float* raw_neg = stats ? p.raw_stats + C : nullptr;
  float* raw_cls_neg = stats ? p.raw_stats + 2 * C : nullptr;
  const T* logits = static_cast<const T*>(p.logits);
  const A* bias = static_cast<const A*>(p.class_bias);
  T* grad = static_cast<T*>(p.grad);
  T* loss_rows = static_cast<T*>(p.loss);
  const A w = p.reduction == ReductionCode::Mean ? A(1) / static_cast<A>(max(p.counts[0], int64_t(1))) : A(1);
  double loss_acc = 0.0;
  if constexpr (kSharedClsNeg) {
    for (int64_t k = threadIdx.x; k < padded_columns(C); k += kStreamedThreads) cls_neg_smem[k] = 0.0f;
    __syncthreads();
  }

  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const int64_t y = p.labels[row];
    const T* z = logits + row * p.logits_row_stride;
    T* g = grad + row * C;
    A loss_row = A(0);
    if (y == p.ignore_index) {
      fill_row(g, C, A(0), lane, kStreamedThreads);
    } else if (y < 0 || y >= C) {
      fill_row(g, C, quiet_nan<A>(), lane, kStreamedThreads);
      loss_row = quiet_nan<A>();
    } else {
      const int shift = misalignment(z);
      const bool grad_aligned = misalignment(g) == shift;
      const A a_y = to_math(z[y]) + (bias ? bias[y] : A(0));
      const int64_t num_vectors = (C + shift + kVec - 1) / kVec;

      // 1. Online softmax over this thread's vectors: (m, S) <- (m', S exp(m - m') + sum exp(a - m')).
      SoftmaxPartial<A> part{negative_infinity<A>(), A(0), 0};
#pragma unroll 2
      for (int64_t v = lane; v < num_vectors; v += kStreamedThreads) {
        const int64_t j0 = v * kVec - shift;
        A a[kVec];
        load_adjusted<T, A, kVec, false>(z, bias, j0, C, a);
        A vector_max = negative_infinity<A>();
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          vector_max = fmax(vector_max, a[e]);
          part.nonfinite |= j0 + e >= 0 && j0 + e < C && !isfinite(a[e]);
        }
        if (vector_max > part.max) {
          if (part.sum_other != A(0)) part.sum_other *= softmax_exp(part.max - vector_max);
          part.max = vector_max;
        }
        if (part.max != negative_infinity<A>()) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            if (j0 + e != y) part.sum_other += softmax_exp(a[e] - part.max);
          }
        }
      }
      part = team_merge<A, kStreamedThreads, kStreamedThreads>(part, reduce_scratch);

      if (part.nonfinite) {
        fill_row(g, C, quiet_nan<A>(), lane, kStreamedThreads);
        loss_row = quiet_nan<A>();
        if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + 1), 1ull);
      } else {
        const A m = part.max;
        const A S = part.sum_other + softmax_exp(a_y - m);
        const A inv_S = A(1) / S;
        const A sum_other = part.sum_other * inv_S;
        loss_row = log(S) - (a_y - m);

        // 2. Re-read the row (L2 when it is still there): gradient and statistics.
        for (int64_t v = lane; v < num_vectors; v += kStreamedThreads) {
          const int64_t j0 = v * kVec - shift;
          A a[kVec], gv[kVec];
          load_adjusted<T, A, kVec, true>(z, bias, j0, C, a);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const int64_t j = j0 + e;
            const A prob = softmax_exp(a[e] - m) * inv_S;
            gv[e] = j == y ? -sum_other * w : prob * w;
            if (stats && j != y && j >= 0 && j < C) {
              if constexpr (kSharedClsNeg) {
                cls_neg_smem[padded_column(j)] += static_cast<float>(prob);
              } else {
                atomicAdd(raw_cls_neg + j, static_cast<float>(prob));
              }
              if (p.raw_pairwise) atomicAdd(p.raw_pairwise + j * C + y, static_cast<float>(prob));
            }
          }
          store_grad<T, A, kVec>(g, j0, C, grad_aligned, gv);
        }
        if (stats && lane == 0) {
          atomicAdd(raw_pos + y, static_cast<float>(sum_other));
          atomicAdd(raw_neg + y, static_cast<float>(sum_other));
          if (p.raw_pairwise) atomicAdd(p.raw_pairwise + y * C + y, static_cast<float>(sum_other));
        }
      }
    }
    if (lane == 0) {
      if (p.reduction == ReductionCode::None) {
        loss_rows[row] = from_math<T>(loss_row);
      } else {
        loss_acc += static_cast<double>(loss_row);
      }
    }
    __syncthreads();  // reduce_scratch and cls_neg_smem are reused by the next row
  }
  if constexpr (kSharedClsNeg) {
    if (stats) flush_cls_neg<1, kStreamedThreads>(cls_neg_smem, raw_cls_neg, C);
  }
  if (p.reduction != ReductionCode::None) finish_reduced_loss<T, kStreamedThreads>(p, loss_acc);
}

// ------------------------------------------------------------------ choosing a kernel
//
// A team must cover C + max_shift columns, where max_shift = kVec - 1 unless every row of the
// logits starts on a 16-byte boundary (then 0). The smallest register variant that fits wins:
//   one warp per row, 4 rows per 128-thread CTA:  8, 16 or 32 elements per thread (<= 1024 columns)
//   one CTA per row, 16 elements per thread:      128, 256, 512 or 1024 threads (<= 16384 columns)
// then the streamed kernel (every double row; longer rows; or raw_clsneg accumulators larger
// than the shared memory a CTA may opt in to), with its raw_clsneg in shared memory when C
// floats fit there (C <= ~56K on sm_90, ~40K on sm_80).
// Why 16 elements per thread at most: a 1024-thread CTA may use 64 registers per thread, and 32
// fp32 values plus the indices and partial sums spill (checked with -Xptxas -warn-spills in the
// compile check, which fails on any spill).
//
// Grid: persistent, at most kTargetThreadsPerSm resident threads per SM (and no more than the
// occupancy allows). Each thread keeps 8 to 32 elements (32 to 128 bytes) of loads in flight, so
// ~1024 threads per SM already cover the memory latency (Little's law: ~3.3 TB/s x ~1 us is a
// few MB over all SMs); a larger grid would only add CTAs, hence more raw_clsneg flushes.
// Provisional: to be tuned on the GPU with bench/bench_cuda.py.
constexpr int kTargetThreadsPerSm = 1024;
struct Variant {
  const void* kernel = nullptr;
  int block_threads = 0;
  int rows_per_cta = 1;     // rows a CTA handles at once (teams)
  size_t dynamic_smem = 0;
  const char* name = "";
};

template <typename T, int kTeamThreads, int kBlockThreads, int kElemsPerThread>
Variant register_variant(const GalaCeCudaParams& p, const char* name) {
  constexpr int kTeams = kBlockThreads / kTeamThreads;
  Variant v;
  v.kernel = reinterpret_cast<const void*>(
      &gala_ce_rows_in_registers_kernel<T, kTeamThreads, kBlockThreads, kElemsPerThread>);
  v.block_threads = kBlockThreads;
  v.rows_per_cta = kTeams;
  const size_t cls_neg_floats = static_cast<size_t>(kTeams * padded_columns(p.num_classes));
  v.dynamic_smem = p.raw_stats ? cls_neg_floats * sizeof(float) : 0;
  v.name = name;
  return v;
}

constexpr size_t kStaticSmemAllowance = 1024;  // reduce scratch and the loss epilogue

template <typename T>
Variant streamed_variant(const GalaCeCudaParams& p, const DeviceLimits& limits) {
  Variant v;
  v.block_threads = kStreamedThreads;
  const size_t cls_neg_bytes = static_cast<size_t>(padded_columns(p.num_classes)) * sizeof(float);
  if (p.raw_stats && cls_neg_bytes + kStaticSmemAllowance <= static_cast<size_t>(limits.max_smem_optin)) {
    v.kernel = reinterpret_cast<const void*>(&gala_ce_rows_streamed_kernel<T, true>);
    v.dynamic_smem = cls_neg_bytes;
    v.name = "streamed_cta512_smem";
  } else {
    v.kernel = reinterpret_cast<const void*>(&gala_ce_rows_streamed_kernel<T, false>);
    v.name = "streamed_cta512";
  }
  return v;
}

bool rows_are_aligned(const GalaCeCudaParams& p, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(p.logits) % kVecBytes == 0 &&
         (static_cast<uint64_t>(p.logits_row_stride) * elem_size) % kVecBytes == 0;
}

template <typename T>
Variant choose_variant(const GalaCeCudaParams& p, const DeviceLimits& limits) {
  if constexpr (std::is_same_v<T, double>) {
    return streamed_variant<T>(p, limits);
  } else {
    constexpr int64_t kVec = kVecBytes / sizeof(T);
    const int64_t need = p.num_classes + (rows_are_aligned(p, sizeof(T)) ? 0 : kVec - 1);
    Variant v;
    if (need <= 32 * 8) {
      v = register_variant<T, 32, 128, 8>(p, "warp_e8");
    } else if (need <= 32 * 16) {
      v = register_variant<T, 32, 128, 16>(p, "warp_e16");
    } else if (need <= 32 * 32) {
      v = register_variant<T, 32, 128, 32>(p, "warp_e32");
    } else if (need <= 128 * 16) {
      v = register_variant<T, 128, 128, 16>(p, "cta128_e16");
    } else if (need <= 256 * 16) {
      v = register_variant<T, 256, 256, 16>(p, "cta256_e16");
    } else if (need <= 512 * 16) {
      v = register_variant<T, 512, 512, 16>(p, "cta512_e16");
    } else if (need <= 1024 * 16) {
      v = register_variant<T, 1024, 1024, 16>(p, "cta1024_e16");
    } else {
      return streamed_variant<T>(p, limits);
    }
    if (v.dynamic_smem + kStaticSmemAllowance > static_cast<size_t>(limits.max_smem_optin)) {
      return streamed_variant<T>(p, limits);
    }
    return v;
  }
}

Variant choose_for_dtype(const GalaCeCudaParams& p, const DeviceLimits& limits) {
  switch (p.dtype) {
    case DType::Float32: return choose_variant<float>(p, limits);
    case DType::Float64: return choose_variant<double>(p, limits);
    case DType::BFloat16: return choose_variant<__nv_bfloat16>(p, limits);
    case DType::Float16: return choose_variant<__half>(p, limits);
  }
  return Variant{};
}

}  // namespace

cudaError_t launch_gala_ce_prepare(const GalaCeCudaParams& params, cudaStream_t stream) {
  DeviceLimits limits;
  cudaError_t err = device_limits(&limits);
  if (err != cudaSuccess) return err;
  // Enough blocks to zero the scratch in a few sweeps; block 0 also scans the labels.
  int64_t zero_elems = params.raw_stats ? 3 * params.num_classes : 0;
  if (params.raw_pairwise) zero_elems += params.num_classes * params.num_classes;
  const int64_t wanted = (zero_elems + kPrepareThreads * 8 - 1) / (kPrepareThreads * 8);
  const int64_t max_blocks = 4 * static_cast<int64_t>(limits.sm_count);
  const int blocks = static_cast<int>(std::clamp<int64_t>(wanted, 1, max_blocks));
  gala_ce_prepare_kernel<<<blocks, kPrepareThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

cudaError_t launch_gala_ce_forward(const GalaCeCudaParams& params, cudaStream_t stream) {
  if (params.batch <= 0) return cudaSuccess;
  DeviceLimits limits;
  cudaError_t err = device_limits(&limits);
  if (err != cudaSuccess) return err;
  const Variant v = choose_for_dtype(params, limits);
  if (v.kernel == nullptr) return cudaErrorInvalidValue;
  if (v.dynamic_smem > 48 * 1024) {
    err = cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(v.dynamic_smem));
    if (err != cudaSuccess) return err;
  }
  int occupancy = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, v.kernel, v.block_threads, v.dynamic_smem);
  if (err != cudaSuccess) return err;
  const int ctas_per_sm = std::max(1, std::min(occupancy, kTargetThreadsPerSm / v.block_threads));
  const int64_t ctas_needed = (params.batch + v.rows_per_cta - 1) / v.rows_per_cta;
  const int64_t grid = std::min<int64_t>(ctas_needed, static_cast<int64_t>(ctas_per_sm) * limits.sm_count);
  GalaCeCudaParams args = params;
  void* kernel_args[] = {&args};
  return cudaLaunchKernel(v.kernel, dim3(static_cast<unsigned>(grid)), dim3(v.block_threads), kernel_args,
                          v.dynamic_smem, stream);
}

const char* gala_ce_forward_variant(const GalaCeCudaParams& params) {
  DeviceLimits limits;
  if (device_limits(&limits) != cudaSuccess) return "unknown (no device)";
  return choose_for_dtype(params, limits).name;
}

}  // namespace gala::cuda
