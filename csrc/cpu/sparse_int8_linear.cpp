// CPU kernel of memkern's block-sparse int8 linear layer (memkern/ops/sparse_int8.py):
//
//   block_sparse_int8_linear_kernel(x, values, scales, crow, col, bias, weight_only)
//     W8A8 (weight_only false): x quantised per row (quantize_row.h: the bytes of the
//     quantize_rowwise kernel), int8 x int8 products over the kept blocks only, summed in
//     int32 (int64 once the padded K passes kExactChunkK: exact for any K), then the
//     epilogue acc * (x_scale * w_scale) + bias (linear_epilogue.h).
//     W8A16 (weight_only true): x widened to float32, float32 products with the int8
//     weight over the kept blocks, acc * w_scale + bias.
//   sparse_int8_kernel_path()  "avx512_vnni" when this CPU runs the VNNI kernel, else "avx2"
//     or "portable" (the build's int8 loop).
//   memkern_internal::block_sparse_int8_mm_kernel(a, values, crow, col, n_out, allow_vnni)
//     the int8 product alone, int32 (tests compare the two paths bit for bit).
//
// The weight: values (nnzb, BN, BK) int8 kept blocks (any block and row strides, unit
// column stride; zero past the matrix edge) and the block-row index crow / col. x is
// copied once into a buffer zero-padded to whole blocks (M x ceil(K / BK) * BK), so every
// block reads a full BK-wide stretch of each row.
//
// Two int8 paths, chosen at run time:
// * AVX512-VNNI (vpdpbusd), compiled with a target attribute whatever -march says and run
//   only where the CPU reports AVX512-F, -BW and -VNNI. In the style of int8_vnni.h: the
//   weight is the unsigned operand (w ^ 0x80 = w + 128 per loaded vector), and the sum is
//   corrected by 128 * sum(a) over the kept columns, a per-block-column row sum of the
//   quantised activations computed once per call. A tile of 4 rows of x and 4 weight rows
//   keeps 16 accumulators of 16 lanes across all kept blocks of its block row and sums
//   their lanes once, at the end.
// * AVX2 (where the build targets it): the same tiling with 2 x 4 accumulators of 8 lanes,
//   vpmaddubsw on |w| and the activations signed by w (vpsignb), then vpmaddwd.
// * portable (other builds, K past kExactChunkK, and W8A16's float products): per (block,
//   weight row, row of x) a BK-long dot product that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#define MEMKERN_SPARSE_VNNI 1
#define MEMKERN_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif

#include "cpu/int8_avx2_packed.h"
#include "cpu/linear_epilogue.h"
#include "cpu/quantize_row.h"

namespace memkern {
namespace {

constexpr const char* kOp = "block_sparse_int8_linear";

// The longest stretch of K whose int8 x int8 products always sum inside int32 (|a| <= 127,
// |w| <= 128, 2^17 * 127 * 128 < 2^31); as kExactChunkK in int8_linear.cpp. Past it the
// portable path adds each block's int32 sum (at most 128 products) into int64.
constexpr int64_t kExactChunkK = int64_t{1} << 17;

// The kept blocks of W (N x K), as the kernels read them.
struct KeptBlocks {
  const int8_t* values;
  int64_t block_stride, row_stride;  // values' strides 0 and 1 (stride 2 is 1)
  const int64_t* crow;
  const int64_t* col;
  int64_t n_block_rows, BN, BK, N;
};

KeptBlocks kept_blocks(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col, int64_t N) {
  return {values.const_data_ptr<int8_t>(), values.stride(0), values.stride(1), crow.const_data_ptr<int64_t>(),
          col.const_data_ptr<int64_t>(), crow.numel() - 1, values.size(1), values.size(2), N};
}

// -- portable path --------------------------------------------------------------------------
inline int32_t dot(const int8_t* a, const int8_t* w, int64_t n) {
  int32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<int32_t>(a[k]) * static_cast<int32_t>(w[k]);
  return s;
}

inline float dot(const float* a, const int8_t* w, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * static_cast<float>(w[k]);
  return s;
}

// acc (M x N, row-major) = a @ W^T over the kept blocks of W; a is M x lda, zero-padded to
// whole blocks. Block rows run in parallel; each writes its own columns of acc, and a block
// row without kept blocks writes zeros.
template <typename a_t, typename acc_t>
void kept_block_product(const a_t* a, int64_t lda, int64_t M, const KeptBlocks& w, acc_t* acc) {
  at::parallel_for(0, w.n_block_rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n0 = r * w.BN, rows = std::min(w.BN, w.N - n0);
      for (int64_t m = 0; m < M; ++m) std::fill(acc + m * w.N + n0, acc + m * w.N + n0 + rows, acc_t(0));
      for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
        const a_t* ab = a + w.col[b] * w.BK;
        for (int64_t i = 0; i < rows; ++i) {
          const int8_t* wi = w.values + b * w.block_stride + i * w.row_stride;
          acc_t* out = acc + n0 + i;
          for (int64_t m = 0; m < M; ++m) out[m * w.N] += dot(ab + m * lda, wi, w.BK);
        }
      }
    }
  });
}

// -- AVX2 path (where the build targets AVX2) ----------------------------------------------------
#ifdef __AVX2__
constexpr int kAvx2Rows = 2;  // rows of x per tile
constexpr int kAvx2Cols = 4;  // weight rows per tile: 8 accumulators, 4 weight vectors, 16 ymm in all

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// 32 (or, for 16-wide blocks, 16 then zeros) bytes at p.
inline __m256i load_bytes(const int8_t* p, int64_t live) {
  if (live >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Block row r of acc (M x N, int32), as kept_block_product computes it: vpmaddubsw multiplies
// unsigned by signed bytes, so each weight byte enters as |w| and the activation takes w's
// sign (vpsignb): pairs of |w| * (+-a) sum to at most 2 * 128 * 127 < 2^15, no saturation.
// The lanes of the 2 x 4 accumulators are summed once, after all kept blocks of the row.
void avx2_block_row(const int8_t* a, int64_t lda, int64_t M, const KeptBlocks& w, int64_t r, int32_t* acc) {
  const int64_t n0 = r * w.BN, rows = std::min(w.BN, w.N - n0);
  const int64_t b0 = w.crow[r], b1 = w.crow[r + 1];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m0 = 0; m0 < M; m0 += kAvx2Rows) {
    const int8_t* ar[kAvx2Rows];
    for (int mi = 0; mi < kAvx2Rows; ++mi) ar[mi] = a + std::min<int64_t>(m0 + mi, M - 1) * lda;
    for (int64_t i0 = 0; i0 < rows; i0 += kAvx2Cols) {
      int64_t is[kAvx2Cols];
      for (int ni = 0; ni < kAvx2Cols; ++ni) is[ni] = std::min<int64_t>(i0 + ni, rows - 1);
      __m256i c[kAvx2Rows][kAvx2Cols];
      for (int mi = 0; mi < kAvx2Rows; ++mi)
        for (int ni = 0; ni < kAvx2Cols; ++ni) c[mi][ni] = _mm256_setzero_si256();
      for (int64_t b = b0; b < b1; ++b) {
        const int8_t* wb = w.values + b * w.block_stride;
        const int64_t k_off = w.col[b] * w.BK;
        for (int64_t k0 = 0; k0 < w.BK; k0 += 32) {
          const int64_t live = w.BK - k0;
          __m256i wv[kAvx2Cols], wabs[kAvx2Cols];
          for (int ni = 0; ni < kAvx2Cols; ++ni) {
            wv[ni] = load_bytes(wb + is[ni] * w.row_stride + k0, live);
            wabs[ni] = _mm256_sign_epi8(wv[ni], wv[ni]);
          }
          for (int mi = 0; mi < kAvx2Rows; ++mi) {
            const __m256i av = load_bytes(ar[mi] + k_off + k0, live);
            for (int ni = 0; ni < kAvx2Cols; ++ni) {
              const __m256i pairs = _mm256_maddubs_epi16(wabs[ni], _mm256_sign_epi8(av, wv[ni]));
              c[mi][ni] = _mm256_add_epi32(c[mi][ni], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
      }
      for (int mi = 0; mi < kAvx2Rows && m0 + mi < M; ++mi)
        for (int ni = 0; ni < kAvx2Cols && i0 + ni < rows; ++ni)
          acc[(m0 + mi) * w.N + n0 + i0 + ni] = hsum_epi32(c[mi][ni]);
    }
  }
}

// Calls with at least this many rows of x pack each kept block for int8_avx2_packed.h's
// tile (a permutation of every kept byte, once per call, which fewer rows do not repay);
// blocks whose rows are not a multiple of 16, or columns of 4, keep the tile above.
constexpr int64_t kPackedMinRows = 32;

bool packed_tile_fits(int64_t M, const KeptBlocks& w) {
  return M >= kPackedMinRows && w.BN % kPackedPanelCols == 0 && w.BK % 4 == 0;
}

// acc (M x N, int32) = a @ W^T through the packed tile: per block row, its kept blocks
// packed into one buffer (at most a block row of the weight: in L2), then every tile of
// rows of x against each 8-column half of the block row, summed over all of the row's
// kept blocks in registers. A block row without kept blocks writes zeros.
void avx2_packed_product(const int8_t* a, int64_t lda, int64_t M, const KeptBlocks& w, int32_t* acc) {
  const int64_t tiles = (M + kPackedTileRows - 1) / kPackedTileRows;
  const int64_t tile_elems = packed_tile_elems(lda / 4);
  std::vector<int16_t> x16(static_cast<size_t>(tiles * tile_elems), 0);
  int8_rows_into_tiles(a, lda, M, x16.data());
  const int64_t groups = w.BK / 4, block_bytes = w.BN * w.BK;
  at::parallel_for(0, w.n_block_rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> packed;
    std::vector<int64_t> x_group;
    std::vector<int32_t> sums(static_cast<size_t>(kPackedTileRows * w.BN));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b0 = w.crow[r], kept = w.crow[r + 1] - b0;
      const int64_t n0 = r * w.BN, cols = std::min(w.BN, w.N - n0);
      packed.resize(static_cast<size_t>(kept * block_bytes));
      x_group.resize(static_cast<size_t>(kept));
      for (int64_t b = 0; b < kept; ++b) {
        pack_int8_block(w.values + (b0 + b) * w.block_stride, w.row_stride, w.BN, w.BK, packed.data() + b * block_bytes);
        x_group[b] = w.col[b0 + b] * groups;
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int rows = static_cast<int>(std::min<int64_t>(kPackedTileRows, M - t * kPackedTileRows));
        std::fill(sums.begin(), sums.end(), 0);
        for (int64_t h = 0; h < w.BN / 8; ++h)  // 8-column halves of the block row's panels
          packed_half_tile_rows(rows, x16.data() + t * tile_elems, x_group.data(),
                                packed.data() + (h / 2) * groups * kPackedBlockBytes + (h % 2) * 32, block_bytes, kept,
                                groups, sums.data() + h * 8, w.BN);
        for (int i = 0; i < rows; ++i)
          std::copy(sums.data() + i * w.BN, sums.data() + i * w.BN + cols, acc + (t * kPackedTileRows + i) * w.N + n0);
      }
    }
  });
}
#endif

// -- AVX512-VNNI path -----------------------------------------------------------------------
bool vnni_available() {
#ifdef MEMKERN_SPARSE_VNNI
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vnni");
  return available;
#else
  return false;
#endif
}

#ifdef MEMKERN_SPARSE_VNNI
// GCC 12 warns that the AVX-512 intrinsics' own placeholder operands (_mm256_undefined_si256
// inside _mm512_reduce_add_epi32) "may be used uninitialized" when they are inlined into a
// function compiled by target attribute rather than -march: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
constexpr int kVnniRows = 4;  // rows of x per tile
constexpr int kVnniCols = 4;  // weight rows per tile: 4 x 4 accumulators of 16 lanes

// Block row r of acc (M x N, int32) from the quantised rows a (M x lda, zero-padded) and
// seg_sum (M x n_block_cols: each row's sum over each block column's BK bytes).
MEMKERN_VNNI_TARGET void vnni_block_row(const int8_t* a, int64_t lda, int64_t M, const int32_t* seg_sum,
                                        int64_t n_block_cols, const KeptBlocks& w, int64_t r, int32_t* acc) {
  const int64_t n0 = r * w.BN, rows = std::min(w.BN, w.N - n0);
  const int64_t b0 = w.crow[r], b1 = w.crow[r + 1];
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t m0 = 0; m0 < M; m0 += kVnniRows) {
    // Rows past M and weight rows past the block repeat the last one; their sums are dropped.
    int64_t ms[kVnniRows];
    int32_t correction[kVnniRows];
    for (int mi = 0; mi < kVnniRows; ++mi) {
      ms[mi] = std::min<int64_t>(m0 + mi, M - 1);
      int32_t s = 0;
      for (int64_t b = b0; b < b1; ++b) s += seg_sum[ms[mi] * n_block_cols + w.col[b]];
      correction[mi] = static_cast<int32_t>(128u * static_cast<uint32_t>(s));  // wraps as the sums do
    }
    for (int64_t i0 = 0; i0 < rows; i0 += kVnniCols) {
      int64_t is[kVnniCols];
      for (int ni = 0; ni < kVnniCols; ++ni) is[ni] = std::min<int64_t>(i0 + ni, rows - 1);
      __m512i c[kVnniRows][kVnniCols];
      for (int mi = 0; mi < kVnniRows; ++mi)
        for (int ni = 0; ni < kVnniCols; ++ni) c[mi][ni] = _mm512_setzero_si512();
      for (int64_t b = b0; b < b1; ++b) {
        const int8_t* wb = w.values + b * w.block_stride;
        const int8_t* ab = a + w.col[b] * w.BK;
        for (int64_t k0 = 0; k0 < w.BK; k0 += 64) {
          const int64_t live = std::min<int64_t>(64, w.BK - k0);
          const __mmask64 mask = live == 64 ? ~__mmask64(0) : ((__mmask64(1) << live) - 1);
          __m512i wv[kVnniCols];
          // Lanes past BK (blocks 16 or 32 wide) load zero activations, so their w + 128
          // adds nothing.
          for (int ni = 0; ni < kVnniCols; ++ni)
            wv[ni] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wb + is[ni] * w.row_stride + k0), flip);
          for (int mi = 0; mi < kVnniRows; ++mi) {
            const __m512i av = _mm512_maskz_loadu_epi8(mask, ab + ms[mi] * lda + k0);
            for (int ni = 0; ni < kVnniCols; ++ni) c[mi][ni] = _mm512_dpbusd_epi32(c[mi][ni], wv[ni], av);
          }
        }
      }
      for (int mi = 0; mi < kVnniRows && m0 + mi < M; ++mi)
        for (int ni = 0; ni < kVnniCols && i0 + ni < rows; ++ni)
          acc[(m0 + mi) * w.N + n0 + i0 + ni] = _mm512_reduce_add_epi32(c[mi][ni]) - correction[mi];
    }
  }
}
#pragma GCC diagnostic pop
#endif

// acc (M x N, int32) = a @ W^T, a the quantised rows (M x lda, zero-padded to whole blocks).
void int8_product(const int8_t* a, int64_t lda, int64_t M, const KeptBlocks& w, bool allow_vnni, int32_t* acc) {
#ifdef MEMKERN_SPARSE_VNNI
  if (allow_vnni && vnni_available()) {
    const int64_t n_block_cols = lda / w.BK;
    std::vector<int32_t> seg_sum(static_cast<size_t>(M * n_block_cols));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < n_block_cols; ++c) {
        int32_t s = 0;
        for (int64_t k = 0; k < w.BK; ++k) s += a[m * lda + c * w.BK + k];
        seg_sum[m * n_block_cols + c] = s;
      }
    at::parallel_for(0, w.n_block_rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) vnni_block_row(a, lda, M, seg_sum.data(), n_block_cols, w, r, acc);
    });
    return;
  }
#endif
#ifdef __AVX2__
  if (packed_tile_fits(M, w)) {
    avx2_packed_product(a, lda, M, w, acc);
    return;
  }
  at::parallel_for(0, w.n_block_rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) avx2_block_row(a, lda, M, w, r, acc);
  });
#else
  kept_block_product<int8_t, int32_t>(a, lda, M, w, acc);
#endif
}

// -- operands -------------------------------------------------------------------------------
// Sizes, dtypes and the index's bounds: the kernels address memory through crow and col, so
// a direct call of the op with a corrupt index is refused here rather than read out of bounds.
void check_operands(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                    int64_t N) {
  TORCH_CHECK(x.dim() == 2, kOp, ": expected x (M, K), got ", x.sizes());
  TORCH_CHECK(values.dim() == 3 && values.scalar_type() == at::kChar, kOp,
              ": values must be (nnzb, BN, BK) int8, got ", values.scalar_type(), " ", values.sizes());
  const int64_t nnzb = values.size(0), BN = values.size(1), BK = values.size(2);
  TORCH_CHECK(BN > 0 && BK > 0, kOp, ": empty blocks ", values.sizes());
  TORCH_CHECK(crow.dim() == 1 && col.dim() == 1 && crow.scalar_type() == at::kLong &&
                  col.scalar_type() == at::kLong && crow.is_contiguous() && col.is_contiguous(),
              kOp, ": crow and col must be 1-D contiguous int64");
  const int64_t n_block_rows = (N + BN - 1) / BN, n_block_cols = (x.size(1) + BK - 1) / BK;
  TORCH_CHECK_VALUE(crow.numel() == n_block_rows + 1 && col.numel() == nnzb, kOp, ": crow must have ",
                    n_block_rows + 1, " entries and col ", nnzb, ", got ", crow.numel(), " and ", col.numel());
  const int64_t* p = crow.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0 && p[n_block_rows] == nnzb, kOp, ": crow must run from 0 to ", nnzb, ", got ", p[0],
                    " to ", p[n_block_rows]);
  for (int64_t r = 0; r < n_block_rows; ++r)
    TORCH_CHECK_VALUE(p[r] <= p[r + 1], kOp, ": crow must not decrease, got ", p[r], " then ", p[r + 1]);
  const int64_t* c = col.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < nnzb; ++b)
    TORCH_CHECK_VALUE(c[b] >= 0 && c[b] < n_block_cols, kOp, ": col must lie in [0, ", n_block_cols, "), got ", c[b],
                      " at position ", b);
}

// The activations of x (M x K) as rows zero-padded to lda: quantised (W8A8, one scale per
// row) or widened to float32 (W8A16).
void quantize_rows(const at::Tensor& x, int64_t lda, int8_t* q, float* x_scale) {
  const int64_t M = x.size(0), K = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_int8_quantize", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1);
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        x_scale[m] = quantize_row(xp + m * s0, K, s1, 0, reinterpret_cast<uint8_t*>(q + m * lda));
    });
  });
}

at::Tensor block_sparse_int8_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                                        const at::Tensor& crow, const at::Tensor& col,
                                        const std::optional<at::Tensor>& bias, bool weight_only) {
  const int64_t N = scales.numel();
  check_operands(x, values, crow, col, N);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1, kOp, ": scales must be 1-D float32");
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0 || N == 0) return at::empty({M, N}, x.options());
  const auto v = values.stride(2) == 1 ? values : values.contiguous();
  const KeptBlocks w = kept_blocks(v, crow, col, N);
  const int64_t lda = (K + w.BK - 1) / w.BK * w.BK;
  const auto ws = scales.contiguous();
  const auto b = float_bias(bias);
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;

  if (weight_only) {
    auto a = at::zeros({M, lda}, x.options().dtype(at::kFloat));
    a.narrow(1, 0, K).copy_(x);
    auto acc = at::empty({M, N}, x.options().dtype(at::kFloat));
    kept_block_product<float, float>(a.const_data_ptr<float>(), lda, M, w, acc.mutable_data_ptr<float>());
    // A float32 output is the accumulator itself, scaled in place (each element read before
    // it is written), as int8_linear.cpp does: M x N x 4 bytes less peak memory.
    auto out = x.scalar_type() == at::kFloat ? acc : at::empty({M, N}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_int8_w8a16_epilogue", [&] {
      epilogue_rows<float, scalar_t>(acc.const_data_ptr<float>(), N, M, N, nullptr, ws.const_data_ptr<float>(), bp,
                                     out.mutable_data_ptr<scalar_t>(), N);
    });
    return out;
  }

  auto a = at::zeros({M, lda}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  quantize_rows(x, lda, a.mutable_data_ptr<int8_t>(), x_scale.mutable_data_ptr<float>());
  const float* xs = x_scale.const_data_ptr<float>();
  if (lda > kExactChunkK) {
    auto out = at::empty({M, N}, x.options());
    auto acc = at::empty({M, N}, x.options().dtype(at::kLong));
    kept_block_product<int8_t, int64_t>(a.const_data_ptr<int8_t>(), lda, M, w, acc.mutable_data_ptr<int64_t>());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_int8_epilogue_int64", [&] {
      epilogue_rows<int64_t, scalar_t>(acc.const_data_ptr<int64_t>(), N, M, N, xs, ws.const_data_ptr<float>(), bp,
                                       out.mutable_data_ptr<scalar_t>(), N);
    });
    return out;
  }
  auto acc = at::empty({M, N}, x.options().dtype(at::kInt));
  int8_product(a.const_data_ptr<int8_t>(), lda, M, w, true, acc.mutable_data_ptr<int32_t>());
  auto out = x.scalar_type() == at::kFloat ? acc.view(at::kFloat) : at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_int8_epilogue", [&] {
    epilogue_rows<int32_t, scalar_t>(acc.const_data_ptr<int32_t>(), N, M, N, xs, ws.const_data_ptr<float>(), bp,
                                     out.mutable_data_ptr<scalar_t>(), N);
  });
  return out;
}

// The int8 product alone: a (M, K) int8 rows against the kept blocks, int32 (K padded to
// whole blocks at most kExactChunkK).
at::Tensor block_sparse_int8_mm_cpu(const at::Tensor& a, const at::Tensor& values, const at::Tensor& crow,
                                    const at::Tensor& col, int64_t n_out, bool allow_vnni) {
  check_operands(a, values, crow, col, n_out);
  TORCH_CHECK(a.scalar_type() == at::kChar, kOp, ": a must be int8, got ", a.scalar_type());
  const int64_t M = a.size(0), K = a.size(1);
  const auto v = values.stride(2) == 1 ? values : values.contiguous();
  const KeptBlocks w = kept_blocks(v, crow, col, n_out);
  const int64_t lda = (K + w.BK - 1) / w.BK * w.BK;
  TORCH_CHECK(lda <= kExactChunkK, kOp, ": K padded to whole blocks must be at most ", kExactChunkK);
  auto padded = at::zeros({M, lda}, a.options());
  padded.narrow(1, 0, K).copy_(a);
  auto acc = at::empty({M, n_out}, a.options().dtype(at::kInt));
  if (M && n_out) int8_product(padded.const_data_ptr<int8_t>(), lda, M, w, allow_vnni, acc.mutable_data_ptr<int32_t>());
  return acc;
}

std::string sparse_int8_kernel_path() {
  if (vnni_available()) return "avx512_vnni";
#ifdef __AVX2__
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) { m.impl("block_sparse_int8_linear_kernel", &block_sparse_int8_linear_cpu); }

TORCH_LIBRARY_IMPL(memkern, CompositeImplicitAutograd, m) {
  m.impl("sparse_int8_kernel_path", &sparse_int8_kernel_path);
}

TORCH_LIBRARY_IMPL(memkern_internal, CPU, m) { m.impl("block_sparse_int8_mm_kernel", &block_sparse_int8_mm_cpu); }

}  // namespace memkern
