// CUDA registrations: check tensors, pick the current stream, call the torch-free launchers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launchers.h"

namespace memkern {
namespace {

cuda::FloatKind float_kind(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::FloatKind::f32;
    case at::kHalf: return cuda::FloatKind::f16;
    case at::kBFloat16: return cuda::FloatKind::bf16;
    default:
      TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "quantize_rowwise: x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_cuda(), "quantize_rowwise: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  auto scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(cuda::launch_quantize_rowwise(x.const_data_ptr(), float_kind(x, "quantize_rowwise"),
                                             x.size(0), x.size(1), x.stride(0), x.stride(1),
                                             q.mutable_data_ptr<int8_t>(),
                                             scale.mutable_data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()),
               "quantize_rowwise");
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CUDA, m) {
  m.impl("quantize_rowwise_kernel", &quantize_rowwise_cuda);
}

}  // namespace memkern
