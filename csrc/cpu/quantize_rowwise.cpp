// CPU kernel for memkern::quantize_rowwise_kernel: symmetric absmax int8 per row.
//
// One pass reads the row for its absmax, a second writes q (quantize_row.h, the same
// arithmetic as reference.py, bit for bit); rows run in parallel on ATen's thread pool.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "cpu/quantize_row.h"

namespace memkern {
namespace {

template <typename scalar_t>
void quantize_rows(const scalar_t* x, int64_t rows, int64_t cols, int64_t row_stride,
                   int64_t col_stride, int8_t* q, float* scale) {
  // ~16K elements per task keeps the threads busy without paying for tiny tasks.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      scale[r] = quantize_row(x + r * row_stride, cols, col_stride, 0, reinterpret_cast<uint8_t*>(q + r * cols));
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "quantize_rowwise: x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "quantize_rowwise: x must be a CPU tensor");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto q = at::empty({rows, cols}, x.options().dtype(at::kChar));
  auto scale = at::empty({rows}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rowwise", [&] {
    quantize_rows<scalar_t>(x.const_data_ptr<scalar_t>(), rows, cols, x.stride(0), x.stride(1),
                            q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>());
  });
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("quantize_rowwise_kernel", &quantize_rowwise_cpu);
}

}  // namespace memkern
