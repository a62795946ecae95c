// CPU kernel of memkern's 4-bit group-wise weight-only linear layer (memkern/ops/int4.py):
//
//   int4_weight_only_linear_kernel  y = x @ W^T + bias with W[n, k] = (q[n, k] - zero[n, g])
//                                   * scale[n, g], g = k / group_size, q the 4-bit codes
//                                   packed two a byte (low nibble: even k), float32
//                                   accumulation, y in x's dtype.
//
// The weight is dequantised in registers as it is read, never stored as float32: per byte
// vector, the codes widen to 32-bit lanes, the low nibbles (even k) and the high nibbles
// (odd k) each become one float vector, and each meets the matching half of x. So that no
// lane shuffle is needed, x is copied once per call into a "split" layout: per chunk of
// 2 * kLanes inputs, its even-k values, then its odd-k values (M x K floats of scratch).
// The order of the sum over k changes, nothing else.
//
// Up to kFusedRows rows of x, a tile of weight rows meets every row of x while it is in
// L1, so the 4-bit weight streams from memory once; weight rows are split across ATen's
// threads. Above, each task dequantises a block of weight rows to float32 (L2-sized, in
// the split k order) and multiplies it with the single-threaded float32 GEMM.
//
// Vector width, chosen at compile time (-march=native, setup.py):
//   AVX-512F  16 lanes; a group's 16 dequantised values are one register, and vpermps
//             looks them up by code (it reads only each lane's low 4 bits, so the low
//             nibble needs no mask): 5 instructions per 32 weights and row of x.
//   AVX2+FMA  8 lanes; code -> float, then one FMA applies scale and zero.
//   neither   the same loops on scalars (kLanes = 1: the split layout is x itself).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace memkern {
namespace {

#if defined(__AVX512F__)
struct Simd {
  static constexpr int kLanes = 16;
  static constexpr const char* kName = "avx512";
  using F = __m512;
  using I = __m512i;
  // The 16 dequantised values of one group, indexed by code.
  struct Table {
    __m512 values;
  };
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F broadcast(float v) { return _mm512_set1_ps(v); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  // kLanes packed bytes, one a 32-bit lane.
  static I load_codes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Table table(float scale, float zero) {
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(zero)), _mm512_set1_ps(scale))};
  }
  static F low(I q, const Table& t) { return _mm512_permutexvar_ps(q, t.values); }
  static F high(I q, const Table& t) { return _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t.values); }
  // The codes themselves as floats (one_row_tile scales per group).
  static F code_low(I q) { return _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))); }
  static F code_high(I q) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Simd {
  static constexpr int kLanes = 8;
  static constexpr const char* kName = "avx2";
  using F = __m256;
  using I = __m256i;
  // value = code * scale + offset, offset = -zero * scale.
  struct Table {
    __m256 scale, offset;
  };
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F broadcast(float v) { return _mm256_set1_ps(v); }
  static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static I load_codes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static Table table(float scale, float zero) { return {_mm256_set1_ps(scale), _mm256_set1_ps(-zero * scale)}; }
  static F low(I q, const Table& t) { return _mm256_fmadd_ps(code_low(q), t.scale, t.offset); }
  static F high(I q, const Table& t) { return _mm256_fmadd_ps(code_high(q), t.scale, t.offset); }
  static F code_low(I q) { return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15))); }
  static F code_high(I q) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)); }
};
#else
struct Simd {
  static constexpr int kLanes = 1;
  static constexpr const char* kName = "scalar";
  using F = float;
  using I = uint32_t;
  struct Table {
    float scale, zero;
  };
  static F zero() { return 0.0f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F broadcast(float v) { return v; }
  static float sum(F v) { return v; }
  static I load_codes(const uint8_t* p) { return *p; }
  static Table table(float scale, float zero) { return {scale, zero}; }
  static F low(I q, const Table& t) { return (static_cast<float>(q & 15u) - t.zero) * t.scale; }
  static F high(I q, const Table& t) { return (static_cast<float>(q >> 4) - t.zero) * t.scale; }
  static F code_low(I q) { return static_cast<float>(q & 15u); }
  static F code_high(I q) { return static_cast<float>(q >> 4); }
};
#endif

constexpr int64_t kLanes = Simd::kLanes;
constexpr int64_t kChunk = 2 * kLanes;  // inputs per packed-byte vector (kLanes bytes)

// Rows of x up to which the fused kernel runs (weights dequantised in registers, read
// once); above, dequantised blocks and the float32 GEMM (bench/NOTES.md, "int4").
constexpr int64_t kFusedRows = 64;
// Bytes of float32 weight one task of the GEMM path dequantises at a time (L2-resident
// while the GEMM reads it).
constexpr int64_t kBlockBytes = 1 << 20;

// The problem, with K split into chunks: chunks = ceil(K / kChunk), each row of the split
// x is chunks * kChunk floats (zero past K).
struct Problem {
  int64_t M, N, K, chunks, group_chunks, groups, row_bytes;
  const uint8_t* w;     // (N, row_bytes) packed codes
  const float* scales;  // (N, groups)
  const float* zeros;   // (N, groups)
  const float* bias;    // (N,) or nullptr
  const float* xs;      // (M, chunks * kChunk) split x
  int64_t full_chunks;  // chunks whose kLanes bytes all lie inside a weight row
};

// x (any strides and float dtype) into the split layout, float32.
template <typename x_t>
void split_x(const x_t* x, int64_t M, int64_t K, int64_t s0, int64_t s1, int64_t chunks, float* out) {
  const int64_t width = chunks * kChunk;
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* o = out + m * width;
      std::fill(o, o + width, 0.0f);
      const x_t* xm = x + m * s0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = k % kChunk;
        o[k - r + (r & 1) * kLanes + r / 2] = static_cast<float>(xm[k * s1]);
      }
    }
  });
}

// The row's last chunk when it holds fewer than kLanes bytes (odd K, or K not a multiple
// of kChunk): copied into `tail`, zero past the row's end, so no load reads past it.
inline const uint8_t* tail_bytes(const Problem& p, const uint8_t* row, uint8_t* tail) {
  const int64_t c = p.full_chunks;
  std::memset(tail, 0, kLanes);
  std::memcpy(tail, row + c * kLanes, static_cast<size_t>(p.row_bytes - c * kLanes));
  return tail;
}

// Calls step(c, bytes) for every chunk c of group g of the rows `w` (NR of them), bytes[j]
// the kLanes packed bytes of row j. The partial last chunk (copied) is kept out of the
// loop over full chunks: a function call inside it made GCC keep every accumulator on the
// stack (all vector registers are caller-saved), 4x slower.
template <int NR, typename Step>
inline void for_each_chunk(const Problem& p, const uint8_t* const* w, int64_t g, Step&& step) {
  const int64_t c0 = g * p.group_chunks, c1 = std::min(p.chunks, c0 + p.group_chunks);
  const int64_t full_end = std::min(c1, p.full_chunks);
  for (int64_t c = c0; c < full_end; ++c) {
    const uint8_t* bytes[NR];
    for (int j = 0; j < NR; ++j) bytes[j] = w[j] + c * kLanes;
    step(c, bytes);
  }
  if (full_end < c1) {
    alignas(64) uint8_t tail[NR][kLanes];
    const uint8_t* bytes[NR];
    for (int j = 0; j < NR; ++j) bytes[j] = tail_bytes(p, w[j], tail[j]);
    step(full_end, bytes);
  }
}

// sums[i][j] = sum_k x[m0 + i, k] * W[rows[j], k] for MR rows of x and NR weight rows,
// MR x NR accumulators, each weight vector dequantised once for all MR rows.
template <int MR, int NR>
void fused_tile(const Problem& p, int64_t m0, const int64_t* rows, float sums[][NR]) {
  typename Simd::F acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = Simd::zero();
  const int64_t width = p.chunks * kChunk;
  const float* x = p.xs + m0 * width;
  const uint8_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = p.w + rows[j] * p.row_bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    typename Simd::Table table[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t at = rows[j] * p.groups + g;
      table[j] = Simd::table(p.scales[at], p.zeros[at]);
    }
    for_each_chunk<NR>(p, w, g, [&](int64_t c, const uint8_t* const* bytes) __attribute__((always_inline)) {
      for (int j = 0; j < NR; ++j) {
        const auto q = Simd::load_codes(bytes[j]);
        const auto lo = Simd::low(q, table[j]);
        const auto hi = Simd::high(q, table[j]);
        for (int i = 0; i < MR; ++i) {
          const float* xc = x + i * width + c * kChunk;
          acc[i][j] = Simd::fma(Simd::load(xc), lo, acc[i][j]);
          acc[i][j] = Simd::fma(Simd::load(xc + kLanes), hi, acc[i][j]);
        }
      }
    });
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) sums[i][j] = Simd::sum(acc[i][j]);
}

// One row of x (decode) against NR weight rows, with scale and zero applied once per group
// instead of per weight: sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k), the
// group's sum of x (xsum) computed once per call. Per kLanes bytes (2 * kLanes weights)
// that leaves the widening load, the nibble split, two conversions and two FMAs; the low
// and high nibbles feed separate accumulators, so each chunk's two FMAs are independent.
// Against fused_tile<1, NR> (bench/NOTES.md, "decode"): its two dequantising FMAs per
// chunk and one chain through both halves made a single row compute-bound well below the
// weight's memory rate.
template <int NR>
void one_row_tile(const Problem& p, const float* xsum, const int64_t* rows, float sums[]) {
  typename Simd::F acc[NR];
  float offset[NR] = {};
  for (int j = 0; j < NR; ++j) acc[j] = Simd::zero();
  const uint8_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = p.w + rows[j] * p.row_bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    typename Simd::F lo_acc[NR], hi_acc[NR];
    for (int j = 0; j < NR; ++j) lo_acc[j] = hi_acc[j] = Simd::zero();
    for_each_chunk<NR>(p, w, g, [&](int64_t c, const uint8_t* const* bytes) __attribute__((always_inline)) {
      const auto x_lo = Simd::load(p.xs + c * kChunk);
      const auto x_hi = Simd::load(p.xs + c * kChunk + kLanes);
      for (int j = 0; j < NR; ++j) {
        const auto q = Simd::load_codes(bytes[j]);
        lo_acc[j] = Simd::fma(x_lo, Simd::code_low(q), lo_acc[j]);
        hi_acc[j] = Simd::fma(x_hi, Simd::code_high(q), hi_acc[j]);
      }
    });
    for (int j = 0; j < NR; ++j) {
      const int64_t at = rows[j] * p.groups + g;
      const float scale = p.scales[at];
      acc[j] = Simd::fma(Simd::add(lo_acc[j], hi_acc[j]), Simd::broadcast(scale), acc[j]);
      offset[j] += scale * p.zeros[at] * xsum[g];
    }
  }
  for (int j = 0; j < NR; ++j) sums[j] = Simd::sum(acc[j]) - offset[j];
}

// Tile shapes: MR rows of x against NR weight rows, MR x NR accumulators plus NR
// dequantised pairs in registers (16 ymm with AVX2, 32 zmm with AVX-512). One row of x
// takes more weight rows so that several independent accumulators hide the FMA latency.
constexpr int kTileRows = 4;
constexpr int kOneRowCols = kLanes >= 16 ? 8 : 4;
constexpr int kTileCols = kLanes >= 16 ? 4 : 2;

template <int NR, typename out_t>
void fused_rows(const Problem& p, out_t* out) {
  const int64_t tiles = (p.N + NR - 1) / NR;
  // >= ~64K weights a task: scheduling stays small beside the work.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(NR * p.K * std::max<int64_t>(p.M, 1), 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NR;
      const int count = static_cast<int>(std::min<int64_t>(NR, p.N - n0));
      int64_t rows[NR];
      for (int j = 0; j < NR; ++j) rows[j] = std::min(n0 + j, p.N - 1);  // past N: repeat the last row
      for (int64_t m0 = 0; m0 < p.M; m0 += kTileRows) {
        float sums[kTileRows][NR];
        switch (std::min<int64_t>(kTileRows, p.M - m0)) {
          case 4: fused_tile<4, NR>(p, m0, rows, sums); break;
          case 3: fused_tile<3, NR>(p, m0, rows, sums); break;
          case 2: fused_tile<2, NR>(p, m0, rows, sums); break;
          default: fused_tile<1, NR>(p, m0, rows, sums); break;
        }
        const int64_t mr = std::min<int64_t>(kTileRows, p.M - m0);
        for (int64_t i = 0; i < mr; ++i)
          for (int j = 0; j < count; ++j) {
            const float v = p.bias ? sums[i][j] + p.bias[n0 + j] : sums[i][j];
            out[(m0 + i) * p.N + n0 + j] = static_cast<out_t>(v);
          }
      }
    }
  });
}

// M = 1: one_row_tile over tiles of kOneRowCols weight rows, one contiguous range of
// tiles per thread.
template <typename out_t>
void one_row(const Problem& p, out_t* out) {
  constexpr int NR = kOneRowCols;
  std::vector<float> xsum(static_cast<size_t>(p.groups), 0.0f);  // zero past K: the split x is
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t c1 = std::min(p.chunks, (g + 1) * p.group_chunks);
    for (int64_t i = g * p.group_chunks * kChunk; i < c1 * kChunk; ++i) xsum[g] += p.xs[i];
  }
  const int64_t tiles = (p.N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, (tiles + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NR;
      int64_t rows[NR];
      for (int j = 0; j < NR; ++j) rows[j] = std::min(n0 + j, p.N - 1);  // past N: repeat the last row
      float sums[NR];
      one_row_tile<NR>(p, xsum.data(), rows, sums);
      for (int j = 0; j < NR && n0 + j < p.N; ++j)
        out[n0 + j] = static_cast<out_t>(p.bias ? sums[j] + p.bias[n0 + j] : sums[j]);
    }
  });
}

// Weight row n, dequantised into the split k order: chunks * kChunk floats.
void dequantize_row(const Problem& p, int64_t n, float* out) {
  const uint8_t* row = p.w + n * p.row_bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    const auto table = Simd::table(p.scales[n * p.groups + g], p.zeros[n * p.groups + g]);
    for_each_chunk<1>(p, &row, g, [&](int64_t c, const uint8_t* const* bytes) __attribute__((always_inline)) {
      const auto q = Simd::load_codes(bytes[0]);
      Simd::store(out + c * kChunk, Simd::low(q, table));
      Simd::store(out + c * kChunk + kLanes, Simd::high(q, table));
    });
  }
}

// M > kFusedRows: per task, blocks of weight rows dequantised (split order, against the
// split x) and one single-threaded float32 GEMM each (ATen runs nested parallel work
// serially), the bias added as the block's columns are stored.
template <typename out_t>
void blocked_gemm(const Problem& p, out_t* out) {
  const int64_t width = p.chunks * kChunk;
  const at::Tensor xs = at::from_blob(const_cast<float*>(p.xs), {p.M, width}, at::kFloat);
  const int64_t nb = std::min(p.N, std::max<int64_t>(16, kBlockBytes / (4 * std::max<int64_t>(width, 1))));
  const int64_t blocks = (p.N + nb - 1) / nb;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor wf = at::empty({nb, width}, at::kFloat);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * nb, cur = std::min(nb, p.N - n0);
      for (int64_t j = 0; j < cur; ++j) dequantize_row(p, n0 + j, wf.mutable_data_ptr<float>() + j * width);
      const at::Tensor acc = at::mm(xs, wf.narrow(0, 0, cur).t()).contiguous();  // M x cur
      const float* a = acc.const_data_ptr<float>();
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t j = 0; j < cur; ++j) {
          const float v = p.bias ? a[m * cur + j] + p.bias[n0 + j] : a[m * cur + j];
          out[m * p.N + n0 + j] = static_cast<out_t>(v);
        }
    }
  });
}

at::Tensor int4_weight_only_linear_cpu(const at::Tensor& x, const at::Tensor& w_int4, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size,
                                       const std::optional<at::Tensor>& bias) {
  const char* op = "int4_weight_only_linear";
  TORCH_CHECK(x.dim() == 2, op, ": expected x (M, K), got ", x.sizes());
  TORCH_CHECK(group_size > 0 && group_size % kChunk == 0 && group_size % 32 == 0, op,
              ": group_size must be a positive multiple of 32, got ", group_size);
  const int64_t M = x.size(0), K = x.size(1), N = w_int4.size(0);
  const int64_t groups = (K + group_size - 1) / group_size, row_bytes = (K + 1) / 2;
  TORCH_CHECK(w_int4.scalar_type() == at::kByte && w_int4.dim() == 2 && w_int4.size(1) == row_bytes, op,
              ": w_int4 must be uint8 of shape (N, ", row_bytes, "), got ", w_int4.scalar_type(), " ", w_int4.sizes());
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == N && t->size(1) == groups, op,
                ": scales and zeros must be float32 of shape (", N, ", ", groups, "), got ", t->scalar_type(), " ",
                t->sizes());
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  const auto w = w_int4.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros.contiguous();
  const auto b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  std::vector<float> xs(static_cast<size_t>(M * chunks * kChunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int4_split_x", [&] {
    split_x(x.const_data_ptr<scalar_t>(), M, K, x.stride(0), x.stride(1), chunks, xs.data());
  });
  const Problem p{M, N, K, chunks, group_size / kChunk, groups, row_bytes,
                  w.const_data_ptr<uint8_t>(), s.const_data_ptr<float>(), z.const_data_ptr<float>(),
                  b.defined() ? b.const_data_ptr<float>() : nullptr, xs.data(), row_bytes / kLanes};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "int4_weight_only_linear", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (M > kFusedRows) {
      blocked_gemm(p, o);
    } else if (M == 1) {
      one_row(p, o);
    } else {
      fused_rows<kTileCols>(p, o);
    }
  });
  return out;
}

// Which vector path this build compiled: "avx512", "avx2" or "scalar".
std::string int4_kernel_simd() { return Simd::kName; }

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("int4_weight_only_linear_kernel", &int4_weight_only_linear_cpu);
}

TORCH_LIBRARY_IMPL(memkern, CompositeImplicitAutograd, m) {
  m.impl("int4_kernel_simd", &int4_kernel_simd);
}

}  // namespace memkern
