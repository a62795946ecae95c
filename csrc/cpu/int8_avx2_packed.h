// An AVX2 register tile for int8 x int8 -> int32 products whose weight is packed as
// memkern.ops.pack_int8_weight packs it: panels of 16 output columns, each a run of
// 64-byte blocks of 16 columns x 4 consecutive inputs. The block-sparse int8 kernel
// (sparse_int8_linear.cpp) packs each kept block so when a call has enough rows of x to
// pay for it.
//
// Why this tile (bench/NOTES.md, "Sparse int8"): one 32-byte half of a packed block is
// 8 output columns x 4 inputs, so a broadcast of 4 inputs of one row of x against it
// gives 8 columns' partial sums in one register. The sums stay in registers across every
// kept block of a block row and are folded once, where the (N, K)-order kernels sum each
// accumulator's lanes per weight row; each loaded weight vector serves kPackedTileRows rows.
//
// Arithmetic (exact, as int8_avx2.h's): weight bytes widened to int16 (vpmovsxbw) and
// multiplied by the quantised activations as int16 pairs (vpmaddwd: |a * w| <= 127 * 128,
// a pair's sum fits int32), int32 accumulators, exact for K up to 2^17. One accumulator
// holds 4 columns x 2 pair sums; two are folded into 8 columns (vphaddd + a lane permute).
// 4 rows x 8 columns: 8 accumulators, two widened weight vectors and the rows' 4
// broadcasts fit the 16 ymm (6 rows spilled accumulators to the stack under GCC 12).
//
// x is laid out per tile of rows as [group of 4 inputs][row][4] int16: one 8-byte
// broadcast per row and group, the tile's rows side by side.
#pragma once

#ifdef __AVX2__
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace memkern {
namespace {

constexpr int kPackedTileRows = 4;         // rows of x per register tile
constexpr int64_t kPackedPanelCols = 16;   // output columns per panel (PACK_COLUMNS)
constexpr int64_t kPackedBlockBytes = 64;  // bytes per (panel, group of 4 inputs)

// int16 elements of one tile of x over `groups` groups of 4 inputs.
inline int64_t packed_tile_elems(int64_t groups) { return groups * kPackedTileRows * 4; }

// sums[i * ld + c] += the tile's row i against column c of an 8-column half of packed
// weight, over `blocks` runs of `groups` groups: run b reads the weight at
// w + b * w_run_stride (the half's first group; a group's next is kPackedBlockBytes on)
// and x from group x_group[b] of the tile at xt.
template <int MR>
inline void packed_half_tile(const int16_t* xt, const int64_t* x_group, const int8_t* w, int64_t w_run_stride,
                             int64_t blocks, int64_t groups, int32_t* sums, int64_t ld) {
  __m256i lo[MR], hi[MR];  // columns 0-3 / 4-7, two pair sums per column
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm256_setzero_si256();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* wb = w + b * w_run_stride;
    const int16_t* xb = xt + x_group[b] * (kPackedTileRows * 4);
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* wg = wb + g * kPackedBlockBytes;
      const __m256i w_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
      const __m256i w_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)));
      const int16_t* xg = xb + g * (kPackedTileRows * 4);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        int64_t four;
        std::memcpy(&four, xg + i * 4, sizeof(four));
        const __m256i xv = _mm256_set1_epi64x(four);
        lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(w_lo, xv));
        hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(w_hi, xv));
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    // hadd: [c0 c1 c4 c5 | c2 c3 c6 c7]; the 64-bit lane permute puts the columns in order.
    const __m256i folded = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo[i], hi[i]), 0xD8);
    __m256i* out = reinterpret_cast<__m256i*>(sums + i * ld);
    _mm256_storeu_si256(out, _mm256_add_epi32(_mm256_loadu_si256(out), folded));
  }
}

// packed_half_tile for a tile of `rows` (1..kPackedTileRows) live rows.
inline void packed_half_tile_rows(int rows, const int16_t* xt, const int64_t* x_group, const int8_t* w,
                                  int64_t w_run_stride, int64_t blocks, int64_t groups, int32_t* sums, int64_t ld) {
  switch (rows) {
    case 4: packed_half_tile<4>(xt, x_group, w, w_run_stride, blocks, groups, sums, ld); break;
    case 3: packed_half_tile<3>(xt, x_group, w, w_run_stride, blocks, groups, sums, ld); break;
    case 2: packed_half_tile<2>(xt, x_group, w, w_run_stride, blocks, groups, sums, ld); break;
    default: packed_half_tile<1>(xt, x_group, w, w_run_stride, blocks, groups, sums, ld); break;
  }
}

// Quantised rows a (M x lda int8, lda a multiple of 4) widened into tiles: row m, input k
// at x16[(m / R) * packed_tile_elems(lda / 4) + (k / 4) * R * 4 + (m % R) * 4 + k % 4]
// (R = kPackedTileRows). x16 holds whole tiles and is zero past M.
inline void int8_rows_into_tiles(const int8_t* a, int64_t lda, int64_t M, int16_t* x16) {
  const int64_t groups = lda / 4;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int16_t* dst = x16 + (m / kPackedTileRows) * packed_tile_elems(groups) + (m % kPackedTileRows) * 4;
      const int8_t* src = a + m * lda;
      for (int64_t g = 0; g < groups; ++g)
        for (int t = 0; t < 4; ++t) dst[g * kPackedTileRows * 4 + t] = src[g * 4 + t];
    }
  });
}

// One (rows x cols) int8 block, row r at v + r * row_stride, packed for the tile:
// out[(p * cols / 4 + g) * 64 + c * 4 + t] = v[(16 p + c) * row_stride + 4 g + t]
// (rows a multiple of 16, cols of 4).
inline void pack_int8_block(const int8_t* v, int64_t row_stride, int64_t rows, int64_t cols, int8_t* out) {
  const int64_t groups = cols / 4;
  for (int64_t p = 0; p < rows / kPackedPanelCols; ++p)
    for (int64_t g = 0; g < groups; ++g) {
      int8_t* dst = out + (p * groups + g) * kPackedBlockBytes;
      for (int64_t c = 0; c < kPackedPanelCols; ++c)
        std::memcpy(dst + c * 4, v + (p * kPackedPanelCols + c) * row_stride + g * 4, 4);
    }
}

}  // namespace
}  // namespace memkern
#endif  // __AVX2__
