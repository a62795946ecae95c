// CUDA registration of quantize_rowwise_kernel: check tensors, pick the stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/torch_utils.h"

namespace memkern {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "quantize_rowwise: x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.is_cuda(), "quantize_rowwise: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  auto scale = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_launch(cuda::launch_quantize_rowwise(x.const_data_ptr(), float_kind(x, "quantize_rowwise", "x"),
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
