// CPU kernels of memkern's low-precision linear layers (memkern/ops/lowp.py):
//
//   int8_linear_kernel              W8A8 dynamic: quantise x per row, int8 x int8 -> int32,
//                                   acc * x_scale * w_scale + bias -> out. With AVX512-VNNI
//                                   one kernel does all three (the epilogue runs on each
//                                   tile as it leaves registers); without it, the
//                                   quantize_rowwise kernel, torch._int_mm (oneDNN) and a
//                                   fused epilogue pass. Rows longer than kExactChunkK add
//                                   int32 partial sums in int64 (exact for any K).
//   int8_linear_packed_kernel       the same from the packed weight layout that
//                                   memkern.nn.Int8Linear keeps on the CPU (vpdpbusd's
//                                   operand order, written once at conversion).
//   int8_mm_kernel                  the int8 GEMM alone (int32 accumulation, exact): the
//                                   VNNI kernel, or the portable loop used where _int_mm
//                                   refuses a shape or a CPU.
//   int8_weight_only_linear_kernel  W8A16 and
//   fp16_linear_kernel              half-precision weights: float32 accumulation from the
//                                   low-precision weight without a float32 copy of it (up
//                                   to 128 rows of x widened in registers as it is read;
//                                   above, a block of rows at a time for the float32 GEMM).
//
// The epilogue arithmetic follows the reference's order, (float)acc * (x_scale * w_scale)
// + bias in float32 (the compiler may fuse the last multiply-add: a rounding, not more).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <type_traits>
#include <utility>

#include "cpu/quantize_row.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MEMKERN_AVX512_VNNI 1
#endif
#include <optional>
#include <vector>

namespace memkern {
namespace {

// Output elements per parallel task: small tasks cost more in scheduling than they earn.
constexpr int64_t kGrain = 16384;

// The longest stretch of K whose int8 x int8 products always sum inside int32: quantised
// activations are at most 127 in magnitude and weights at most 128 (-128 is accepted), and
// 2^17 * 127 * 128 < 2^31 (133,144 = 2^31 / 127^2 would let a -128 weight wrap). Longer
// rows add int32 partial sums over stretches of this length in int64, so the exact sum
// rounds once to float32, as in the reference. The same length as kExactChunkK in
// csrc/cuda/int8_gemm.cuh and EXACT_CHUNK_K in memkern/kernels/int8.py.
constexpr int64_t kExactChunkK = int64_t{1} << 17;

at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::Tensor();
  return bias->to(at::kFloat).contiguous();
}

// out[m, n] = (float)acc[m, n] * (row_scale[m] * col_scale[n]) + bias[n]; each factor is
// optional (nullptr). acc is row-major with leading dimension lda.
template <typename acc_t, typename out_t>
void epilogue_rows(const acc_t* acc, int64_t lda, int64_t rows, int64_t cols, const float* row_scale,
                   const float* col_scale, const float* bias, out_t* out, int64_t ldo) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* a = acc + m * lda;
      out_t* o = out + m * ldo;
      const float rs = row_scale ? row_scale[m] : 1.0f;
      for (int64_t n = 0; n < cols; ++n) {
        float v = static_cast<float>(a[n]);
        // The scales multiply first (reference.int8_linear says why: overflow).
        if (row_scale && col_scale) v = v * (rs * col_scale[n]);
        else if (col_scale) v = v * col_scale[n];
        else if (row_scale) v = v * rs;
        if (bias) v = v + bias[n];
        o[n] = static_cast<out_t>(v);
      }
    }
  });
}

// acc[m, n] = sum_k a[m, k] * b[n, k] in int32 (a: M x K, b: N x K, both row-major). The
// inner loop is a plain widening dot product that the compiler vectorises (vpmaddwd).
void int8_mm_rows(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int32_t* c) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* bn = b + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* am = a + m * K;
        int32_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(am[k]) * static_cast<int32_t>(bn[k]);
        c[m * N + n] = s;
      }
    }
  });
}

#ifdef MEMKERN_AVX512_VNNI
// AVX512-VNNI int8 GEMM: c[m, n] = sum_k a[m, k] * b[n, k], both operands row-major in K,
// the weight b read in place (no packed layout: the op is stateless and w_q is (N, K)).
//
// vpdpbusd multiplies unsigned by signed bytes. The weight is made the unsigned operand,
// b + 128 (b ^ 0x80, one xor per loaded vector, free beside the vpdpbusd), and the bias is
// taken back out with the activation row's sum: sum((b + 128) * a) - 128 * sum(a). sum(a)
// is M x K work; biasing the activations instead needs sum(b), a pass over all N x K
// weights that cost 8% at 16 x 4096 x 4096. int32 arithmetic wraps, so the difference is
// exact whenever the true sum fits int32.
//
// Micro-tile: MR <= 4 rows of a x 4 rows of b, 16 zmm accumulators of 16 int32 lanes over
// k, 8 loads per 16 vpdpbusd; the lanes are summed once per tile, at the end of K, four
// accumulators at a time (reduce4). Six rows of a (24 accumulators, 10 loads per 24)
// measured up to 25% slower: at K = 4096 they read 24 KiB of a beside the 16 KiB weight
// group, more than the 32 KiB L1 holds. Peak on the 2-core EPYC of bench/NOTES.md: one zmm
// vpdpbusd per cycle per core.
//
// Cache blocking: a block of kRowBlockBytes of a (128 rows at K = 4096) stays in L2 while
// each task's weight rows stream past it; a 4-row weight group (16 KiB at K = 4096) stays
// in L1 across the tiles of one row block.
//
// The accumulators are named variables, not an array: GCC 12 kept an array of them on the
// stack (a load and a store around every vpdpbusd).
constexpr int kTileRows = 4;
constexpr int64_t kRowBlockBytes = 512 * 1024;

// The sums of the 16 lanes of a, b, c, d, as the 4 lanes of one vector.
inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  // Per 128-bit lane: [a, b, c, d] partial sums; then the four 128-bit lanes are added.
  __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  s = _mm512_add_epi32(s, _mm512_shuffle_i32x4(s, s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm512_add_epi32(s, _mm512_shuffle_i32x4(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castsi512_si128(s);
}

// The four weight rows of one tile; past N's end a group repeats b's last row and the
// extra columns are dropped at the store.
struct WeightRows {
  const int8_t* r[4];
  int count;
  WeightRows(const int8_t* b, int64_t N, int64_t K, int64_t n0) : count(static_cast<int>(std::min<int64_t>(4, N - n0))) {
    for (int j = 0; j < 4; ++j) r[j] = b + std::min(n0 + j, N - 1) * K;
  }
};

// acc += u (unsigned bytes) . s (signed bytes), as an asm statement: with the intrinsic,
// GCC 12 copied accumulators between registers and the stack on every step of a
// 24-accumulator tile (objdump), which then ran at 39% of peak. The empty asm in a step
// keeps each weight vector in a register (GCC otherwise reloads it for every use).
#define MEMKERN_DPBUSD(acc, u, s) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s))
#define MEMKERN_DP_ROW(i)                                              \
  if constexpr (MR > i) {                                              \
    const __m512i av = _mm512_loadu_si512(a + (i) * lda + k);          \
    MEMKERN_DPBUSD(acc##i##0, b0, av);                                 \
    MEMKERN_DPBUSD(acc##i##1, b1, av);                                 \
    MEMKERN_DPBUSD(acc##i##2, b2, av);                                 \
    MEMKERN_DPBUSD(acc##i##3, b3, av);                                 \
  }
#define MEMKERN_STEP(LOAD)                                                                   \
  {                                                                                         \
    __m512i b0 = _mm512_xor_si512(LOAD(w.r[0] + k), flip);                                  \
    __m512i b1 = _mm512_xor_si512(LOAD(w.r[1] + k), flip);                                  \
    __m512i b2 = _mm512_xor_si512(LOAD(w.r[2] + k), flip);                                  \
    __m512i b3 = _mm512_xor_si512(LOAD(w.r[3] + k), flip);                                  \
    asm("" : "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3));                                       \
    MEMKERN_DP_ROW(0) MEMKERN_DP_ROW(1) MEMKERN_DP_ROW(2) MEMKERN_DP_ROW(3)                 \
  }
#define MEMKERN_FULL_LOAD(p) _mm512_loadu_si512(p)
#define MEMKERN_MASKED_LOAD(p) _mm512_maskz_loadu_epi8(tail, p)
#define MEMKERN_STORE_ROW(i) \
  if constexpr (MR > i) _mm_storeu_si128(reinterpret_cast<__m128i*>(sums[i]), reduce4(acc##i##0, acc##i##1, acc##i##2, acc##i##3));

// sums[i][j] = sum_k a[i, k] * (b[j, k] + 128) for MR rows of a (leading dimension lda,
// zero-padded to it) and the group's four weight rows.
template <int MR>
void vnni_tile(const int8_t* a, int64_t lda, const WeightRows& w, int64_t K, int32_t sums[][4]) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc00 = z, acc01 = z, acc02 = z, acc03 = z, acc10 = z, acc11 = z, acc12 = z, acc13 = z;
  __m512i acc20 = z, acc21 = z, acc22 = z, acc23 = z, acc30 = z, acc31 = z, acc32 = z, acc33 = z;
  // Full 64-byte steps with plain loads, then the tail with masked weight loads (past K the
  // weight reads 0 + 128, against a's zero padding: nothing added). Masked loads on every
  // step cost 8%.
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) MEMKERN_STEP(MEMKERN_FULL_LOAD)
  if (k < K) {
    const __mmask64 tail = (__mmask64{1} << (K - k)) - 1;
    MEMKERN_STEP(MEMKERN_MASKED_LOAD)
  }
  MEMKERN_STORE_ROW(0) MEMKERN_STORE_ROW(1) MEMKERN_STORE_ROW(2) MEMKERN_STORE_ROW(3)
}
#undef MEMKERN_DP_ROW
#undef MEMKERN_STEP
#undef MEMKERN_FULL_LOAD
#undef MEMKERN_MASKED_LOAD
#undef MEMKERN_DPBUSD
#undef MEMKERN_STORE_ROW

// The driver: rows of a in L2-sized blocks, weight groups split across the thread pool (one
// parallel region), every tile handed to store(m, n0, count, rows, sums) with the true int32
// sums of rows m .. m + rows - 1 and columns n0 .. n0 + count - 1. a_sum[m] = sum_k a[m, k].
//
// While a group's tiles run, the next group's weight rows are prefetched into L2, a share
// before each tile: each 4 KiB weight row is a page of its own at K = 4096, and the
// hardware prefetcher stops at page ends, so without this the first tile of every group
// waited on memory (single thread, 16 x 4096 x 4096: 53% -> 65% of peak; 512 rows: 73% ->
// 76%). Prefetching inside the tile's loop instead cost registers and halved its speed.
template <typename Store>
void vnni_gemm(const int8_t* a, int64_t lda, const int32_t* a_sum, const int8_t* b, int64_t M, int64_t N,
               int64_t K, Store store) {
  const int64_t groups = (N + 3) / 4;
  const int64_t block_rows = std::max<int64_t>(kTileRows, kRowBlockBytes / lda / kTileRows * kTileRows);
  const int64_t lines = (K + 63) / 64;  // cache lines per weight row
  // Enough multiply-adds per task (>= 64K) that scheduling stays small beside the work.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(M * K * 4, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g_begin, int64_t g_end) {
    int32_t sums[kTileRows][4];
    for (int64_t r0 = 0; r0 < M; r0 += block_rows) {
      const int64_t r1 = std::min(M, r0 + block_rows);
      const int64_t tiles = (r1 - r0 + kTileRows - 1) / kTileRows;
      const int64_t lines_per_tile = (lines + tiles - 1) / tiles;
      for (int64_t g = g_begin; g < g_end; ++g) {
        const int64_t n0 = g * 4;
        const WeightRows w(b, N, K, n0);
        for (int64_t m = r0, tile = 0; m < r1; m += kTileRows, ++tile) {
          if (g + 1 < g_end) {
            const int64_t l0 = tile * lines_per_tile, l1 = std::min(lines, l0 + lines_per_tile);
            for (int64_t n = n0 + 4; n < std::min(N, n0 + 8); ++n)
              for (int64_t l = l0; l < l1; ++l) _mm_prefetch(reinterpret_cast<const char*>(b + n * K + l * 64), _MM_HINT_T1);
          }
          const int8_t* am = a + m * lda;
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, r1 - m));
          switch (rows) {
            case 4: vnni_tile<4>(am, lda, w, K, sums); break;
            case 3: vnni_tile<3>(am, lda, w, K, sums); break;
            case 2: vnni_tile<2>(am, lda, w, K, sums); break;
            default: vnni_tile<1>(am, lda, w, K, sums); break;
          }
          // The biased sums back to the true ones (wrapping int32, exact).
          for (int i = 0; i < rows; ++i) {
            __m128i* row = reinterpret_cast<__m128i*>(sums[i]);
            const __m128i correction = _mm_set1_epi32(static_cast<int32_t>(128u * static_cast<uint32_t>(a_sum[m + i])));
            _mm_storeu_si128(row, _mm_sub_epi32(_mm_loadu_si128(row), correction));
          }
          store(m, n0, w.count, rows, sums);
        }
      }
    }
  });
}

// sum_k a[k]: the activation row's sum, which takes the weight's +128 bias back out.
inline int32_t byte_sum(const int8_t* a, int64_t K) {
  int32_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += a[k];
  return s;
}

// Scratch memory for a kernel's copy of the activations. Past 1 MiB it lives in
// 2 MiB pages where the kernel allows it: rows of 4 KiB are otherwise a page each, and the
// hardware prefetcher stops at every page end (512 x 4096 x 4096 on one thread: 65% -> 73%
// of peak with huge pages for it).
class KernelBuffer {
 public:
  // zero: whether the kernel needs it zeroed (padding it does not write itself).
  KernelBuffer(size_t bytes, bool zero) : bytes_(bytes) {
    constexpr size_t kHuge = size_t{2} << 20;
    if (bytes_ >= (size_t{1} << 20)) {
      const size_t rounded = (bytes_ + kHuge - 1) / kHuge * kHuge;
      data_ = static_cast<int8_t*>(std::aligned_alloc(kHuge, rounded));
#ifdef MADV_HUGEPAGE
      if (data_ != nullptr) madvise(data_, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    } else {
      data_ = static_cast<int8_t*>(std::aligned_alloc(64, std::max<size_t>((bytes_ + 63) / 64 * 64, 64)));
    }
    TORCH_CHECK(data_ != nullptr, "int8 GEMM: out of memory for ", bytes_, " bytes of quantised activations");
    if (zero) std::memset(data_, 0, bytes_);
  }
  ~KernelBuffer() { std::free(data_); }
  KernelBuffer(const KernelBuffer&) = delete;
  KernelBuffer& operator=(const KernelBuffer&) = delete;
  int8_t* data() { return data_; }

 private:
  size_t bytes_;
  int8_t* data_;
};

// A copy of the activations for the (N, K) kernel: rows of lda bytes (K rounded up to
// whole 64-byte steps, zero padding) and their sums.
class KernelRows {
 public:
  KernelRows(int64_t rows, int64_t K)
      : lda_(std::max<int64_t>(64, (K + 63) / 64 * 64)), buffer_(static_cast<size_t>(rows * lda_), true), sums_(rows) {}

  int64_t lda() const { return lda_; }
  int8_t* row(int64_t m) { return buffer_.data() + m * lda_; }
  const int8_t* data() { return buffer_.data(); }
  const int32_t* sums() const { return sums_.data(); }
  // Call once row m is written.
  void sum_row(int64_t m, int64_t K) { sums_[m] = byte_sum(row(m), K); }

 private:
  int64_t lda_;
  KernelBuffer buffer_;
  std::vector<int32_t> sums_;
};

void int8_mm_vnni(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int32_t* c) {
  KernelRows rows(M, K);
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(rows.row(m), a + m * K, static_cast<size_t>(K));
    rows.sum_row(m, K);
  }
  vnni_gemm(rows.data(), rows.lda(), rows.sums(), b, M, N, K,
            [&](int64_t m, int64_t n0, int count, int tile_rows, int32_t sums[][4]) {
              for (int i = 0; i < tile_rows; ++i)
                for (int j = 0; j < count; ++j) c[(m + i) * N + n0 + j] = sums[i][j];
            });
}

// int8_linear in one kernel: quantise x (quantize_row.h, the quantize_rowwise kernel's
// arithmetic), then the VNNI GEMM with the epilogue acc * (x_scale * w_scale) + bias
// applied to each tile as it leaves registers, so no M x N int32 accumulator is ever
// stored. Quantisation runs serially up to 64K elements of x (ATen runs a range within
// one grain inline): a parallel region costs a wake-up and a barrier, which on a loaded
// 2-core machine can be a scheduler quantum.
template <typename x_t, typename out_t>
void int8_linear_vnni(const x_t* x, int64_t M, int64_t K, int64_t xs0, int64_t xs1, const int8_t* w, int64_t N,
                      const float* w_scale, const float* bias, out_t* out) {
  KernelRows q(M, K);
  std::vector<float> x_scale(static_cast<size_t>(M));
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      x_scale[m] = quantize_row(x + m * xs0, K, xs1, 0, reinterpret_cast<uint8_t*>(q.row(m)));
      q.sum_row(m, K);
    }
  });
  vnni_gemm(q.data(), q.lda(), q.sums(), w, M, N, K, [&](int64_t m, int64_t n0, int count, int rows, int32_t sums[][4]) {
    // Four columns at a time; lanes past N are masked off every load and store.
    const __mmask8 live = static_cast<__mmask8>((1u << count) - 1);
    const __m128 ws = _mm_maskz_loadu_ps(live, w_scale + n0);
    const __m128 bs = bias ? _mm_maskz_loadu_ps(live, bias + n0) : _mm_setzero_ps();
    for (int i = 0; i < rows; ++i) {
      // The scales multiply first (reference.int8_linear says why: overflow).
      const __m128 scale = _mm_mul_ps(_mm_set1_ps(x_scale[m + i]), ws);
      const __m128 acc = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sums[i])));
      const __m128 v = _mm_add_ps(_mm_mul_ps(acc, scale), bs);
      out_t* o = out + (m + i) * N + n0;
      if constexpr (std::is_same_v<out_t, float>) {
        _mm_mask_storeu_ps(o, live, v);
      } else {
        alignas(16) float f[4];
        _mm_store_ps(f, v);
        for (int j = 0; j < count; ++j) o[j] = static_cast<out_t>(f[j]);
      }
    }
  });
}

// ---- int8_linear on the packed weight layout (memkern.ops.pack_int8_weight) -------------
//
// Layout: w_packed[j, g, c, t] = w[16 j + c, 4 g + t], shape (ceil(N / 16), ceil(K / 4),
// 16, 4), zero past N and K. One 64-byte vector holds 4 consecutive k of 16 consecutive
// output columns: exactly vpdpbusd's operand, so a panel of 16 columns streams through
// memory in order and each weight vector meets a 4-byte broadcast of each activation row
// (an embedded-broadcast memory operand). No horizontal sums, one weight stream per panel,
// and each activation row's 4 bytes come from one 64-byte line per step (the activations
// are interleaved the same way per 16-row tile). Standalone, 16 x 4096 x 4096 on the
// 2-core EPYC of bench/NOTES.md: 98% of the vpdpbusd peak against 74% for the (N, K)
// kernel above; 512 rows: 93-95% against 86%.
//
// Signs as above: the weight is the unsigned operand (xor 0x80 per loaded vector), and
// sum((w + 128) * a) - 128 * sum(a) gives the true sum.
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
// accumulators, named (see MEMKERN_DPBUSD on arrays).
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
#endif  // MEMKERN_AVX512_VNNI

// acc = a @ b.T in int32 (a: M x K, b: N x K, int8): the VNNI kernel where this build has
// it and allow_vnni is set, otherwise the portable loop.
at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b, bool allow_vnni) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "int8_mm: expected a (M, K) and b (N, K) with the same K, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "int8_mm: a and b must be int8, got ", a.scalar_type(), " and ", b.scalar_type());
  const auto ac = a.contiguous();
  const auto bc = b.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  auto c = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return c;
#ifdef MEMKERN_AVX512_VNNI
  if (allow_vnni) {
    int8_mm_vnni(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), M, N, K, c.mutable_data_ptr<int32_t>());
    return c;
  }
#endif
  int8_mm_rows(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), M, N, K, c.mutable_data_ptr<int32_t>());
  return c;
}

#ifdef MEMKERN_AVX512_VNNI
// out (M x N, out_dtype) = kernel<x_t, out_t>(x, M, K, x strides, w, N, w_scale, bias, out)
// for the fused VNNI kernels, dispatched on x's dtype and out_dtype.
template <typename Kernel>
at::Tensor run_fused_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, const at::Tensor& bias,
                          int64_t N, at::ScalarType out_dtype, Kernel kernel) {
  auto out = at::empty({x.size(0), N}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int8_linear_fused_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_linear_fused_out", [&] {
      kernel(x.const_data_ptr<x_t>(), x.size(0), x.size(1), x.stride(0), x.stride(1), w.const_data_ptr<int8_t>(), N,
             w_scale.const_data_ptr<float>(), bias.defined() ? bias.const_data_ptr<float>() : nullptr,
             out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_rowwise(const at::Tensor& x) {
  // The same kernel quantize_rowwise runs (csrc/cpu/quantize_rowwise.cpp), so both ops
  // quantise activations identically.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("memkern::quantize_rowwise_kernel", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
}

// x_q @ w_q.T in int32 (x_q: M x K quantised activations, w_q: N x K), exact for K up to
// kExactChunkK.
at::Tensor int8_product_int32(const at::Tensor& x_q, const at::Tensor& w_q) {
  if (x_q.size(1) < 2) {
    // torch 2.13's CPU _int_mm leaves its output uninitialised for K = 1 (N > 1), seen
    // with fill_uninitialized_memory in tests/test_lowp.py.
    return int8_mm_cpu(x_q, w_q, true);
  }
  try {
    // oneDNN's s8s8s32 GEMM: ~4.4x the float32 GEMM at 512 x 4096 x 4096 on the AVX-512
    // VNNI machine of bench/NOTES.md. w_q.t() is a (K, N) view, no copy.
    return at::_int_mm(x_q, w_q.t());
  } catch (const c10::Error&) {
    return int8_mm_cpu(x_q, w_q, true);  // shapes or CPUs _int_mm refuses
  }
}

// x_q @ w_q.T in int64 for any K: int32 products over stretches of kExactChunkK, added
// exactly. Only rows longer than kExactChunkK come here (one M x N int64 sum beside them).
at::Tensor int8_product_int64(const at::Tensor& x_q, const at::Tensor& w_q) {
  const int64_t K = x_q.size(1);
  auto acc = at::zeros({x_q.size(0), w_q.size(0)}, x_q.options().dtype(at::kLong));
  for (int64_t k0 = 0; k0 < K; k0 += kExactChunkK) {
    const int64_t len = std::min(kExactChunkK, K - k0);
    acc.add_(int8_product_int32(x_q.narrow(1, k0, len).contiguous(), w_q.narrow(1, k0, len)));
  }
  return acc;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2 && w_q.dim() == 2 && x.size(1) == w_q.size(1),
              "int8_linear: expected x (M, K) and w_q (N, K), got ", x.sizes(), " and ", w_q.sizes());
  TORCH_CHECK(w_q.scalar_type() == at::kChar, "int8_linear: w_q must be int8, got ", w_q.scalar_type());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w_q.size(0),
              "int8_linear: w_scale must be float32 of shape (", w_q.size(0), ",)");
  const int64_t M = x.size(0), N = w_q.size(0);
  if (M == 0 || N == 0) return at::empty({M, N}, x.options().dtype(out_dtype));

  const int64_t K = x.size(1);
  const auto ws = w_scale.contiguous();
  const auto b = float_bias(bias);
#ifdef MEMKERN_AVX512_VNNI
  // Every M: level with torch._int_mm's GEMM at 512 x 4096 x 4096 and faster below, with
  // the quantisation and the epilogue fused (bench/NOTES.md). Its tiles sum all of K in
  // int32, so longer rows take the int64 path below.
  if (K <= kExactChunkK)
    return run_fused_int8(x, w_q.contiguous(), ws, b, N, out_dtype, [](auto... args) { int8_linear_vnni(args...); });
#endif
  auto [x_q, x_scale] = quantize_rowwise(x);
  const float* xs = x_scale.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  if (K > kExactChunkK) {
    const auto acc = int8_product_int64(x_q, w_q);
    auto out = at::empty({M, N}, x.options().dtype(out_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_linear_epilogue_int64", [&] {
      epilogue_rows<int64_t, scalar_t>(acc.const_data_ptr<int64_t>(), N, M, N, xs, ws.const_data_ptr<float>(), bp,
                                       out.mutable_data_ptr<scalar_t>(), N);
    });
    return out;
  }
  const auto acc = int8_product_int32(x_q, w_q).contiguous();
  // A float32 output overwrites the int32 accumulator in place (each element is read
  // before it is written): 8 MiB less peak memory at 512 x 4096 x 4096.
  auto out = out_dtype == at::kFloat ? acc.view(at::kFloat) : at::empty({M, N}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_linear_epilogue", [&] {
    epilogue_rows<int32_t, scalar_t>(acc.const_data_ptr<int32_t>(), N, M, N, xs, ws.const_data_ptr<float>(), bp,
                                     out.mutable_data_ptr<scalar_t>(), N);
  });
  return out;
}

// int8_linear from the packed weight layout (memkern.ops.pack_int8_weight): the packed VNNI
// kernel, or, in a build without VNNI (and for K past kExactChunkK), the path above on the
// weight unpacked to (N, K).
at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2, "int8_linear_packed: expected x (M, K), got ", x.sizes());
  TORCH_CHECK(w_packed.scalar_type() == at::kChar, "int8_linear_packed: w_packed must be int8, got ",
              w_packed.scalar_type());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1,
              "int8_linear_packed: w_scale must be 1-D float32, got ", w_scale.scalar_type(), " ", w_scale.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.size(0);
  const int64_t groups = (K + 3) / 4, panels = (N + 15) / 16;
  TORCH_CHECK(w_packed.dim() == 4 && w_packed.size(0) == panels && w_packed.size(1) == groups &&
                  w_packed.size(2) == 16 && w_packed.size(3) == 4,
              "int8_linear_packed: w_packed must have shape (", panels, ", ", groups, ", 16, 4) for N = ", N,
              " and K = ", K, ", got ", w_packed.sizes());
  if (M == 0 || N == 0) return at::empty({M, N}, x.options().dtype(out_dtype));
#ifdef MEMKERN_AVX512_VNNI
  // The packed kernel sums all of K in int32 (see kExactChunkK).
  if (K <= kExactChunkK)
    return run_fused_int8(x, w_packed.contiguous(), w_scale.contiguous(), float_bias(bias), N, out_dtype,
                          [](auto... args) { int8_linear_packed_vnni(args...); });
#endif
  const auto w_q = w_packed.permute({0, 2, 1, 3}).reshape({panels * 16, groups * 4}).narrow(0, 0, N).narrow(1, 0, K);
  return int8_linear_cpu(x, w_q, w_scale, bias, out_dtype);
}

// Whether int8_linear_packed_kernel runs its own kernel here (true) or unpacks the weight
// first (false): memkern's modules keep a packed weight only where it pays.
bool int8_packed_kernel_native() {
#ifdef MEMKERN_AVX512_VNNI
  return true;
#else
  return false;
#endif
}

// ---- float32 accumulation from low-precision weights ------------------------------------

// Bytes of float32 weight one task widens at a time on the GEMM path (1 MiB: 64 rows of
// K = 4096, L2-resident while the GEMM reads it).
constexpr int64_t kBlockBytes = 1 << 20;

#ifdef __AVX512F__
// 16 consecutive weights as float32 (Tail: only the lanes in `live`, zero past them).
template <bool Tail>
inline __m512 weights16(const int8_t* w, __mmask16 live) {
  const __m128i v = Tail ? _mm_maskz_loadu_epi8(live, w) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}
template <bool Tail>
inline __m512 weights16(const at::Half* w, __mmask16 live) {
  const __m256i v = Tail ? _mm256_maskz_loadu_epi16(live, w) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_cvtph_ps(v);
}
template <bool Tail>
inline __m512 weights16(const at::BFloat16* w, __mmask16 live) {
  const __m256i v = Tail ? _mm256_maskz_loadu_epi16(live, w) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));  // bf16 is fp32's top half
}

// sums[i][j] = sum_k x[i, k] * w[j, k] for MR rows of x (K floats apart) and NR weight rows
// (pointers), each weight vector widened in registers as it is loaded: no float32 copy of
// the weight, not even of one row. MR x NR accumulators, all independent.
template <int MR, int NR, typename w_t>
void fused_dot_tile(const float* x, const w_t* const* w, int64_t K, float sums[][NR]) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, auto tail, __mmask16 live) {
    constexpr bool kTail = decltype(tail)::value;
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = weights16<kTail>(w[j] + k, live);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = kTail ? _mm512_maskz_loadu_ps(live, x + i * K + k) : _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, std::false_type{}, __mmask16(0xFFFF));
  if (k < K) step(k, std::true_type{}, static_cast<__mmask16>((1u << (K - k)) - 1));
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

// M <= kFusedRows: weight rows in groups of NR (split across threads); each group meets
// every row of x, four rows at a time, while it is in L1, so the weight is read from
// memory once. One row of x takes 8 weight rows per tile so that 8 accumulators hide the
// FMA latency.
template <int NR, typename w_t, typename out_t>
void fused_small_m_linear(const float* x, int64_t M, int64_t K, const w_t* w, int64_t N, const float* col_scale,
                          const float* bias, out_t* out) {
  const int64_t groups = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(K * NR, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * NR;
      const int count = static_cast<int>(std::min<int64_t>(NR, N - n0));
      const w_t* rows[NR];
      for (int j = 0; j < NR; ++j) rows[j] = w + std::min<int64_t>(n0 + j, N - 1) * K;  // past N: repeat the last
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        float sums[4][NR];
        const float* xm = x + m0 * K;
        const int64_t mr = std::min<int64_t>(4, M - m0);
        switch (mr) {
          case 4: fused_dot_tile<4, NR>(xm, rows, K, sums); break;
          case 3: fused_dot_tile<3, NR>(xm, rows, K, sums); break;
          case 2: fused_dot_tile<2, NR>(xm, rows, K, sums); break;
          default: fused_dot_tile<1, NR>(xm, rows, K, sums); break;
        }
        for (int64_t i = 0; i < mr; ++i)
          for (int j = 0; j < count; ++j) {
            float v = sums[i][j];
            if (col_scale) v = v * col_scale[n0 + j];
            if (bias) v = v + bias[n0 + j];
            out[(m0 + i) * N + n0 + j] = static_cast<out_t>(v);
          }
      }
    }
  });
}
#endif

#ifdef __AVX512F__
// Rows of x up to which the fused kernel runs. Against the widened-block GEMM path below,
// 4096 x 4096 int8 and fp16 weights, 2 threads (bench/NOTES.md): faster from 1 row (0.36
// against 0.9-2.4 ms) to 128 (23.3 against 25.0 ms), level at 256, 4% slower at 512.
constexpr int64_t kFusedRows = 128;

template <typename w_t, typename out_t>
void fused_small_m(const at::Tensor& xf, int64_t M, int64_t K, const at::Tensor& w, int64_t N, const float* sp,
                   const float* bp, at::Tensor& out) {
  const float* xp = xf.const_data_ptr<float>();
  const w_t* wp = w.const_data_ptr<w_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  if (M == 1) {
    fused_small_m_linear<8>(xp, M, K, wp, N, sp, bp, op);
  } else {
    fused_small_m_linear<4>(xp, M, K, wp, N, sp, bp, op);
  }
}
#endif

at::Tensor scaled_linear_cpu(const char* op, const at::Tensor& x, const at::Tensor& w,
                             const at::Tensor& col_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), op,
              ": expected x (M, K) and weight (N, K), got ", x.sizes(), " and ", w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const auto xf = x.to(at::kFloat).contiguous();  // activations only: M x K
  const auto b = float_bias(bias);
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const float* sp = col_scale.defined() ? col_scale.const_data_ptr<float>() : nullptr;

#ifdef __AVX512F__
  if (M <= kFusedRows && w.stride(1) == 1 && w.stride(0) == K) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_small_m_out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_SWITCH(w.scalar_type(), "fused_small_m_w",
          AT_DISPATCH_CASE(at::kChar, [&] { fused_small_m<int8_t, out_t>(xf, M, K, w, N, sp, bp, out); })
          AT_DISPATCH_CASE(at::kHalf, [&] { fused_small_m<at::Half, out_t>(xf, M, K, w, N, sp, bp, out); })
          AT_DISPATCH_CASE(at::kBFloat16, [&] { fused_small_m<at::BFloat16, out_t>(xf, M, K, w, N, sp, bp, out); }));
    });
    return out;
  }
#endif
  // GEMM path: each task widens a block of weight rows to float32, multiplies it with the
  // single-threaded GEMM (ATen runs nested parallel work serially) and runs the epilogue on
  // the block's output columns. One parallel region per call: with one ATen call per block
  // in sequence, every call's barrier cost a scheduler quantum on the loaded 2-core machine
  // (bench/NOTES.md). Peak extra memory: one block and its M x nb product per thread.
  int64_t nb = std::max<int64_t>(16, kBlockBytes / (4 * std::max<int64_t>(K, 1)));
  nb = std::min(N, (nb + 15) / 16 * 16);
  const int64_t blocks = (N + nb - 1) / nb;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * nb, cur = std::min(nb, N - n0);
      const auto wf = w.narrow(0, n0, cur).to(at::kFloat).contiguous();
      const auto acc = at::mm(xf, wf.t()).contiguous();  // M x cur, float32
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scaled_linear_epilogue", [&] {
        epilogue_rows<float, scalar_t>(acc.const_data_ptr<float>(), cur, M, cur, nullptr, sp ? sp + n0 : nullptr,
                                       bp ? bp + n0 : nullptr, out.mutable_data_ptr<scalar_t>() + n0, N);
      });
    }
  });
  return out;
}

at::Tensor int8_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_q.scalar_type() == at::kChar, "int8_weight_only_linear: w_q must be int8, got ",
              w_q.scalar_type());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w_q.size(0),
              "int8_weight_only_linear: w_scale must be float32 of shape (", w_q.size(0), ",)");
  return scaled_linear_cpu("int8_weight_only_linear", x, w_q, w_scale.contiguous(), bias);
}

at::Tensor fp16_linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
              "fp16_linear: w_half must be float16 or bfloat16, got ", w.scalar_type());
  return scaled_linear_cpu("fp16_linear", x, w, at::Tensor(), bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("int8_linear_kernel", &int8_linear_cpu);
  m.impl("int8_linear_packed_kernel", &int8_linear_packed_cpu);
  m.impl("int8_mm_kernel", &int8_mm_cpu);
  m.impl("int8_weight_only_linear_kernel", &int8_weight_only_linear_cpu);
  m.impl("fp16_linear_kernel", &fp16_linear_cpu);
}

TORCH_LIBRARY_FRAGMENT(memkern, m) {
  m.def("int8_packed_kernel_native() -> bool", &int8_packed_kernel_native);
}

}  // namespace memkern
