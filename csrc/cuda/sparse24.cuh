// Device code for the 2:4 compressed weight format (no torch headers). One thread owns one
// meta byte, i.e. two groups of 4 columns, so no two threads write the same byte.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace memkern::cuda::sparse24 {

template <typename T> __device__ __forceinline__ T zero();
template <> __device__ __forceinline__ float zero<float>() { return 0.0f; }
template <> __device__ __forceinline__ __half zero<__half>() { return __float2half(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ __half add(__half a, __half b) { return __hadd(a, b); }
__device__ __forceinline__ __nv_bfloat16 add(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }

template <typename T>
__global__ void compress_kernel(const T* __restrict__ w, const bool* __restrict__ mask, int64_t rows,
                                int64_t cols, T* __restrict__ values, uint8_t* __restrict__ meta) {
  const int64_t meta_cols = (cols + 7) / 8, groups = cols / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * meta_cols) return;
  const int64_t r = idx / meta_cols, byte_col = idx % meta_cols;
  uint8_t byte = 0;
  for (int half = 0; half < 2; ++half) {
    const int64_t g = 2 * byte_col + half;
    if (g >= groups) break;
    const int64_t base = r * cols + 4 * g;
    int pos[2] = {0, 0};
    int n = 0;
    for (int p = 0; p < 4 && n < 2; ++p)
      if (mask[base + p]) pos[n++] = p;
    // Free slots take the lowest positions not already kept (their value is 0).
    for (int p = 0; p < 4 && n < 2; ++p)
      if (!mask[base + p] && (n == 0 || pos[0] != p)) pos[n++] = p;
    if (pos[0] > pos[1]) {
      const int t = pos[0];
      pos[0] = pos[1];
      pos[1] = t;
    }
    for (int s = 0; s < 2; ++s) {
      const int64_t src = base + pos[s];
      values[r * (cols / 2) + 2 * g + s] = mask[src] ? w[src] : zero<T>();
    }
    byte |= static_cast<uint8_t>((pos[0] | (pos[1] << 2)) << (4 * half));
  }
  meta[idx] = byte;
}

template <typename T>
__global__ void decompress_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta, int64_t rows,
                                  int64_t cols, T* __restrict__ w) {
  const int64_t meta_cols = (cols + 7) / 8, groups = cols / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * meta_cols) return;
  const int64_t r = idx / meta_cols, byte_col = idx % meta_cols;
  const int byte = meta[idx];
  for (int half = 0; half < 2; ++half) {
    const int64_t g = 2 * byte_col + half;
    if (g >= groups) break;
    const int code = (byte >> (4 * half)) & 15;
    const int i0 = code & 3, i1 = code >> 2;
    T out[4] = {zero<T>(), zero<T>(), zero<T>(), zero<T>()};
    // A repeated position (only in hand-made meta) adds, as the CPU and Triton kernels do.
    out[i0] = add(out[i0], values[r * (cols / 2) + 2 * g]);
    out[i1] = add(out[i1], values[r * (cols / 2) + 2 * g + 1]);
    for (int p = 0; p < 4; ++p) w[r * cols + 4 * g + p] = out[p];
  }
}

}  // namespace memkern::cuda::sparse24
