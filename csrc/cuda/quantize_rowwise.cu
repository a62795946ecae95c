// Launcher for quantize_rowwise_kernel (torch-free; see launchers.h).
#include "launchers.h"
#include "quantize_rowwise.cuh"

namespace memkern::cuda {

template <typename T>
static cudaError_t launch_typed(const void* x, int64_t rows, int64_t cols, int64_t row_stride,
                                int64_t col_stride, int8_t* q, float* scale, cudaStream_t stream) {
  constexpr int kThreads = 256;
  if (rows == 0) return cudaSuccess;
  // gridDim.x allows 2^31 - 1 blocks: far beyond any row count a tensor can hold here.
  quantize_rowwise_kernel<T, kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(x), cols, row_stride, col_stride, q, scale);
  return cudaGetLastError();
}

cudaError_t launch_quantize_rowwise(const void* x, FloatKind kind, int64_t rows, int64_t cols,
                                    int64_t row_stride, int64_t col_stride, int8_t* q,
                                    float* scale, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::f32:
      return launch_typed<float>(x, rows, cols, row_stride, col_stride, q, scale, stream);
    case FloatKind::f16:
      return launch_typed<__half>(x, rows, cols, row_stride, col_stride, q, scale, stream);
    case FloatKind::bf16:
      return launch_typed<__nv_bfloat16>(x, rows, cols, row_stride, col_stride, q, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memkern::cuda
