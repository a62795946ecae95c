// CUDA registration of int8_linear_kernel: check tensors, quantise x per row, run the
// int8 tensor-core GEMM with its fused epilogue, on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/lowp_launchers.h"
#include "cuda/torch_utils.h"

namespace memkern {
namespace {

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  constexpr const char* op = "int8_linear";
  TORCH_CHECK(x.dim() == 2 && w_q.dim() == 2 && x.size(1) == w_q.size(1), op,
              ": expected x (M, K) and w_q (N, K), got ", x.sizes(), " and ", w_q.sizes());
  TORCH_CHECK(x.is_cuda() && w_q.is_cuda() && w_scale.is_cuda(), op, ": tensors must be CUDA tensors");
  TORCH_CHECK(w_q.scalar_type() == at::kChar, op, ": w_q must be int8, got ", w_q.scalar_type());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w_q.size(0), op,
              ": w_scale must be float32 of shape (", w_q.size(0), ",)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = w_q.size(0);
  auto out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();

  auto x_q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  check_launch(cuda::launch_quantize_rowwise(x.const_data_ptr(), float_kind(x, op, "x"), M, K, x.stride(0),
                                             x.stride(1), x_q.mutable_data_ptr<int8_t>(),
                                             x_scale.mutable_data_ptr<float>(), stream),
               op);
  // The GEMM reads rows of w_q with unit column stride; a transposed view is copied once.
  const auto w = w_q.stride(1) == 1 ? w_q : w_q.contiguous();
  const auto ws = w_scale.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  check_launch(cuda::launch_int8_linear_gemm(x_q.const_data_ptr<int8_t>(), x_scale.const_data_ptr<float>(),
                                             w.const_data_ptr<int8_t>(), w.stride(0), ws.const_data_ptr<float>(),
                                             b.defined() ? b.const_data_ptr<float>() : nullptr,
                                             out.mutable_data_ptr(), float_kind(out, op, "out_dtype"), M, N, K,
                                             stream),
               op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CUDA, m) {
  m.impl("int8_linear_kernel", &int8_linear_cuda);
}

}  // namespace memkern
