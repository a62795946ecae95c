// CPU kernels for memkern::block_sparse_matmul_kernel and its backward.
//
// The weight W (n_out x K) is stored as its kept (BN x BK) blocks only: values
// (nnzb, BN, BK), zero-padded where a block hangs over the matrix edge, and a block-row
// index (crow, col: BSR order) plus a block-column index (ccol, csc_row, csc_block: the
// same blocks in column order, for dx). Each kernel walks tiles of its output in parallel
// on ATen's thread pool and, for each tile, visits only the kept blocks that touch it; the
// arithmetic of each (tile x block) step is a small dense GEMM handed to ATen's BLAS
// (MKL on x86 builds), which runs single-threaded inside the parallel region.
//
// Why GEMM calls per block instead of one gather + GEMM per block row: gathering the kept
// columns of x for each block row copies about half of x per block row and measured 3.7x
// slower than per-block calls at 50% sparsity (2048x4096 @ 4096x4096^T fp32, 2-core EPYC).
//
// The float32 forward has its own AVX-512 micro-kernel instead
// (when the build has AVX-512): the BLAS calls above are small (256 x 128 x 64 at 50%
// sparsity, 64x64 blocks) and single-threaded MKL runs them at ~80% of its large-GEMM rate,
// whereas the micro-kernel keeps one output micro-tile in registers across all kept blocks
// of its block row and stores it once. The backward and float64 stay on BLAS.
//
// float16/bfloat16 inputs are computed in float32 (converted once per call), so every
// sum accumulates in float32 and is rounded to the output dtype once; float64 stays
// float64 (for gradcheck).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace memkern {
namespace {

constexpr const char* kOp = "block_sparse_matmul";

// Rows of x per output tile. Forward tasks run row tile by row tile (all block rows of one
// row tile before the next) so the row tile of x is reused from cache across block rows.
// 128, 256 and 512 measured alike within noise (1.50-1.58x over dense at 50% block
// sparsity, 2048x4096 @ 4096x4096^T fp32, 2-core EPYC shared with other jobs).
constexpr int64_t kRowTile = 256;

void check_index(const at::Tensor& t, const char* name, int64_t entries) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.device().is_cpu() && t.is_contiguous(), kOp, ": ",
              name, " must be a contiguous 1-D int64 CPU tensor, got ", t.sizes(), " ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK_VALUE(t.size(0) == entries, kOp, ": ", name, " must have ", entries, " entries, got ", t.size(0));
}

// The block index steers every memory access below: a block column past the matrix or a
// pointer that runs backwards would read and write out of bounds. memkern.ops.sparse checks
// a structure where it enters; the kernels check again (O(blocks), nothing beside the
// products) so that a direct call of the op cannot corrupt memory either.
void check_pointer(const at::Tensor& ptr, const char* name, int64_t total) {
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int64_t n = ptr.size(0);
  TORCH_CHECK_VALUE(p[0] == 0 && p[n - 1] == total, kOp, ": ", name, " must run from 0 to ", total,
                    " (the number of blocks), got ", p[0], " to ", p[n - 1]);
  for (int64_t i = 0; i + 1 < n; ++i)
    TORCH_CHECK_VALUE(p[i] <= p[i + 1], kOp, ": ", name, " must not decrease, got ", p[i], " then ", p[i + 1],
                      " at position ", i);
}

void check_entries(const at::Tensor& t, const char* name, int64_t bound) {
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.size(0); ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < bound, kOp, ": ", name, " must lie in [0, ", bound, "), got ", p[i],
                      " at position ", i);
}

// Detached: GradMode is thread-local and the pool's worker threads do not inherit the
// caller's NoGradGuard, so views taken there must not require grad.
at::Tensor as_acc(const at::Tensor& t, const at::Tensor& like) {
  return t.detach().to(like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

// values (nnzb, BN, BK) as its (BN, nnzb, BK) storage: free when values is in
// memkern.ops.sparse.row_panel_layout (and of the compute dtype), one copy otherwise.
at::Tensor as_panels(const at::Tensor& values, const at::Tensor& like) {
  return as_acc(values.permute({1, 0, 2}), like);
}

#ifdef __AVX512F__
// -- float32 forward: AVX-512 micro-kernel ----------------------------------------------
//
// The output of a block row is computed in column panels of NR = min(BN, 64) columns. The
// kept blocks of a panel are packed (per task, see forward_avx512) so that each (block,
// panel) is a (BK x NR) matrix (row kk holds W[panel columns, c*BK + kk]): one k step is
// NV = NR/16 contiguous vector loads. An output micro-tile of MR rows x NR columns lives
// in MR * NV = 24 zmm registers (of 32: the rest hold the NV weight vectors and the
// broadcast of x) for all kept blocks of the block row, so y is written exactly once, with no zero-fill and no read-back.
//
// x is packed too, one row tile at a time by the thread that uses it, as micro-panels of
// MR rows interleaved by k (element (i, k) at k * MR + i), zero-padded to whole blocks
// along K and to whole micro-panels along M. Read in place, the MR rows of a micro-tile
// lie K floats apart: at K = 4096 that is 16 KiB, so they all map to one set of the 8-way
// L1 and with MR 12 or 24 evict each other on every k step (16x16 blocks ran at 0.55x of
// dense, 32x32 at 1.8x, 64x64 at 1.97x). Packed, the broadcasts of a kept block are one
// contiguous run of BK * MR floats.
constexpr int kLanes = 16;  // floats per zmm register
constexpr int kAccumulators = 24;
// Why panels no wider than 64: with 128 columns (NV 8, MR 3) a k step loads 512 bytes of
// weights for 24 FMAs, twice as many per FMA as NV 4 / MR 6, and a block row's packed
// blocks at 50% of 4096 columns (1 MiB) no longer fit the 1 MiB L2 next to x; measured
// 1.62x over dense at 50% with 128x128 blocks, against 1.92x with 64-column panels.
constexpr int64_t kMaxPanelWidth = 64;

// Each task packs the panel of weights it needs (see forward_avx512), a copy through
// registers that costs a few percent of the call; with it the micro-kernel beat the BLAS path
// at every batch size measured (4096 x 4096, 50%, 64x64 blocks: 2.5 / 12.3 / 42.5 ms for
// 1 / 128 / 512 rows against 4-5 / 15.7 / 55-67 ms on BLAS), so it takes every float32 call.
// (Packing the whole weight once per call, tried first, paid ~10 ms of first-touch page
// faults on its fresh 32 MiB buffer, which kept the BLAS path below 512 rows; transparent
// huge pages for that buffer made full-size calls bimodal.)

// Whether the micro-kernel computes this call: float32 compute and block rows of 16, 32, 64
// or 128 (the panel widths it is instantiated for, 128 as two panels of 64;
// memkern.ops.sparse.BLOCK_SIZES). Anything else takes the BLAS path.
bool micro_kernel_takes(const at::Tensor& xf, int64_t BN) {
  return xf.scalar_type() == at::kFloat && (BN == 16 || BN == 32 || BN == 64 || BN == 128);
}

// What every micro-tile of one (row tile, column panel) task shares.
struct PanelTask {
  const float* blocks;   // the panel of the block row's first kept block
  int64_t block_stride;  // floats from one kept block's panel to the next one's
  const int64_t* cols;   // block columns of the kept blocks
  int64_t kept;
  int64_t BK;
  const float* bias;  // at the panel's first column, or nullptr
  int64_t width;      // output columns of this panel inside the matrix (< NR only at n_out)
};

// y[0..rows, 0..width) = bias + sum over the kept blocks of x[0..rows, block cols] @ block,
// x being one packed micro-panel (rows <= MR; its other rows are zero padding).
template <int NV, int MR>
void micro_tile(const PanelTask& t, const float* x_panel, int64_t rows, float* y, int64_t ldy) {
  static_assert(NV * MR <= kAccumulators, "accumulators must fit in registers");
  constexpr int NR = NV * kLanes;
  // Lanes of each output vector inside the matrix: the last panel may be cut by n_out;
  // masked loads and stores neither touch nor fault on the lanes left out.
  __mmask16 lanes[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::clamp<int64_t>(t.width - v * kLanes, 0, kLanes);
    lanes[v] = static_cast<__mmask16>((1u << n) - 1u);
  }
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __m512 init = t.bias ? _mm512_maskz_loadu_ps(lanes[v], t.bias + v * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 24
    for (int i = 0; i < MR; ++i) acc[i][v] = init;
  }
  const float* block = t.blocks;
  for (int64_t s = 0; s < t.kept; ++s, block += t.block_stride) {
    const float* xk = x_panel + t.cols[s] * t.BK * MR;
    for (int64_t kk = 0; kk < t.BK; ++kk, xk += MR) {
      const float* w = block + kk * NR;
      __m512 wv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + v * kLanes);
#pragma GCC unroll 24
      for (int i = 0; i < MR; ++i) {
        const __m512 xi = _mm512_set1_ps(xk[i]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xi, wv[v], acc[i][v]);
      }
    }
  }
#pragma GCC unroll 24
  for (int i = 0; i < MR; ++i)
    if (i < rows)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(y + i * ldy + v * kLanes, lanes[v], acc[i][v]);
}

// x[0..rows, 0..K) (row stride ldx) -> micro-panels of MR rows, (ceil(rows/MR), k_pad, MR),
// zero where k >= K or the row is past rows.
template <int MR>
void pack_row_tile(const float* x, int64_t ldx, int64_t rows, int64_t K, int64_t k_pad, float* dst) {
  for (int64_t m0 = 0; m0 < rows; m0 += MR, dst += k_pad * MR)
    for (int i = 0; i < MR; ++i) {
      const int64_t k_end = m0 + i < rows ? K : 0;
      const float* src = x + (m0 + i) * ldx;
      for (int64_t k = 0; k < k_end; ++k) dst[k * MR + i] = src[k];
      for (int64_t k = k_end; k < k_pad; ++k) dst[k * MR + i] = 0.0f;
    }
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r, c < 16.
inline void transpose16(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + i * src_stride);
  // Rows interleaved by element, then by pairs of elements: afterwards 128-bit lane L of
  // a[4q + j] holds rows 4q .. 4q + 3 of column 4L + j.
  for (int i = 0; i < 8; ++i) {
    b[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
    b[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
  }
  for (int q = 0; q < 4; ++q) {
    a[4 * q + 0] = _mm512_shuffle_ps(b[4 * q + 0], b[4 * q + 2], _MM_SHUFFLE(1, 0, 1, 0));
    a[4 * q + 1] = _mm512_shuffle_ps(b[4 * q + 0], b[4 * q + 2], _MM_SHUFFLE(3, 2, 3, 2));
    a[4 * q + 2] = _mm512_shuffle_ps(b[4 * q + 1], b[4 * q + 3], _MM_SHUFFLE(1, 0, 1, 0));
    a[4 * q + 3] = _mm512_shuffle_ps(b[4 * q + 1], b[4 * q + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // Then the four row groups of each column are gathered lane by lane.
  for (int j = 0; j < 4; ++j) {
    const __m512 x0 = _mm512_shuffle_f32x4(a[j], a[4 + j], _MM_SHUFFLE(2, 0, 2, 0));  // lanes 0, 2 of q0, q1
    const __m512 x1 = _mm512_shuffle_f32x4(a[j], a[4 + j], _MM_SHUFFLE(3, 1, 3, 1));  // lanes 1, 3 of q0, q1
    const __m512 y0 = _mm512_shuffle_f32x4(a[8 + j], a[12 + j], _MM_SHUFFLE(2, 0, 2, 0));
    const __m512 y1 = _mm512_shuffle_f32x4(a[8 + j], a[12 + j], _MM_SHUFFLE(3, 1, 3, 1));
    b[j] = _mm512_shuffle_f32x4(x0, y0, _MM_SHUFFLE(2, 0, 2, 0));        // col j      (lane 0)
    b[8 + j] = _mm512_shuffle_f32x4(x0, y0, _MM_SHUFFLE(3, 1, 3, 1));    // col 8 + j  (lane 2)
    b[4 + j] = _mm512_shuffle_f32x4(x1, y1, _MM_SHUFFLE(2, 0, 2, 0));    // col 4 + j  (lane 1)
    b[12 + j] = _mm512_shuffle_f32x4(x1, y1, _MM_SHUFFLE(3, 1, 3, 1));   // col 12 + j (lane 3)
  }
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + c * dst_stride, b[c]);
}
// One column panel of one block row's kept blocks, for the micro-kernel: the panel's NR
// output rows of W (rows nb .. nb + NR - 1 of every kept block j = first .. first + kept - 1
// of values (nnzb, BN, BK)) -> (kept, BK, NR), so the NR outputs of one k are adjacent.
// 16 x 16 tiles are transposed in registers when k is the unit stride (the row-panel layout
// memkern stores): element by element, the strided stores made packing per task 10-15%
// of the call at 50% sparsity. Block sizes are powers of two from 16 (BLOCK_SIZES).
template <int NR>
void pack_panel(const float* values, int64_t sj, int64_t sn, int64_t sk, int64_t first, int64_t kept, int64_t nb,
                int64_t BK, float* dst) {
  for (int64_t s = 0; s < kept; ++s, dst += BK * NR) {
    const float* block = values + (first + s) * sj + nb * sn;
    if (sk == 1) {
      for (int64_t n0 = 0; n0 < NR; n0 += 16)
        for (int64_t k0 = 0; k0 < BK; k0 += 16) transpose16(block + n0 * sn + k0, sn, dst + k0 * NR + n0, NR);
      continue;
    }
    for (int64_t n = 0; n < NR; ++n)
      for (int64_t kk = 0; kk < BK; ++kk) dst[kk * NR + n] = block[n * sn + kk * sk];
  }
}

template <int NV>
void forward_avx512(const at::Tensor& xf, const at::Tensor& values, const int64_t* crow_p, const int64_t* col_p,
                    const float* bias_p, at::Tensor& yf) {
  constexpr int MR = kAccumulators / NV, NR = NV * kLanes;
  const int64_t M = xf.size(0), K = xf.size(1), n_out = yf.size(1);
  const int64_t BN = values.size(1), BK = values.size(2);
  const int64_t k_pad = (K + BK - 1) / BK * BK;
  const at::Tensor v = values.detach().to(at::kFloat);  // a copy for float16/bfloat16 only
  const float* v_p = v.const_data_ptr<float>();
  const int64_t sj = v.stride(0), sn = v.stride(1), sk = v.stride(2);
  const int64_t n_block_rows = (n_out + BN - 1) / BN;
  int64_t most_kept = 0;
  for (int64_t r = 0; r < n_block_rows; ++r) most_kept = std::max(most_kept, crow_p[r + 1] - crow_p[r]);
  const int64_t n_panels = (n_out + NR - 1) / NR;  // panels wholly past n_out are skipped
  const int64_t m_tiles = (M + kRowTile - 1) / kRowTile;
  const float* x_p = xf.const_data_ptr<float>();
  float* y_p = yf.mutable_data_ptr<float>();
  const int64_t ldx = xf.stride(0), ldy = yf.stride(0);
  // Same task order as the BLAS path: all panels of a row tile of x before the next, so the
  // packed row tile is reused from cache. Each task packs its panel of the block row's kept
  // blocks into a per-thread buffer (kept * BK * NR floats, 512 KiB at 50% of 4096 columns),
  // reused by every micro-tile of the row tile from L2. Packing the whole weight once per
  // call instead held a second copy of the kept blocks (+32 MiB peak at 50% of 4096 x 4096)
  // and spent ~10 ms in first-touch page faults of that fresh buffer; repacking per row tile
  // from a warm buffer is a copy through registers.
  at::parallel_for(0, n_panels * m_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x_tile((std::min(kRowTile, M) + MR - 1) / MR * MR * k_pad);
    std::vector<float> w_panel(std::max<int64_t>(most_kept, 1) * BK * NR);
    int64_t packed_m0 = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = (task % n_panels) * NR, m0 = (task / n_panels) * kRowTile;
      const int64_t rows = std::min(kRowTile, M - m0);
      if (m0 != packed_m0) {
        pack_row_tile<MR>(x_p + m0 * ldx, ldx, rows, K, k_pad, x_tile.data());
        packed_m0 = m0;
      }
      const int64_t r = n0 / BN, first = crow_p[r], kept = crow_p[r + 1] - first;
      pack_panel<NR>(v_p, sj, sn, sk, first, kept, n0 - r * BN, BK, w_panel.data());
      const PanelTask t{w_panel.data(),
                        BK * NR,
                        col_p + first,
                        kept,
                        BK,
                        bias_p ? bias_p + n0 : nullptr,
                        std::min<int64_t>(NR, n_out - n0)};
      for (int64_t m = 0; m < rows; m += MR)
        micro_tile<NV, MR>(t, x_tile.data() + m * k_pad, std::min<int64_t>(MR, rows - m), y_p + (m0 + m) * ldy + n0,
                           ldy);
    }
  });
}

at::Tensor block_sparse_matmul_avx512(const at::Tensor& xf, const at::Tensor& values, const at::Tensor& crow,
                                      const at::Tensor& col, int64_t n_out, const std::optional<at::Tensor>& bias) {
  const int64_t M = xf.size(0), BN = values.size(1);
  at::Tensor yf = at::empty({M, n_out}, xf.options());
  if (M == 0 || n_out == 0) return yf;
  const at::Tensor bf = bias.has_value() ? bias->detach().to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_p = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  const int64_t* crow_p = crow.const_data_ptr<int64_t>();
  const int64_t* col_p = col.const_data_ptr<int64_t>();
  switch (std::min(BN, kMaxPanelWidth)) {
    case 16: forward_avx512<1>(xf, values, crow_p, col_p, bias_p, yf); break;
    case 32: forward_avx512<2>(xf, values, crow_p, col_p, bias_p, yf); break;
    case 64: forward_avx512<4>(xf, values, crow_p, col_p, bias_p, yf); break;
    default: TORCH_INTERNAL_ASSERT(false, kOp, ": no micro-kernel for block rows of ", BN);
  }
  return yf;
}
#endif  // __AVX512F__

// The general forward (float64, block rows other than 16..128, builds without AVX-512): BLAS per run of kept
// blocks.
at::Tensor block_sparse_matmul_blas(const at::Tensor& xf, const at::Tensor& values, const at::Tensor& crow,
                                    const at::Tensor& col, int64_t n_out, const std::optional<at::Tensor>& bias) {
  const int64_t M = xf.size(0), K = xf.size(1);
  const int64_t BN = values.size(1), BK = values.size(2);
  const int64_t n_block_rows = crow.size(0) - 1;
  const at::Tensor vp = as_panels(values, xf);  // (BN, nnzb, BK)
  at::Tensor yf = at::zeros({M, n_out}, xf.options());
  const int64_t* crow_p = crow.const_data_ptr<int64_t>();
  const int64_t* col_p = col.const_data_ptr<int64_t>();
  const int64_t m_tiles = (M + kRowTile - 1) / kRowTile;
  if (M > 0 && n_out > 0) {
    at::parallel_for(0, n_block_rows * m_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task % n_block_rows, m0 = (task / n_block_rows) * kRowTile;
        const int64_t rows = std::min(kRowTile, M - m0);
        const int64_t n0 = r * BN, bn = std::min(BN, n_out - n0);
        const int64_t first = crow_p[r], kept = crow_p[r + 1] - first;
        if (kept == 0) continue;
        at::Tensor y_tile = yf.narrow(0, m0, rows).narrow(1, n0, bn);
        const at::Tensor x_rows = xf.narrow(0, m0, rows);
        // The row's kept blocks side by side: a (BN, kept * BK) view of the panel storage,
        // so a run of adjacent block columns is one GEMM with a longer inner dimension.
        const at::Tensor panel = vp.narrow(1, first, kept).reshape({BN, kept * BK}).narrow(0, 0, bn);
        for (int64_t s = 0; s < kept;) {
          const int64_t c0 = col_p[first + s];
          int64_t len = 1;
          while (s + len < kept && col_p[first + s + len] == c0 + len) ++len;
          const int64_t k0 = c0 * BK, width = std::min((c0 + len) * BK, K) - k0;
          y_tile.addmm_(x_rows.narrow(1, k0, width), panel.narrow(1, s * BK, width).t());
          s += len;
        }
      }
    });
  }
  if (bias.has_value()) yf.add_(bias->detach().to(yf.scalar_type()));
  return yf;
}

at::Tensor block_sparse_matmul_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                                   const at::Tensor& col, int64_t n_out, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(values.dim() == 3, kOp, ": values must be 3-D (blocks, BN, BK), got ", values.dim(), "-D");
  TORCH_CHECK_VALUE(n_out >= 0, kOp, ": n_out must be non-negative, got ", n_out);
  const int64_t nnzb = values.size(0), BN = values.size(1), BK = values.size(2);
  check_index(crow, "crow", (n_out + BN - 1) / BN + 1);
  check_index(col, "col", nnzb);
  check_pointer(crow, "crow", nnzb);
  check_entries(col, "col", (x.size(1) + BK - 1) / BK);
  const at::Tensor xf = as_acc(x, x);
#ifdef __AVX512F__
  if (micro_kernel_takes(xf, BN))
    return block_sparse_matmul_avx512(xf, values, crow, col, n_out, bias).to(x.scalar_type());
#endif
  return block_sparse_matmul_blas(xf, values, crow, col, n_out, bias).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> block_sparse_matmul_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
    const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& csc_row, const at::Tensor& csc_block) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0), kOp,
              ": grad and x must be 2-D with equal rows, got ", grad.sizes(), " and ", x.sizes());
  TORCH_CHECK(values.dim() == 3, kOp, ": values must be 3-D (blocks, BN, BK), got ", values.dim(), "-D");
  const int64_t M = x.size(0), K = x.size(1), n_out = grad.size(1);
  const int64_t BN = values.size(1), BK = values.size(2), nnzb = values.size(0);
  const int64_t n_block_rows = (n_out + BN - 1) / BN, n_block_cols = (K + BK - 1) / BK;
  check_index(crow, "crow", n_block_rows + 1);
  check_index(ccol, "ccol", n_block_cols + 1);
  for (auto [t, name] : {std::pair{&col, "col"}, {&csc_row, "csc_row"}, {&csc_block, "csc_block"}})
    check_index(*t, name, nnzb);
  check_pointer(crow, "crow", nnzb);
  check_pointer(ccol, "ccol", nnzb);
  check_entries(col, "col", n_block_cols);
  check_entries(csc_row, "csc_row", n_block_rows);
  check_entries(csc_block, "csc_block", nnzb);

  const at::Tensor gf = as_acc(grad, x);
  const at::Tensor xf = as_acc(x, x);
  const at::Tensor vp = as_panels(values, x);  // (BN, nnzb, BK)
  at::Tensor dxf = at::zeros({M, K}, xf.options());
  at::Tensor dvp = at::zeros({BN, nnzb, BK}, xf.options());  // the gradient in the same layout
  const int64_t* crow_p = crow.const_data_ptr<int64_t>();
  const int64_t* col_p = col.const_data_ptr<int64_t>();
  const int64_t* ccol_p = ccol.const_data_ptr<int64_t>();
  const int64_t* crow_of = csc_row.const_data_ptr<int64_t>();

  // dx = grad @ W, one block column per task, kept blocks of that column only. The column's
  // kept blocks are stacked once into a (kept * BN, BK) panel (a copy: the storage is laid
  // out by block row) and reused for every row tile; runs of adjacent block rows then
  // become one GEMM, as in the forward.
  if (M > 0 && K > 0) {
    at::parallel_for(0, n_block_cols, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t k0 = c * BK, bk = std::min(BK, K - k0);
        const int64_t first = ccol_p[c], kept = ccol_p[c + 1] - first;
        if (kept == 0) continue;
        const at::Tensor panel = vp.index_select(1, csc_block.narrow(0, first, kept))
                                     .permute({1, 0, 2})
                                     .reshape({kept * BN, BK})
                                     .narrow(1, 0, bk);
        for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
          const int64_t rows = std::min(kRowTile, M - m0);
          at::Tensor dx_tile = dxf.narrow(0, m0, rows).narrow(1, k0, bk);
          const at::Tensor g_rows = gf.narrow(0, m0, rows);
          for (int64_t s = 0; s < kept;) {
            const int64_t r0 = crow_of[first + s];
            int64_t len = 1;
            while (s + len < kept && crow_of[first + s + len] == r0 + len) ++len;
            const int64_t n0 = r0 * BN, height = std::min((r0 + len) * BN, n_out) - n0;
            dx_tile.addmm_(g_rows.narrow(1, n0, height), panel.narrow(0, s * BN, height));
            s += len;
          }
        }
      }
    });
  }
  // dW for kept blocks only: block (r, c) gets grad[:, r]^T @ x[:, c]; the padding of edge
  // blocks stays exactly zero, and pruned blocks have no storage to update at all.
  at::parallel_for(0, n_block_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n0 = r * BN, bn = std::min(BN, n_out - n0);
      const at::Tensor g_t = gf.narrow(1, n0, bn).t();
      for (int64_t j = crow_p[r]; j < crow_p[r + 1]; ++j) {
        const int64_t k0 = col_p[j] * BK, bk = std::min(BK, K - k0);
        at::Tensor dw = dvp.select(1, j).narrow(0, 0, bn).narrow(1, 0, bk);
        if (M > 0) at::mm_out(dw, g_t, xf.narrow(1, k0, bk));
      }
    }
  });
  return {dxf.to(x.scalar_type()), dvp.permute({1, 0, 2}).to(values.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("block_sparse_matmul_kernel", &block_sparse_matmul_cpu);
  m.impl("block_sparse_matmul_backward_kernel", &block_sparse_matmul_backward_cpu);
}

}  // namespace memkern
