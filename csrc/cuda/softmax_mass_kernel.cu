// The mass pass of post-hoc re-balancing, CUDA: column sums of the row softmax.
//
// docs/rebalancing.md, the mass pass:
//   mass[j] = sum_i softmax(z[i, :])[j]
// One call computes colsum[j] = sum_{i < B} p[i, j] and adds it into (or writes it to) `out`.
// A row holding NaN or +inf, or -inf everywhere, has a NaN softmax (as torch.softmax) and adds
// NaN to every column; a -inf entry has probability 0.
//
// Kernels (math in fp32, fp64 for double logits):
//   softmax_colsum_rows_kernel     C up to kThreads x kItems (16,384 fp32, 4,096 fp64): a CTA
//                                  walks a contiguous range of rows, one row at a time. Thread t
//                                  holds columns j = k * kThreads + t (k < kItems) of the row in
//                                  registers (coalesced 4-byte loads: column ownership must not
//                                  depend on a row's alignment, see below) and owns the CTA's
//                                  column sums of those columns (shared memory):
//                                    m_t = max_k z[j_k],  e_k = exp(z[j_k] - m_t),  s_t = sum_k e_k
//                                    (M, S) = merge over the CTA of (m_t, s_t)   one __syncthreads
//                                    colsum_cta[j_k] += e_k * exp(m_t - M) / S
//                                  Variants differ in threads per row and in whether the next
//                                  row's loads are issued before this row's reductions (row_variants
//                                  below). The logits are read exactly once; nothing but the
//                                  per-CTA partial sums (grid x C, a few % of the logits) is written.
//   softmax_row_lse_kernel +       longer rows: lse[i] = logsumexp(z[i, :]) (an online pass),
//   softmax_colsum_tiles_kernel    then (column tile, row group) CTAs sum exp(z[i, j] - lse[i]):
//                                  two reads of the logits.
//   reduce_partials_kernel         out[j] (+)= sum over CTAs g of partial[g, j], in double and in
//                                  a fixed order: bitwise deterministic, no atomics.
//
// Why 4-byte loads: the columns a thread owns must be the same in every row, since it alone
// updates their sums. With 16-byte loads they would shift with each row's alignment (C = 8,142
// fp32 rows alternate between two 16-byte phases). A warp's 32 consecutive 4-byte loads still
// fill whole 128-byte lines, and kItems independent loads per thread keep bytes in flight.

#include "softmax_mass_kernel.cuh"

#include "device_common.cuh"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace gala::cuda {
namespace {

// Fewest rows a row-kernel CTA takes: bounds the partial sums to C / kMinRowsPerCta values per
// row of logits (12.5% of a batch's bytes at worst, a few % at evaluation-set sizes).
constexpr int64_t kMinRowsPerCta = 8;
// Threads of the row-logsumexp kernel (one CTA per row at a time).
constexpr int kLseThreads = 512;
// The tiles kernel: kTileThreads x kTileItems columns per tile; CTAs aimed at per SM.
constexpr int kTileThreads = 256;
constexpr int kTileItems = 8;
constexpr int kTileCtasPerSm = 8;
constexpr int64_t kMinRowsPerGroup = 8;
// The partials reduction: 32 columns per CTA (one per lane), kReduceWarps warps over the CTAs.
constexpr int kReduceWarps = 8;

template <typename T>
using Math = typename MathType<T>::type;

template <typename A>
__device__ __forceinline__ A positive_infinity() {
  return -negative_infinity<A>();
}

// True for NaN and +inf: the values that make a row's softmax NaN.
template <typename A>
__device__ __forceinline__ bool poisons_row(A x) {
  return x != x || x == positive_infinity<A>();
}

// The streaming (evict-first) load of one element, in the math type.
template <typename T>
__device__ __forceinline__ Math<T> load_streaming(const T* ptr) {
  return to_math(__ldcs(ptr));
}

// Columns j = k * kThreads + threadIdx.x of one row into x[k]; -inf past the row's end.
template <typename T, int kThreads, int kItems>
__device__ __forceinline__ void load_row(const T* row, int C, Math<T> (&x)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int j = k * kThreads + static_cast<int>(threadIdx.x);
    x[k] = j < C ? load_streaming(row + j) : negative_infinity<Math<T>>();
  }
}

// exp(x) as the row kernels need it: fp32 math takes 2^(x log2 e) on the special-function unit
// (ex2.approx, a few ulp, ample for probabilities that are summed; -inf -> 0, NaN -> NaN) from an
// argument the caller already scaled by log2 e, fp64 math full accuracy.
__device__ __forceinline__ float exp_of_scaled(float x_log2e) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x_log2e));
  return y;
}
__device__ __forceinline__ double exp_of_scaled(double x) { return exp(x); }

// log2 e for fp32 math (exp_of_scaled takes x log2 e), 1 for fp64 math (it takes x).
template <typename A>
__device__ __forceinline__ A exp_scale() {
  return std::is_same_v<A, float> ? A(1.4426950408889634) : A(1);
}

struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return fmax(a, b); }
};
struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};

// op over one value per thread of the CTA (or of the warp, kThreads = 32); every thread gets the
// result. Warp shuffles, then (CTA) one value per warp through `scratch` and one __syncthreads.
// A CTA may reuse `scratch` once every warp has read it: past the next barrier of the kernel.
template <int kThreads, typename A, typename Op>
__device__ __forceinline__ A team_all_reduce(A v, A* scratch, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if constexpr (kThreads == kWarpSize) {
    return v;
  } else {
    constexpr int kWarps = kThreads / kWarpSize;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[lane % kWarps];  // every lane a warp's value: the shuffles below reduce all of them
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
  }
}

// Shared memory of one row's softmax over a CTA: one max and one sum per warp.
template <typename A, int kThreads>
struct RowReduceScratch {
  A max[kThreads / kWarpSize];
  A sum[kThreads / kWarpSize];
};

// One row's softmax over a CTA (or a warp, kThreads = 32), given this thread's kItems values x:
// turns them into e_k = exp(x_k - M) and returns 1 / S, so that p_k = e_k / S, where M is the
// row's max and S = sum_j exp(z_j - M). Two team reductions (max, then sum), two __syncthreads.
// NaN rows need no test of their own: a NaN or +inf entry (inf - inf), or a row of -inf only
// (M = -inf: -inf - -inf), puts a NaN into some e and so into S, and 1 / S is NaN.
// Each scratch array is written again at the next row only after a barrier that every warp
// reaches after reading it (the other reduction's), so one buffer of each suffices.
template <typename A, int kThreads, int kItems>
__device__ __forceinline__ A row_softmax_scale(A (&x)[kItems], RowReduceScratch<A, kThreads>& scratch) {
  A m = negative_infinity<A>();
#pragma unroll
  for (int k = 0; k < kItems; ++k) m = fmax(m, x[k]);  // fmax skips NaN; the sum catches it
  const A row_max = team_all_reduce<kThreads>(m, scratch.max, MaxOp{});
  const A scale = exp_scale<A>();
  const A shift = -row_max * scale;
  A s = A(0);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    x[k] = exp_of_scaled(fma(x[k], scale, shift));  // exp(x_k - M)
    s += x[k];
  }
  return A(1) / team_all_reduce<kThreads>(s, scratch.sum, SumOp{});
}

// ------------------------------------------------------------------ C up to kThreads x kItems

// CTAs per SM the row kernel must fit: 64 registers per thread (1024 resident threads per SM),
// 128 for fp64 math.
template <typename T>
constexpr int rows_kernel_min_ctas(int threads) {
  const int resident_threads = std::is_same_v<T, double> ? 512 : 1024;
  return resident_threads / threads > 0 ? resident_threads / threads : 1;
}

template <typename T, int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads, rows_kernel_min_ctas<T>(kThreads)) softmax_colsum_rows_kernel(
    const T* __restrict__ logits, int64_t B, int C, int64_t row_stride, Math<T>* __restrict__ partials) {
  using A = Math<T>;
  __shared__ RowReduceScratch<A, kThreads> scratch;
  const int64_t row_begin = blockIdx.x * B / gridDim.x;
  const int64_t row_end = (blockIdx.x + 1) * B / gridDim.x;
  A acc[kItems];  // this thread's columns' sums over the CTA's rows
#pragma unroll
  for (int k = 0; k < kItems; ++k) acc[k] = A(0);
  for (int64_t r = row_begin; r < row_end; ++r) {
    A x[kItems];
    load_row<T, kThreads, kItems>(logits + r * row_stride, C, x);
    const A inv_sum = row_softmax_scale<A, kThreads, kItems>(x, scratch);
#pragma unroll
    for (int k = 0; k < kItems; ++k) acc[k] = fma(x[k], inv_sum, acc[k]);
  }
  // This CTA's column sums (zeros when it had no row).
  A* out = partials + static_cast<int64_t>(blockIdx.x) * C;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int j = k * kThreads + static_cast<int>(threadIdx.x);
    if (j < C) out[j] = acc[k];
  }
}

// ------------------------------------------------------------------ the same, loads pipelined

// cp.async (sm_80+): copies one word of kWordBytes from global to shared memory without passing
// through registers; the first src_bytes are copied and the rest zero-filled.
template <int kWordBytes>
__device__ __forceinline__ void copy_word_async(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem_src), "n"(kWordBytes),
               "r"(src_bytes));
#else  // older GPUs: a synchronous copy with the same result
  unsigned char* out = static_cast<unsigned char*>(smem_dst);
  for (int b = 0; b < kWordBytes; ++b) out[b] = b < src_bytes ? static_cast<const unsigned char*>(gmem_src)[b] : 0;
#endif
}

__device__ __forceinline__ void commit_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Words of the pipelined kernel: 4 bytes (one fp32 value, two bf16 / fp16 values) or 8 (fp64).
template <typename T>
__host__ __device__ constexpr int word_bytes() {
  return sizeof(T) >= 4 ? static_cast<int>(sizeof(T)) : 4;
}

// Element e of a word read from shared memory, in the math type.
template <typename T>
__device__ __forceinline__ Math<T> word_element(const unsigned char* word, int e) {
  if constexpr (sizeof(T) >= 4) {
    return *reinterpret_cast<const T*>(word);
  } else {
    const uint32_t bits = *reinterpret_cast<const uint32_t*>(word) >> (16 * e);  // little-endian
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
  }
}

// The row kernel with its loads decoupled from its math: each thread copies its own words of row
// r + kStages - 1 into a shared-memory stage (cp.async) while it computes row r from another, so
// kStages - 1 rows per CTA are always in flight, and the column sums stay in registers. A thread
// reads back only the words it copied itself, so the pipeline needs no barrier: each thread's
// wait_group is enough. Thread t owns the words w = k * kThreads + t (k < kWords), i.e. columns
// w * E .. w * E + E - 1 (E values per word), in every row: the rows must start on word boundaries.
template <typename T, int kThreads, int kWords, int kStages>
__global__ void __launch_bounds__(kThreads, rows_kernel_min_ctas<T>(kThreads)) softmax_colsum_pipelined_kernel(
    const T* __restrict__ logits, int64_t B, int C, int64_t row_stride, Math<T>* __restrict__ partials) {
  using A = Math<T>;
  constexpr int kWordBytes = word_bytes<T>();
  constexpr int kPerWord = kWordBytes / static_cast<int>(sizeof(T));
  constexpr int kItems = kWords * kPerWord;
  constexpr int64_t kStageBytes = int64_t(kThreads) * kWords * kWordBytes;
  extern __shared__ __align__(16) unsigned char stages[];  // kStages x kStageBytes
  __shared__ RowReduceScratch<A, kThreads> scratch;

  const int64_t row_begin = blockIdx.x * B / gridDim.x;
  const int64_t row_end = (blockIdx.x + 1) * B / gridDim.x;
  // This thread's words k < valid_words hold columns < C (a prefix, as w grows with k): one
  // comparison per word instead of kWords predicates kept live across the loop.
  const int row_words = (C + kPerWord - 1) / kPerWord;
  const int valid_words = min(kWords, max(0, (row_words - static_cast<int>(threadIdx.x) + kThreads - 1) / kThreads));
  const int last_word_bytes = (C - (row_words - 1) * kPerWord) * static_cast<int>(sizeof(T));  // < a word: zero-fill
  // Queues this thread's words of row r (if any) into `stage`, as one commit group (possibly
  // empty, so that the group count stays one per row).
  auto queue_row = [&](int64_t r, int stage) {
    if (r < row_end) {
      const auto* row = reinterpret_cast<const unsigned char*>(logits + r * row_stride);
      unsigned char* dst = stages + stage * kStageBytes;
#pragma unroll
      for (int k = 0; k < kWords; ++k) {
        const int w = k * kThreads + static_cast<int>(threadIdx.x);
        if (k < valid_words) {
          const int bytes = w == row_words - 1 ? last_word_bytes : kWordBytes;
          copy_word_async<kWordBytes>(dst + int64_t(w) * kWordBytes, row + int64_t(w) * kWordBytes, bytes);
        }
      }
    }
    commit_async_copies();
  };

  A acc[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) acc[k] = A(0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) queue_row(row_begin + s, s);
  int stage = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    queue_row(r + kStages - 1, stage == 0 ? kStages - 1 : stage - 1);  // the stage row r - 1 used
    wait_async_copies<kStages - 1>();                                   // row r has landed
    const unsigned char* src = stages + stage * kStageBytes;
    A x[kItems];
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int w = k * kThreads + static_cast<int>(threadIdx.x);
#pragma unroll
      for (int e = 0; e < kPerWord; ++e) {  // the zero-filled half of a last 16-bit word is past C
        const bool inside = k < valid_words && (kPerWord == 1 || w * kPerWord + e < C);
        x[k * kPerWord + e] = inside ? word_element<T>(src + int64_t(w) * kWordBytes, e) : negative_infinity<A>();
      }
    }
    const A inv_sum = row_softmax_scale<A, kThreads, kItems>(x, scratch);
#pragma unroll
    for (int k = 0; k < kItems; ++k) acc[k] = fma(x[k], inv_sum, acc[k]);
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  wait_async_copies<0>();  // nothing left in flight when the CTA exits
  A* out = partials + static_cast<int64_t>(blockIdx.x) * C;
#pragma unroll
  for (int k = 0; k < kWords; ++k) {
    const int w = k * kThreads + static_cast<int>(threadIdx.x);
#pragma unroll
    for (int e = 0; e < kPerWord; ++e) {
      const int j = w * kPerWord + e;
      if (j < C) out[j] = acc[k * kPerWord + e];
    }
  }
}

// ------------------------------------------------------------------ longer rows

// lse[i] = logsumexp(z[i, :]) by an online pass per thread, NaN for rows whose softmax is NaN.
template <typename T>
__global__ void __launch_bounds__(kLseThreads) softmax_row_lse_kernel(
    const T* __restrict__ logits, int64_t B, int64_t C, int64_t row_stride, Math<T>* __restrict__ lse) {
  using A = Math<T>;
  constexpr int kChunk = std::is_same_v<A, double> ? 4 : 8;  // elements per thread between two rescalings
  __shared__ SoftmaxPartial<A> merge_scratch[2][kLseThreads / kWarpSize];
  const int64_t row_begin = blockIdx.x * B / gridDim.x;
  const int64_t row_end = (blockIdx.x + 1) * B / gridDim.x;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = logits + r * row_stride;
    SoftmaxPartial<A> part{negative_infinity<A>(), A(0), 0};
    for (int64_t j0 = threadIdx.x; j0 < C; j0 += int64_t(kLseThreads) * kChunk) {
      A v[kChunk];
      A chunk_max = negative_infinity<A>();
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const int64_t j = j0 + int64_t(k) * kLseThreads;
        v[k] = j < C ? to_math(__ldg(row + j)) : negative_infinity<A>();
        part.nonfinite |= poisons_row(v[k]);
        chunk_max = fmax(chunk_max, v[k]);
      }
      if (chunk_max == negative_infinity<A>()) continue;
      A chunk_sum = A(0);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) chunk_sum += softmax_exp(v[k] - chunk_max);
      part = merge(part, SoftmaxPartial<A>{chunk_max, chunk_sum, 0});
    }
    part = team_merge<A, kLseThreads, kLseThreads>(part, merge_scratch[r & 1]);
    if (threadIdx.x == 0) {
      const bool nan_row = part.nonfinite || part.max == negative_infinity<A>();
      lse[r] = nan_row ? quiet_nan<A>() : part.max + log(part.sum_other);
    }
  }
}

// partials[g, j] = sum over the rows i of group g of exp(z[i, j] - lse[i]), for the kTileThreads
// x kTileItems columns of tile blockIdx.x. The rows were read once by the lse kernel already;
// this is the second read.
template <typename T>
__global__ void __launch_bounds__(kTileThreads) softmax_colsum_tiles_kernel(
    const T* __restrict__ logits, const Math<T>* __restrict__ lse, int64_t B, int64_t C, int64_t row_stride,
    Math<T>* __restrict__ partials) {
  using A = Math<T>;
  const int64_t group = blockIdx.y, groups = gridDim.y;
  const int64_t row_begin = group * B / groups, row_end = (group + 1) * B / groups;
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTileThreads * kTileItems + threadIdx.x;
  A acc[kTileItems];
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) acc[k] = A(0);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = logits + r * row_stride;
    const A row_lse = lse[r];
#pragma unroll
    for (int k = 0; k < kTileItems; ++k) {
      const int64_t j = tile_start + int64_t(k) * kTileThreads;
      if (j < C) acc[k] += softmax_exp(load_streaming(row + j) - row_lse);
    }
  }
  A* out = partials + group * C;
#pragma unroll
  for (int k = 0; k < kTileItems; ++k) {
    const int64_t j = tile_start + int64_t(k) * kTileThreads;
    if (j < C) out[j] = acc[k];
  }
}

// ------------------------------------------------------------------ the partials' reduction

// out[j] (+)= sum_g partials[g, j]: lane = column (32 per CTA), warp w sums g = w, w + 8, ... in
// double, then warp 0 adds the 8 warp sums in order. Fixed order everywhere: deterministic.
template <typename A, typename Out>
__global__ void __launch_bounds__(kReduceWarps * kWarpSize) reduce_partials_kernel(
    const A* __restrict__ partials, int64_t groups, int64_t C, Out* __restrict__ out, bool accumulate) {
  __shared__ double warp_sums[kReduceWarps][kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpSize + lane;
  double sum = 0.0;
  if (j < C) {
    for (int64_t g = warp; g < groups; g += kReduceWarps) sum += static_cast<double>(partials[g * C + j]);
  }
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || j >= C) return;
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kReduceWarps; ++w) total += warp_sums[w][lane];
  out[j] = static_cast<Out>(accumulate ? static_cast<double>(out[j]) + total : total);
}

// ------------------------------------------------------------------ choosing a path

// How a call runs: the row kernel (rows_kernel != nullptr) or the lse + tiles pair.
struct Plan {
  const void* rows_kernel = nullptr;
  int threads = 0;
  size_t smem = 0;      // dynamic shared memory of the row kernel
  int64_t grid = 0;     // CTAs of the row kernel, or row groups of the tiles kernel
  int64_t tiles = 0;    // column tiles of the tiles kernel
  int64_t lse_grid = 0;
  const char* name = "";
};

// One instantiation of a row kernel.
struct RowVariant {
  const char* name;
  const void* kernel;
  int threads;
  int64_t capacity;    // the most columns it holds: threads x values per thread
  size_t smem;         // dynamic shared memory (the pipeline's stages)
  int word_bytes;      // pipelined: rows must start on this boundary; 0: any row
  bool by_default;     // a candidate of the default rule
};

template <typename T, int kThreads, int kItems>
RowVariant register_variant(const char* name, bool by_default) {
  return {name, reinterpret_cast<const void*>(&softmax_colsum_rows_kernel<T, kThreads, kItems>), kThreads,
          int64_t(kThreads) * kItems, 0, 0, by_default};
}

// kStages - 1 rows in flight per CTA.
template <typename T, int kThreads, int kWords, int kStages = 4>
RowVariant pipelined_variant(const char* name, bool by_default) {
  constexpr int kWordBytes = word_bytes<T>();
  return {name, reinterpret_cast<const void*>(&softmax_colsum_pipelined_kernel<T, kThreads, kWords, kStages>),
          kThreads, int64_t(kThreads) * kWords * (kWordBytes / int(sizeof(T))),
          size_t(kStages) * kThreads * kWords * kWordBytes, kWordBytes, by_default};
}

// The row-kernel menu. Default rule: the first default candidate that holds the row (and fits
// the device's shared memory): the register kernel with 16 values per thread (8 for fp64, whose
// values take two registers) on the fewest threads from 32 to 1024. The pipelined variants (rows
// must start on word boundaries) are benchmark alternatives (`python -m gala_kernels bench mass
// --sweep`); measured on a GPU they ran slower than the register kernel (docs/performance.md).
template <typename T>
const std::vector<RowVariant>& row_variants() {
  constexpr bool kDouble = std::is_same_v<T, double>;
  constexpr int kItems = kDouble ? 8 : 16;  // register kernel
  constexpr int kPipelinedItems = kItems / 2;
  constexpr int kWords = kPipelinedItems / (word_bytes<T>() / int(sizeof(T)));  // words holding them
  static const std::vector<RowVariant> menu = [] {
    std::vector<RowVariant> v = {
        register_variant<T, 32, 4>("t32_e4", true),
        register_variant<T, 32, kItems>(kDouble ? "t32_e8" : "t32_e16", true),
        register_variant<T, 64, kItems>(kDouble ? "t64_e8" : "t64_e16", true),
        register_variant<T, 128, kItems>(kDouble ? "t128_e8" : "t128_e16", true),
        register_variant<T, 256, kItems>(kDouble ? "t256_e8" : "t256_e16", true),
        register_variant<T, 512, kItems>(kDouble ? "t512_e8" : "t512_e16", true),
        pipelined_variant<T, 64, kWords>(kDouble ? "t64_e4_async" : "t64_e8_async", false),
        pipelined_variant<T, 128, kWords>(kDouble ? "t128_e4_async" : "t128_e8_async", false),
        pipelined_variant<T, 256, kWords>(kDouble ? "t256_e4_async" : "t256_e8_async", false),
        pipelined_variant<T, 512, kWords>(kDouble ? "t512_e4_async" : "t512_e8_async", false),
        pipelined_variant<T, 1024, kWords>(kDouble ? "t1024_e4_async" : "t1024_e8_async", false),
    };
    if constexpr (!kDouble) {  // fp64 values need more than the 64 registers 1024 threads leave
      v.push_back(register_variant<T, 1024, kItems>("t1024_e16", true));
      // 16 values per thread and 3 stages: two CTAs of 512 threads per SM on sm_90 (96 KB each)
      v.push_back(pipelined_variant<T, 512, 2 * kWords, 3>("t512_e16_async", false));
    }
    return v;
  }();
  return menu;
}

// The plan's row kernel: the variant named `variant` (when it holds C and can run), else the
// default rule's choice; no row kernel (the lse + tiles path) when nothing holds C.
template <typename T>
Plan row_plan(const SoftmaxColsumCudaParams& p, const DeviceLimits& limits) {
  Plan plan;
  plan.name = "lse_then_tiles";
  const bool named = p.variant != nullptr && p.variant[0] != '\0';
  if (named && std::strcmp(p.variant, plan.name) == 0) return plan;  // asked for the tiles path
  const auto base = reinterpret_cast<uintptr_t>(p.logits);
  const auto row_bytes = static_cast<uint64_t>(p.logits_row_stride) * sizeof(T);
  for (const RowVariant& v : row_variants<T>()) {
    const bool aligned = v.word_bytes == 0 || (base % v.word_bytes == 0 && row_bytes % v.word_bytes == 0);
    const bool fits = v.smem <= static_cast<size_t>(limits.max_smem_optin);
    if (v.capacity < p.num_classes || !aligned || !fits) continue;
    if (named ? std::strcmp(v.name, p.variant) != 0 : !v.by_default) continue;
    plan.rows_kernel = v.kernel;
    plan.threads = v.threads;
    plan.smem = v.smem;
    plan.name = v.name;
    break;
  }
  return plan;
}

Plan plan_for_dtype(const SoftmaxColsumCudaParams& p, const DeviceLimits& limits) {
  switch (p.dtype) {
    case DType::Float32: return row_plan<float>(p, limits);
    case DType::Float64: return row_plan<double>(p, limits);
    case DType::BFloat16: return row_plan<__nv_bfloat16>(p, limits);
    case DType::Float16: return row_plan<__half>(p, limits);
  }
  return Plan{};
}

size_t math_bytes(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

// The plan with its grid for this device: persistent row-kernel CTAs (ctas_per_sm per SM, at
// least kMinRowsPerCta rows each), or enough (tile, group) CTAs to fill the SMs.
cudaError_t make_plan(const SoftmaxColsumCudaParams& p, Plan* out) {
  DeviceLimits limits;
  cudaError_t err = device_limits(&limits);
  if (err != cudaSuccess) return err;
  Plan plan = plan_for_dtype(p, limits);
  const int64_t B = std::max<int64_t>(p.batch, 1);
  if (plan.rows_kernel != nullptr) {
    if (plan.smem > 0) {  // opt in: with the static shared memory, even 48 KB exceeds the default limit
      err = cudaFuncSetAttribute(plan.rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(plan.smem));
      if (err != cudaSuccess) return err;
    }
    int ctas_per_sm = p.ctas_per_sm;
    if (ctas_per_sm <= 0) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, plan.rows_kernel, plan.threads, plan.smem);
      if (err != cudaSuccess) return err;
      ctas_per_sm = std::max(ctas_per_sm, 1);
    }
    const int64_t by_rows = (B + kMinRowsPerCta - 1) / kMinRowsPerCta;
    plan.grid = std::max<int64_t>(1, std::min<int64_t>(by_rows, int64_t(ctas_per_sm) * limits.sm_count));
  } else {
    constexpr int64_t kTileColumns = int64_t(kTileThreads) * kTileItems;
    plan.tiles = (p.num_classes + kTileColumns - 1) / kTileColumns;
    const int64_t wanted = (int64_t(kTileCtasPerSm) * limits.sm_count + plan.tiles - 1) / plan.tiles;
    const int64_t by_rows = (B + kMinRowsPerGroup - 1) / kMinRowsPerGroup;
    plan.grid = std::clamp<int64_t>(wanted, 1, std::min<int64_t>(by_rows, 65535));
    plan.lse_grid = std::min<int64_t>(B, 4 * int64_t(limits.sm_count));
  }
  *out = plan;
  return cudaSuccess;
}

size_t workspace_bytes_for(const SoftmaxColsumCudaParams& p, const Plan& plan) {
  const size_t partials = static_cast<size_t>(plan.grid) * static_cast<size_t>(p.num_classes);
  const size_t lse = plan.rows_kernel == nullptr ? static_cast<size_t>(p.batch) : 0;
  const size_t bytes = (partials + lse) * math_bytes(p.dtype);
  return (bytes + 15) / 16 * 16;
}

template <typename T>
cudaError_t launch_typed(const SoftmaxColsumCudaParams& p, const Plan& plan, cudaStream_t stream) {
  using A = Math<T>;
  const auto* logits = static_cast<const T*>(p.logits);
  auto* partials = static_cast<A*>(p.workspace);
  if (p.batch > 0) {
    if (plan.rows_kernel != nullptr) {
      int C = static_cast<int>(p.num_classes);
      int64_t B = p.batch, stride = p.logits_row_stride;
      void* args[] = {&logits, &B, &C, &stride, &partials};
      cudaError_t err = cudaLaunchKernel(plan.rows_kernel, dim3(static_cast<unsigned>(plan.grid)),
                                         dim3(plan.threads), args, plan.smem, stream);
      if (err != cudaSuccess) return err;
    } else {
      A* lse = partials + plan.grid * p.num_classes;
      softmax_row_lse_kernel<T><<<static_cast<unsigned>(plan.lse_grid), kLseThreads, 0, stream>>>(
          logits, p.batch, p.num_classes, p.logits_row_stride, lse);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.grid));
      softmax_colsum_tiles_kernel<T><<<grid, kTileThreads, 0, stream>>>(
          logits, lse, p.batch, p.num_classes, p.logits_row_stride, partials);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  // With no row, every partial is... nothing: reduce over zero groups (writes 0 or leaves out).
  const int64_t groups = p.batch > 0 ? plan.grid : 0;
  const unsigned reduce_grid = static_cast<unsigned>((p.num_classes + kWarpSize - 1) / kWarpSize);
  if (p.out_is_double) {
    reduce_partials_kernel<A, double><<<reduce_grid, kReduceWarps * kWarpSize, 0, stream>>>(
        partials, groups, p.num_classes, static_cast<double*>(p.out), p.accumulate);
  } else {
    reduce_partials_kernel<A, float><<<reduce_grid, kReduceWarps * kWarpSize, 0, stream>>>(
        partials, groups, p.num_classes, static_cast<float*>(p.out), p.accumulate);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_colsum_workspace_bytes(const SoftmaxColsumCudaParams& params, size_t* bytes) {
  Plan plan;
  const cudaError_t err = make_plan(params, &plan);
  if (err != cudaSuccess) return err;
  *bytes = workspace_bytes_for(params, plan);
  return cudaSuccess;
}

cudaError_t launch_softmax_colsum(const SoftmaxColsumCudaParams& params, cudaStream_t stream) {
  Plan plan;
  const cudaError_t err = make_plan(params, &plan);
  if (err != cudaSuccess) return err;
  switch (params.dtype) {
    case DType::Float32: return launch_typed<float>(params, plan, stream);
    case DType::Float64: return launch_typed<double>(params, plan, stream);
    case DType::BFloat16: return launch_typed<__nv_bfloat16>(params, plan, stream);
    case DType::Float16: return launch_typed<__half>(params, plan, stream);
  }
  return cudaErrorInvalidValue;
}

const char* softmax_colsum_variant(const SoftmaxColsumCudaParams& params) {
  DeviceLimits limits;
  if (device_limits(&limits) != cudaSuccess) return "unknown (no device)";
  return plan_for_dtype(params, limits).name;
}

}  // namespace gala::cuda
