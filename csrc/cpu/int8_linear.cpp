// CPU kernels of memkern's low-precision linear layers (memkern/ops/lowp.py):
//
//   int8_linear_kernel              W8A8 dynamic: quantise x per row, int8 x int8 -> int32
//                                   with torch._int_mm (oneDNN, VNNI where the CPU has it),
//                                   then one fused pass acc * x_scale * w_scale + bias -> out.
//   int8_mm_kernel                  the portable int8 GEMM used when _int_mm refuses a shape
//                                   or a CPU (int32 accumulation, exact).
//   int8_weight_only_linear_kernel  W8A16 and
//   fp16_linear_kernel              half-precision weights: float32 accumulation from the
//                                   low-precision weight without a float32 copy of it.
//
// The epilogue arithmetic follows the reference's order, (float)acc * (x_scale * w_scale)
// + bias in float32 (the compiler may fuse the last multiply-add: a rounding, not more).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
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
// AVX512-VNNI int8 GEMM for few rows of a (the decode and small-batch cases, where
// torch._int_mm was 2.4x slower than fbgemm at 16 x 4096 x 4096, bench/NOTES.md).
// vpdpbusd multiplies unsigned by signed bytes, so a is biased to u = a + 128 (a ^ 0x80)
// and the bias is taken back out: sum(u * b) - 128 * sum(b), with sum(b) from one more
// vpdpbusd against a vector of ones. int32 arithmetic wraps, so the difference is exact
// whenever the true sum fits int32. Tiles of 4 rows of a x 4 rows of b hold 16 zmm
// accumulators and spend one load per two vpdpbusd.
//
// The accumulators are named variables, not an array: GCC 12 kept an array of them on the
// stack (a load and a store around every vpdpbusd, 5x slower). Four rows of b per tile;
// past N's end the tile re-reads b's last row and drops those results.
#define MEMKERN_DP_ROW(i)                                                       \
  if constexpr (MB > i) {                                                       \
    const __m512i uv = _mm512_loadu_si512(u + (m0 + i) * ldu + k);              \
    acc##i##0 = _mm512_dpbusd_epi32(acc##i##0, uv, b0);                         \
    acc##i##1 = _mm512_dpbusd_epi32(acc##i##1, uv, b1);                         \
    acc##i##2 = _mm512_dpbusd_epi32(acc##i##2, uv, b2);                         \
    acc##i##3 = _mm512_dpbusd_epi32(acc##i##3, uv, b3);                         \
  }
#define MEMKERN_STORE_ROW(i)                                                    \
  if constexpr (MB > i) {                                                       \
    const __m512i row[4] = {acc##i##0, acc##i##1, acc##i##2, acc##i##3};        \
    for (int j = 0; j < nb; ++j) {                                              \
      const uint32_t biased = static_cast<uint32_t>(_mm512_reduce_add_epi32(row[j])); \
      c[(m0 + i) * ldc + n0 + j] = static_cast<int32_t>(biased - 128u * static_cast<uint32_t>(bsum[j])); \
    }                                                                           \
  }

template <int MB, bool kSum>
void vnni_tile(const uint8_t* u, int64_t ldu, const int8_t* b, int64_t N, int64_t K, int64_t m0, int64_t n0,
               int32_t* bsum, int32_t* c, int64_t ldc) {
  const int nb = static_cast<int>(std::min<int64_t>(4, N - n0));
  const int8_t* r0 = b + n0 * K;
  const int8_t* r1 = b + std::min(n0 + 1, N - 1) * K;
  const int8_t* r2 = b + std::min(n0 + 2, N - 1) * K;
  const int8_t* r3 = b + std::min(n0 + 3, N - 1) * K;
  const __m512i zero = _mm512_setzero_si512();
  __m512i acc00 = zero, acc01 = zero, acc02 = zero, acc03 = zero, acc10 = zero, acc11 = zero, acc12 = zero,
          acc13 = zero, acc20 = zero, acc21 = zero, acc22 = zero, acc23 = zero, acc30 = zero, acc31 = zero,
          acc32 = zero, acc33 = zero, s0 = zero, s1 = zero, s2 = zero, s3 = zero;
  const __m512i ones = _mm512_set1_epi8(1);
  // Full 64-byte steps with plain loads, then the tail with a masked load of b (zeros past
  // K); u is padded with zeros to ldu. (A lambda for the step body spilled the
  // accumulators again.)
#define MEMKERN_STEP(LOAD)                                                       \
  {                                                                             \
    __m512i b0 = LOAD(r0 + k);                                                  \
    __m512i b1 = LOAD(r1 + k);                                                  \
    __m512i b2 = LOAD(r2 + k);                                                  \
    __m512i b3 = LOAD(r3 + k);                                                  \
    MEMKERN_IN_REGISTER(b0, b1, b2, b3)                                         \
    if constexpr (kSum) {                                                       \
      s0 = _mm512_dpbusd_epi32(s0, ones, b0);                                   \
      s1 = _mm512_dpbusd_epi32(s1, ones, b1);                                   \
      s2 = _mm512_dpbusd_epi32(s2, ones, b2);                                   \
      s3 = _mm512_dpbusd_epi32(s3, ones, b3);                                   \
    }                                                                           \
    MEMKERN_DP_ROW(0)                                                           \
    MEMKERN_DP_ROW(1)                                                           \
    MEMKERN_DP_ROW(2)                                                           \
    MEMKERN_DP_ROW(3)                                                           \
  }
#define MEMKERN_FULL_LOAD(p) _mm512_loadu_si512(p)
// Left alone, GCC folds each b load into the four vpdpbusd that use it (four loads
// instead of one); an empty asm that "changes" them pins them in registers.
#define MEMKERN_IN_REGISTER(b0, b1, b2, b3) asm("" : "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3));
#define MEMKERN_TAIL_LOAD(p) _mm512_maskz_loadu_epi8(tail, p)
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) MEMKERN_STEP(MEMKERN_FULL_LOAD)
  if (k < K) {
    const __mmask64 tail = (__mmask64{1} << (K - k)) - 1;
    MEMKERN_STEP(MEMKERN_TAIL_LOAD)
  }
#undef MEMKERN_STEP
#undef MEMKERN_FULL_LOAD
#undef MEMKERN_IN_REGISTER
#undef MEMKERN_TAIL_LOAD
  if constexpr (kSum) {
    bsum[0] = _mm512_reduce_add_epi32(s0);
    bsum[1] = _mm512_reduce_add_epi32(s1);
    bsum[2] = _mm512_reduce_add_epi32(s2);
    bsum[3] = _mm512_reduce_add_epi32(s3);
  }
  MEMKERN_STORE_ROW(0)
  MEMKERN_STORE_ROW(1)
  MEMKERN_STORE_ROW(2)
  MEMKERN_STORE_ROW(3)
}
#undef MEMKERN_DP_ROW
#undef MEMKERN_STORE_ROW

// Columns n0 .. n0 + 3 of c: the first tile of rows also sums b's rows, the rest reuse it.
void vnni_column_block(const uint8_t* u, int64_t ldu, const int8_t* b, int64_t M, int64_t N, int64_t K,
                       int64_t n0, int32_t* c, int64_t ldc) {
  int32_t bsum[4];
  int64_t m = 0;
  if (M >= 4) {
    vnni_tile<4, true>(u, ldu, b, N, K, 0, n0, bsum, c, ldc);
    for (m = 4; m + 4 <= M; m += 4) vnni_tile<4, false>(u, ldu, b, N, K, m, n0, bsum, c, ldc);
  }
  const bool first = m == 0;
  switch (M - m) {
    case 3:
      first ? vnni_tile<3, true>(u, ldu, b, N, K, m, n0, bsum, c, ldc)
            : vnni_tile<3, false>(u, ldu, b, N, K, m, n0, bsum, c, ldc);
      break;
    case 2:
      first ? vnni_tile<2, true>(u, ldu, b, N, K, m, n0, bsum, c, ldc)
            : vnni_tile<2, false>(u, ldu, b, N, K, m, n0, bsum, c, ldc);
      break;
    case 1:
      first ? vnni_tile<1, true>(u, ldu, b, N, K, m, n0, bsum, c, ldc)
            : vnni_tile<1, false>(u, ldu, b, N, K, m, n0, bsum, c, ldc);
      break;
    default:
      break;
  }
}

void int8_mm_vnni(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int32_t* c) {
  const int64_t ldu = std::max<int64_t>(64, (K + 63) / 64 * 64);
  std::vector<uint8_t> u(static_cast<size_t>(M * ldu), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) u[m * ldu + k] = static_cast<uint8_t>(a[m * K + k]) ^ 0x80u;
  const int64_t groups = (N + 3) / 4;
  // ~64K multiply-adds per task at least.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(M * K * 4, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) vnni_column_block(u.data(), ldu, b, M, N, K, g * 4, c, N);
  });
}

// The whole of int8_linear for few rows in one parallel region (two past 64K elements of
// x, where quantising in parallel pays). Every region costs a
// wake-up and a barrier, and on a 2-core machine shared with other work a thread that has
// lost its core makes each barrier wait a scheduler quantum (~4 ms per region seen at
// 16 x 4096 x 4096): so the rows are quantised serially (16 x 4096 floats take ~50 us)
// straight into the biased u8 layout, and each task runs the epilogue on the columns it
// computed. The quantisation is quantize_rowwise's arithmetic, step for step.
template <typename x_t, typename out_t>
void int8_linear_vnni(const x_t* x, int64_t M, int64_t K, int64_t xs0, int64_t xs1, const int8_t* w, int64_t N,
                      const float* w_scale, const float* bias, out_t* out) {
  const int64_t ldu = std::max<int64_t>(64, (K + 63) / 64 * 64);
  std::vector<uint8_t> u(static_cast<size_t>(M * ldu), 0);
  std::vector<float> x_scale(static_cast<size_t>(M));
  // Serial (no parallel region) up to 64K elements: ATen runs a range within one grain
  // inline.
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      const x_t* xr = x + m * xs0;
      uint8_t* ur = u.data() + m * ldu;
      float absmax = 0.0f;
      bool nonfinite = false;
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(static_cast<float>(xr[k * xs1]));
        nonfinite |= !(a <= FLT_MAX);
        absmax = std::max(absmax, a);
      }
      if (nonfinite) {  // scale NaN, q = 0: the row's outputs are NaN
        x_scale[m] = NAN;
        std::fill(ur, ur + K, uint8_t{0x80});
        continue;
      }
      float s = absmax / 127.0f;
      if (s == 0.0f) s = 1.0f;
      x_scale[m] = s;
      for (int64_t k = 0; k < K; ++k) {
        float v = std::nearbyint(static_cast<float>(xr[k * xs1]) / s);
        v = std::min(127.0f, std::max(-127.0f, v));
        ur[k] = static_cast<uint8_t>(static_cast<int8_t>(v)) ^ 0x80u;
      }
    }
  });
  std::vector<int32_t> acc(static_cast<size_t>(M * N));
  const int64_t groups = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(M * K * 4, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * 4, n1 = std::min(N, n0 + 4);
      vnni_column_block(u.data(), ldu, w, M, N, K, n0, acc.data(), N);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          float v = static_cast<float>(acc[m * N + n]) * (x_scale[m] * w_scale[n]);
          if (bias) v = v + bias[n];
          out[m * N + n] = static_cast<out_t>(v);
        }
    }
  });
}
#endif  // MEMKERN_AVX512_VNNI

constexpr bool kHasVnni =
#ifdef MEMKERN_AVX512_VNNI
    true;
#else
    false;
#endif

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

// Rows of x up to which the VNNI kernel runs instead of torch._int_mm: it won at 128 rows
// (13.9 vs 17.3 ms on one thread) and lost at 512 (58.6 vs 50.6 ms), bench/NOTES.md.
constexpr int64_t kVnniMaxRows = 128;

std::tuple<at::Tensor, at::Tensor> quantize_rowwise(const at::Tensor& x) {
  // The same kernel quantize_rowwise runs (csrc/cpu/quantize_rowwise.cpp), so both ops
  // quantise activations identically.
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("memkern::quantize_rowwise_kernel", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
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
  if (M <= kVnniMaxRows) {
    auto out = at::empty({M, N}, x.options().dtype(out_dtype));
    const auto w = w_q.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int8_linear_vnni_x", [&] {
      using x_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_linear_vnni_out", [&] {
        int8_linear_vnni<x_t, scalar_t>(x.const_data_ptr<x_t>(), M, K, x.stride(0), x.stride(1),
                                        w.const_data_ptr<int8_t>(), N, ws.const_data_ptr<float>(),
                                        b.defined() ? b.const_data_ptr<float>() : nullptr,
                                        out.mutable_data_ptr<scalar_t>());
      });
    });
    return out;
  }
#endif
  auto [x_q, x_scale] = quantize_rowwise(x);
  at::Tensor acc;
  if (K < 2) {
    // torch 2.13's CPU _int_mm leaves its output uninitialised for K = 1 (N > 1), seen
    // with fill_uninitialized_memory in tests/test_lowp.py.
    acc = int8_mm_cpu(x_q, w_q, true);
  } else {
    try {
      // oneDNN's s8s8s32 GEMM: ~4.4x the float32 GEMM at 512 x 4096 x 4096 on the AVX-512
      // VNNI machine of bench/NOTES.md. w_q.t() is a (K, N) view, no copy.
      acc = at::_int_mm(x_q, w_q.t());
    } catch (const c10::Error&) {
      acc = int8_mm_cpu(x_q, w_q, true);  // shapes or CPUs _int_mm refuses
    }
  }
  acc = acc.contiguous();
  // A float32 output overwrites the int32 accumulator in place (each element is read
  // before it is written): 8 MiB less peak memory at 512 x 4096 x 4096.
  auto out = out_dtype == at::kFloat ? acc.view(at::kFloat) : at::empty({M, N}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_linear_epilogue", [&] {
    epilogue_rows<int32_t, scalar_t>(acc.const_data_ptr<int32_t>(), N, M, N, x_scale.const_data_ptr<float>(),
                                     ws.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                                     out.mutable_data_ptr<scalar_t>(), N);
  });
  return out;
}

// ---- float32 accumulation from low-precision weights ------------------------------------

// Up to this many rows of x, each weight row is widened once into a per-thread float32
// buffer and dotted with every row of x, four rows at a time: the weight is read exactly
// once (the decode case, bound by memory bandwidth). Above it, blocks of weight rows are
// widened and handed to the float32 GEMM.
constexpr int64_t kDirectRows = 8;
// Bytes of float32 weight one task widens at a time on the GEMM path (1 MiB: 64 rows of
// K = 4096, L2-resident while the GEMM reads it).
constexpr int64_t kBlockBytes = 1 << 20;

// wr[0..K) = (float)w[0..K). The int8 and bfloat16 loops vectorise as written; float16
// goes through vcvtph2ps (scalar _cvtsh_ss otherwise: 3x slower on the 4096 x 4096 case).
template <typename w_t>
inline void widen_row(const w_t* w, int64_t K, float* wr) {
  int64_t k = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<w_t, at::Half>) {
    for (; k + 16 <= K; k += 16)
      _mm512_storeu_ps(wr + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))));
  }
#endif
  for (; k < K; ++k) wr[k] = static_cast<float>(w[k]);
}

// s[i] = sum_k xi[k] * w[k] for four rows sharing each load of w. GCC 12 left the
// four-reduction omp simd loop scalar (vfmadd231ss), hence the intrinsics.
inline void dot4(const float* x0, const float* x1, const float* x2, const float* x3, const float* w, int64_t K,
                 float* s) {
  int64_t k = 0;
  float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
#ifdef __AVX512F__
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = _mm512_loadu_ps(w + k);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k), wv, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k), wv, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k), wv, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k), wv, a3);
  }
  t0 = _mm512_reduce_add_ps(a0), t1 = _mm512_reduce_add_ps(a1);
  t2 = _mm512_reduce_add_ps(a2), t3 = _mm512_reduce_add_ps(a3);
#endif
  for (; k < K; ++k) {
    t0 += x0[k] * w[k];
    t1 += x1[k] * w[k];
    t2 += x2[k] * w[k];
    t3 += x3[k] * w[k];
  }
  s[0] = t0, s[1] = t1, s[2] = t2, s[3] = t3;
}

inline float dot1(const float* x, const float* w, int64_t K) {
  int64_t k = 0;
  float t = 0.0f;
#ifdef __AVX512F__
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;  // two chains hide the FMA latency
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
  }
  t = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; k < K; ++k) t += x[k] * w[k];
  return t;
}

template <typename w_t, typename out_t>
void direct_linear(const float* x, int64_t M, int64_t K, const w_t* w, int64_t N, const float* col_scale,
                   const float* bias, out_t* out) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(K));
    float* wr = row.data();
    for (int64_t n = begin; n < end; ++n) {
      const w_t* wn = w + n * K;
      widen_row(wn, K, wr);
      auto store = [&](int64_t m, float s) {
        if (col_scale) s = s * col_scale[n];
        if (bias) s = s + bias[n];
        out[m * N + n] = static_cast<out_t>(s);
      };
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {  // four rows share each load of wr
        const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        float s[4];
        dot4(x0, x1, x2, x3, wr, K, s);
        store(m, s[0]), store(m + 1, s[1]), store(m + 2, s[2]), store(m + 3, s[3]);
      }
      for (; m < M; ++m) {
        const float* xm = x + m * K;
        store(m, dot1(xm, wr, K));
      }
    }
  });
}

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

  if (M <= kDirectRows && w.stride(1) == 1 && w.stride(0) == K) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "direct_linear_out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_SWITCH(w.scalar_type(), "direct_linear_w",
          AT_DISPATCH_CASE(at::kChar, [&] {
            direct_linear<int8_t, out_t>(xf.const_data_ptr<float>(), M, K, w.const_data_ptr<int8_t>(), N, sp, bp,
                                         out.mutable_data_ptr<out_t>());
          })
          AT_DISPATCH_CASE(at::kHalf, [&] {
            direct_linear<at::Half, out_t>(xf.const_data_ptr<float>(), M, K, w.const_data_ptr<at::Half>(), N, sp,
                                           bp, out.mutable_data_ptr<out_t>());
          })
          AT_DISPATCH_CASE(at::kBFloat16, [&] {
            direct_linear<at::BFloat16, out_t>(xf.const_data_ptr<float>(), M, K, w.const_data_ptr<at::BFloat16>(),
                                               N, sp, bp, out.mutable_data_ptr<out_t>());
          }));
    });
    return out;
  }

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
  m.impl("int8_mm_kernel", &int8_mm_cpu);
  m.impl("int8_weight_only_linear_kernel", &int8_weight_only_linear_cpu);
  m.impl("fp16_linear_kernel", &fp16_linear_cpu);
}

}  // namespace memkern
