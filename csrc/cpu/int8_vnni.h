// AVX512-VNNI kernels of int8_linear on the plain (N, K) int8 weight (int8_linear.cpp):
// the int8 GEMM (int8_mm_vnni), the fused quantise + GEMM + epilogue (int8_linear_vnni),
// and what the packed-layout kernels (int8_vnni_packed.h) share with them: the activation
// byte sums and the scratch buffers. Defines MEMKERN_AVX512_VNNI where the build targets
// AVX512-F, -BW and -VNNI; without it this header declares nothing.
//
// Only int8_linear.cpp includes this header and int8_vnni_packed.h. Like linear_epilogue.h
// they keep their kernels in an unnamed namespace, as a .cpp file would: with internal
// linkage GCC inlines and specialises the drivers and epilogues as it did when their speed
// was measured (bench/NOTES.md); as external inline functions it compiled their loops
// differently (outlined epilogues, other register allocation in the tile drivers).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MEMKERN_AVX512_VNNI 1
#endif

#ifdef MEMKERN_AVX512_VNNI
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu/quantize_row.h"

namespace memkern {
namespace {

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

}  // namespace
}  // namespace memkern
#endif  // MEMKERN_AVX512_VNNI
