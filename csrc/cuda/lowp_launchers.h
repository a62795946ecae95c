// Host-side entry points of the low-precision CUDA kernels (torch-free; see launchers.h).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "launchers.h"  // FloatKind

namespace memkern::cuda {

// out[m, n] = (float)(x_q[m, :] . w_q[n, :]) * (x_scale[m] * w_scale[n]) + bias[n]
// x_q: (M, K) int8 row-major; w_q: (N, K) int8 with rows ldw elements apart (unit column
// stride); x_scale (M), w_scale (N) float32; bias (N) float32 or nullptr; out: (M, N)
// row-major of out_kind. The int8 product runs on tensor cores (mma.sync m16n8k32,
// int32 accumulation), the epilogue in float32 before the one store. sm_80 and newer.
cudaError_t launch_int8_linear_gemm(const int8_t* x_q, const float* x_scale, const int8_t* w_q, int64_t ldw,
                                    const float* w_scale, const float* bias, void* out, FloatKind out_kind,
                                    int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace memkern::cuda
