// AVX512-VNNI kernel of int8_linear on the packed weight layout
// (memkern.ops.pack_int8_weight), int8_linear_packed_vnni, and its activation tiles. For
// int8_linear.cpp alone, in an unnamed namespace (int8_vnni.h says why).
//
// Layout: w_packed[j, g, c, t] = w[16 j + c, 4 g + t], shape (ceil(N / 16), ceil(K / 4),
// 16, 4), zero past N and K. One 64-byte vector holds 4 consecutive k of 16 consecutive
// output columns: exactly vpdpbusd's operand, so a panel of 16 columns streams through
// memory in order and each weight vector meets a 4-byte broadcast of each activation row
// (an embedded-broadcast memory operand). No horizontal sums, one weight stream per panel,
// and each activation row's 4 bytes come from one 64-byte line per step (the activations
// are interleaved the same way per 16-row tile). Standalone, 16 x 4096 x 4096 on the
// 2-core EPYC of bench/NOTES.md: 98% of the vpdpbusd peak against 74% for the (N, K)
// kernel of int8_vnni.h; 512 rows: 93-95% against 86%.
//
// Signs as in int8_vnni.h: the weight is the unsigned operand (xor 0x80 per loaded
// vector), and sum((w + 128) * a) - 128 * sum(a) gives the true sum.
#pragma once

#include "cpu/int8_vnni.h"  // defines MEMKERN_AVX512_VNNI where the build has it

#ifdef MEMKERN_AVX512_VNNI
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/quantize_row.h"

namespace memkern {
namespace {

constexpr int64_t kPanelCols = 16;   // output columns per panel (one zmm of int32)
constexpr int64_t kPanelDepth = 4;   // k per vpdpbusd lane
constexpr int kPackedTileRows = 16;  // rows of x per tile (at most 16 accumulators)
constexpr int kPanelsPerUnit = 4;    // panels a task takes at a time (small-M tiles span them)
constexpr int64_t kUnitCols = kPanelsPerUnit * kPanelCols;
// Prefetch distance inside a panel: 16 steps ahead. None -> 1 KiB ahead: 78% -> 94% of
// peak at 16 x 4096 x 4096 on one thread (standalone); 2 KiB: 96%, within the noise.
constexpr int64_t kPanelPrefetchBytes = 1024;

#define MEMKERN_DP_BCAST(acc, u, s_ptr) \
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*reinterpret_cast<const int32_t*>(s_ptr)))
#define MEMKERN_PACKED_LOAD(j)                                                                     \
  __m512i w##j = z;                                                                                \
  if constexpr (NP > j) {                                                                          \
    const int8_t* p = w + (j) * panel_bytes + g * 64;                                              \
    w##j = _mm512_xor_si512(_mm512_loadu_si512(p), flip);                                          \
    _mm_prefetch(reinterpret_cast<const char*>(p + kPanelPrefetchBytes), _MM_HINT_T0);             \
  }
#define MEMKERN_PACKED_DP(i, j) \
  if constexpr (MR > i && NP > j) MEMKERN_DP_BCAST(c##i##_##j, w##j, ak + 4 * (i));
#define MEMKERN_PACKED_ROW(i) \
  MEMKERN_PACKED_DP(i, 0) MEMKERN_PACKED_DP(i, 1) MEMKERN_PACKED_DP(i, 2) MEMKERN_PACKED_DP(i, 3)
#define MEMKERN_PACKED_STORE(i, j) \
  if constexpr (MR > i && NP > j) _mm512_store_si512(acc + (i) * kUnitCols + (j) * 16, c##i##_##j);
#define MEMKERN_PACKED_STORE_ROW(i) \
  MEMKERN_PACKED_STORE(i, 0) MEMKERN_PACKED_STORE(i, 1) MEMKERN_PACKED_STORE(i, 2) MEMKERN_PACKED_STORE(i, 3)
#define MEMKERN_FOR_16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define MEMKERN_DECLARE_ROW(i) __m512i c##i##_0 = z, c##i##_1 = z, c##i##_2 = z, c##i##_3 = z;

// acc[i * kUnitCols + 16 j + c] = sum_k a[i, k] * (w[column 16 j + c, k] + 128) for MR rows of one
// interleaved activation tile and NP panels (panel_bytes apart); MR x NP <= 16
// accumulators, named (see MEMKERN_DPBUSD in int8_vnni.h on arrays).
template <int MR, int NP>
void packed_tile(const int8_t* a, const int8_t* w, int64_t panel_bytes, int64_t groups, int32_t* acc) {
  static_assert(MR * NP <= 16, "at most 16 accumulators");
  const __m512i z = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  MEMKERN_FOR_16(MEMKERN_DECLARE_ROW)
  for (int64_t g = 0; g < groups; ++g) {
    MEMKERN_PACKED_LOAD(0) MEMKERN_PACKED_LOAD(1) MEMKERN_PACKED_LOAD(2) MEMKERN_PACKED_LOAD(3)
    const int8_t* ak = a + g * 64;
    MEMKERN_FOR_16(MEMKERN_PACKED_ROW)
  }
  MEMKERN_FOR_16(MEMKERN_PACKED_STORE_ROW)
}
#undef MEMKERN_DP_BCAST
#undef MEMKERN_PACKED_LOAD
#undef MEMKERN_PACKED_DP
#undef MEMKERN_PACKED_ROW
#undef MEMKERN_PACKED_STORE
#undef MEMKERN_PACKED_STORE_ROW
#undef MEMKERN_FOR_16
#undef MEMKERN_DECLARE_ROW

// MR rows against `panels` (<= 4) consecutive panels. Few rows take several panels per
// tile so that several independent accumulators hide vpdpbusd's latency (MR x NP = 4 to
// 16; one row against one panel would be a single dependency chain).
template <int MR>
void packed_rows(const int8_t* a, const int8_t* w, int64_t panel_bytes, int64_t groups, int panels, int32_t* acc) {
  constexpr int NP = MR <= 4 ? 4 : (MR <= 8 ? 2 : 1);
  int p = 0;
  for (; p + NP <= panels; p += NP) packed_tile<MR, NP>(a, w + p * panel_bytes, panel_bytes, groups, acc + p * kPanelCols);
  for (; p < panels; ++p) packed_tile<MR, 1>(a, w + p * panel_bytes, panel_bytes, groups, acc + p * kPanelCols);
}

using PackedRowsFn = void (*)(const int8_t*, const int8_t*, int64_t, int64_t, int, int32_t*);
template <int... MR>
constexpr std::array<PackedRowsFn, sizeof...(MR)> packed_rows_table(std::integer_sequence<int, MR...>) {
  return {&packed_rows<MR + 1>...};
}
// packed_rows<rows> for rows = 1 .. 16, indexed by rows - 1.
constexpr auto kPackedRows = packed_rows_table(std::make_integer_sequence<int, kPackedTileRows>{});

// out[c] lane r = in[r] lane c for 16 vectors of 16 32-bit lanes (4 bytes of k each).
inline void transpose_16x16_epi32(const __m512i in[16], __m512i out[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a0 b0 a1 b1 | a2 b2 a3 b3
    t[2 * i] = _mm512_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4 i + e], 128-bit lane L: column 4 L + e of rows 4 i .. 4 i + 3
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // gather 128-bit lane L of u[e], u[4 + e], u[8 + e], u[12 + e]
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    out[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    out[4 + e] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    out[8 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    out[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// x quantised per row into the interleaved tile layout: tile t holds rows 16 t .. 16 t + 15
// as [group g][row][4 bytes of k = 4 g ..], zero past M and K; plus each row's scale and
// byte sum. A tile's rows are quantised row-major into a buffer first (quantize_row, the
// quantize_rowwise kernel's arithmetic) and then interleaved 64 bytes of k at a time by a
// 16 x 16 transpose of 4-byte lanes: writing each row's 4-byte groups straight into the
// tile (one store per 64-byte line, 16 passes over it) took 15 us of a 48 us call at
// 16 x 4096 x 64.
class TileQuantizer {
 public:
  TileQuantizer(int64_t K, int64_t groups) : K_(K), groups_(groups), chunks_((groups + 15) / 16), ld_(chunks_ * 64) {}
  int64_t ld() const { return ld_; }

  // Rows m0 .. m0 + count - 1 of x into rows (leading dimension ld(), zero past K).
  template <typename x_t>
  void quantize(const x_t* x, int64_t xs0, int64_t xs1, int64_t m0, int64_t count, int8_t* rows, float* x_scale,
                int32_t* a_sum) const {
    for (int64_t i = 0; i < count; ++i) {
      int8_t* row = rows + i * ld_;
      x_scale[m0 + i] = quantize_row(x + (m0 + i) * xs0, K_, xs1, 0, reinterpret_cast<uint8_t*>(row));
      a_sum[m0 + i] = byte_sum(row, K_);
    }
  }

  // 16 quantised rows (zero rows past M) into one tile of the interleaved layout.
  void interleave(const int8_t* rows, int8_t* tile) const {
    for (int64_t c = 0; c < chunks_; ++c) {
      __m512i in[16], out[16];
      for (int i = 0; i < 16; ++i) in[i] = _mm512_loadu_si512(rows + i * ld_ + c * 64);
      transpose_16x16_epi32(in, out);
      const int64_t live = std::min<int64_t>(16, groups_ - c * 16);
      for (int64_t g = 0; g < live; ++g) _mm512_storeu_si512(tile + (c * 16 + g) * 64, out[g]);
    }
  }

 private:
  int64_t K_, groups_, chunks_, ld_;
};

template <typename x_t>
void quantize_to_tiles(const x_t* x, int64_t M, int64_t K, int64_t xs0, int64_t xs1, int64_t groups, int8_t* tiles,
                       float* x_scale, int32_t* a_sum) {
  const TileQuantizer q(K, groups);
  const int64_t tile_count = (M + kPackedTileRows - 1) / kPackedTileRows;
  const size_t tile_rows_bytes = static_cast<size_t>(kPackedTileRows * q.ld());
  if (tile_count == 1) {
    // One tile (M <= 16, the decode case): its rows are quantised in parallel, then
    // interleaved. x arrives cold from memory after the previous call's weight stream:
    // on one thread the quantisation took 36 of 660 us at 16 x 4096 x 4096.
    std::vector<int8_t> rows(tile_rows_bytes, 0);
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
      q.quantize(x, xs0, xs1, r0, r1 - r0, rows.data() + r0 * q.ld(), x_scale, a_sum);
    });
    q.interleave(rows.data(), tiles);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(kPackedTileRows * K, 1));
  at::parallel_for(0, tile_count, grain, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> rows(tile_rows_bytes, 0);  // zero padding past K stays
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * kPackedTileRows;
      const int64_t count = std::min<int64_t>(kPackedTileRows, M - m0);
      q.quantize(x, xs0, xs1, m0, count, rows.data(), x_scale, a_sum);
      if (count < kPackedTileRows) std::memset(rows.data() + count * q.ld(), 0, (kPackedTileRows - count) * q.ld());
      q.interleave(rows.data(), tiles + t * groups * 64);
    }
  });
}

// out = dequantised (x @ w.T) + bias from the packed weight: tasks take units of 4 panels
// (64 columns); rows go in blocks whose activations (kPackedRowBlockBytes) stay in L2
// while a unit's panels stream past them.
constexpr int64_t kPackedRowBlockBytes = 256 * 1024;

template <typename x_t, typename out_t>
void int8_linear_packed_vnni(const x_t* x, int64_t M, int64_t K, int64_t xs0, int64_t xs1, const int8_t* w,
                             int64_t N, const float* w_scale, const float* bias, out_t* out) {
  const int64_t groups = (K + kPanelDepth - 1) / kPanelDepth;
  const int64_t tiles = (M + kPackedTileRows - 1) / kPackedTileRows;
  KernelBuffer a(static_cast<size_t>(tiles * groups * 64), false);  // quantize_to_tiles writes all of it
  std::vector<float> x_scale(static_cast<size_t>(M));
  std::vector<int32_t> a_sum(static_cast<size_t>(M));
  quantize_to_tiles(x, M, K, xs0, xs1, groups, a.data(), x_scale.data(), a_sum.data());

  const int64_t panel_bytes = groups * 64;
  const int64_t panels = (N + kPanelCols - 1) / kPanelCols;
  const int64_t units = (panels + kPanelsPerUnit - 1) / kPanelsPerUnit;
  const int64_t block_tiles = std::max<int64_t>(1, kPackedRowBlockBytes / std::max<int64_t>(panel_bytes, 1));
  // Enough multiply-adds per task (>= 1M) that scheduling stays small beside the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(M * K * kUnitCols, 1));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    alignas(64) int32_t acc[kPackedTileRows * kUnitCols];
    for (int64_t t0 = 0; t0 < tiles; t0 += block_tiles) {
      const int64_t t1 = std::min(tiles, t0 + block_tiles);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t p0 = u * kPanelsPerUnit;
        const int unit_panels = static_cast<int>(std::min<int64_t>(kPanelsPerUnit, panels - p0));
        const int64_t n0 = p0 * kPanelCols;
        const int64_t cols = std::min<int64_t>(kUnitCols, N - n0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m0 = t * kPackedTileRows;
          const int rows = static_cast<int>(std::min<int64_t>(kPackedTileRows, M - m0));
          // The output lines this tile's epilogue writes, requested for writing now so they
          // arrive while the tile computes: met cold, each line's read-for-ownership cost
          // the epilogue 17 of 660 us at 16 x 4096 x 4096.
          for (int i = 0; i < rows; ++i)
            for (int64_t c = 0; c < cols * static_cast<int64_t>(sizeof(out_t)); c += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(out + (m0 + i) * N + n0) + c, 1, 3);
          kPackedRows[rows - 1](a.data() + t * panel_bytes, w + p0 * panel_bytes, panel_bytes, groups, unit_panels,
                                acc);
          // Epilogue, 16 columns at a time; lanes past N are masked off.
          for (int i = 0; i < rows; ++i) {
            const int64_t m = m0 + i;
            const __m512i correction =
                _mm512_set1_epi32(static_cast<int32_t>(128u * static_cast<uint32_t>(a_sum[m])));
            const __m512 xs = _mm512_set1_ps(x_scale[m]);
            for (int64_t c = 0; c < cols; c += kPanelCols) {
              const __mmask16 live = static_cast<__mmask16>(cols - c >= 16 ? 0xFFFF : (1u << (cols - c)) - 1);
              const __m512i sums = _mm512_sub_epi32(_mm512_load_si512(acc + i * kUnitCols + c), correction);
              // The scales multiply first (reference.int8_linear says why: overflow).
              const __m512 scale = _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(live, w_scale + n0 + c));
              const __m512 bs = bias ? _mm512_maskz_loadu_ps(live, bias + n0 + c) : _mm512_setzero_ps();
              const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), scale), bs);
              out_t* o = out + m * N + n0 + c;
              if constexpr (std::is_same_v<out_t, float>) {
                _mm512_mask_storeu_ps(o, live, v);
              } else {
                alignas(64) float f[16];
                _mm512_store_ps(f, v);
                for (int64_t j = 0; j < std::min<int64_t>(16, cols - c); ++j) o[j] = static_cast<out_t>(f[j]);
              }
            }
          }
        }
      }
    }
  });
}

}  // namespace
}  // namespace memkern
#endif  // MEMKERN_AVX512_VNNI
