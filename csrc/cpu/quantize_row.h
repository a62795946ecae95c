// Symmetric absmax int8 quantisation of one row: the arithmetic of
// memkern.reference.quantize_rowwise, shared by the quantize_rowwise kernel and the fused
// quantisation inside int8_linear so both give the same bytes.
//
//   scale = absmax / 127 in float32 (1 for an all-zero row); q = clamp(rint(x / scale),
//   -127, 127) with a correctly rounded division and round-half-to-even. A row holding
//   inf or NaN gets scale NaN and q = 0, so every dequantised use of it is NaN.
//
// float32 rows with unit stride take an AVX-512 path (16 lanes, the same IEEE operations
// as the scalar loop, so the same result); other dtypes and strides take the scalar loop.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace memkern {

// Writes q[c] ^ flip for every column (flip = 0x80 stores q + 128 as an unsigned byte, the
// operand layout of vpdpbusd) and returns the row's scale.
template <typename x_t>
inline float quantize_row(const x_t* x, int64_t cols, int64_t stride, uint8_t flip, uint8_t* q) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<x_t, float>) {
    if (stride == 1) {
      const __m512 sign = _mm512_set1_ps(-0.0f);
      const __m512 largest = _mm512_set1_ps(FLT_MAX);
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 nonfinite = 0;
      for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 live = cols - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - c)) - 1);
        const __m512 a = _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(live, x + c));
        nonfinite |= _mm512_cmp_ps_mask(a, largest, _CMP_NLE_UQ);  // inf or NaN
        vmax = _mm512_max_ps(vmax, a);
      }
      const float absmax = _mm512_reduce_max_ps(vmax);
      if (nonfinite) {
        std::fill(q, q + cols, flip);
        return NAN;
      }
      float s = absmax / 127.0f;
      if (s == 0.0f) s = 1.0f;
      const __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
      const __m128i vflip = _mm_set1_epi8(static_cast<char>(flip));
      for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 live = cols - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - c)) - 1);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(live, x + c), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        const __m128i bytes = _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)), vflip);
        _mm_mask_storeu_epi8(q + c, live, bytes);
      }
      return s;
    }
  }
#endif
  float absmax = 0.0f;
  bool nonfinite = false;
  for (int64_t c = 0; c < cols; ++c) {
    const float a = std::fabs(static_cast<float>(x[c * stride]));
    nonfinite |= !(a <= FLT_MAX);  // true for inf and NaN
    absmax = std::max(absmax, a);
  }
  if (nonfinite) {
    std::fill(q, q + cols, flip);
    return NAN;
  }
  float s = absmax / 127.0f;
  if (s == 0.0f) s = 1.0f;  // all-zero row (or absmax so small the scale underflows)
  for (int64_t c = 0; c < cols; ++c) {
    float v = std::nearbyint(static_cast<float>(x[c * stride]) / s);
    v = std::min(127.0f, std::max(-127.0f, v));
    q[c] = static_cast<uint8_t>(static_cast<int8_t>(v)) ^ flip;
  }
  return s;
}

}  // namespace memkern
