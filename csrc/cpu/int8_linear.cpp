// CPU kernels of memkern's int8 linear layers (memkern/ops/lowp.py):
//
//   int8_linear_kernel              W8A8 dynamic: quantise x per row, int8 x int8 -> int32,
//                                   acc * x_scale * w_scale + bias -> out. With AVX512-VNNI
//                                   one kernel does all three (the epilogue runs on each
//                                   tile as it leaves registers); with AVX2 but no VNNI,
//                                   the same in one AVX2 kernel (int8_avx2.h); otherwise
//                                   the quantize_rowwise kernel, torch._int_mm (oneDNN)
//                                   and a fused epilogue pass. Rows longer than kExactChunkK add
//                                   int32 partial sums in int64 (exact for any K).
//   int8_linear_packed_kernel       the same from the packed weight layout that
//                                   memkern.nn.Int8Linear keeps on the CPU (vpdpbusd's
//                                   operand order, written once at conversion).
//   int8_packed_kernel_native       whether this build reads the packed layout natively.
//   memkern_internal::int8_mm_kernel
//                                   the int8 GEMM alone (int32 accumulation, exact): the
//                                   VNNI kernel, or the portable loop used where _int_mm
//                                   refuses a shape or a CPU.
//
// The VNNI kernels are in int8_vnni.h ((N, K) weight) and int8_vnni_packed.h (packed
// weight); the epilogue's arithmetic is linear_epilogue.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/int8_avx2.h"
#include "cpu/int8_vnni.h"
#include "cpu/int8_vnni_packed.h"
#include "cpu/linear_epilogue.h"

namespace memkern {
namespace {

// The longest stretch of K whose int8 x int8 products always sum inside int32: quantised
// activations are at most 127 in magnitude and weights at most 128 (-128 is accepted), and
// 2^17 * 127 * 128 < 2^31 (133,144 = 2^31 / 127^2 would let a -128 weight wrap). Longer
// rows add int32 partial sums over stretches of this length in int64, so the exact sum
// rounds once to float32, as in the reference. The same length as kExactChunkK in
// csrc/cuda/int8_gemm.cuh and EXACT_CHUNK_K in memkern/kernels/int8.py.
constexpr int64_t kExactChunkK = int64_t{1} << 17;

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

#if defined(MEMKERN_AVX512_VNNI) || defined(MEMKERN_INT8_AVX2)
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
#elif defined(MEMKERN_INT8_AVX2)
  // Every M: torch._int_mm has no fast path on such a CPU (int8_avx2.h). int32 sums over
  // all of K, so longer rows take the int64 path below.
  if (K <= kExactChunkK)
    return run_fused_int8(x, w_q.contiguous(), ws, b, N, out_dtype, [](auto... args) { int8_linear_avx2(args...); });
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

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("int8_linear_kernel", &int8_linear_cpu);
  m.impl("int8_linear_packed_kernel", &int8_linear_packed_cpu);
}

TORCH_LIBRARY_IMPL(memkern, CompositeImplicitAutograd, m) {
  m.impl("int8_packed_kernel_native", &int8_packed_kernel_native);
}

TORCH_LIBRARY_IMPL(memkern_internal, CPU, m) {
  m.impl("int8_mm_kernel", &int8_mm_cpu);
}

}  // namespace memkern
