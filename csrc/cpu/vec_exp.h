// Vectorised exp for the CPU kernels (included by each *_kernel.cpp, compiled once per ISA).
#pragma once

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <type_traits>

namespace gala::cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
// exp(x) for x <= 88, never NaN (the kernels pass x = a - max(a) or z - reference), AVX-512,
// in about half the instructions of Vectorized<float>::exp_u20: exp is most of the kernels' work.
//   k = x * log2(e) rounded to a multiple of 1/16,  r = x - k * ln2,  |r| <= ln2 / 32
//   exp(x) = 2^floor(k) * 2^frac(k) * e^r
//   2^frac(k): one of 16 table entries (a register permute indexed by the low 4 bits of 16k)
//   e^r:       degree-3 Taylor polynomial, relative error < 1e-8 on |r| <= ln2 / 32
//   2^floor(k): _mm512_scalef_ps, exact, gradual underflow to 0
// x is clamped at -110 first (exp is already 0 there in fp32), so -inf gives exactly 0.
// Accuracy: about 2 ulp (table rounding + Horner), like exp_u20's.
inline at::vec::Vectorized<float> exp_clamped(const at::vec::Vectorized<float>& xv) {
  const __m512 two_pow_sixteenths = _mm512_setr_ps(
      1.0f, 1.04427378242741384f, 1.09050773266525766f, 1.13878863475669165f, 1.18920711500272107f,
      1.24185781207348405f, 1.29683955465100967f, 1.35425554693689273f, 1.41421356237309505f,
      1.47682614593949931f, 1.54221082540794082f, 1.61049033194925431f, 1.68179283050742909f,
      1.75625216037329948f, 1.83400808640934246f, 1.91520656139714729f);
  constexpr int kRoundToSixteenths = (4 << 4) | _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 x = _mm512_max_ps(xv, _mm512_set1_ps(-110.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        kRoundToSixteenths);
  const __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693147180559945309f), x);
  const __m512i sixteen_k = _mm512_cvtps_epi32(_mm512_mul_ps(k, _mm512_set1_ps(16.0f)));  // exact
  const __m512 two_pow_frac = _mm512_permutexvar_ps(sixteen_k, two_pow_sixteenths);     // low 4 bits
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 6), r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(_mm512_mul_ps(poly, two_pow_frac), k);
}

// exp(d) for the fused loss kernel's block sweep, AVX-512 fp32, in 10 vector instructions (the
// routine above takes 12 and a clamp):
//   x = d * log2(e),  k = round(x),  f = x - k  (exact, |f| <= 1/2)
//   2^f: degree-5 polynomial, coefficients fitted for the least maximum relative error on
//        [-1/2, 1/2] (1.9e-7 in fp32 Horner, about 1.6 ulp)
//   exp(d) = 2^k * 2^f: _mm512_scalef_ps, exact, 0 below 2^-149, inf above 2^128
// Rounding x adds a relative error of up to |d| * 4e-8 (1e-6 at d = -25, where exp(d) = 1e-11
// is far below anything a probability sum notices). d = -inf gives 0, +inf gives +inf, NaN
// gives NaN (the caller tests finiteness itself: scalef does not carry f's NaN through when k
// is infinite). Finite d < -88 needs no clamp: scalef flushes the product to 0.
inline __m512 exp_of_difference(__m512 d) {
  const __m512 x = _mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f));
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, k);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.001326472731307149f), f, _mm512_set1_ps(0.009671512991189957f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550733581185341f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022242426872253f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931470036506653f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}
#endif

// exp of x = z - reference. fp32 math: the AVX-512 routine above, else exp_u20 (both
// ample for probabilities that are summed; both map -inf to 0). fp64 math: full accuracy (the
// float64 path is the one the reference comparisons use). NaN never reaches it (rows holding
// NaN are handled apart).
template <typename Vec>
inline Vec fast_exp(const Vec& x) {
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return exp_clamped(x);
#else
    return x.exp_u20();
#endif
  } else {
    return x.exp();
  }
}

// max(a, b) lane by lane, for callers that detect NaN apart: on AVX-512 fp32 the plain vmaxps,
// which may drop a NaN lane (at::vec::maximum propagates NaN with a compare, a mask move and an
// or per vector).
template <typename Vec>
inline Vec max_any_nan(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<typename Vec::value_type, float>) return _mm512_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

}  // namespace CPU_CAPABILITY
}  // namespace gala::cpu
