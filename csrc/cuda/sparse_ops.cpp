// CUDA registration of the 2:4 compress/decompress kernels: check tensors, pick the stream,
// launch (the kernels are in sparse24.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/sparse_launchers.h"
#include "cuda/torch_utils.h"

namespace memkern {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse24_compress_cuda(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.dim() == 2 && weight.sizes() == mask.sizes(), "sparse24_compress: weight and mask must be ",
              "2-D of one shape, got ", weight.sizes(), " and ", mask.sizes());
  TORCH_CHECK(weight.is_cuda() && mask.device() == weight.device(),
              "sparse24_compress: weight and mask must be on one CUDA device");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "sparse24_compress: mask must be bool, got ", mask.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(cols % 4 == 0, "sparse24_compress: weight columns must be a multiple of 4, got ", cols);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  auto values = at::empty({rows, cols / 2}, w.options());
  auto meta = at::empty({rows, (cols + 7) / 8}, w.options().dtype(at::kByte));
  check_launch(cuda::launch_sparse24_compress(w.const_data_ptr(), m.const_data_ptr<bool>(),
                                              float_kind(w, "sparse24_compress", "weight"), rows, cols,
                                              values.mutable_data_ptr(), meta.mutable_data_ptr<uint8_t>(),
                                              c10::cuda::getCurrentCUDAStream()),
               "sparse24_compress");
  return {values, meta};
}

at::Tensor sparse24_decompress_cuda(const at::Tensor& values, const at::Tensor& meta, int64_t cols) {
  TORCH_CHECK(values.dim() == 2 && meta.dim() == 2, "sparse24_decompress: values and meta must be 2-D");
  TORCH_CHECK(cols % 4 == 0 && values.size(1) == cols / 2 && meta.size(1) == (cols + 7) / 8 &&
                  meta.size(0) == values.size(0) && meta.scalar_type() == at::kByte,
              "sparse24_decompress: expected values (rows, ", cols / 2, ") and uint8 meta (rows, ", (cols + 7) / 8,
              ") for cols=", cols, ", got ", values.sizes(), " and ", meta.sizes(), " ", meta.scalar_type());
  TORCH_CHECK(values.is_cuda() && meta.device() == values.device(),
              "sparse24_decompress: values and meta must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  auto w = at::empty({values.size(0), cols}, v.options());
  check_launch(cuda::launch_sparse24_decompress(v.const_data_ptr(), mt.const_data_ptr<uint8_t>(),
                                                float_kind(v, "sparse24_decompress", "values"), v.size(0), cols,
                                                w.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "sparse24_decompress");
  return w;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CUDA, m) {
  m.impl("sparse24_compress_kernel", &sparse24_compress_cuda);
  m.impl("sparse24_decompress_kernel", &sparse24_decompress_cuda);
}

}  // namespace memkern
