// Fused GALA cross-entropy, CPU: loss, gradient and per-class statistics in one pass per row.
//
// Compiled once per CPU capability; CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) is set by the
// build and selects both the at::vec implementation and the namespace of the entry point.
//
// Per row i with label y (docs/contract.md), class weights wt (all ones without `weight`) and label
// smoothing ls (torch's semantics):
//   a[j]    = z[j] + class_bias[j]              class_bias = lambda1 * log(pos_grad + eps)
//   lse     = logsumexp(a)                      blockwise online: (m, S) rescaled per block
//   p[j]    = exp(a[j] - lse)
//   loss_i  = (1 - ls) * wt[y] * (lse - a[y]) + (ls / C) * sum_j wt[j] * (lse - a[j])
//   grad[j] = r * (c_p * p[j] - (1 - ls) * wt[y] * [j == y] - (ls / C) * wt[j])
//             c_p = (1 - ls) * wt[y] + (ls / C) * sum_k wt[k];  r = 1/W ("mean",
//             W = sum of wt[y_i] over the non-ignored rows) or 1
//   raw_pos[y] += sum_{j != y} p[j]             (= 1 - p[y], computed without cancellation)
//   raw_neg[y] += sum_{j != y} p[j]
//   raw_clsneg[j] += p[j] for j != y
// The statistics do not depend on wt or ls. The lambda2 term is constant along a row and changes
// nothing, so it is skipped. Plain cross-entropy is ls = 0, wt = 1: loss_i = lse - a[y],
// grad[j] = (p[j] - [j == y]) * r.
//
// Options cost nothing per column unless ls > 0: wt alone only changes per-row coefficients.
// Smoothing adds one term to each sweep (Smoothing, a compile-time choice), so the plain call
// runs the code it ran before the options existed. Smoothing with class weights reads wt, one
// more (C,) array per row (loaded once for both rows of the fused loop): the op took 1.08-1.15x
// the time of the plain one (512 x 8,142 fp32, 1 thread, 2-core EPYC VM); with wt
// pointed at class_bias's own lines instead (wrong values, same instructions) 1.01x, so the cost
// is the extra cache lines, not the arithmetic. Smoothing alone and weights alone: within noise.
//
// Per row, two passes (rows are processed in order within a thread's chunk):
//   pass 1, one sweep per block of kBlock columns: e = exp(a - r) into a per-thread scratch row,
//           with the block's sum and max (row_pass1; the reference r as in the mass kernel);
//           a is read once, and nothing but e is stored (the previous kernel stored a, took its
//           max, then read it again for the exp: measured, with streaming stores and prefetch
//           added too, 1.55 ms against 2.38 ms at 2 threads, 2.94 against 4.36 ms at 1 thread);
//   pass 2, per block: p = e * exp(r_b - m) / S, the gradient and the cls_neg sums (row_pass2).
// Pass 2 of row i runs block by block inside pass 1 of row i + 1 (see row_pass1); on AVX-512 fp32
// vector by vector, in the same loop (exp_block_with_pass2).
//
// Memory traffic: z is read once from memory (prefetched a block ahead, across rows), grad is
// written once with streaming stores (AVX-512, fp32), the scratch rows stay in L2.
//
// Measured, op fused_ce_fwd(z, y, bias, -100, mean, stats) on 512 x 8142 fp32, 2-core Zen 4,
// interleaved medians, against the previous kernel (a = z + bias stored in pass 1a, max, then
// exp in pass 1b, pass 2 after the row, plain stores, no software prefetch): see the comments at
// kPrefetchAhead, grad_block_stream and row_pass1 for each part.

#include "gala_ce_kernel.h"
#include "vec_exp.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <utility>
#include <cstdint>
#include <type_traits>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace gala::cpu {
namespace CPU_CAPABILITY {
namespace {

// Columns per block: the unit of the reference update and of pass 2 (8 KB of fp32). 1024, 2048
// and 4096 made no difference tools/ab_cpu_commits.py can separate (three builds of the same
// commit spread by 10-20% there).
constexpr int64_t kBlock = 2048;
// How far above the reference a block's max may be before the block is recomputed with its own
// max as reference: exp(60) * (C = 1e9 columns) = 1e35 stays below FLT_MAX = 3.4e38.
constexpr double kMaxAboveReference = 60.0;
// Software prefetch of the logits, kPrefetchAhead bytes ahead, continuing into the thread's next
// row (the hardware prefetchers stop at 4 KB page boundaries), into L2 (prefetcht1: the L1 miss
// buffers limit how many lines an L1 prefetch keeps in flight; the L1 streamer takes it from L2).
// Measured (512 x 8142 fp32, medians of interleaved ratios): no software prefetch takes 1.32x as
// long at 1 thread and 1.19x at 2 than 4 KB ahead into L1; 2 KB ahead 1.08x / 1.03x; 16 KB into
// L2 0.98x / 0.98x. (The mass kernel, whose logits always come from DRAM, gains 13-15% from it.)
constexpr int64_t kPrefetchAhead = 16384;
constexpr int kPrefetchLocality = 2;  // __builtin_prefetch: 3 = prefetcht0 (L1), 2 = prefetcht1 (L2)

// n values of T (zero-initialised if asked) starting `page_offset` bytes (a multiple of 64) into a
// 4 KB page: on a cache line (16 fp32 columns), at the place in the page that ScratchPlacement chose.
// The scratch rows and the cls_neg accumulators are column-aligned with class_bias (torch
// allocates 64-byte aligned), so the block loops' vector loads and stores at multiples of 16
// columns never split a line; only the logits (any row stride) and the gradient rows (C * itemsize
// apart) are not, and exp_block_with_pass2 realigns the fp32 gradient for its streaming stores.
template <typename T>
class PagePlacedArray {
 public:
  PagePlacedArray(int64_t n, int64_t page_offset, bool zeroed) {
    if (n <= 0) return;
    const size_t bytes = n * sizeof(T) + 2 * kPage;
    storage_.reset(zeroed ? new char[bytes]() : new char[bytes]);
    const uintptr_t address = reinterpret_cast<uintptr_t>(storage_.get());
    data_ = reinterpret_cast<T*>((address + kPage - 1) / kPage * kPage + page_offset);
  }
  PagePlacedArray(const PagePlacedArray&) = delete;
  PagePlacedArray& operator=(const PagePlacedArray&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }

 private:
  static constexpr int64_t kPage = 4096;
  std::unique_ptr<char[]> storage_;
  T* data_ = nullptr;
};

// Where the kernel's own arrays start within a 4 KB page, placed from class_bias's address. A
// load whose address agrees in its low 12 bits with a store still in flight waits for that store
// ("4K aliasing", as for the gradient in gala_ce_cpu.cpp). The fused loop, at each column, loads
// class_bias, the class weights, the previous row's exp row and cls_neg, and stores the new row's
// exp row and cls_neg; the two exp rows swap roles every row. With these offsets (bytes, modulo
// 4 KB) every loaded array starts 512-3,072 bytes past every stored one, whichever exp row is the
// new one, so a load never trails a recent store by less than that:
//   class_bias 3072 (as it is), exp rows 0 and 2048, cls_neg 1024, class weights (copied) 2560
// Left to the heap, the offsets changed from process to process, and so did the time. The op
// alone, 512 x 8,142 fp32, 1 thread, 2-core EPYC VM, 10th percentiles of 300 calls in
// separate processes: 2.37-2.58 ms with the heap's placement; the two exp rows at the same page
// offset 2.67 ms, 2,048 bytes apart 2.37 ms. Side by side in one process against the heap-placed
// build (medians of 200 per-call ratios): median 0.99x over 10 processes, 0.92-1.04x.
struct ScratchPlacement {
  int64_t exp_row[2];
  int64_t cls_neg;
  int64_t weights;
  static ScratchPlacement from_bias(const void* bias) {
    constexpr int64_t kPage = 4096;
    // the page offset that puts class_bias at 3072; 0 without class_bias
    const int64_t base = bias ? (static_cast<int64_t>(reinterpret_cast<uintptr_t>(bias) % kPage) / 64 * 64 -
                                 3072 + kPage) % kPage
                              : 0;
    auto at = [&](int64_t offset) { return (base + offset) % kPage; };
    return {{at(0), at(2048)}, at(1024), at(2560)};
  }
};

// How label smoothing enters the two sweeps of a row, fixed at compile time so that the plain
// call (kNone) runs no code of it:
//   pass 1 sums T_b = sum_{j in b} wt[j] * (a[j] - r_b) beside the exp (for the loss);
//   pass 2 writes grad[j] = e[j] * sw - k * wt[j], k = r * ls / C (for the gradient).
// kUniform: ls > 0 without class weights (wt = 1, nothing loaded); kWeighted: ls > 0 with them.
enum class Smoothing { kNone, kUniform, kWeighted };

// What every row of one call shares: the margins and the options of the loss.
template <typename acc_t>
struct CallConstants {
  const acc_t* bias = nullptr;          // (C,) class_bias, or nullptr (plain cross-entropy)
  const acc_t* class_weight = nullptr;  // (C,) wt, or nullptr (all ones)
  int64_t num_classes = 0;
  double row_weight = 1;                // r: 1/W for "mean", 1 for "sum" and "none"
  double smoothing = 0;                 // ls
  double smoothing_per_class = 0;       // ls / C
  double weight_total = 0;              // sum_k wt[k]
  std::vector<double> block_weight_total;  // sum_{k in block b} wt[k], with smoothing only
  acc_t smooth_grad = 0;                // k = r * ls / C
};

// One row in flight: its pass-1 results, kept until its pass 2 has run (see row_pass1).
template <typename scalar_t>
struct RowWorkspace {
  using acc_t = at::opmath_type<scalar_t>;
  PagePlacedArray<acc_t> exp_row;  // (C,) exp(a - r_b) block by block (reduced dtypes: z first)
  std::vector<acc_t> block_ref;    // (ceil(C / kBlock),) r_b, the reference of block b
  std::vector<acc_t> block_sum;    // (ceil(C / kBlock),) sum_{j in b, j != y} exp(a[j] - r_b)
  std::vector<acc_t> block_smooth; // (ceil(C / kBlock),) T_b, with smoothing only
  double m = 0, S = 0;             // S = sum_j exp(a[j] - m)
  int64_t y = 0;
  acc_t w_prob = 0;                // r * c_p: grad[j] = p[j] * w_prob (- the smoothing term), j != y
  scalar_t grad_y = 0;             // grad[y], written after pass 2
  scalar_t* grad_row = nullptr;    // nullptr: no pass 2 pending
  int64_t next_block = 0;          // the next block of pass 2
  double sum_other = 0;            // sum_{j != y} p[j], summed by pass 2
  double* sum_other_out = nullptr;
  RowWorkspace(int64_t C, int64_t exp_row_page_offset)
      : exp_row(C, exp_row_page_offset, /*zeroed=*/false),  // written before it is read
        block_ref((C + kBlock - 1) / kBlock),
        block_sum(block_ref.size()),
        block_smooth(block_ref.size()) {}
};

template <typename acc_t>
inline acc_t vec_sum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, v);
}

// The logits stream of one thread, for software prefetch: the current row, then its next row
// (nullptr at the end of the thread's rows), in bytes. at(offset) is the address `offset` bytes
// into the current row, or past its end into the next row.
struct PrefetchStream {
  uintptr_t row = 0, next = 0;
  int64_t row_bytes = 0;
  const char* at(int64_t offset) const {
    if (offset < row_bytes) return reinterpret_cast<const char*>(row + offset);
    return next ? reinterpret_cast<const char*>(next + (offset - row_bytes)) : nullptr;
  }
};

// One demand load of the logits kTlbWarmAhead bytes ahead, per 4 KB page: it fills the TLB entry
// of a page before the block loop's software prefetches and loads reach it (a TLB miss is dear on
// this VM). Side by side in one process (512 x 8,142 fp32 training step), the build
// without it took 1.07-1.08x the time of the build with it. Reading a line of the gradient ahead
// the same way was slower (it is written by streaming stores, not read).
constexpr int64_t kTlbWarmAhead = 32768;

// Only within the current and the next row (a load, unlike a prefetch, must stay in bounds).
inline void warm_tlb(const PrefetchStream& pf, int64_t offset) {
  if (offset + kTlbWarmAhead >= 2 * pf.row_bytes) return;
  const char* p = pf.at(offset + kTlbWarmAhead);
  if (p == nullptr) return;
  const char value = *reinterpret_cast<const volatile char*>(p);
  asm volatile("" : : "r"(value));  // keep the load
}

template <typename scalar_t>
void store_block(const at::opmath_type<scalar_t>* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
void fill_row(scalar_t* dst, int64_t n, double value) {
  std::fill(dst, dst + n, static_cast<scalar_t>(value));
}

template <typename acc_t>
struct BlockSums {
  acc_t sum;                // sum_j exp(a[j] - ref)
  bool finite;              // every a[j] finite
  bool reference_too_low;   // some a[j] may exceed ref + kMaxAboveReference: redo the block
  acc_t smooth = 0;         // T = sum_j wt[j] * (a[j] - ref), with smoothing only
};

// The block sum above which exp_block asks for a new reference (AVX-512 fp32 path): a block whose
// a[j] all stay below ref + kMaxAboveReference sums to at most kBlock * exp(kMaxAboveReference).
constexpr float kBlockSumLimit = static_cast<float>(kBlock * 1.1420073898156842e26);  // exp(60)

// max_j (x[j] + bias[j]) over a block, for the rare block that needs a new reference.
template <typename acc_t>
acc_t block_max(const acc_t* x, const acc_t* bias, int64_t n) {
  acc_t best = std::numeric_limits<acc_t>::lowest();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, x[j] + (bias ? bias[j] : acc_t(0)));
  return best;
}

// The software prefetch of the block sweeps: the logits kPrefetchAhead bytes ahead of `offset`
// (bytes into the row; one line per vector, fp32: each line once). prefetch_from < 0: none.
inline void prefetch_logits(const PrefetchStream& pf, int64_t prefetch_from, int64_t offset) {
  if (prefetch_from < 0) return;
  const char* p = pf.at(prefetch_from + kPrefetchAhead + offset);
  if (p) __builtin_prefetch(p, 0, kPrefetchLocality);
}

// The smoothing terms of the sweeps (see Smoothing), on `count` lanes from column j of a block
// (wt: the block's class weights; read for kWeighted only). Pass 1: acc + wt[j] * d, where
// d = a - ref; pass 2: the gradient e * sw - k * wt[j] (e * sw for kNone, as the plain call).
template <Smoothing kSmooth, typename Vec>
inline Vec add_smoothing_term(const Vec& acc, const Vec& d, const typename Vec::value_type* wt, int64_t j,
                              int64_t count) {
  if constexpr (kSmooth == Smoothing::kNone) {
    return acc;
  } else {
    Vec term = d;
    if constexpr (kSmooth == Smoothing::kWeighted) term = Vec::loadu(wt + j, count) * d;
    // the tail's pad lanes hold no column (d may be anything there)
    if (count < Vec::size()) term = Vec::set(Vec(0), term, count);
    return acc + term;
  }
}

template <Smoothing kSmooth, typename Vec>
inline Vec smoothed_gradient(const Vec& e, const Vec& sw, const Vec& k, const typename Vec::value_type* wt,
                             int64_t j, int64_t count) {
  if constexpr (kSmooth == Smoothing::kNone) {
    return e * sw;
  } else if constexpr (kSmooth == Smoothing::kUniform) {
    return at::vec::fmsub(e, sw, k);
  } else {
    return at::vec::fnmadd(Vec::loadu(wt + j, count), k, e * sw);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The same on 16 fp32 lanes for the AVX-512 loops, given the lanes' class weights w (weights16:
// loaded once per vector, for both rows of exp_block_with_pass2; unused unless kWeighted).
template <Smoothing kSmooth>
inline __m512 weights16(const float* wt, int64_t j) {
  if constexpr (kSmooth == Smoothing::kWeighted) return _mm512_loadu_ps(wt + j);
  return _mm512_setzero_ps();
}

template <Smoothing kSmooth>
inline __m512 weights16(const float* wt, int64_t j, __mmask16 mask) {
  if constexpr (kSmooth == Smoothing::kWeighted) return _mm512_maskz_loadu_ps(mask, wt + j);
  return _mm512_setzero_ps();
}

template <Smoothing kSmooth>
inline __m512 add_smoothing_term(__m512 acc, __m512 d, __m512 w) {
  if constexpr (kSmooth == Smoothing::kUniform) return _mm512_add_ps(acc, d);
  if constexpr (kSmooth == Smoothing::kWeighted) return _mm512_fmadd_ps(w, d, acc);
  return acc;
}

template <Smoothing kSmooth>
inline __m512 add_smoothing_term(__m512 acc, __m512 d, __m512 w, __mmask16 mask) {
  if constexpr (kSmooth == Smoothing::kUniform) return _mm512_mask_add_ps(acc, mask, acc, d);
  if constexpr (kSmooth == Smoothing::kWeighted) return _mm512_mask3_fmadd_ps(w, d, acc, mask);
  return acc;
}

template <Smoothing kSmooth>
inline __m512 smoothed_gradient(__m512 e, __m512 sw, __m512 k, __m512 w) {
  if constexpr (kSmooth == Smoothing::kUniform) return _mm512_fmsub_ps(e, sw, k);
  if constexpr (kSmooth == Smoothing::kWeighted) return _mm512_fnmadd_ps(w, k, _mm512_mul_ps(e, sw));
  return _mm512_mul_ps(e, sw);
}
#endif

// One sweep over a block of n columns: a = x + bias, e = exp(a - ref) (x may alias e), with the
// sum of e, whether every a is finite, and with smoothing T = sum_j wt[j] * (a[j] - ref). While
// it runs, prefetches the logits kPrefetchAhead bytes ahead of the block (prefetch_from: the
// block's byte offset in the row; -1: no prefetch).
// Two implementations:
// Both test finiteness with fin = fma(a, 0, fin), which stays 0 while a is finite and turns NaN
// at the first NaN / +-inf (0 * inf = NaN): one instruction per vector, exact.
// - AVX-512, fp32 math: exp_of_difference, and no max: the reference is too low when the block
//   sum exceeds kBlockSumLimit (or is +inf). 13 vector instructions per 16 columns besides loads
//   and stores, against 17 for the generic sweep with exp_clamped.
// - otherwise: max of a (reference too low when it exceeds ref + kMaxAboveReference), fast_exp.
// The tail (n % kVec columns) runs as one masked vector: generic, padded with lowest() (nothing
// added to the max unless every a is lowest(), 0 to the sum, finite); AVX-512, padded with 0 and
// its pad lanes left out of the sum.
template <typename scalar_t, Smoothing kSmooth, typename acc_t>
BlockSums<acc_t> exp_block(const acc_t* x, const acc_t* bias, const acc_t* wt, int64_t n, acc_t ref, acc_t* e,
                           const PrefetchStream& pf, int64_t prefetch_from) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  auto prefetch = [&](int64_t j) { prefetch_logits(pf, prefetch_from, j * int64_t(sizeof(scalar_t))); };
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 vref = _mm512_set1_ps(ref), vzero = _mm512_setzero_ps();
    __m512 vsum = vzero, vfin = vzero, vsmooth = vzero;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      prefetch(j);
      __m512 a = _mm512_loadu_ps(x + j);
      if (bias) a = _mm512_add_ps(a, _mm512_loadu_ps(bias + j));
      vfin = _mm512_fmadd_ps(a, vzero, vfin);
      const __m512 d = _mm512_sub_ps(a, vref);
      const __m512 ex = exp_of_difference(d);
      _mm512_storeu_ps(e + j, ex);
      vsum = _mm512_add_ps(vsum, ex);
      vsmooth = add_smoothing_term<kSmooth>(vsmooth, d, weights16<kSmooth>(wt, j));
    }
    if (j < n) {  // masked loads fill the pad lanes with 0: finite, and left out of the sums
      const __mmask16 mask = static_cast<__mmask16>((1u << (n - j)) - 1);
      __m512 a = _mm512_maskz_loadu_ps(mask, x + j);
      if (bias) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(mask, bias + j));
      vfin = _mm512_fmadd_ps(a, vzero, vfin);
      const __m512 d = _mm512_sub_ps(a, vref);
      const __m512 ex = exp_of_difference(d);
      _mm512_mask_storeu_ps(e + j, mask, ex);
      vsum = _mm512_mask_add_ps(vsum, mask, vsum, ex);
      vsmooth = add_smoothing_term<kSmooth>(vsmooth, d, weights16<kSmooth>(wt, j, mask), mask);
    }
    const float sum = _mm512_reduce_add_ps(vsum);
    const float smooth = kSmooth == Smoothing::kNone ? 0.0f : _mm512_reduce_add_ps(vsmooth);
    return {sum, !std::isnan(_mm512_reduce_add_ps(vfin)), !(sum <= kBlockSumLimit), smooth};
  }
#endif
  const Vec vref(ref), vzero(0), vpad(std::numeric_limits<acc_t>::lowest());
  Vec vsum(0), vmax(vpad), vfin(0), vsmooth(0);
  auto step = [&](const Vec& a, int64_t j, int64_t count) {
    vmax = max_any_nan(vmax, a);
    vfin = at::vec::fmadd(a, vzero, vfin);
    const Vec d = a - vref;
    const Vec ex = fast_exp(d);
    ex.store(e + j, count);
    vsum = vsum + ex;
    vsmooth = add_smoothing_term<kSmooth>(vsmooth, d, wt, j, count);
  };
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    prefetch(j);
    Vec a = Vec::loadu(x + j);
    if (bias) a = a + Vec::loadu(bias + j);
    step(a, j, kVec);
  }
  if (j < n) {
    const int64_t count = n - j;
    Vec a = Vec::set(vpad, Vec::loadu(x + j, count), count);
    if (bias) a = a + Vec::loadu(bias + j, count);  // lanes past count: lowest() + 0
    step(a, j, count);
  }
  const acc_t bm = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return max_any_nan(p, q); }, vmax);
  return {vec_sum(vsum), !std::isnan(vec_sum(vfin)),
          static_cast<double>(bm) > static_cast<double>(ref) + kMaxAboveReference,
          kSmooth == Smoothing::kNone ? acc_t(0) : vec_sum(vsmooth)};
}

// The block's logits in acc_t: z itself, or (bf16 / fp16) converted into the scratch row.
template <typename scalar_t, typename acc_t>
const acc_t* block_in_acc_type(const scalar_t* z, acc_t* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return z;
  } else {
    at::vec::convert(z, scratch, n);
    return scratch;
  }
}

// Pass 2 for a block: grad[j] = e[j] * sw (- k * wt[j] with smoothing), cls[j] += e[j] * s
// (s = exp(r_b - m) / S, sw = s * w_prob, so p[j] = e[j] * s).
template <Smoothing kSmooth, typename acc_t>
void grad_block_generic(const acc_t* e, int64_t n, acc_t s, acc_t sw, const acc_t* wt, acc_t k, acc_t* g,
                        float* cls) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const Vec vs(s), vsw(sw), vk(k);
  // raw_clsneg[j] += p[j], in fp32 like the state: fused into the vector loop when the math is
  // fp32, a separate sweep for fp64 math.
  constexpr bool kFusedClsNeg = std::is_same_v<acc_t, float>;
  int64_t j = 0;
  for (; j < n; j += kVec) {
    const int64_t count = std::min(kVec, n - j);
    const Vec ev = Vec::loadu(e + j, count);
    smoothed_gradient<kSmooth>(ev, vsw, vk, wt, j, count).store(g + j, count);
    if constexpr (kFusedClsNeg) {
      if (cls) at::vec::fmadd(ev, vs, Vec::loadu(cls + j, count)).store(cls + j, count);
    }
  }
  if constexpr (!kFusedClsNeg) {
    if (cls) {
      for (int64_t k = 0; k < n; ++k) cls[k] += static_cast<float>(e[k] * s);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The same for fp32 logits on AVX-512, with the gradient written by non-temporal (streaming)
// stores: the gradient (B * C * 4 bytes, far more than the caches) is not read again here, and a
// plain store first reads its line from memory (read for ownership), so streaming it halves its
// traffic. The unaligned head and tail of the block (up to 15 columns each) use masked plain
// stores; the line they share with the neighbouring block is then written by plain stores only.
// Measured (512 x 8142 fp32 with statistics, interleaved medians): 1.51 ms against 1.65 ms with
// plain stores at 2 threads, 3.08 against 3.39 ms at 1 thread. _mm_sfence() at the end of each
// thread's work orders them before the parallel region's join.
template <Smoothing kSmooth>
void grad_block_stream(const float* e, int64_t n, float s, float sw, const float* wt, float k, float* g,
                       float* cls) {
  const __m512 vs = _mm512_set1_ps(s), vsw = _mm512_set1_ps(sw), vk = _mm512_set1_ps(k);
  auto masked = [&](int64_t j, int64_t count) {
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    const __m512 ev = _mm512_maskz_loadu_ps(mask, e + j);
    const __m512 w = weights16<kSmooth>(wt, j, mask);
    _mm512_mask_storeu_ps(g + j, mask, smoothed_gradient<kSmooth>(ev, vsw, vk, w));
    if (cls) _mm512_mask_storeu_ps(cls + j, mask, _mm512_fmadd_ps(ev, vs, _mm512_maskz_loadu_ps(mask, cls + j)));
  };
  const int64_t head = std::min<int64_t>(n, ((64 - (reinterpret_cast<uintptr_t>(g) & 63)) & 63) / 4);
  if (head > 0) masked(0, head);
  int64_t j = head;
  for (; j + 16 <= n; j += 16) {
    const __m512 ev = _mm512_loadu_ps(e + j);
    _mm512_stream_ps(g + j, smoothed_gradient<kSmooth>(ev, vsw, vk, weights16<kSmooth>(wt, j)));
    if (cls) _mm512_storeu_ps(cls + j, _mm512_fmadd_ps(ev, vs, _mm512_loadu_ps(cls + j)));
  }
  if (j < n) masked(j, n - j);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Loads and stores of 16 logits / gradient values as 16 fp32 lanes: fp32 itself, or bf16 / fp16
// converted on the way (round to nearest even, as c10::BFloat16 and c10::Half do; the gradients
// written here are finite). write() is how a full vector of a bf16 / fp16 gradient goes out: a
// plain store (fp32 goes by RealignedGradStream's streaming stores). Measured (512 x 8,142
// training step, versions side by side in one process, 2-core EPYC VM): bf16 plain
// stores took 0.66-0.70x the time of 32-byte streaming stores, whole lines streamed two vectors
// at a time 0.83x; fp16 0.67x and 0.84x (the reduced types are bound by the arithmetic, not by
// memory); fp32 plain stores took 1.09-1.13x the time of streaming ones.
template <typename scalar_t>
struct Lanes16;

template <>
struct Lanes16<float> {
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
  static void store(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
};

inline __m512 bf16_to_fp32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m256i fp32_to_bf16(__m512 v) {  // round to nearest even (finite values)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline __m512 fp16_to_fp32(__m256i v) { return _mm512_cvtph_ps(v); }
inline __m256i fp32_to_fp16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// bf16 and fp16: 16 values are 32 bytes.
template <typename T, __m512 (*to_fp32)(__m256i), __m256i (*from_fp32)(__m512)>
struct ReducedLanes16 {
  static __m512 load(const T* p) { return to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(__mmask16 mask, const T* p) { return to_fp32(_mm256_maskz_loadu_epi16(mask, p)); }
  static void store(T* p, __mmask16 mask, __m512 v) { _mm256_mask_storeu_epi16(p, mask, from_fp32(v)); }
  static void write(T* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), from_fp32(v)); }
};
template <>
struct Lanes16<c10::BFloat16> : ReducedLanes16<c10::BFloat16, bf16_to_fp32, fp32_to_bf16> {};
template <>
struct Lanes16<c10::Half> : ReducedLanes16<c10::Half, fp16_to_fp32, fp32_to_fp16> {};

// The fp32 gradient of one block, handed over 16 columns at a time from the block's first column
// (a multiple of 16), written with streaming stores of whole 64-byte lines. The gradient row
// starts C * 4 bytes after the previous one, so its lines begin at column o of the block, not 0:
// each line is the last 16 - o lanes of one vector and the first o of the next (vpermt2ps); the
// o columns before the first line and those after the last one go out by masked plain stores
// (a line shared with the neighbouring block or row is then written by plain stores only).
class RealignedGradStream {
 public:
  explicit RealignedGradStream(float* g) : g_(g) {
    const int64_t misaligned_columns = static_cast<int64_t>(reinterpret_cast<uintptr_t>(g) & 63) / 4;
    o_ = (16 - misaligned_columns) & 15;
    line_ = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(o_)),
                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  // v: the gradient of columns j .. j + 15, j = 0, 16, 32, ... in order.
  void put(int64_t j, __m512 v) {
    if (o_ == 0) {
      _mm512_stream_ps(g_ + j, v);
      return;
    }
    if (j == 0) {
      _mm512_mask_storeu_ps(g_, static_cast<__mmask16>((1u << o_) - 1), v);  // columns 0 .. o - 1
    } else {  // the line of columns j - 16 + o .. j + o - 1
      _mm512_stream_ps(g_ + j - 16 + o_, _mm512_permutex2var_ps(last_, line_, v));
    }
    last_ = v;
  }
  // After the last put (at column full - 16): its columns full - 16 + o .. full - 1.
  void finish(int64_t full) {
    if (o_ != 0 && full > 0) {
      _mm512_mask_storeu_ps(g_ + full - 16, static_cast<__mmask16>(~((1u << o_) - 1)), last_);
    }
  }

 private:
  float* g_;
  int64_t o_;
  __m512i line_;
  __m512 last_ = _mm512_setzero_ps();
};

// exp_block's AVX-512 fp32-math sweep of block b of one row and the pass 2 of block b of the
// previous row (gradient, cls_neg sums), in one loop: vector j of the new row's exp next to
// vector j of the old row's gradient, so that the gradient leaves at an even rate instead of as a
// burst of a whole block. The logits are read (and bf16 / fp16 converted) straight from z. The
// reference-too-low redo, rare, is exp_block alone.
// Which columns the vectors start at:
// - with statistics (cls != nullptr): columns 0, 16, 32, ... of the block, where class_bias, the
//   scratch rows and cls_neg are line-aligned (PagePlacedArray): only the logits loads and
//   the gradient stores may split a line, and the fp32 gradient is realigned into whole lines
//   for its streaming stores (RealignedGradStream);
// - without (plain cross-entropy): the gradient's own line boundaries (the columns before the
//   first one run masked), where its fp32 streaming stores need no realigning.
// The tail runs masked. Measured (512 x 8,142, the op alone, 2 threads, 2-core EPYC VM,
// builds side by side in one process, three runs): column-aligned
// against gradient-aligned, with statistics 0.93-0.98x (fp32), 0.92-0.94x (bf16), 0.91x (fp16);
// without them 1.07-1.20x (fp32), so that case keeps the gradient alignment. (One thread, hot
// in L2, the kernel alone: 6.7-6.9 against 7.4-7.9 ns per 16 columns with statistics.)
// The fused two-row loop itself (512 x 8,142 training step, 2 threads, 2-core EPYC VM,
// builds side by side in one process, a random order every round): fp32 took
// 0.92-0.93x the time of the two-pass kernel it replaces, whose second sweep re-read the row
// block after block (that order alone: 1.05-1.07x); bf16 and fp16, converted in registers
// instead of into a scratch fp32 row and written with plain stores, 0.71-0.74x and 0.46x.
// With smoothing, the new row's T (pass 1) and the old row's smoothing term (pass 2) come along;
// both rows read the block's class weights wt (same columns).
template <typename scalar_t, Smoothing kSmooth>
BlockSums<float> exp_block_with_pass2(const scalar_t* z, const float* bias, const float* wt, int64_t n, float ref,
                                      float* e, const PrefetchStream& pf, int64_t prefetch_from,
                                      const float* e_prev, float s, float sw, float k, scalar_t* g, float* cls) {
  using Lanes = Lanes16<scalar_t>;
  const __m512 vref = _mm512_set1_ps(ref), vzero = _mm512_setzero_ps();
  const __m512 vs = _mm512_set1_ps(s), vsw = _mm512_set1_ps(sw), vk = _mm512_set1_ps(k);
  __m512 vsum = vzero, vfin = vzero, vsmooth = vzero;
  auto masked = [&](int64_t j, int64_t count) {
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
    __m512 a = Lanes::load(mask, z + j);
    if (bias) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(mask, bias + j));
    vfin = _mm512_fmadd_ps(a, vzero, vfin);
    const __m512 d = _mm512_sub_ps(a, vref);
    const __m512 ex = exp_of_difference(d);
    _mm512_mask_storeu_ps(e + j, mask, ex);
    vsum = _mm512_mask_add_ps(vsum, mask, vsum, ex);
    const __m512 w = weights16<kSmooth>(wt, j, mask);
    vsmooth = add_smoothing_term<kSmooth>(vsmooth, d, w, mask);
    const __m512 ep = _mm512_maskz_loadu_ps(mask, e_prev + j);
    Lanes::store(g + j, mask, smoothed_gradient<kSmooth>(ep, vsw, vk, w));
    if (cls) _mm512_mask_storeu_ps(cls + j, mask, _mm512_fmadd_ps(ep, vs, _mm512_maskz_loadu_ps(mask, cls + j)));
  };
  // 16 columns: the new row's exp, and the old row's gradient (returned, not stored) and cls_neg.
  auto lane16 = [&](int64_t j) {
    prefetch_logits(pf, prefetch_from, j * int64_t(sizeof(scalar_t)));
    const __m512 w = weights16<kSmooth>(wt, j);  // first, ahead of the stores: 0.97-0.98x the time
    __m512 a = Lanes::load(z + j);
    if (bias) a = _mm512_add_ps(a, _mm512_loadu_ps(bias + j));
    vfin = _mm512_fmadd_ps(a, vzero, vfin);
    const __m512 d = _mm512_sub_ps(a, vref);
    const __m512 ex = exp_of_difference(d);
    _mm512_storeu_ps(e + j, ex);
    vsum = _mm512_add_ps(vsum, ex);
    vsmooth = add_smoothing_term<kSmooth>(vsmooth, d, w);
    const __m512 ep = _mm512_loadu_ps(e_prev + j);
    if (cls) _mm512_storeu_ps(cls + j, _mm512_fmadd_ps(ep, vs, _mm512_loadu_ps(cls + j)));
    return smoothed_gradient<kSmooth>(ep, vsw, vk, w);
  };
  int64_t j = 0;
  if (cls != nullptr) {  // column-aligned
    const int64_t full = n / 16 * 16;
    if constexpr (std::is_same_v<scalar_t, float>) {
      RealignedGradStream grad_out(g);
      for (; j < full; j += 16) grad_out.put(j, lane16(j));
      grad_out.finish(full);
    } else {
      for (; j < full; j += 16) Lanes::write(g + j, lane16(j));
    }
  } else {  // gradient-aligned
    const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(g) & 63);
    const int64_t head = std::min<int64_t>(n, ((64 - misaligned) & 63) / int64_t(sizeof(scalar_t)));
    for (; j < head; j += 16) masked(j, std::min<int64_t>(16, head - j));
    j = head;
    for (; j + 16 <= n; j += 16) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_stream_ps(g + j, lane16(j));  // g + j: 64-byte aligned
      } else {
        Lanes::write(g + j, lane16(j));
      }
    }
  }
  for (; j < n; j += 16) masked(j, std::min<int64_t>(16, n - j));
  const float sum = _mm512_reduce_add_ps(vsum);
  const float smooth = kSmooth == Smoothing::kNone ? 0.0f : _mm512_reduce_add_ps(vsmooth);
  return {sum, !std::isnan(_mm512_reduce_add_ps(vfin)), !(sum <= kBlockSumLimit), smooth};
}
#endif

// Pass 2 of block b of a row whose pass 1 is done: the block's probability scale
// s_b = exp(r_b - m) / S (p[j] = e[j] * s_b), and sw = s_b * w_prob for the gradient; adds the
// block's share of sum_{j != y} p[j].
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> block_scale(RowWorkspace<scalar_t>& r, int64_t b) {
  using acc_t = at::opmath_type<scalar_t>;
  const double scale = std::exp(static_cast<double>(r.block_ref[b]) - r.m) / r.S;
  r.sum_other += r.block_sum[b] * scale;
  return {static_cast<acc_t>(scale), static_cast<acc_t>(scale * r.w_prob)};
}

// Records that pass 2 has written blocks up to b_end - 1; after the last block: grad[y] and
// sum_other.
template <typename scalar_t>
void finish_pass2_blocks(RowWorkspace<scalar_t>& r, int64_t b_end) {
  const int64_t num_blocks = static_cast<int64_t>(r.block_ref.size());
  r.next_block = std::max(r.next_block, std::min(b_end, num_blocks));
  if (r.next_block == num_blocks) {
    r.grad_row[r.y] = r.grad_y;
    *r.sum_other_out = r.sum_other;
    r.grad_row = nullptr;
  }
}

// The class weights of the block starting at column `start`, or nullptr.
template <typename acc_t>
const acc_t* block_weights(const CallConstants<acc_t>& call, int64_t start) {
  return call.class_weight ? call.class_weight + start : nullptr;
}

// Pass 2 of a row whose pass 1 is done, blocks r.next_block .. b_end - 1: probabilities,
// gradient and statistics, p[j] = e[j] * s_b. grad_block: (kBlock,) staging for the conversion
// to scalar_t.
template <Smoothing kSmooth, typename scalar_t>
void row_pass2(RowWorkspace<scalar_t>& r, int64_t b_end, const CallConstants<at::opmath_type<scalar_t>>& call,
               float* cls_neg_acc, at::opmath_type<scalar_t>* grad_block) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!r.grad_row) return;
  const int64_t C = call.num_classes;
  const int64_t num_blocks = static_cast<int64_t>(r.block_ref.size());
  const acc_t k = call.smooth_grad;
  b_end = std::min(b_end, num_blocks);
  for (int64_t b = r.next_block; b < b_end; ++b) {
    const int64_t start = b * kBlock, n = std::min(kBlock, C - start);
    const auto [s, sw] = block_scale(r, b);
    const acc_t* e = r.exp_row.data() + start;
    const acc_t* wt = block_weights(call, start);
    float* cls = cls_neg_acc ? cls_neg_acc + start : nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) {
        grad_block_stream<kSmooth>(e, n, s, sw, wt, k, r.grad_row + start, cls);
        continue;
      }
#endif
      grad_block_generic<kSmooth>(e, n, s, sw, wt, k, r.grad_row + start, cls);
    } else {
      grad_block_generic<kSmooth>(e, n, s, sw, wt, k, grad_block, cls);
      store_block<scalar_t>(grad_block, r.grad_row + start, n);
    }
  }
  finish_pass2_blocks(r, b_end);
}

// The coefficients of row i with label y (the formulas at the top):
//   target = (1 - ls) * wt[y]                          (of lse - a[y] in the loss, of [j == y] in grad)
//   prob   = c_p = target + (ls / C) * sum_k wt[k]     (of p[j] in grad)
struct RowCoefficients {
  double label_weight;  // wt[y]
  double target;
  double prob;
};

template <Smoothing kSmooth, typename acc_t>
RowCoefficients row_coefficients(const CallConstants<acc_t>& call, int64_t y) {
  if constexpr (kSmooth == Smoothing::kNone) {  // ls = 0: target = prob = wt[y]
    const double label_weight = call.class_weight ? static_cast<double>(call.class_weight[y]) : 1.0;
    return {label_weight, label_weight, label_weight};
  } else {
    const double label_weight = call.class_weight ? static_cast<double>(call.class_weight[y]) : 1.0;
    const double target = (1.0 - call.smoothing) * label_weight;
    return {label_weight, target, target + call.smoothing_per_class * call.weight_total};
  }
}

// Sets up pass 2 of a row whose pass 1 is done (m, S: its reference and sum). e[y] is set to 0 and
// its block's sum redone (from L2, once per row), so the sums run over j != y exactly (no
// 1 - p[y] cancellation); grad[y] is written after the other columns (finish_pass2_blocks):
//   grad[y] = r * (c_p * p[y] - target - (ls / C) * wt[y])
//           = r * (target * (p[y] - 1) + (ls / C) * (sum_k wt[k] * p[y] - wt[y]))
template <Smoothing kSmooth, typename scalar_t>
void set_up_pass2(RowWorkspace<scalar_t>& cur, const CallConstants<at::opmath_type<scalar_t>>& call, int64_t y,
                  const RowCoefficients& coef, at::opmath_type<scalar_t> m, double S) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t* e = cur.exp_row.data();
  const int64_t block_y = y / kBlock;
  cur.m = m;
  cur.S = S;
  cur.y = y;
  const acc_t p_y = static_cast<acc_t>(e[y] * std::exp(static_cast<double>(cur.block_ref[block_y]) - m) / S);
  cur.w_prob = static_cast<acc_t>(call.row_weight * coef.prob);
  if constexpr (kSmooth == Smoothing::kNone) {
    cur.grad_y = static_cast<scalar_t>((p_y - acc_t(1)) * static_cast<acc_t>(call.row_weight * coef.target));
  } else {
    cur.grad_y = static_cast<scalar_t>(
        call.row_weight * (coef.target * (static_cast<double>(p_y) - 1.0) +
                           call.smoothing_per_class * (call.weight_total * p_y - coef.label_weight)));
  }
  e[y] = 0;
  const int64_t start = block_y * kBlock, n = std::min(kBlock, call.num_classes - start);
  Vec vsum(0);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    vsum = vsum + Vec::loadu(e + start + j, std::min<int64_t>(Vec::size(), n - j));
  }
  cur.block_sum[block_y] = vec_sum(vsum);
  cur.next_block = 0;
  cur.sum_other = 0;
}

// The first exp reference of a row: max of a = z + bias over its first vector (k columns).
template <typename scalar_t>
at::opmath_type<scalar_t> first_reference(const scalar_t* z, const at::opmath_type<scalar_t>* bias, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t m = static_cast<acc_t>(z[0]) + (bias ? bias[0] : acc_t(0));
  for (int64_t j = 1; j < k; ++j) m = std::max(m, static_cast<acc_t>(z[j]) + (bias ? bias[j] : acc_t(0)));
  return m;
}

// warm_tlb for each 4 KB page of the `bytes` bytes of logits from `offset` (bytes into the row).
inline void warm_pages(const PrefetchStream& pf, int64_t offset, int64_t bytes) {
  for (int64_t page = 0; page < bytes; page += 4096) warm_tlb(pf, offset + page);
}

// Pass 1 of block b (columns start .. start + n - 1) of the current row: e = exp(a - ref) into
// cur's scratch row, with the block's sums; ref = the row's reference m, or, when exp_block finds
// m too low (a block max more than kMaxAboveReference above it, or on AVX-512 a block sum past
// kBlockSumLimit), the block's own max, the block then swept again from L1. On AVX-512 with fp32
// math, pass 2 of the previous row's block b runs in the same loop (exp_block_with_pass2).
// Returns the block's sums (finite = false: the block holds a non-finite a) and sets *ref.
template <Smoothing kSmooth, typename scalar_t>
BlockSums<at::opmath_type<scalar_t>> sweep_block(const scalar_t* z, const CallConstants<at::opmath_type<scalar_t>>& call,
                                                 int64_t b, int64_t n, at::opmath_type<scalar_t> m,
                                                 const PrefetchStream& pf, RowWorkspace<scalar_t>& cur,
                                                 RowWorkspace<scalar_t>& prev, float* cls_neg_acc,
                                                 at::opmath_type<scalar_t>* ref) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t start = b * kBlock;
  const int64_t prefetch_from = start * int64_t(sizeof(scalar_t));
  const acc_t* bias_b = call.bias ? call.bias + start : nullptr;
  const acc_t* wt = block_weights(call, start);
  acc_t* e = cur.exp_row.data() + start;
  *ref = m;
  BlockSums<acc_t> sums;
  bool swept = false;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (prev.grad_row && prev.next_block == b) {  // with the previous row's pass 2 of block b
      const auto [s, sw] = block_scale(prev, b);
      sums = exp_block_with_pass2<scalar_t, kSmooth>(z + start, bias_b, wt, n, m, e, pf, prefetch_from,
                                                     prev.exp_row.data() + start, s, sw, call.smooth_grad,
                                                     prev.grad_row + start,
                                                     cls_neg_acc ? cls_neg_acc + start : nullptr);
      finish_pass2_blocks(prev, b + 1);
      swept = true;
    }
  }
#endif
  if (!swept) {
    const acc_t* x = block_in_acc_type(z + start, e, n);
    sums = exp_block<scalar_t, kSmooth>(x, bias_b, wt, n, m, e, pf, prefetch_from);
  }
  if (!sums.finite || !sums.reference_too_low) return sums;
  // rare: redo the block with its own max as the reference
  const acc_t* x = block_in_acc_type(z + start, e, n);  // e has overwritten the converted block
  *ref = block_max(x, bias_b, n);
  return exp_block<scalar_t, kSmooth>(x, bias_b, wt, n, *ref, e, pf, -1);  // finite: the block was
}

// loss_i = target * (lse - a[y]) + (ls / C) * sum_j wt[j] * (lse - a[j]). The smoothing sum is
// taken from the blocks' T_b = sum_{j in b} wt[j] * (a[j] - r_b), relative to their references
// (m >= r_b, a[j] - r_b < 60 + log(kBlock)), so nothing cancels:
//   sum_j wt[j] * (lse - a[j]) = (lse - m) * sum_k wt[k] + sum_b ((m - r_b) * W_b - T_b),
//   W_b = sum_{k in b} wt[k]
template <Smoothing kSmooth, typename scalar_t>
double row_loss(const RowWorkspace<scalar_t>& cur, const CallConstants<at::opmath_type<scalar_t>>& call,
                const RowCoefficients& coef, double m, double lse, double a_y) {
  const double nll = lse - a_y;
  if constexpr (kSmooth == Smoothing::kNone) {
    return coef.target * nll;
  } else {
    double smooth = (lse - m) * call.weight_total;
    for (size_t b = 0; b < cur.block_ref.size(); ++b) {
      smooth += (m - static_cast<double>(cur.block_ref[b])) * call.block_weight_total[b] -
                static_cast<double>(cur.block_smooth[b]);
    }
    return coef.target * nll + call.smoothing_per_class * smooth;
  }
}

// Pass 1 of one non-ignored row into `cur`, running pass 2 of the previous row (`prev`, if
// pending) block by block alongside, so that the gradient stores of one row overlap the logit
// loads and the exp work of the next instead of coming as a burst of their own. Measured
// (512 x 8142 fp32 with statistics, interleaved medians): 1.51 ms against 1.60 ms for pass 2
// right after pass 1 at 2 threads, 3.08 against 3.39 ms at 1 thread. The cls_neg adds of a
// column still come in row order. (Grouping 2-16 rows so that the cls_neg block is reused from
// L1 was not faster.)
// Returns false when the row holds a non-finite logit (then nothing of it is written; prev's
// pass 2 is left for the caller to finish). On success fills loss and lse and leaves cur's pass 2
// pending: grad row, sum_{j != y} p[j], and p[j] (j != y) added into cls_neg_acc when given.
template <Smoothing kSmooth, typename scalar_t>
bool row_pass1(const scalar_t* z, const CallConstants<at::opmath_type<scalar_t>>& call, int64_t y,
               const PrefetchStream& pf, RowWorkspace<scalar_t>& cur, RowWorkspace<scalar_t>& prev,
               float* cls_neg_acc, at::opmath_type<scalar_t>* grad_block, double* loss, double* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t C = call.num_classes;
  const acc_t* bias = call.bias;

  // 1. One sweep per block, a = z + bias read once: e = exp(a - r) into the scratch row, with
  //    the block's sum (the mass kernel's scheme). The reference r starts as the max of the
  //    row's first vector and only moves up, when a block needs it (sweep_block); so exp never
  //    overflows, and the separate max sweep (with its store and reload of a) is not needed.
  //    (m, S) <- (r, S * exp(m - r) + bs) when r moves, else S += bs * exp(r - m):
  //    S = sum_j exp(a[j] - m), m = the last reference (m <= max(a) < m + 60 + log(kBlock)).
  // Within a block the sums run in the math dtype (at most kBlock / kVec adds per lane); across
  // blocks they run in double, so a row of a million classes keeps fp32-level accuracy.
  // A row is finite iff every a is (exp_block's check; a non-finite first reference means the
  // same).
  acc_t m = first_reference(z, bias, std::min<int64_t>(Vec::size(), C));
  if (!std::isfinite(m)) return false;
  double S = 0;
  for (int64_t start = 0, b = 0; start < C; start += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - start);
    warm_pages(pf, start * int64_t(sizeof(scalar_t)), n * int64_t(sizeof(scalar_t)));
    acc_t ref;
    const BlockSums<acc_t> sums = sweep_block<kSmooth>(z, call, b, n, m, pf, cur, prev, cls_neg_acc, &ref);
    if (!sums.finite) return false;
    cur.block_ref[b] = ref;
    cur.block_sum[b] = sums.sum;
    cur.block_smooth[b] = sums.smooth;
    if (ref > m) {
      S = S * std::exp(static_cast<double>(m) - ref) + sums.sum;
      m = ref;
    } else {
      S += sums.sum * std::exp(static_cast<double>(ref) - m);
    }
    row_pass2<kSmooth>(prev, b + 1, call, cls_neg_acc, grad_block);  // the previous row's block b
  }
  // 2. The loss, and pass 2 set up.
  const RowCoefficients coef = row_coefficients<kSmooth>(call, y);
  *lse = m + std::log(S);
  const double a_y = static_cast<double>(static_cast<acc_t>(z[y]) + (bias ? bias[y] : acc_t(0)));
  *loss = row_loss<kSmooth>(cur, call, coef, m, *lse, a_y);
  set_up_pass2<kSmooth>(cur, call, y, coef, m, S);
  return true;
}

// Pairwise statistics: raw_pair[j, y_i] += |p[i, j] - [j == y_i]| over the rows used for the
// statistics. A second sweep over the logits, parallel over j so that no two threads write the
// same entry; only run when pairwise tracking is on.
template <typename scalar_t>
void pairwise_pass(const GalaCeParams& p, const std::vector<double>& row_lse,
                   const std::vector<uint8_t>& row_used, const at::opmath_type<scalar_t>* bias) {
  using acc_t = at::opmath_type<scalar_t>;
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

// What the rows of a call leave for the statistics, by row.
struct RowRecords {
  std::vector<double> sum_other;   // sum_{j != y} p[j]
  std::vector<double> lse;         // logsumexp(a), for the pairwise pass
  std::vector<uint8_t> used;       // non-ignored and finite: counted in the statistics
  std::vector<uint8_t> nonfinite;  // non-ignored with a non-finite logit
  explicit RowRecords(int64_t B) : sum_other(B, 0.0), lse(B, 0.0), used(B, 0), nonfinite(B, 0) {}
};

// Rows r0 .. r1 - 1 in order, two in flight: pass 1 of row i runs with pass 2 of the previous row
// (row_pass1). Writes their loss and gradient rows, adds p[j] (j != y) into cls_neg_acc when given.
template <Smoothing kSmooth, typename scalar_t>
void run_rows(const GalaCeParams& p, const CallConstants<at::opmath_type<scalar_t>>& call, int64_t r0, int64_t r1,
              RowWorkspace<scalar_t>*& cur, RowWorkspace<scalar_t>*& prev, float* cls_neg_acc,
              at::opmath_type<scalar_t>* grad_block, RowRecords& records) {
  const auto* logits = static_cast<const scalar_t*>(p.logits);
  auto* grad = static_cast<scalar_t*>(p.grad);
  const int64_t C = p.num_classes;
  constexpr int64_t kAllBlocks = std::numeric_limits<int64_t>::max();
  for (int64_t i = r0; i < r1; ++i) {
    const scalar_t* z = logits + i * p.logits_row_stride;
    scalar_t* g = grad + i * C;
    const int64_t y = p.labels[i];
    if (y == p.ignore_index) {
      fill_row(g, C, 0.0);
      p.loss_rows[i] = 0.0;
      continue;
    }
    PrefetchStream pf;
    pf.row = reinterpret_cast<uintptr_t>(z);
    pf.row_bytes = C * int64_t(sizeof(scalar_t));
    pf.next = i + 1 < r1 ? reinterpret_cast<uintptr_t>(z + p.logits_row_stride) : 0;
    double loss = 0.0, lse = 0.0;
    if (row_pass1<kSmooth>(z, call, y, pf, *cur, *prev, cls_neg_acc, grad_block, &loss, &lse)) {
      row_pass2<kSmooth>(*prev, kAllBlocks, call, cls_neg_acc, grad_block);
      cur->grad_row = g;
      cur->sum_other_out = &records.sum_other[i];
      p.loss_rows[i] = loss;
      records.lse[i] = lse;
      records.used[i] = 1;
      std::swap(cur, prev);
    } else {  // a non-finite logit: NaN loss and gradient, no statistics
      row_pass2<kSmooth>(*prev, kAllBlocks, call, cls_neg_acc, grad_block);
      fill_row(g, C, std::numeric_limits<double>::quiet_NaN());
      p.loss_rows[i] = std::numeric_limits<double>::quiet_NaN();
      records.nonfinite[i] = 1;
    }
  }
  row_pass2<kSmooth>(*prev, kAllBlocks, call, cls_neg_acc, grad_block);
}

// The raw statistics from the rows' records and the chunks' cls_neg accumulators (cls_stride
// floats apart), in a fixed order (deterministic):
//   raw_pos[y] += sum_{j != y} p[j],  raw_neg[y] += the same  (a serial scatter over B rows)
//   raw_clsneg[j] = sum over chunks of cls_neg_acc[j]
template <typename scalar_t>
void sum_statistics(const GalaCeParams& p, const RowRecords& records, const float* cls_neg_chunks,
                    int64_t num_chunks, int64_t cls_stride) {
  const int64_t B = p.batch, C = p.num_classes;
  float* raw_pos = p.raw_stats;
  float* raw_neg = p.raw_stats + C;
  float* raw_cls_neg = p.raw_stats + 2 * C;
  for (int64_t i = 0; i < B; ++i) {
    if (!records.used[i]) continue;
    raw_pos[p.labels[i]] += static_cast<float>(records.sum_other[i]);
    raw_neg[p.labels[i]] += static_cast<float>(records.sum_other[i]);
  }
  at::parallel_for(0, C, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const float* src = cls_neg_chunks + chunk * cls_stride;
      for (int64_t j = j0; j < j1; ++j) raw_cls_neg[j] += src[j];
    }
  });
  if (p.raw_pairwise) {
    pairwise_pass<scalar_t>(p, records.lse, records.used, static_cast<const at::opmath_type<scalar_t>*>(p.class_bias));
  }
}

// sum_j x[j] in double, four partial sums (a dependency chain a quarter as long).
template <typename acc_t>
double sum_in_double(const acc_t* x, int64_t n) {
  double partial[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (int k = 0; k < 4; ++k) partial[k] += static_cast<double>(x[j + k]);
  }
  for (; j < n; ++j) partial[0] += static_cast<double>(x[j]);
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// The constants of a call from its parameters: the class weight sums (whole row and per block)
// and k = r * ls / C.
template <typename acc_t>
CallConstants<acc_t> call_constants(const GalaCeParams& p) {
  CallConstants<acc_t> call;
  call.bias = static_cast<const acc_t*>(p.class_bias);
  call.class_weight = static_cast<const acc_t*>(p.class_weight);
  call.num_classes = p.num_classes;
  call.row_weight = p.row_weight;
  call.smoothing = p.label_smoothing;
  const int64_t C = p.num_classes;
  call.smoothing_per_class = p.label_smoothing / static_cast<double>(C);
  // The weight sums enter the smoothing terms only (without smoothing, c_p = wt[y]).
  call.weight_total = static_cast<double>(C);
  if (call.smoothing > 0) {
    call.weight_total = 0;
    for (int64_t start = 0; start < C; start += kBlock) {
      const int64_t n = std::min(kBlock, C - start);
      const double total = call.class_weight ? sum_in_double(call.class_weight + start, n) : static_cast<double>(n);
      call.block_weight_total.push_back(total);
      call.weight_total += total;
    }
  }
  call.smooth_grad = static_cast<acc_t>(p.row_weight * p.label_smoothing / static_cast<double>(C));
  return call;
}

template <Smoothing kSmooth, typename scalar_t>
void gala_ce_forward_typed(const GalaCeParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = p.batch, C = p.num_classes;
  const bool stats = p.raw_stats != nullptr;
  const ScratchPlacement placement = ScratchPlacement::from_bias(p.class_bias);
  CallConstants<acc_t> call = call_constants<acc_t>(p);
  // The smoothing sweeps read the class weights at every column: a copy, placed.
  PagePlacedArray<acc_t> weights_copy(kSmooth == Smoothing::kWeighted ? C : 0, placement.weights, false);
  if constexpr (kSmooth == Smoothing::kWeighted) {
    std::copy(call.class_weight, call.class_weight + C, weights_copy.data());
    call.class_weight = weights_copy.data();
  }

  // Rows are split into a fixed number of contiguous chunks (one per thread), so the
  // per-chunk cls_neg accumulators and their final sum are deterministic.
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  // One cls_neg accumulator per chunk, each at the same place in its pages (cls_stride: C floats
  // rounded up to 4 KB).
  const int64_t cls_stride = (C * int64_t(sizeof(float)) + 4095) / 4096 * 4096 / int64_t(sizeof(float));
  PagePlacedArray<float> cls_neg_chunks(stats ? num_chunks * cls_stride : 0, placement.cls_neg, true);
  RowRecords records(B);

  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    RowWorkspace<scalar_t> ws_a(C, placement.exp_row[0]), ws_b(C, placement.exp_row[1]);
    RowWorkspace<scalar_t>* cur = &ws_a;
    RowWorkspace<scalar_t>* prev = &ws_b;
    std::vector<acc_t> grad_block(std::is_same_v<scalar_t, acc_t> ? 0 : kBlock);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t r0 = chunk * B / num_chunks, r1 = (chunk + 1) * B / num_chunks;
      float* cls_neg_acc = stats ? cls_neg_chunks.data() + chunk * cls_stride : nullptr;
      run_rows<kSmooth>(p, call, r0, r1, cur, prev, cls_neg_acc, grad_block.data(), records);
    }
#if defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();  // the streaming gradient stores are weakly ordered: complete them before the join
#endif
  });

  int64_t nonfinite = 0;
  for (int64_t i = 0; i < B; ++i) nonfinite += records.nonfinite[i];
  *p.nonfinite_rows = nonfinite;
  if (stats) sum_statistics<scalar_t>(p, records, cls_neg_chunks.data(), num_chunks, cls_stride);
}

// The kernel for one dtype, with label smoothing compiled in only when it is asked for.
template <typename scalar_t>
void gala_ce_forward_options(const GalaCeParams& params) {
  if (params.label_smoothing == 0.0) return gala_ce_forward_typed<Smoothing::kNone, scalar_t>(params);
  if (params.class_weight == nullptr) return gala_ce_forward_typed<Smoothing::kUniform, scalar_t>(params);
  return gala_ce_forward_typed<Smoothing::kWeighted, scalar_t>(params);
}

}  // namespace

void gala_ce_forward_kernel(const GalaCeParams& params) {
  switch (params.dtype) {
    case c10::ScalarType::Float: return gala_ce_forward_options<float>(params);
    case c10::ScalarType::Double: return gala_ce_forward_options<double>(params);
    case c10::ScalarType::BFloat16: return gala_ce_forward_options<c10::BFloat16>(params);
    case c10::ScalarType::Half: return gala_ce_forward_options<c10::Half>(params);
    default: TORCH_INTERNAL_ASSERT(false, "gala_ce_forward_kernel: unexpected dtype ", params.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace gala::cpu
