// Fused GALA cross-entropy, CPU: loss, gradient and per-class statistics in one pass per row.
//
// Compiled once per CPU capability; CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) is set by the
// build and selects both the at::vec implementation and the namespace of the entry point.
//
// Per row i with label y (SPEC.md):
//   a[j]    = z[j] + class_bias[j]              class_bias = lambda1 * log(pos_grad + eps)
//   lse     = logsumexp(a)                      blockwise online: (m, S) rescaled per block
//   loss_i  = lse - a[y]
//   grad[j] = (p[j] - [j == y]) * w             p[j] = exp(a[j] - lse), w = 1/N or 1
//   raw_pos[y] += sum_{j != y} p[j]             (= 1 - p[y], computed without cancellation)
//   raw_neg[y] += sum_{j != y} p[j]
//   raw_clsneg[j] += p[j] for j != y
// The lambda2 term is constant along a row and changes nothing, so it is skipped.
//
// Memory traffic: z is read once from memory (each block of kBlock columns is converted into a
// per-thread fp32 scratch row that stays in cache) and grad is written once.

#include "gala_ce_kernel.h"
#include "vec_exp.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace gala::cpu {
namespace CPU_CAPABILITY {
namespace {

// Columns per online-softmax block: 1024 fp32 = 4 KB, so a block's two sweeps stay in L1.
constexpr int64_t kBlock = 1024;

template <typename scalar_t>
struct RowWorkspace {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> exp_row;      // (C,) a, then exp(a - block_max) block by block
  std::vector<acc_t> block_max;    // (ceil(C / kBlock),)
  std::vector<acc_t> grad_block;   // (kBlock,) staging for the conversion to scalar_t
  explicit RowWorkspace(int64_t C)
      : exp_row(C), block_max((C + kBlock - 1) / kBlock), grad_block(kBlock) {}
};

template <typename scalar_t>
void store_block(const typename RowWorkspace<scalar_t>::acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, typename RowWorkspace<scalar_t>::acc_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
void fill_row(scalar_t* dst, int64_t n, double value) {
  std::fill(dst, dst + n, static_cast<scalar_t>(value));
}

// One non-ignored row. Returns false (and writes nothing but NaNs) when the row holds a
// non-finite logit. On success fills loss, the grad row, the row's sum_{j != y} p[j], lse,
// and adds p[j] (j != y) into cls_neg_acc when it is given.
template <typename scalar_t>
bool gala_ce_row(
    const scalar_t* z, const typename RowWorkspace<scalar_t>::acc_t* bias, int64_t C, int64_t y,
    typename RowWorkspace<scalar_t>::acc_t w, RowWorkspace<scalar_t>& ws, scalar_t* grad_row,
    double* loss, double* sum_other_out, float* cls_neg_acc) {
  using acc_t = typename RowWorkspace<scalar_t>::acc_t;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t* e = ws.exp_row.data();

  // 1. Online logsumexp, block by block: a = z + bias; bm = max(a); e = exp(a - bm);
  //    (m, S) <- (max(m, bm), S * exp(m - m') + sum(e) * exp(bm - m')).
  // Within a block the sums run in the math dtype (at most kBlock / kVec adds per lane); across
  // blocks they run in double, so a row of a million classes keeps fp32-level accuracy.
  acc_t m = neg_inf;
  double S = 0;
  for (int64_t start = 0, b = 0; start < C; start += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - start);
    acc_t* a = e + start;
    // src: the block in the math dtype (read straight from z when no conversion is needed)
    const acc_t* src;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      src = z + start;
    } else {
      at::vec::convert(z + start, a, n);
      src = a;
    }
    // A row is finite iff its max and min are: maximum/minimum propagate NaN, +inf shows in the
    // max and -inf in the min.
    Vec vmax(neg_inf), vmin(-neg_inf);
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) {
      Vec x = Vec::loadu(src + j);
      if (bias) x = x + Vec::loadu(bias + start + j);
      x.store(a + j);
      vmax = at::vec::maximum(vmax, x);
      vmin = at::vec::minimum(vmin, x);
    }
    acc_t bm = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
    acc_t bmin = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::minimum(p, q); }, vmin);
    bool finite = j == 0 || (std::isfinite(bm) && std::isfinite(bmin));  // j == 0: no full vector
    for (; j < n; ++j) {
      a[j] = src[j] + (bias ? bias[start + j] : acc_t(0));
      finite = finite && std::isfinite(a[j]);
      bm = std::max(bm, a[j]);
    }
    if (!finite) {
      return false;
    }
    Vec vsum(0), vbm(bm);
    j = 0;
    for (; j + kVec <= n; j += kVec) {
      Vec ex = fast_exp(Vec::loadu(a + j) - vbm);
      ex.store(a + j);
      vsum = vsum + ex;
    }
    acc_t bs = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vsum);
    for (; j < n; ++j) {
      a[j] = std::exp(a[j] - bm);
      bs += a[j];
    }
    ws.block_max[b] = bm;
    if (bm > m) {
      S = S * std::exp(static_cast<double>(m) - bm) + bs;
      m = bm;
    } else {
      S += bs * std::exp(static_cast<double>(bm) - m);
    }
  }
  const double lse = m + std::log(S);
  const double a_y = static_cast<double>(static_cast<acc_t>(z[y]) + (bias ? bias[y] : acc_t(0)));
  *loss = lse - a_y;

  // 2. Probabilities, gradient and statistics. e[y] is set to 0 first, so the sums below run
  //    over j != y exactly (no 1 - p[y] cancellation); grad[y] is patched afterwards.
  const int64_t block_y = y / kBlock;
  const acc_t p_y = static_cast<acc_t>(e[y] * std::exp(static_cast<double>(ws.block_max[block_y]) - m) / S);
  e[y] = 0;
  const Vec vw(w);
  double sum_other = 0;
  for (int64_t start = 0, b = 0; start < C; start += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - start);
    const acc_t scale = static_cast<acc_t>(std::exp(static_cast<double>(ws.block_max[b]) - m) / S);  // p = e * scale
    Vec vsum_other(0);
    acc_t block_sum_other = 0;
    const Vec vscale(scale);
    const acc_t* eb = e + start;
    acc_t* g = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(grad_row + start)
                                                : ws.grad_block.data();
    // raw_clsneg[j] += p[j] for j != y, in fp32 like the state: fused into the vector loop when
    // the math is fp32, a separate sweep for fp64 math.
    float* cls = cls_neg_acc ? cls_neg_acc + start : nullptr;
    constexpr bool kFusedClsNeg = std::is_same_v<acc_t, float>;
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) {
      Vec p = Vec::loadu(eb + j) * vscale;
      vsum_other = vsum_other + p;
      (p * vw).store(g + j);
      if constexpr (kFusedClsNeg) {
        if (cls) (Vec::loadu(cls + j) + p).store(cls + j);
      }
    }
    for (; j < n; ++j) {
      const acc_t p = eb[j] * scale;
      block_sum_other += p;
      g[j] = p * w;
      if constexpr (kFusedClsNeg) {
        if (cls) cls[j] += p;
      }
    }
    if constexpr (!kFusedClsNeg) {
      if (cls) {
        for (int64_t k = 0; k < n; ++k) cls[k] += static_cast<float>(eb[k] * scale);
      }
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      store_block<scalar_t>(g, grad_row + start, n);
    }
    sum_other += block_sum_other + at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vsum_other);
  }
  grad_row[y] = static_cast<scalar_t>((p_y - acc_t(1)) * w);
  *sum_other_out = sum_other;
  return true;
}

// Pairwise statistics: raw_pair[j, y_i] += |p[i, j] - [j == y_i]| over the rows used for the
// statistics. A second sweep over the logits, parallel over j so that no two threads write the
// same entry; only run when pairwise tracking is on.
template <typename scalar_t>
void pairwise_pass(const GalaCeParams& p, const std::vector<double>& row_lse,
                   const std::vector<uint8_t>& row_used, const typename RowWorkspace<scalar_t>::acc_t* bias) {
  using acc_t = typename RowWorkspace<scalar_t>::acc_t;
  const auto* logits = static_cast<const scalar_t*>(p.logits);
  const int64_t B = p.batch, C = p.num_classes;
  at::parallel_for(0, C, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < B; ++i) {
      if (!row_used[i]) continue;
      const scalar_t* z = logits + i * p.logits_row_stride;
      const int64_t y = p.labels[i];
      const acc_t lse = static_cast<acc_t>(row_lse[i]);
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t a = static_cast<acc_t>(z[j]) + (bias ? bias[j] : acc_t(0));
        const acc_t prob = std::exp(a - lse);
        p.raw_pairwise[j * C + y] += static_cast<float>(std::abs(prob - (j == y ? acc_t(1) : acc_t(0))));
      }
    }
  });
}

template <typename scalar_t>
void gala_ce_forward_typed(const GalaCeParams& p) {
  using acc_t = typename RowWorkspace<scalar_t>::acc_t;
  const auto* logits = static_cast<const scalar_t*>(p.logits);
  auto* grad = static_cast<scalar_t*>(p.grad);
  const int64_t B = p.batch, C = p.num_classes;
  const bool stats = p.raw_stats != nullptr;
  const auto* bias = static_cast<const acc_t*>(p.class_bias);

  // Rows are split into a fixed number of contiguous chunks (one per thread), so the
  // per-chunk cls_neg accumulators and their final sum are deterministic.
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  std::vector<float> cls_neg_chunks(stats ? num_chunks * C : 0, 0.0f);
  std::vector<double> row_sum_other(B, 0.0), row_lse(B, 0.0);
  std::vector<uint8_t> row_used(B, 0), row_nonfinite(B, 0);
  const acc_t w = static_cast<acc_t>(p.row_weight);

  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    RowWorkspace<scalar_t> ws(C);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t r0 = chunk * B / num_chunks, r1 = (chunk + 1) * B / num_chunks;
      float* cls_neg_acc = stats ? cls_neg_chunks.data() + chunk * C : nullptr;
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t* z = logits + i * p.logits_row_stride;
        scalar_t* g = grad + i * C;
        const int64_t y = p.labels[i];
        if (y == p.ignore_index) {
          fill_row(g, C, 0.0);
          p.loss_rows[i] = 0.0;
          continue;
        }
        double loss = 0.0;
        if (gala_ce_row<scalar_t>(z, bias, C, y, w, ws, g, &loss, &row_sum_other[i], cls_neg_acc)) {
          p.loss_rows[i] = loss;
          row_lse[i] = loss + (static_cast<double>(z[y]) + (bias ? static_cast<double>(bias[y]) : 0.0));
          row_used[i] = 1;
        } else {  // a non-finite logit: NaN loss and gradient, no statistics
          fill_row(g, C, std::numeric_limits<double>::quiet_NaN());
          p.loss_rows[i] = std::numeric_limits<double>::quiet_NaN();
          row_nonfinite[i] = 1;
        }
      }
    }
  });

  int64_t nonfinite = 0;
  for (int64_t i = 0; i < B; ++i) nonfinite += row_nonfinite[i];
  *p.nonfinite_rows = nonfinite;
  if (!stats) return;

  // raw_pos[y] and raw_neg[y]: a serial scatter over B rows (fixed order, deterministic).
  float* raw_pos = p.raw_stats;
  float* raw_neg = p.raw_stats + C;
  float* raw_cls_neg = p.raw_stats + 2 * C;
  for (int64_t i = 0; i < B; ++i) {
    if (!row_used[i]) continue;
    raw_pos[p.labels[i]] += static_cast<float>(row_sum_other[i]);
    raw_neg[p.labels[i]] += static_cast<float>(row_sum_other[i]);
  }
  at::parallel_for(0, C, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const float* src = cls_neg_chunks.data() + chunk * C;
      for (int64_t j = j0; j < j1; ++j) raw_cls_neg[j] += src[j];
    }
  });
  if (p.raw_pairwise) pairwise_pass<scalar_t>(p, row_lse, row_used, bias);
}

}  // namespace

void gala_ce_forward_kernel(const GalaCeParams& params) {
  switch (params.dtype) {
    case c10::ScalarType::Float: return gala_ce_forward_typed<float>(params);
    case c10::ScalarType::Double: return gala_ce_forward_typed<double>(params);
    case c10::ScalarType::BFloat16: return gala_ce_forward_typed<c10::BFloat16>(params);
    case c10::ScalarType::Half: return gala_ce_forward_typed<c10::Half>(params);
    default: TORCH_INTERNAL_ASSERT(false, "gala_ce_forward_kernel: unexpected dtype ", params.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace gala::cpu
