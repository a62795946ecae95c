// AVX2 kernel of int8_linear (int8_linear.cpp) for builds without AVX512-VNNI: quantise
// x, int8 x int8 -> int32 and the epilogue in one pass over the plain (N, K) weight.
// Defines MEMKERN_INT8_AVX2 where the build targets AVX2 but not the VNNI kernels
// (int8_vnni.h); otherwise this header declares nothing.
//
// Without it, such a CPU ran torch._int_mm (oneDNN's reference path there: 258 ms at
// 16 x 4096 x 4096 on the AVX2 EPYC of bench/NOTES.md, against 2.7 ms for fbgemm's
// quantize_dynamic) or the portable loop (40 ms).
//
// Arithmetic: the weight bytes and the quantised activations are widened to int16 and
// multiplied with vpmaddwd (16 products per ymm, adjacent pairs summed into int32: exact,
// |a * b| <= 127 * 128); the pairs are added into int32 accumulators, exact for K up to
// kExactChunkK. vpmaddubsw would take the bytes as they are, but it needs an unsigned
// operand and saturates at int16, so it cannot be exact for signed weights without a
// sign fix-up per row of x (the same instruction count as widening).
//
// Tiles: MR rows of x x NR weight rows (MR x NR ymm accumulators). A tile of NR weight
// rows is read from memory once, by the first row tile, and stays in L1 for the others;
// while the first row tile runs, the next weight tile is prefetched into L2 (the weight
// rows are page-sized streams, where hardware prefetchers stop; its effect on its own was
// not measured on the loaded AVX2 machine, bench/NOTES.md "Decode").
// Weight tiles are split over threads in contiguous ranges (ATen's parallel_for), so each
// thread streams one contiguous slab of the weight.
#pragma once

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__))
#define MEMKERN_INT8_AVX2 1
#endif

#ifdef MEMKERN_INT8_AVX2
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/linear_epilogue.h"
#include "cpu/quantize_row.h"

namespace memkern {
namespace {

// Rows of x per pass over a thread's weight tiles: their int16 copy (128 KiB at K = 4096)
// stays in L2 while the weight streams past it; each block reads the weight once. At 512 x
// 4096 x 4096 on one thread of the AVX2 machine of bench/NOTES.md: 64 rows 637 ms, 32 rows
// 498 ms, 16 rows 348 ms.
constexpr int64_t kAvx2RowBlock = 16;

inline int32_t sum_lanes(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// sums[i][j] = sum_k x16[i, k] * w[j][k] over all of K (x16: MR rows, ldx int16 apart,
// zero past K up to a multiple of 16; w: NR row pointers). With Prefetch, the rows `next`
// are fetched into L2 one line per weight row every 64 bytes of k.
template <int MR, int NR, bool Prefetch>
void int8_avx2_tile(const int16_t* x16, int64_t ldx, const int8_t* const* w, const int8_t* const* next, int64_t K,
                    int32_t sums[][NR]) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (Prefetch && k % 64 == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(next[j] + k), _MM_HINT_T1);
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[j] + k)));
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i * ldx + k));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t s = sum_lanes(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += int32_t{x16[i * ldx + t]} * int32_t{w[j][t]};  // K % 16 tail
      sums[i][j] = s;
    }
}

// All M rows of x (already quantised and widened into x16) against every weight row:
// MR-row tiles against NR-row weight tiles, the epilogue applied as each tile leaves
// registers. One parallel region per call: each thread takes a contiguous range of weight
// tiles and walks the rows in blocks of kAvx2RowBlock against it (a region per row block
// cost a scheduler wait per region whenever another process held a core: medians 4x the
// minimum at 2048 x 64 x 256).
template <int MR, int NR, typename out_t>
void int8_avx2_rows(const int16_t* x16, int64_t ldx, const float* x_scale, int64_t M, const int8_t* w, int64_t N,
                    int64_t K, const float* w_scale, const float* bias, out_t* out) {
  const int64_t tiles = (N + NR - 1) / NR;
  // One contiguous range of weight tiles per thread (grain: tiles / threads at least).
  const int64_t grain = std::max<int64_t>(1, (tiles + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t b0 = 0; b0 < M; b0 += kAvx2RowBlock) {
      const int64_t b1 = std::min(M, b0 + kAvx2RowBlock);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * NR;
        const int count = static_cast<int>(std::min<int64_t>(NR, N - n0));
        const int8_t* wr[NR];
        const int8_t* next[NR];
        for (int j = 0; j < NR; ++j) {
          wr[j] = w + std::min<int64_t>(n0 + j, N - 1) * K;  // past N: repeat the last row
          next[j] = w + std::min<int64_t>(n0 + NR + j, N - 1) * K;
        }
        for (int64_t r = b0; r < b1; r += MR) {
          int32_t sums[MR][NR];
          const int16_t* xr = x16 + r * ldx;
          const int64_t mr = std::min<int64_t>(MR, b1 - r);
          const bool first = r == b0 && t + 1 < t1;
          switch (mr * 2 + (first ? 1 : 0)) {
            case 2 * MR + 1: int8_avx2_tile<MR, NR, true>(xr, ldx, wr, next, K, sums); break;
            case 2 * MR: int8_avx2_tile<MR, NR, false>(xr, ldx, wr, next, K, sums); break;
            default:
              // The last row tile is short: one row at a time.
              for (int64_t i = 0; i < mr; ++i) {
                int32_t one[1][NR];
                int8_avx2_tile<1, NR, false>(xr + i * ldx, ldx, wr, next, K, one);
                for (int j = 0; j < NR; ++j) sums[i][j] = one[0][j];
              }
          }
          for (int64_t i = 0; i < mr; ++i) {
            const int64_t m = r + i;
            for (int j = 0; j < count; ++j)
              out[m * N + n0 + j] = static_cast<out_t>(epilogue_value(static_cast<float>(sums[i][j]), x_scale[m],
                                                                      w_scale[n0 + j], bias ? bias + n0 + j : nullptr));
          }
        }
      }
    }
  });
}

// int8_linear on AVX2: every row of x quantised (quantize_row.h, the quantize_rowwise
// kernel's arithmetic) and widened to int16 once, in parallel, then the tiles above. One
// row of x takes 4 weight rows per tile (4 independent accumulators), more rows 4 x 2.
template <typename x_t, typename out_t>
void int8_linear_avx2(const x_t* x, int64_t M, int64_t K, int64_t xs0, int64_t xs1, const int8_t* w, int64_t N,
                      const float* w_scale, const float* bias, out_t* out) {
  const int64_t ldx = (K + 15) / 16 * 16;
  std::vector<int16_t> x16(static_cast<size_t>(M * ldx), 0);
  std::vector<float> x_scale(static_cast<size_t>(M));
  at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    std::vector<uint8_t> q(static_cast<size_t>(K));
    for (int64_t m = m0; m < m1; ++m) {
      x_scale[m] = quantize_row(x + m * xs0, K, xs1, 0, q.data());
      int16_t* row = x16.data() + m * ldx;
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<int8_t>(q[k]);
    }
  });
  if (M == 1)
    int8_avx2_rows<1, 4>(x16.data(), ldx, x_scale.data(), M, w, N, K, w_scale, bias, out);
  else
    int8_avx2_rows<4, 2>(x16.data(), ldx, x_scale.data(), M, w, N, K, w_scale, bias, out);
}

}  // namespace
}  // namespace memkern
#endif  // MEMKERN_INT8_AVX2
