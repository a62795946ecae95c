// Host-side entry point of the top-k distillation-loss CUDA kernel (torch-free; see launchers.h).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "kd_launchers.h"

namespace memkern::cuda {

// The most top-k entries a row may have on this kernel (its buckets live in shared memory);
// memkern/ops/kd_topk_ops.py sends larger k to Triton.
constexpr int64_t kTopkMaxK = 1024;

// Per-row loss of (rows x V) student logits (row stride in elements, unit column stride)
// against the teacher's (rows x k) fp32 log-probabilities at int64 indices (both
// contiguous) into loss (rows, fp32), and grad_scale * row_scale[r] * d loss_r / d s_r into
// grad (which may alias s) when grad is not null. labels and row_scale may be null.
// covers_vocab: k == V (no tail bucket). See csrc/cpu/kd_topk.cpp for the arithmetic.
cudaError_t launch_kd_topk_rows(const void* s, FloatKind s_kind, int64_t s_stride, const float* lp,
                                const int64_t* idx, int64_t k, const int64_t* labels, const float* row_scale,
                                void* grad, FloatKind g_kind, int64_t g_stride, float* loss, int64_t rows,
                                int64_t V, const KDParams& params, cudaStream_t stream);

}  // namespace memkern::cuda
