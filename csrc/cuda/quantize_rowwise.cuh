// Device code for symmetric absmax int8 quantisation per row (no torch headers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace memkern::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// One block per row: a block-wide absmax reduction, then each thread writes its columns.
// Division and rounding use the correctly rounded intrinsics (__fdiv_rn, rintf: round
// half to even) so the result is bit-identical to the CPU kernel and the reference.
template <typename T, int kThreads>
__global__ void quantize_rowwise_kernel(const T* __restrict__ x, int64_t cols, int64_t row_stride,
                                        int64_t col_stride, int8_t* __restrict__ q,
                                        float* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * row_stride;
  int8_t* qr = q + row * cols;

  float absmax = 0.0f;
  int nonfinite = 0;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const float a = fabsf(to_float(xr[c * col_stride]));
    nonfinite |= !(a <= 3.402823466e38f);  // inf or NaN
    absmax = fmaxf(absmax, a);
  }
  // Warp reduction, then one value per warp through shared memory.
  for (int offset = 16; offset > 0; offset >>= 1) {
    absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, offset));
    nonfinite |= __shfl_xor_sync(0xffffffffu, nonfinite, offset);
  }
  __shared__ float warp_max[kThreads / 32];
  __shared__ int warp_bad[kThreads / 32];
  __shared__ float row_scale;
  __shared__ int row_bad;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_max[warp] = absmax;
    warp_bad[warp] = nonfinite;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = 0.0f;
    int bad = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      m = fmaxf(m, warp_max[w]);
      bad |= warp_bad[w];
    }
    float s = __fdiv_rn(m, 127.0f);
    if (s == 0.0f) s = 1.0f;  // all-zero row, or a scale that underflows
    row_bad = bad;
    row_scale = bad ? __int_as_float(0x7fc00000) : s;  // NaN scale marks a non-finite row
    scale[row] = row_scale;
  }
  __syncthreads();
  const float s = row_scale;
  const int bad = row_bad;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    float v = bad ? 0.0f : rintf(__fdiv_rn(to_float(xr[c * col_stride]), s));
    v = fminf(127.0f, fmaxf(-127.0f, v));
    qr[c] = static_cast<int8_t>(v);
  }
}

}  // namespace memkern::cuda
