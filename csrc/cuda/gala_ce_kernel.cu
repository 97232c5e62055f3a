// Fused GALA cross-entropy, CUDA: loss, gradient and per-class statistics in one pass per row;
// for a training step (fused_ce_step_) also the class bias and the fold into the state.
//
// Per row i with label y (docs/contract.md; weight and label smoothing as torch.nn.functional.cross_entropy):
//   a[j]    = z[j] + class_bias[j]              class_bias = lambda1 * log(pos_grad + eps)
//   m       = max_j a[j]
//   S_other = sum_{j != y} exp(a[j] - m)        S = S_other + exp(a[y] - m)
//   p[j]    = exp(a[j] - m) / S                 sum_{j != y} p[j] = S_other / S (no 1 - p[y] cancellation)
//   lse - a[j] = log(S) + (m - a[j])            (every term >= 0: no cancellation)
//   with wt the class weights (ones without a weight), ls the smoothing, c_t = (1 - ls) * wt[y],
//   c_u = ls / C, c_p = c_t + c_u * sum_k wt[k], r = 1/W ("mean", W = sum of wt[y_i] over the
//   non-ignored rows; NaN when W = 0) or 1 ("sum", "none"):
//   loss_i  = c_t * (lse - a[y]) + c_u * sum_j wt[j] * (lse - a[j])
//   grad[j] = r * (c_p * p[j] - c_u * wt[j])                          j != y
//   grad[y] = r * (c_u * (sum_k wt[k] * p[y] - wt[y]) - c_t * S_other / S)
//   raw_pos[y] += S_other / S;  raw_neg[y] += the same value;  raw_clsneg[j] += p[j] for j != y
//   raw_pair[j, y] += |p[j] - [j == y]|         (optional)
// Without label smoothing (c_u = 0) the row needs wt[y] only: grad = r * wt[y] * (p - onehot), the
// plain path's cost. The statistics never depend on weight or smoothing. The lambda2 term is
// constant along a row and changes nothing, so it is skipped.
// Ignored rows: loss 0, grad 0. Rows holding a non-finite a[j]: loss NaN, grad NaN, no statistics,
// counted. Rows whose label is neither ignore_index nor in [0, C) ("bad"): loss NaN, no
// statistics, grad NaN (fused_ce_fwd, only reachable when its host-side check is skipped) or 0 (a
// training step); such a label is never used as an index, and it adds nothing to W.
//
// Kernels (every one keeps math in fp32, fp64 for double logits):
//   gala_ce_prepare_kernel            label counts per block (N, W, bad rows, the first bad row),
//                                     the training step's class bias, zeroed fresh outputs
//   gala_ce_rows_in_registers_kernel  a team (one warp, or the whole CTA) per row; the row is
//                                     read once with 16-byte loads into registers, so the
//                                     logits are read from memory exactly once and the gradient
//                                     written once: the copy floor's traffic.
//   gala_ce_rows_streamed_kernel      one CTA per row for rows longer than the register capacity
//                                     (and every double row): pass 1 streams the row (online
//                                     softmax), pass 2 re-reads it (from L2 when the rows in
//                                     flight fit there, else from memory: 1.5x the floor's traffic).
//                                     C up to at least 1,000,000 (limited only by int64 offsets).
// Label smoothing is a template flag (kSmooth) of both row kernels: the plain path pays nothing.
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
// pairwise matrix (off by default, C x C) takes one atomicAdd per element of each row.
//
// The last CTA to finish (a ticket counter; fences on both sides, see finish_launch) writes the
// reduced loss (sum / W or sum) and, in a training step, adds the step's counts to the scratch,
// records a bad label, and folds the scratch into the state (fold_common.cuh): no extra launch,
// no host synchronisation.

#include "gala_ce_kernel.cuh"

#include "device_common.cuh"
#include "fold_common.cuh"
#include "vector_io.cuh"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace gala::cuda {
namespace {

// ------------------------------------------------------------------ row I/O

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

// A whole gradient row set to one value (ignored rows: 0; non-finite or bad-label rows: NaN or 0).
template <typename T, typename A>
__device__ __forceinline__ void fill_row(T* row, int64_t C, A value, int lane, int team_threads) {
  const T v = from_math<T>(value);
  for (int64_t j = lane; j < C; j += team_threads) row[j] = v;
}

// ------------------------------------------------------------------ the launch's label counts

// The prepare kernel's per-block counts, summed (PartialSlot has the meaning of each field).
struct LaunchTotals {
  long long rows;
  long long bad_rows;
  long long first_bad_row;  // INT64_MAX when none
  long long first_bad_label;
  double label_weight;      // W
  double class_weight;      // sum_k wt[k] (with a weight and label smoothing only)
};

constexpr long long kNoRow = INT64_MAX;

__device__ __forceinline__ LaunchTotals empty_totals() { return {0, 0, kNoRow, 0, 0.0, 0.0}; }

// Sums two counts; the first bad row is the smaller one, with its label. Commutative, so every
// lane of a butterfly reduction ends with the same value.
__device__ __forceinline__ LaunchTotals merge(const LaunchTotals& x, const LaunchTotals& y) {
  const bool x_first = x.first_bad_row < y.first_bad_row ||
                       (x.first_bad_row == y.first_bad_row && x.first_bad_label <= y.first_bad_label);
  return {x.rows + y.rows, x.bad_rows + y.bad_rows, x_first ? x.first_bad_row : y.first_bad_row,
          x_first ? x.first_bad_label : y.first_bad_label, x.label_weight + y.label_weight,
          x.class_weight + y.class_weight};
}

__device__ __forceinline__ LaunchTotals warp_merge(LaunchTotals v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const LaunchTotals other{__shfl_xor_sync(0xffffffffu, v.rows, offset),
                             __shfl_xor_sync(0xffffffffu, v.bad_rows, offset),
                             __shfl_xor_sync(0xffffffffu, v.first_bad_row, offset),
                             __shfl_xor_sync(0xffffffffu, v.first_bad_label, offset),
                             __shfl_xor_sync(0xffffffffu, v.label_weight, offset),
                             __shfl_xor_sync(0xffffffffu, v.class_weight, offset)};
    v = merge(v, other);
  }
  return v;
}

// ------------------------------------------------------------------ loss and gradient coefficients

// What every row of a launch shares (formulas in the header comment).
template <typename A>
struct LaunchCoefficients {
  const A* weight;     // wt, or nullptr (all ones)
  A row_scale;         // r
  A keep;              // 1 - ls
  A uniform;           // c_u = ls / C
  A class_weight_sum;  // sum_k wt[k] (C without a weight)
};

template <typename A>
__device__ __forceinline__ LaunchCoefficients<A> launch_coefficients(const GalaCeCudaParams& p,
                                                                    const LaunchTotals& totals) {
  const double W = totals.label_weight;
  LaunchCoefficients<A> lc;
  lc.weight = static_cast<const A*>(p.weight);
  // __drcp_rn: the correctly rounded 1 / W without the division's out-of-line slow path
  lc.row_scale = p.reduction != ReductionCode::Mean ? A(1)
                 : W > 0.0                          ? static_cast<A>(__drcp_rn(W))
                                                    : quiet_nan<A>();  // W = 0: NaN, as torch
  lc.keep = static_cast<A>(1.0 - p.label_smoothing);
  lc.uniform = static_cast<A>(p.smoothing_per_class);
  lc.class_weight_sum = p.weight ? static_cast<A>(totals.class_weight) : static_cast<A>(p.num_classes);
  return lc;
}

// What a CTA of the forward kernel keeps for its whole life: the launch's label counts, the loss
// coefficients, and each team's share of the summed loss (added by the team's lane 0). In shared
// memory rather than registers: they are live across the whole row loop, where registers are
// scarce (ptxas would spill them).
template <typename A, int kTeams>
struct LaunchShared {
  LaunchTotals totals;
  LaunchCoefficients<A> coefficients;
  double team_loss[kTeams];
};

// Every CTA at its start (all threads call it; it ends with a barrier): the sum of the prepare
// kernel's partial counts (at most kMaxPartials, one per lane of warp 0) and the coefficients;
// block 0 also writes fused_ce_fwd's counts[0] = N.
template <typename A, int kTeams>
__device__ __forceinline__ void begin_launch(const GalaCeCudaParams& p, LaunchShared<A, kTeams>& launch) {
  if (threadIdx.x < kWarpSize) {
    LaunchTotals t = empty_totals();
    if (static_cast<int>(threadIdx.x) < p.label_partials) {
      const int64_t* slot = p.workspace + kPartials + threadIdx.x * kPartialSlots;
      t = {slot[kPartialRows], slot[kPartialBadRows], slot[kPartialFirstBadRow], slot[kPartialFirstBadLabel],
           __longlong_as_double(slot[kPartialLabelWeight]), __longlong_as_double(slot[kPartialClassWeight])};
    }
    if (p.label_partials > 1) t = warp_merge(t);  // uniform over warp 0
    if (threadIdx.x == 0) {
      launch.totals = t;
      launch.coefficients = launch_coefficients<A>(p, t);
      for (int k = 0; k < kTeams; ++k) launch.team_loss[k] = 0.0;
      if (p.counts && blockIdx.x == 0) p.counts[0] = t.rows;
    }
  }
  __syncthreads();
}

// What the gradient pass of a row needs; the rest of the row (its loss, grad[y], its row
// statistics) is done before the pass, so that only these values stay live through it.
template <typename A>
struct RowGradient {
  A max;            // m
  A inv_sum;        // 1 / S:  p[j] = exp(a[j] - m) / S
  A prob_scale;     // r c_p   (r wt[y] without smoothing)
  A uniform_scale;  // r c_u   (smoothing only)
  A at_label;       // grad[y]
};

// grad[j] for j != y: r c_p p[j] - r c_u wt[j]   (`wj` = wt[j], smoothing only).
template <typename A, bool kSmooth>
__device__ __forceinline__ A off_label_gradient(const RowGradient<A>& rg, A prob, A wj) {
  return kSmooth ? rg.prob_scale * prob - rg.uniform_scale * wj : rg.prob_scale * prob;
}

// Adds the smoothing's sum_j wt[j] (m - a[j]) (over the whole row) to a row's loss.
template <typename A, bool kSmooth>
__device__ __forceinline__ A finish_row_loss(const LaunchCoefficients<A>& lc, A loss_row, A smooth_sum) {
  return kSmooth ? loss_row + lc.uniform * smooth_sum : loss_row;
}

// ------------------------------------------------------------------ per-row bookkeeping

enum class RowKind { Ignored, BadLabel, Normal };

__device__ __forceinline__ RowKind row_kind(const GalaCeCudaParams& p, int64_t y) {
  if (y == p.ignore_index) return RowKind::Ignored;
  return (y < 0 || y >= p.num_classes) ? RowKind::BadLabel : RowKind::Normal;
}

// The gradient of an ignored row (0) or a bad-label row (0 in a training step, NaN otherwise).
template <typename A>
__device__ __forceinline__ A skipped_row_grad(const GalaCeCudaParams& p, RowKind kind) {
  return kind == RowKind::BadLabel && !p.step.active ? quiet_nan<A>() : A(0);
}

// One more non-ignored row holding a non-finite logit (counts[1], or the step's scratch slot).
__device__ __forceinline__ void count_nonfinite_row(const GalaCeCudaParams& p) {
  if (p.counts != nullptr) {
    atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + 1), 1ull);
  } else {
    atomicAdd(p.step.scratch + 3 * p.num_classes + kScratchNonfinite, 1.0f);
  }
}

// raw_pos[y] += S_other / S, raw_neg[y] += the same, pairwise diagonal |p[y] - 1| (once per row).
__device__ __forceinline__ void add_row_statistics(const GalaCeCudaParams& p, int64_t y, float sum_other) {
  const int64_t C = p.num_classes;
  atomicAdd(p.raw_stats + y, sum_other);
  atomicAdd(p.raw_stats + C + y, sum_other);
  if (p.raw_pairwise) atomicAdd(p.raw_pairwise + y * C + y, sum_other);
}

// A row's softmax once its (m, S_other) are merged over the team, and everything of the row
// except the gradient pass:
//   S = S_other + exp(a[y] - m);  sum_{j != y} p[j] = S_other / S
//   loss_i (but for c_u sum_j wt[j] (m - a[j]), added after the pass) =
//       c_t (log S + m - a[y]) + c_u sum_k wt[k] log S
//   grad[y] = r c_u (sum_k wt[k] p[y] - wt[y]) - r c_t S_other / S
//   raw_pos[y], raw_neg[y] (+ the pairwise diagonal) += S_other / S, by the team's lane 0
template <typename A, bool kSmooth>
__device__ __forceinline__ RowGradient<A> begin_row_gradient(const GalaCeCudaParams& p,
                                                             const LaunchCoefficients<A>& lc,
                                                             const SoftmaxPartial<A>& part, A a_y, int64_t y,
                                                             bool leader, A& loss_row) {
  const A S = part.sum_other + softmax_exp(a_y - part.max);
  const A inv_S = A(1) / S;
  const A sum_other = part.sum_other * inv_S;
  const A log_S = log(S);
  const A wy = lc.weight ? __ldg(lc.weight + y) : A(1);
  const A target = kSmooth ? lc.keep * wy : wy;  // c_t
  RowGradient<A> rg;
  rg.max = part.max;
  rg.inv_sum = inv_S;
  const A target_scale = lc.row_scale * target;  // r c_t
  rg.prob_scale = kSmooth ? lc.row_scale * (target + lc.uniform * lc.class_weight_sum) : target_scale;
  rg.uniform_scale = kSmooth ? lc.row_scale * lc.uniform : A(0);
  rg.at_label = -target_scale * sum_other;
  loss_row = target * (log_S - (a_y - part.max));
  if constexpr (kSmooth) {
    const A p_y = softmax_exp(a_y - part.max) * inv_S;
    rg.at_label += rg.uniform_scale * (lc.class_weight_sum * p_y - wy);
    loss_row += lc.uniform * lc.class_weight_sum * log_S;
  }
  if (p.raw_stats && leader) add_row_statistics(p, y, static_cast<float>(sum_other));
  return rg;
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

// ------------------------------------------------------------------ epilogue (the last CTA)

// A training step's bad label: the first row of the launch is recorded unless an earlier record
// is still pending (the first one is kept until the host raises it).
__device__ __forceinline__ void record_label_error(const GalaCeCudaParams& p, const LaunchTotals& totals) {
  int64_t* record = p.step.label_error;
  if (record[kErrorFlag] != 0) return;
  record[kErrorRow] = p.step.row_offset + totals.first_bad_row;
  record[kErrorLabel] = totals.first_bad_label;
  record[kErrorStep] = *p.step.steps;  // before this step's fold
  record[kErrorIgnoreIndex] = p.ignore_index;
  record[kErrorFlag] = 1;
}

// The last CTA of a training step, after every other CTA's atomics are visible: the step's counts
// into the scratch slots, the label record, and with `fold` the fold of the scratch into the state
// (skipped when the step met a bad label) and the zeroed scratch. Without `fold` the raw sums and
// counts stay in the scratch for fold_step_.
template <int kBlockThreads>
__device__ __forceinline__ void finish_training_step(const GalaCeCudaParams& p, const LaunchTotals& totals) {
  const GalaStepParams& st = p.step;
  const int64_t C = p.num_classes;
  float* slots = st.scratch + 3 * C;
  __shared__ float fold_s;
  __shared__ int fold_now;
  if (threadIdx.x == 0) {
    if (totals.bad_rows > 0) record_label_error(p, totals);
    // counts of earlier calls of this step (fold = false) plus this launch's
    const float rows = __ldcg(slots + kScratchRows) + static_cast<float>(totals.rows);
    const float bad_rows = __ldcg(slots + kScratchBadLabels) + static_cast<float>(totals.bad_rows);
    if (!st.fold) {
      slots[kScratchRows] = rows;
      slots[kScratchBadLabels] = bad_rows;
    }
    fold_now = st.fold && bad_rows == 0.0f;
    fold_s = fold_scale(rows);
    if (fold_now) {
      *st.steps += 1;
      *st.nonfinite_rows += static_cast<int64_t>(__ldcg(slots + kScratchNonfinite));
    }
  }
  __syncthreads();  // thread 0 has read the count slots before they are zeroed below
  if (!st.fold) return;
  if (fold_now) {
    fold_state_vectors(st.scratch, st.stats, st.running, C, fold_s, st.accumulation, st.ema_beta, st.ema_keep,
                       threadIdx.x, kBlockThreads);
  } else {
    for (int64_t k = threadIdx.x; k < 3 * C; k += kBlockThreads) st.scratch[k] = 0.0f;
  }
  for (int k = threadIdx.x; k < kScratchSlots; k += kBlockThreads) slots[k] = 0.0f;
}

// Every CTA at its end (all threads call it): its share of the summed loss into the workspace,
// then a ticket; the last CTA writes the reduced loss (sum / W for "mean", sum for "sum") and
// finishes a training step.
//
// Ordering (the PTX memory model's release and acquire patterns, made of fences and the ticket):
// the barrier orders every thread's atomics (statistics, counts) before thread 0's fence, which
// is cumulative, then thread 0 takes the ticket (release). The thread 0 that draws the last
// ticket fences right after it (acquire), before the barrier that lets its CTA's other threads
// read what every CTA wrote; those reads go through L2 (__ldcg), never a stale L1 line.
template <typename T, int kBlockThreads, typename A, int kTeams>
__device__ __forceinline__ void finish_launch(const GalaCeCudaParams& p, const LaunchShared<A, kTeams>& launch) {
  const bool reduced = p.reduction != ReductionCode::None;
  if (!reduced && !p.step.active) return;
  __shared__ int is_last;
  if (p.step.active && p.step.fold) {
    prefetch_fold_state(p.step.stats, p.step.running, p.num_classes,
                        p.step.accumulation == AccumulationCode::Cumulative,
                        static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x,
                        static_cast<int64_t>(gridDim.x) * kBlockThreads);
  }
  __syncthreads();  // every thread's atomics, and every team's loss, before thread 0 goes on
  double* loss_sum = reinterpret_cast<double*>(p.workspace + kLossSum);
  if (threadIdx.x == 0) {
    if (reduced) {
      double block_sum = 0.0;
      for (int t = 0; t < kTeams; ++t) block_sum += launch.team_loss[t];
      atomicAdd(loss_sum, block_sum);
    }
    __threadfence();  // release
    auto* done = reinterpret_cast<unsigned long long*>(p.workspace + kDoneCtas);
    is_last = atomicAdd(done, 1ull) == gridDim.x - 1;
    __threadfence();  // acquire (when last)
  }
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0 && reduced) {
    const double sum = __ldcg(loss_sum);
    // W = 0 gives 0 * inf = NaN (or inf with smoothing), as the reference's sum / W
    const double value = p.reduction == ReductionCode::Mean ? sum * __drcp_rn(launch.totals.label_weight) : sum;
    static_cast<T*>(p.loss)[0] = from_math<T>(value);
  }
  if (p.step.active) finish_training_step<kBlockThreads>(p, launch.totals);
}

// ------------------------------------------------------------------ prepare kernel

constexpr int kPrepareThreads = 512;
constexpr int64_t kRowsPerPartial = 8192;  // labels one prepare block scans, at least

// Column work, over the whole grid: zeroes fused_ce_fwd's fresh raw_stats / raw_pairwise, or
// writes a training step's class bias[j] = lambda1 * log(pos_grad[j] + eps) (math dtype A; the
// operations of reference.class_bias: add eps, log, multiply, each rounded to A).
template <typename A>
__device__ __forceinline__ void prepare_columns(const GalaCeCudaParams& p) {
  const int64_t C = p.num_classes;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kPrepareThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kPrepareThreads + threadIdx.x;
  if (p.step.active) {
    A* bias = reinterpret_cast<A*>(p.workspace + kBiasSlot);
    const A lambda1 = static_cast<A>(p.step.lambda1), eps = static_cast<A>(p.step.eps);
    for (int64_t j = tid; j < C; j += grid_threads) bias[j] = lambda1 * log(static_cast<A>(p.step.pos_grad[j]) + eps);
    return;
  }
  if (p.raw_stats) {
    for (int64_t k = tid; k < 3 * C; k += grid_threads) p.raw_stats[k] = 0.0f;
  }
  if (p.raw_pairwise) {
    for (int64_t k = tid; k < C * C; k += grid_threads) p.raw_pairwise[k] = 0.0f;
  }
}

// Blocks 0 .. label_partials - 1: the counts of their share of the labels (rows b * threads + t,
// strided by label_partials * threads) and, with a weight and smoothing, of the class weights;
// written to the block's partial slots (PartialSlot).
template <typename A>
__device__ __forceinline__ void prepare_label_counts(const GalaCeCudaParams& p) {
  const int64_t C = p.num_classes;
  const int64_t stride = static_cast<int64_t>(p.label_partials) * kPrepareThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPrepareThreads + threadIdx.x;
  const A* weight = static_cast<const A*>(p.weight);
  LaunchTotals t = empty_totals();
  for (int64_t i = first; i < p.batch; i += stride) {
    const int64_t y = p.labels[i];
    if (y == p.ignore_index) continue;
    ++t.rows;
    if (y < 0 || y >= C) {  // never used as an index
      ++t.bad_rows;
      t.first_bad_row = min(t.first_bad_row, static_cast<long long>(i));
      t.first_bad_label = 0;  // read once below, for the block's first bad row
      continue;
    }
    t.label_weight += weight ? static_cast<double>(weight[y]) : 1.0;
  }
  if (weight && p.label_smoothing > 0.0) {
    for (int64_t j = first; j < C; j += stride) t.class_weight += static_cast<double>(weight[j]);
  }
  __shared__ LaunchTotals warp_totals[kPrepareThreads / kWarpSize];
  t = warp_merge(t);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = t;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kPrepareThreads / kWarpSize; ++w) t = merge(t, warp_totals[w]);
  int64_t* slot = p.workspace + kPartials + blockIdx.x * kPartialSlots;
  slot[kPartialRows] = t.rows;
  slot[kPartialBadRows] = t.bad_rows;
  slot[kPartialFirstBadRow] = t.first_bad_row;
  slot[kPartialFirstBadLabel] = t.first_bad_row == kNoRow ? 0 : p.labels[t.first_bad_row];
  slot[kPartialLabelWeight] = __double_as_longlong(t.label_weight);
  slot[kPartialClassWeight] = __double_as_longlong(t.class_weight);
}

// Everything the forward kernel reads besides its inputs: see prepare_columns and
// prepare_label_counts; block 0 also resets the loss sum, the ticket and fused_ce_fwd's counts
// (counts[0] is set by the forward kernel, which has the totals).
template <typename A>
__global__ void __launch_bounds__(kPrepareThreads) gala_ce_prepare_kernel(const GalaCeCudaParams p) {
  prepare_columns<A>(p);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.workspace[kLossSum] = 0;  // the bit pattern of 0.0
    p.workspace[kDoneCtas] = 0;
    if (p.counts) {
      p.counts[0] = 0;
      p.counts[1] = 0;
    }
  }
  if (static_cast<int>(blockIdx.x) < p.label_partials) prepare_label_counts<A>(p);
}

// ------------------------------------------------------------------ register kernel

// Resident threads per SM the persistent grid aims at (see "Choosing a kernel").
constexpr int kTargetThreadsPerSm = 1024;

// The CTAs per SM a kernel's __launch_bounds__ promises: a CTA-per-row kernel is compiled for
// kTargetThreadsPerSm resident threads (64 registers per thread), so that ptxas's own occupancy
// heuristics neither lower the grid's occupancy nor spill; a warp-per-row kernel keeps its
// kElemsPerThread values in as many registers as it needs (up to 255).
constexpr int min_ctas_per_sm(int team_threads, int block_threads) {
  return team_threads == kWarpSize ? 1 : kTargetThreadsPerSm / block_threads;
}

// Each thread of a team holds kElemsPerThread adjusted logits in registers: kItems 16-byte
// vectors; item k of team lane l covers columns l * kVec - shift + k * kItemStride + [0, kVec).
template <typename T, int kTeamThreads, int kElemsPerThread>
struct RegisterLayout {
  static constexpr int kVec = kVecBytes / sizeof(T);
  static_assert(kElemsPerThread % kVec == 0, "whole vectors per thread");
  static constexpr int kItems = kElemsPerThread / kVec;
  static constexpr int kItemStride = kTeamThreads * kVec;
};

// Phase 2: this thread's max and sum_{j != y} exp(a[j] - max) (-inf padding adds exp(-inf) = 0),
// and whether any of its columns is non-finite.
template <int kVec, int kItems, int kItemStride>
__device__ __forceinline__ SoftmaxPartial<float> thread_softmax_partial(const float (&a)[kItems][kVec], int lane_j0,
                                                                        int Ci, int yi) {
  SoftmaxPartial<float> part{negative_infinity<float>(), 0.0f, 0};
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int j = lane_j0 + k * kItemStride + e;
      part.max = fmaxf(part.max, a[k][e]);
      part.nonfinite |= static_cast<unsigned>(j) < static_cast<unsigned>(Ci) && !isfinite(a[k][e]);
    }
  }
  if (part.max != negative_infinity<float>()) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (lane_j0 + k * kItemStride + e != yi) part.sum_other += softmax_exp(a[k][e] - part.max);
      }
    }
  }
  return part;
}

// Phase 4: gradient stores, raw_clsneg into the team's shared-memory accumulators, pairwise
// (global atomics) when tracked. Returns this thread's share of sum_j wt[j] (m - a[j])
// (smoothing only; 0 otherwise).
template <typename T, bool kSmooth, int kVec, int kItems, int kItemStride>
__device__ __forceinline__ float register_row_gradient(const GalaCeCudaParams& p, const float* weight,
                                                       const RowGradient<float>& rg, const float (&a)[kItems][kVec],
                                                       int lane_j0, int Ci, int yi, T* g, bool grad_aligned,
                                                       float* cls_neg_team) {
  const bool stats = p.raw_stats != nullptr;
  float smooth = 0.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int j0 = lane_j0 + k * kItemStride;
    float gv[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int j = j0 + e;
      const bool in_row = static_cast<unsigned>(j) < static_cast<unsigned>(Ci);
      const float prob = softmax_exp(a[k][e] - rg.max) * rg.inv_sum;
      float wj = 0.0f;
      if constexpr (kSmooth) {
        if (in_row) {
          wj = weight ? __ldg(weight + j) : 1.0f;
          smooth += wj * (rg.max - a[k][e]);
        }
      }
      gv[e] = j == yi ? rg.at_label : off_label_gradient<float, kSmooth>(rg, prob, wj);
      if (stats && j != yi && in_row) {
        cls_neg_team[padded_column(j)] += prob;
        if (p.raw_pairwise) atomicAdd(p.raw_pairwise + static_cast<int64_t>(j) * p.num_classes + yi, prob);
      }
    }
    store_grad<T, float, kVec>(g, j0, Ci, grad_aligned, gv);
  }
  return smooth;
}

// One non-ignored row with a valid label, held by a team: phases 1-5. Returns loss_i (NaN for a
// row holding a non-finite logit, whose gradient is NaN and which is counted).
template <typename T, int kTeamThreads, int kBlockThreads, int kElemsPerThread, bool kSmooth>
__device__ __forceinline__ float register_row(const GalaCeCudaParams& p, const LaunchCoefficients<float>& lc,
                                              const T* z, T* g, int yi, int lane, float* cls_neg_team,
                                              SoftmaxPartial<float>* reduce_scratch, float* smooth_scratch) {
  using L = RegisterLayout<T, kTeamThreads, kElemsPerThread>;
  const float* bias = static_cast<const float*>(p.class_bias);
  // Row-local indices fit in 32 bits here (C <= 16384, checked by the launcher).
  const int Ci = static_cast<int>(p.num_classes);
  const int shift = misalignment(z);
  const float a_y = to_math(z[yi]) + (bias ? bias[yi] : 0.0f);
  const int lane_j0 = lane * L::kVec - shift;

  // 1. Load the row into registers (padding columns read as -inf).
  float a[L::kItems][L::kVec];
#pragma unroll
  for (int k = 0; k < L::kItems; ++k) {
    load_adjusted<T, float, L::kVec, true>(z, bias, lane_j0 + k * L::kItemStride, Ci, a[k]);
  }
  // 2. Softmax partials, merged over the team.
  SoftmaxPartial<float> part = thread_softmax_partial<L::kVec, L::kItems, L::kItemStride>(a, lane_j0, Ci, yi);
  part = team_merge<float, kTeamThreads, kBlockThreads>(part, reduce_scratch);
  if (part.nonfinite) {
    fill_row(g, p.num_classes, quiet_nan<float>(), lane, kTeamThreads);
    if (lane == 0) count_nonfinite_row(p);
    return quiet_nan<float>();
  }
  // 3. Loss, grad[y] and the row statistics.
  float loss_row;
  const RowGradient<float> rg = begin_row_gradient<float, kSmooth>(p, lc, part, a_y, yi, lane == 0, loss_row);
  // 4. Gradient and column statistics.
  float smooth = register_row_gradient<T, kSmooth, L::kVec, L::kItems, L::kItemStride>(
      p, lc.weight, rg, a, lane_j0, Ci, yi, g, misalignment(g) == shift, cls_neg_team);
  // 5. The smoothing's share of the loss.
  if constexpr (kSmooth) smooth = team_sum<float, kTeamThreads, kBlockThreads>(smooth, smooth_scratch);
  return finish_row_loss<float, kSmooth>(lc, loss_row, smooth);
}

// A team of kTeamThreads threads (one warp, or the whole CTA) handles one row at a time; the CTA
// loops over rows (persistent grid). Rows up to kTeamThreads * kElemsPerThread - (kVec - 1)
// columns fit (the launcher checks; kVec - 1 covers a misaligned row start).
//
// Dynamic shared memory: kTeams * padded_columns(C) floats of raw_clsneg accumulators, when
// statistics are on.
template <typename T, int kTeamThreads, int kBlockThreads, int kElemsPerThread, bool kSmooth>
__global__ void __launch_bounds__(kBlockThreads, min_ctas_per_sm(kTeamThreads, kBlockThreads))
    gala_ce_rows_in_registers_kernel(const GalaCeCudaParams p) {
  constexpr int kTeams = kBlockThreads / kTeamThreads;
  extern __shared__ float cls_neg_smem[];
  __shared__ SoftmaxPartial<float> reduce_scratch[kBlockThreads / kWarpSize];
  __shared__ float smooth_scratch[kBlockThreads / kWarpSize];
  __shared__ LaunchShared<float, kTeams> launch;

  const int64_t B = p.batch, C = p.num_classes;
  const int team = threadIdx.x / kTeamThreads, lane = threadIdx.x % kTeamThreads;
  float* cls_neg_team = cls_neg_smem + team * padded_columns(C);
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  T* loss_rows = static_cast<T*>(p.loss);

  if (p.raw_stats) {
    for (int64_t k = threadIdx.x; k < kTeams * padded_columns(C); k += kBlockThreads) cls_neg_smem[k] = 0.0f;
  }
  begin_launch(p, launch);  // its barrier also orders the zeroing above
  const LaunchCoefficients<float>& lc = launch.coefficients;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kTeams + team; row < B;
       row += static_cast<int64_t>(gridDim.x) * kTeams) {
    const int64_t y = p.labels[row];
    const T* z = logits + row * p.logits_row_stride;
    T* g = grad + row * C;
    const RowKind kind = row_kind(p, y);
    float loss_row = 0.0f;
    if (kind == RowKind::Normal) {
      loss_row = register_row<T, kTeamThreads, kBlockThreads, kElemsPerThread, kSmooth>(
          p, lc, z, g, static_cast<int>(y), lane, cls_neg_team, reduce_scratch, smooth_scratch);
    } else {
      fill_row(g, C, skipped_row_grad<float>(p, kind), lane, kTeamThreads);
      if (kind == RowKind::BadLabel) loss_row = quiet_nan<float>();
    }
    if (lane == 0) {
      if (p.reduction == ReductionCode::None) {
        loss_rows[row] = from_math<T>(loss_row);
      } else {
        launch.team_loss[team] += static_cast<double>(loss_row);
      }
    }
    // Orders this row's shared-memory writes (raw_clsneg, reduce scratch) before the next row's.
    if constexpr (kTeamThreads == kWarpSize) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }

  if (p.raw_stats) flush_cls_neg<kTeams, kBlockThreads>(cls_neg_smem, p.raw_stats + 2 * C, C);
  finish_launch<T, kBlockThreads>(p, launch);
}

// ------------------------------------------------------------------ streamed kernel

constexpr int kStreamedThreads = 512;

// Pass 1: online softmax over this thread's vectors (vectors lane, lane + 512, ...):
// (m, S) <- (m', S exp(m - m') + sum exp(a - m')).
template <typename T, typename A>
__device__ __forceinline__ SoftmaxPartial<A> streamed_softmax_partial(const T* z, const A* bias, int64_t C, int shift,
                                                                      int64_t y) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const int64_t num_vectors = (C + shift + kVec - 1) / kVec;
  SoftmaxPartial<A> part{negative_infinity<A>(), A(0), 0};
#pragma unroll 2
  for (int64_t v = threadIdx.x; v < num_vectors; v += kStreamedThreads) {
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
  return part;
}

// Pass 2: re-read the row (L2 when it is still there): gradient and column statistics. Returns
// this thread's share of sum_j wt[j] (m - a[j]) (smoothing only; 0 otherwise).
template <typename T, typename A, bool kSharedClsNeg, bool kSmooth>
__device__ __forceinline__ A streamed_row_gradient(const GalaCeCudaParams& p, const A* weight,
                                                   const RowGradient<A>& rg, const T* z, T* g, int shift, int64_t y,
                                                   float* cls_neg_smem) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const int64_t C = p.num_classes;
  const int64_t num_vectors = (C + shift + kVec - 1) / kVec;
  const A* bias = static_cast<const A*>(p.class_bias);
  const bool grad_aligned = misalignment(g) == shift;
  const bool stats = p.raw_stats != nullptr;
  A smooth = A(0);
  for (int64_t v = threadIdx.x; v < num_vectors; v += kStreamedThreads) {
    const int64_t j0 = v * kVec - shift;
    A a[kVec], gv[kVec];
    load_adjusted<T, A, kVec, true>(z, bias, j0, C, a);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int64_t j = j0 + e;
      const bool in_row = j >= 0 && j < C;
      const A prob = softmax_exp(a[e] - rg.max) * rg.inv_sum;
      A wj = A(0);
      if constexpr (kSmooth) {
        if (in_row) {
          wj = weight ? __ldg(weight + j) : A(1);
          smooth += wj * (rg.max - a[e]);
        }
      }
      gv[e] = j == y ? rg.at_label : off_label_gradient<A, kSmooth>(rg, prob, wj);
      if (stats && j != y && in_row) {
        if constexpr (kSharedClsNeg) {
          cls_neg_smem[padded_column(j)] += static_cast<float>(prob);
        } else {
          atomicAdd(p.raw_stats + 2 * C + j, static_cast<float>(prob));
        }
        if (p.raw_pairwise) atomicAdd(p.raw_pairwise + j * C + y, static_cast<float>(prob));
      }
    }
    store_grad<T, A, kVec>(g, j0, C, grad_aligned, gv);
  }
  return smooth;
}

// One non-ignored row with a valid label, held by the whole CTA: both passes. Returns loss_i
// (NaN for a row holding a non-finite logit, whose gradient is NaN and which is counted).
template <typename T, bool kSharedClsNeg, bool kSmooth>
__device__ __forceinline__ typename MathType<T>::type streamed_row(
    const GalaCeCudaParams& p, const LaunchCoefficients<typename MathType<T>::type>& lc, const T* z, T* g, int64_t y,
    float* cls_neg_smem, SoftmaxPartial<typename MathType<T>::type>* reduce_scratch,
    typename MathType<T>::type* smooth_scratch) {
  using A = typename MathType<T>::type;
  const A* bias = static_cast<const A*>(p.class_bias);
  const int shift = misalignment(z);
  const A a_y = to_math(z[y]) + (bias ? bias[y] : A(0));

  SoftmaxPartial<A> part = streamed_softmax_partial<T, A>(z, bias, p.num_classes, shift, y);
  part = team_merge<A, kStreamedThreads, kStreamedThreads>(part, reduce_scratch);
  if (part.nonfinite) {
    fill_row(g, p.num_classes, quiet_nan<A>(), threadIdx.x, kStreamedThreads);
    if (threadIdx.x == 0) count_nonfinite_row(p);
    return quiet_nan<A>();
  }
  A loss_row;
  const RowGradient<A> rg = begin_row_gradient<A, kSmooth>(p, lc, part, a_y, y, threadIdx.x == 0, loss_row);
  A smooth = streamed_row_gradient<T, A, kSharedClsNeg, kSmooth>(p, lc.weight, rg, z, g, shift, y, cls_neg_smem);
  if constexpr (kSmooth) smooth = team_sum<A, kStreamedThreads, kStreamedThreads>(smooth, smooth_scratch);
  return finish_row_loss<A, kSmooth>(lc, loss_row, smooth);
}

// One CTA per row (persistent grid) for rows of any length: pass 1 streams the row once
// (online softmax per thread, then merged over the CTA), pass 2 reads it again to write the
// gradient. kSharedClsNeg: raw_clsneg is accumulated in C floats of dynamic shared memory and
// flushed once per CTA, as in the register kernel; otherwise (C too large for shared memory)
// it takes one global atomicAdd per column of each row.
//
// Double rows (a correctness path: fp64 math throughout, exp's slow path included) are compiled
// for one CTA per SM (up to 128 registers); the others for kTargetThreadsPerSm threads per SM.
template <typename T, bool kSharedClsNeg, bool kSmooth>
__global__ void __launch_bounds__(kStreamedThreads,
                                  std::is_same_v<T, double> ? 1 : min_ctas_per_sm(kStreamedThreads, kStreamedThreads))
    gala_ce_rows_streamed_kernel(const GalaCeCudaParams p) {
  using A = typename MathType<T>::type;
  __shared__ SoftmaxPartial<A> reduce_scratch[kStreamedThreads / kWarpSize];
  __shared__ A smooth_scratch[kStreamedThreads / kWarpSize];
  __shared__ LaunchShared<A, 1> launch;
  extern __shared__ float cls_neg_smem[];

  const int64_t B = p.batch, C = p.num_classes;
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  T* loss_rows = static_cast<T*>(p.loss);
  if constexpr (kSharedClsNeg) {
    for (int64_t k = threadIdx.x; k < padded_columns(C); k += kStreamedThreads) cls_neg_smem[k] = 0.0f;
  }
  begin_launch(p, launch);  // its barrier also orders the zeroing above
  const LaunchCoefficients<A>& lc = launch.coefficients;

  for (int64_t row = blockIdx.x; row < B; row += gridDim.x) {
    const int64_t y = p.labels[row];
    const T* z = logits + row * p.logits_row_stride;
    T* g = grad + row * C;
    const RowKind kind = row_kind(p, y);
    A loss_row = A(0);
    if (kind == RowKind::Normal) {
      loss_row = streamed_row<T, kSharedClsNeg, kSmooth>(p, lc, z, g, y, cls_neg_smem, reduce_scratch, smooth_scratch);
    } else {
      fill_row(g, C, skipped_row_grad<A>(p, kind), threadIdx.x, kStreamedThreads);
      if (kind == RowKind::BadLabel) loss_row = quiet_nan<A>();
    }
    if (threadIdx.x == 0) {
      if (p.reduction == ReductionCode::None) {
        loss_rows[row] = from_math<T>(loss_row);
      } else {
        launch.team_loss[0] += static_cast<double>(loss_row);
      }
    }
    __syncthreads();  // reduce_scratch, smooth_scratch and cls_neg_smem are reused by the next row
  }
  if constexpr (kSharedClsNeg) {
    if (p.raw_stats) flush_cls_neg<1, kStreamedThreads>(cls_neg_smem, p.raw_stats + 2 * C, C);
  }
  finish_launch<T, kStreamedThreads>(p, launch);
}

// ------------------------------------------------------------------ choosing a kernel
//
// A team must cover C + max_shift columns, where max_shift = kVec - 1 unless every row of the
// logits starts on a 16-byte boundary (then 0). The smallest register variant that fits wins:
//   one warp per row, 4 rows per 128-thread CTA:  8, 16 or 32 elements per thread (<= 1024 columns)
//   one CTA per row, 16 elements per thread:      128, 256, 512 or 1024 threads (<= 16384 columns)
// then the streamed kernel (every double row; longer rows; or raw_clsneg accumulators larger
// than the shared memory a CTA may opt in to), with its raw_clsneg in shared memory when C
// floats fit there (C <= ~56K on sm_90, ~40K on sm_80). Each has a label-smoothing twin.
// Why 16 elements per thread at most: a 1024-thread CTA may use 64 registers per thread, and 32
// fp32 values plus the indices and partial sums spill (checked with -Xptxas -warn-spills in the
// compile check, which fails on any spill).
//
// Grid: persistent, at most kTargetThreadsPerSm resident threads per SM (and no more than the
// occupancy allows). Each thread keeps 8 to 32 elements (32 to 128 bytes) of loads in flight, so
// ~1024 threads per SM already cover the memory latency (Little's law: ~3.3 TB/s x ~1 us is a
// few MB over all SMs); a larger grid would only add CTAs, hence more raw_clsneg flushes.
// Provisional: to be tuned on a GPU with the crossover benchmark (python -m gala_kernels bench crossover).
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
  v.kernel = p.label_smoothing > 0.0
                 ? reinterpret_cast<const void*>(
                       &gala_ce_rows_in_registers_kernel<T, kTeamThreads, kBlockThreads, kElemsPerThread, true>)
                 : reinterpret_cast<const void*>(
                       &gala_ce_rows_in_registers_kernel<T, kTeamThreads, kBlockThreads, kElemsPerThread, false>);
  v.block_threads = kBlockThreads;
  v.rows_per_cta = kTeams;
  const size_t cls_neg_floats = static_cast<size_t>(kTeams * padded_columns(p.num_classes));
  v.dynamic_smem = p.raw_stats ? cls_neg_floats * sizeof(float) : 0;
  v.name = name;
  return v;
}

// Static shared memory of the kernels (reduce scratch, loss epilogue, totals), at most.
constexpr size_t kStaticSmemAllowance = 2048;

template <typename T, bool kSharedClsNeg>
const void* streamed_kernel(const GalaCeCudaParams& p) {
  return p.label_smoothing > 0.0 ? reinterpret_cast<const void*>(&gala_ce_rows_streamed_kernel<T, kSharedClsNeg, true>)
                                 : reinterpret_cast<const void*>(&gala_ce_rows_streamed_kernel<T, kSharedClsNeg, false>);
}

template <typename T>
Variant streamed_variant(const GalaCeCudaParams& p, const DeviceLimits& limits) {
  Variant v;
  v.block_threads = kStreamedThreads;
  const size_t cls_neg_bytes = static_cast<size_t>(padded_columns(p.num_classes)) * sizeof(float);
  if (p.raw_stats && cls_neg_bytes + kStaticSmemAllowance <= static_cast<size_t>(limits.max_smem_optin)) {
    v.kernel = streamed_kernel<T, true>(p);
    v.dynamic_smem = cls_neg_bytes;
    v.name = "streamed_cta512_smem";
  } else {
    v.kernel = streamed_kernel<T, false>(p);
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

int gala_ce_label_partials(int64_t batch) {
  return static_cast<int>(std::clamp<int64_t>((batch + kRowsPerPartial - 1) / kRowsPerPartial, 1, kMaxPartials));
}

cudaError_t launch_gala_ce_prepare(const GalaCeCudaParams& params, cudaStream_t stream) {
  DeviceLimits limits;
  cudaError_t err = device_limits(&limits);
  if (err != cudaSuccess) return err;
  GalaCeCudaParams args = params;
  args.label_partials = gala_ce_label_partials(params.batch);
  // Enough blocks for the column work in a few sweeps, and at least one per label partial.
  int64_t column_elems = params.step.active ? params.num_classes : 0;
  if (!params.step.active && params.raw_stats) column_elems += 3 * params.num_classes;
  if (!params.step.active && params.raw_pairwise) column_elems += params.num_classes * params.num_classes;
  const int64_t wanted = (column_elems + kPrepareThreads * 8 - 1) / (kPrepareThreads * 8);
  const int64_t max_blocks = 4 * static_cast<int64_t>(limits.sm_count);
  const int blocks = static_cast<int>(std::max<int64_t>(std::clamp<int64_t>(wanted, 1, max_blocks), args.label_partials));
  if (params.dtype == DType::Float64) {
    gala_ce_prepare_kernel<double><<<blocks, kPrepareThreads, 0, stream>>>(args);
  } else {
    gala_ce_prepare_kernel<float><<<blocks, kPrepareThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

cudaError_t launch_gala_ce_forward(const GalaCeCudaParams& params, cudaStream_t stream) {
  // fused_ce_fwd has nothing to do without rows; a training step still folds (one CTA, no row).
  if (params.batch <= 0 && !params.step.active) return cudaSuccess;
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
  const int64_t ctas_needed = std::max<int64_t>(1, (params.batch + v.rows_per_cta - 1) / v.rows_per_cta);
  const int64_t grid = std::min<int64_t>(ctas_needed, static_cast<int64_t>(ctas_per_sm) * limits.sm_count);
  GalaCeCudaParams args = params;
  args.label_partials = gala_ce_label_partials(params.batch);
  args.smoothing_per_class = params.label_smoothing / static_cast<double>(params.num_classes);
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
