// The mass pass of post-hoc re-balancing, CPU: column sums of the row softmax in one read of
// the logits.
//
// Compiled once per CPU capability; CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) is set by the
// build and selects both the at::vec implementation and the namespace of the entry point.
//
// docs/rebalancing.md:
//   mass[j] = sum_i softmax(z[i, :])[j]
// This kernel returns one call's share, colsum[j] = sum_{i < B} p[i, j]; the caller adds it
// into the running float64 mass.
//
// Per row, one sweep over the logits (z is read from memory once):
//   1. for each block of kBlock columns, with a reference r (a value of the row seen so far):
//        e = exp(z - r) into a per-thread scratch row, bs = sum(e), bm = max(z), in one sweep;
//      r starts as the max of the row's first vector and only moves up, when a block's max
//      exceeds it by more than kMaxAboveReference (the block is then recomputed with r = bm);
//      so exp never overflows and the usual separate max sweep is not needed.
//      (m, S) <- (r, S * exp(m - r) + bs) when r moves, else S += bs: S = sum_j exp(z[j] - m).
//   2. p[j] = e[j] * exp(r_b - m) / S, added into the row tile's column accumulator.
// A row holding NaN or +inf, or -inf everywhere, has a NaN softmax (as torch.softmax), so it adds
// NaN to every column. A -inf entry has p = 0 (a -inf column is legitimate: that class has
// probability 0).
//
// Determinism: rows are cut into fixed tiles of kRowsPerTile rows, whatever the thread count.
// Each tile sums its rows in order into its own accumulator (math dtype), and the tiles are
// then summed in tile order in double. The result is bitwise the same for any number of
// threads, and the fp32 part of the sum never spans more than kRowsPerTile rows.
//
// Memory traffic: z is read once (prefetched kPrefetchAhead bytes ahead while a block is
// computed); the scratch row and the tile accumulator stay in cache.

#include "softmax_mass_kernel.h"
#include "vec_exp.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace gala::cpu {
namespace CPU_CAPABILITY {
namespace {

// Columns per block: 1024 fp32 = 4 KB, one page; the unit of the reference update and of the
// prefetch (each block prefetches as many bytes, kPrefetchAhead further on), and small enough
// that a block's exp values are still in L1 for step 2 of short rows.
constexpr int64_t kBlock = 1024;
// Rows per tile (see "Determinism" above): small enough for many tiles per thread at the
// usual evaluation batch sizes, large enough that the (tiles, C) partial sums are a small
// fraction (1/kRowsPerTile) of the logits' size.
constexpr int64_t kRowsPerTile = 32;
// Columns per chunk of the final tile reduction (double scratch of 16 KB).
constexpr int64_t kReduceChunk = 2048;
// How far above the reference a block's max may be before the block is recomputed with its
// own max as reference: exp(60) * (C = 1e9 columns) = 1e35 stays below FLT_MAX = 3.4e38.
constexpr double kMaxAboveReference = 60.0;
// Prefetch distance: 16 KB ahead (four fp32 blocks), across rows when they are contiguous, into L2
// (prefetcht1): the L1 miss buffers limit how many lines an L1 prefetch keeps in flight, and the
// L1 streamer takes the lines from L2. Measured (4096 x 8142 fp32 from DRAM in batches of 512,
// medians of interleaved ratios) against one block ahead into L1: 0.87x the time at 1 thread,
// 0.85x at 2 (8 KB or 32 KB into L2: the same; 8 KB into L1: 1.02x).
constexpr int64_t kPrefetchAhead = 16384;
constexpr int kPrefetchLocality = 2;  // __builtin_prefetch: 3 = prefetcht0 (L1), 2 = prefetcht1 (L2)

template <typename acc_t>
inline acc_t vec_sum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Per-thread scratch: the row's exp values, block by block, and each block's reference.
template <typename acc_t>
struct RowWorkspace {
  std::vector<acc_t> exp_row;    // (C,) z converted to acc_t (reduced dtypes), then exp(z - r_b)
  std::vector<acc_t> block_ref;  // (ceil(C / kBlock),) r_b, or -inf for a block of -inf only
  explicit RowWorkspace(int64_t C) : exp_row(C), block_ref((C + kBlock - 1) / kBlock) {}
};

// dst[0:n] = src[0:n] converted to float (bf16 / fp16 logits).
template <typename scalar_t>
void convert_to_float_block(const scalar_t* src, float* dst, int64_t n) {
  using VecS = at::vec::Vectorized<scalar_t>;
  using VecF = at::vec::Vectorized<float>;
  int64_t j = 0;
  for (; j + VecS::size() <= n; j += VecS::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + j));
    lo.store(dst + j);
    hi.store(dst + j + VecF::size());
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// max(x[0:n]); NaN if some x is NaN.
template <typename acc_t>
acc_t block_max_of(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  Vec vmax(neg_inf);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(x + j));  // propagates NaN
  acc_t bm = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) {
    if (std::isnan(x[j]) || x[j] > bm) bm = x[j];
    if (std::isnan(bm)) break;
  }
  return bm;
}

struct BlockSums {
  double max;  // max_j x[j]; NaN if some x[j] is NaN
  double sum;  // sum_j exp(x[j] - ref)
};

// max(src[0:n]) in acc_t, NaN if some src is NaN: the vector code for acc_t logits, else a
// scalar loop (only run for blocks holding NaN or +-inf).
template <typename acc_t, typename scalar_t>
acc_t exact_max_of(const scalar_t* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return block_max_of(src, n);
  } else {
    acc_t bm = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = static_cast<acc_t>(src[j]);
      if (std::isnan(v)) return v;
      bm = std::max(bm, v);
    }
    return bm;
  }
}

// One sweep over a block: e[j] = exp(x[j] - ref) (x may alias e), its sum and the max of x
// (src: the block's logits as given, x converted to acc_t).
// Prefetches `prefetch_bytes` from `prefetch` (kPrefetchAhead bytes further on) on the way.
template <typename acc_t, typename scalar_t>
BlockSums exp_block(const scalar_t* src, const acc_t* x, int64_t n, acc_t ref, acc_t* e, const char* prefetch,
                    int64_t prefetch_bytes) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const Vec vzero(0);
  Vec vsum(0), vmax(neg_inf), vref(ref), vinf(0);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const int64_t line = (j / kVec) * 64;  // one 64-byte line per vector
    if (line < prefetch_bytes) __builtin_prefetch(prefetch + line, 0, kPrefetchLocality);
    const Vec xv = Vec::loadu(x + j);
    vmax = max_any_nan(vmax, xv);
    vinf = at::vec::fmadd(xv, vzero, vinf);  // NaN once some x is NaN or +-inf (0 * inf = NaN)
    const Vec ex = fast_exp(xv - vref);
    ex.store(e + j);
    vsum = vsum + ex;
  }
  acc_t bm = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return max_any_nan(a, b); }, vmax);
  // The max above may have dropped a NaN: in a block holding NaN or +-inf (rare; -inf is a
  // legitimate logit), the max is taken again with NaN propagated. In the loop, the plain max and
  // the independent fma replace at::vec::maximum's compare, mask move and or on the loop-carried
  // max chain: measured (4096 x 8142 fp32 in batches of 512, interleaved medians, with the
  // prefetch above) 0.92x the time at 1 thread, 0.95x at 2; results bitwise the same.
  // x may alias e (bf16 / fp16: the converted block), so the exact max is taken from src.
  if (j > 0 && std::isnan(vec_sum(vinf))) bm = exact_max_of<acc_t>(src, j);
  acc_t bs = vec_sum(vsum);
  for (; j < n; ++j) {
    const acc_t xj = x[j];
    if (std::isnan(xj) || xj > bm) bm = xj;
    e[j] = std::exp(xj - ref);
    bs += e[j];
  }
  return {static_cast<double>(bm), static_cast<double>(bs)};
}

// The block's logits in acc_t: z itself, or (bf16 / fp16) converted into the scratch row.
template <typename scalar_t, typename acc_t>
const acc_t* block_in_acc_type(const scalar_t* z, acc_t* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return z;
  } else {
    convert_to_float_block(z, scratch, n);
    return scratch;
  }
}

// Adds softmax(z) of one row into acc[0:C]. Bytes up to prefetch_end (the end of the rows this
// thread reads next, contiguous with z) are prefetched kPrefetchAhead bytes ahead.
template <typename scalar_t, typename acc_t>
void add_row_softmax(const scalar_t* z, const char* prefetch_end, int64_t C, RowWorkspace<acc_t>& ws,
                     acc_t* acc) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
  acc_t* e = ws.exp_row.data();

  // 1. One sweep per block: e = exp(z - r), with (m, S) kept for the row's reference m.
  acc_t m = neg_inf, S = 0;  // no finite value seen yet
  bool row_is_nan = false;
  for (int64_t start = 0, b = 0; start < C; start += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - start);
    const acc_t* x = block_in_acc_type(z + start, e + start, n);
    // While this block is computed, prefetch as many bytes kPrefetchAhead further on (the rest of
    // the row, then the next row's start): an fp32 block is one 4 KB page, where the hardware
    // prefetchers stop.
    const auto here = reinterpret_cast<uintptr_t>(z + start) + kPrefetchAhead;
    const auto limit = reinterpret_cast<uintptr_t>(prefetch_end);
    const int64_t next_bytes =
        here < limit ? std::min<int64_t>(limit - here, n * int64_t(sizeof(scalar_t))) : 0;
    const char* next = next_bytes > 0 ? reinterpret_cast<const char*>(here) : nullptr;

    acc_t ref = m;
    if (m == neg_inf) {  // the first reference: the max of the block's first vector, or of the block
      ref = block_max_of(x, std::min(kVec, n));
      if (ref == neg_inf) ref = block_max_of(x, n);
      if (std::isnan(ref) || ref == pos_inf) {
        row_is_nan = true;
        break;
      }
      if (ref == neg_inf) {  // a block of -inf only, and nothing finite before: every p here is 0
        ws.block_ref[b] = neg_inf;
        continue;
      }
    }
    BlockSums sums = exp_block(z + start, x, n, ref, e + start, next, next_bytes);
    if (std::isnan(sums.max) || sums.max == static_cast<double>(pos_inf)) {  // NaN softmax everywhere
      row_is_nan = true;
      break;
    }
    if (sums.max > static_cast<double>(ref) + kMaxAboveReference) {  // rare: move the reference up
      ref = static_cast<acc_t>(sums.max);
      x = block_in_acc_type(z + start, e + start, n);  // e may have overwritten the converted block
      sums = exp_block(z + start, x, n, ref, e + start, nullptr, 0);
    }
    ws.block_ref[b] = ref;
    const acc_t bs = static_cast<acc_t>(sums.sum);
    if (ref > m) {  // m = -inf, S = 0 at the first finite block: S * exp(-inf) = 0
      S = S * std::exp(m - ref) + bs;
      m = ref;
    } else {
      S += bs * std::exp(ref - m);
    }
  }

  // A row of NaN / +inf, or -inf everywhere (m stays -inf): torch.softmax gives NaN throughout.
  if (row_is_nan || m == neg_inf) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    for (int64_t j = 0; j < C; ++j) acc[j] += nan;
    return;
  }

  // 2. p[j] = e[j] * exp(r_b - m) / S, summed into the tile's columns.
  for (int64_t start = 0, b = 0; start < C; start += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - start);
    if (ws.block_ref[b] == neg_inf) continue;
    const acc_t scale = std::exp(ws.block_ref[b] - m) / S;
    const Vec vscale(scale);
    const acc_t* eb = e + start;
    acc_t* ab = acc + start;
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) {
      at::vec::fmadd(Vec::loadu(eb + j), vscale, Vec::loadu(ab + j)).store(ab + j);
    }
    for (; j < n; ++j) ab[j] += eb[j] * scale;
  }
}

template <typename scalar_t>
void softmax_colsum_typed(const SoftmaxColsumParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* logits = static_cast<const scalar_t*>(p.logits);
  auto* colsum = static_cast<acc_t*>(p.colsum);
  const int64_t B = p.batch, C = p.num_classes;
  const int64_t num_tiles = (B + kRowsPerTile - 1) / kRowsPerTile;

  // tile_sums[t, j] = sum of p[i, j] over the rows i of tile t (each tile zeroes its own row).
  std::unique_ptr<acc_t[]> tile_sums(new acc_t[num_tiles * C]);
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    RowWorkspace<acc_t> ws(C);
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* acc = tile_sums.get() + t * C;
      std::fill(acc, acc + C, acc_t(0));
      const int64_t r1 = std::min(B, (t + 1) * kRowsPerTile);
      for (int64_t i = t * kRowsPerTile; i < r1; ++i) {
        const scalar_t* row = logits + i * p.logits_row_stride;
        // contiguous rows: prefetch across rows up to the tile's end; strided: within the row
        const scalar_t* end = p.logits_row_stride == C ? logits + r1 * C : row + C;
        add_row_softmax<scalar_t, acc_t>(row, reinterpret_cast<const char*>(end), C, ws, acc);
      }
    }
  });

  // colsum[j] = sum_t tile_sums[t, j], in double and in tile order (deterministic).
  at::parallel_for(0, C, kReduceChunk, [&](int64_t j0, int64_t j1) {
    std::vector<double> total(j1 - j0, 0.0);
    for (int64_t t = 0; t < num_tiles; ++t) {
      const acc_t* src = tile_sums.get() + t * C + j0;
      for (int64_t j = 0; j < j1 - j0; ++j) total[j] += static_cast<double>(src[j]);
    }
    for (int64_t j = j0; j < j1; ++j) colsum[j] = static_cast<acc_t>(total[j - j0]);
  });
}

}  // namespace

void softmax_colsum_kernel(const SoftmaxColsumParams& params) {
  switch (params.dtype) {
    case c10::ScalarType::Float: return softmax_colsum_typed<float>(params);
    case c10::ScalarType::Double: return softmax_colsum_typed<double>(params);
    case c10::ScalarType::BFloat16: return softmax_colsum_typed<c10::BFloat16>(params);
    case c10::ScalarType::Half: return softmax_colsum_typed<c10::Half>(params);
    default: TORCH_INTERNAL_ASSERT(false, "softmax_colsum_kernel: unexpected dtype ", params.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace gala::cpu
