// CPU kernels of memkern's linear layers with float32 accumulation from low-precision
// weights (memkern/ops/lowp.py):
//
//   int8_weight_only_linear_kernel  W8A16 and
//   fp16_linear_kernel              half-precision weights: float32 accumulation from the
//                                   low-precision weight without a float32 copy of it (up
//                                   to 128 rows of x widened in registers as it is read;
//                                   above, a block of rows at a time for the float32 GEMM).
//
// The epilogue's arithmetic is linear_epilogue.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
// The register kernel below: 16 lanes with AVX-512F, 8 with AVX2 + FMA + F16C.
#define MEMKERN_FUSED_SCALED_LINEAR 1
#endif

#include "cpu/linear_epilogue.h"

namespace memkern {
namespace {

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

#elif defined(MEMKERN_FUSED_SCALED_LINEAR)
// 8 consecutive weights as float32.
inline __m256 weights8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
inline __m256 weights8(const at::Half* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline __m256 weights8(const at::BFloat16* w) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));  // bf16 is fp32's top half
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The AVX2 form of the tile above: 8 lanes, the K % 8 tail in scalar arithmetic.
template <int MR, int NR, typename w_t>
void fused_dot_tile(const float* x, const w_t* const* w, int64_t K, float sums[][NR]) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = weights8(w[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = sum_lanes(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += x[i * K + t] * static_cast<float>(w[j][t]);
      sums[i][j] = s;
    }
}
#endif

#ifdef MEMKERN_FUSED_SCALED_LINEAR
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

// Rows of x up to which the fused kernel runs. Against the widened-block GEMM path below,
// 4096 x 4096 int8 and fp16 weights, 2 threads (bench/NOTES.md): faster from 1 row (0.36
// against 0.9-2.4 ms) to 128 (23.3 against 25.0 ms), level at 256, 4% slower at 512.
// Those are AVX-512 figures; the AVX2 form uses the same limit, not swept on its own.
constexpr int64_t kFusedRows = 128;
#ifdef __AVX512F__
constexpr int kManyRowCols = 4;
#else
constexpr int kManyRowCols = 2;
#endif

template <typename w_t, typename out_t>
void fused_small_m(const at::Tensor& xf, int64_t M, int64_t K, const at::Tensor& w, int64_t N, const float* sp,
                   const float* bp, at::Tensor& out) {
  const float* xp = xf.const_data_ptr<float>();
  const w_t* wp = w.const_data_ptr<w_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  if (M == 1) {
    // 8 weight rows: 8 independent accumulators (AVX2 too: 8 + 8 of the 16 ymm).
    fused_small_m_linear<8>(xp, M, K, wp, N, sp, bp, op);
  } else {
    // 4 x 4 accumulators with AVX-512 (32 zmm); 4 x 2 with AVX2, whose 16 ymm would spill.
    fused_small_m_linear<kManyRowCols>(xp, M, K, wp, N, sp, bp, op);
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

#ifdef MEMKERN_FUSED_SCALED_LINEAR
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
  m.impl("int8_weight_only_linear_kernel", &int8_weight_only_linear_cpu);
  m.impl("fp16_linear_kernel", &fp16_linear_cpu);
}

}  // namespace memkern
