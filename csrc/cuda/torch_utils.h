// Helpers shared by the CUDA registration files (*_ops.cpp): compiled in CUDA builds only.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "cuda/launchers.h"

namespace memkern {

inline cuda::FloatKind float_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::FloatKind::f32;
    case at::kHalf: return cuda::FloatKind::f16;
    case at::kBFloat16: return cuda::FloatKind::bf16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace memkern
