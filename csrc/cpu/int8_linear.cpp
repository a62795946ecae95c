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
#include <cstdint>
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

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "int8_mm: expected a (M, K) and b (N, K) with the same K, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar,
              "int8_mm: a and b must be int8, got ", a.scalar_type(), " and ", b.scalar_type());
  const auto ac = a.contiguous();
  const auto bc = b.contiguous();
  auto c = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  int8_mm_rows(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), a.size(0), b.size(0), a.size(1),
               c.mutable_data_ptr<int32_t>());
  return c;
}

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
  auto out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;

  auto [x_q, x_scale] = quantize_rowwise(x);
  at::Tensor acc;
  const int64_t K = x.size(1);
  if (K < 2) {
    // torch 2.13's CPU _int_mm leaves its output uninitialised for K = 1 (N > 1): seen
    // with fill_uninitialized_memory, tests/test_lowp.py. K = 0 is cheaper here anyway.
    acc = int8_mm_cpu(x_q, w_q);
  } else {
    try {
      // oneDNN's s8s8s32 GEMM: ~4.4x the float32 GEMM at 512 x 4096 x 4096 on the AVX-512
      // VNNI machine of bench/NOTES.md. w_q.t() is a (K, N) view, no copy.
      acc = at::_int_mm(x_q, w_q.t());
    } catch (const c10::Error&) {
      acc = int8_mm_cpu(x_q, w_q);  // shapes or CPUs _int_mm refuses
    }
  }
  acc = acc.contiguous();
  const auto ws = w_scale.contiguous();
  const auto b = float_bias(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_linear_epilogue", [&] {
    epilogue_rows<int32_t, scalar_t>(acc.const_data_ptr<int32_t>(), N, M, N, x_scale.const_data_ptr<float>(),
                                     ws.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                                     out.mutable_data_ptr<scalar_t>(), N);
  });
  return out;
}

// ---- float32 accumulation from low-precision weights ------------------------------------

// Up to this many rows of x, each weight row is widened once into a per-thread float32
// buffer and dotted with every row of x: the weight is read exactly once (the decode case,
// bound by memory bandwidth). Above it, blocks of weight rows are widened and handed to the
// float32 GEMM.
constexpr int64_t kDirectRows = 8;
// Bytes of float32 weight widened at a time on the GEMM path (fits the L2 of a core pair).
constexpr int64_t kBlockBytes = 2 << 20;

template <typename w_t, typename out_t>
void direct_linear(const float* x, int64_t M, int64_t K, const w_t* w, int64_t N, const float* col_scale,
                   const float* bias, out_t* out) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(K));
    float* wr = row.data();
    for (int64_t n = begin; n < end; ++n) {
      const w_t* wn = w + n * K;
      for (int64_t k = 0; k < K; ++k) wr[k] = static_cast<float>(wn[k]);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < K; ++k) s += xm[k] * wr[k];
        if (col_scale) s = s * col_scale[n];
        if (bias) s = s + bias[n];
        out[m * N + n] = static_cast<out_t>(s);
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

  // GEMM path: widen a block of weight rows to float32, multiply, run the epilogue on the
  // block's output columns. Peak extra memory: one block (kBlockBytes) and its M x nb product.
  int64_t nb = std::max<int64_t>(16, kBlockBytes / (4 * std::max<int64_t>(K, 1)));
  nb = std::min(N, (nb + 15) / 16 * 16);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t cur = std::min(nb, N - n0);
    const auto wf = w.narrow(0, n0, cur).to(at::kFloat).contiguous();
    const auto acc = at::mm(xf, wf.t()).contiguous();  // M x cur, float32
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scaled_linear_epilogue", [&] {
      epilogue_rows<float, scalar_t>(acc.const_data_ptr<float>(), cur, M, cur, nullptr, sp ? sp + n0 : nullptr,
                                     bp ? bp + n0 : nullptr, out.mutable_data_ptr<scalar_t>() + n0, N);
    });
  }
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
