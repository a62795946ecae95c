// Launchers for the 2:4 compress/decompress kernels (torch-free; see sparse_launchers.h).
#include "sparse24.cuh"
#include "sparse_launchers.h"

namespace memkern::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

template <typename T>
cudaError_t compress_typed(const void* w, const bool* mask, int64_t rows, int64_t cols, void* values, uint8_t* meta,
                           cudaStream_t stream) {
  const int64_t threads = rows * ((cols + 7) / 8);
  if (threads == 0) return cudaSuccess;
  sparse24::compress_kernel<T><<<grid_for(threads), kThreads, 0, stream>>>(
      static_cast<const T*>(w), mask, rows, cols, static_cast<T*>(values), meta);
  return cudaGetLastError();
}

template <typename T>
cudaError_t decompress_typed(const void* values, const uint8_t* meta, int64_t rows, int64_t cols, void* w,
                             cudaStream_t stream) {
  const int64_t threads = rows * ((cols + 7) / 8);
  if (threads == 0) return cudaSuccess;
  sparse24::decompress_kernel<T><<<grid_for(threads), kThreads, 0, stream>>>(
      static_cast<const T*>(values), meta, rows, cols, static_cast<T*>(w));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse24_compress(const void* weight, const bool* mask, FloatKind kind, int64_t rows,
                                     int64_t cols, void* values, uint8_t* meta, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::f32: return compress_typed<float>(weight, mask, rows, cols, values, meta, stream);
    case FloatKind::f16: return compress_typed<__half>(weight, mask, rows, cols, values, meta, stream);
    case FloatKind::bf16: return compress_typed<__nv_bfloat16>(weight, mask, rows, cols, values, meta, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_sparse24_decompress(const void* values, const uint8_t* meta, FloatKind kind, int64_t rows,
                                       int64_t cols, void* weight, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::f32: return decompress_typed<float>(values, meta, rows, cols, weight, stream);
    case FloatKind::f16: return decompress_typed<__half>(values, meta, rows, cols, weight, stream);
    case FloatKind::bf16: return decompress_typed<__nv_bfloat16>(values, meta, rows, cols, weight, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memkern::cuda
