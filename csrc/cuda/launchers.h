// Host-side entry points of memkern's CUDA kernels.
//
// The .cu files that implement these include no torch header, so nvcc can compile-check
// them for sm_80/sm_90 on any machine with nvcc (tests/test_cuda_compile.py, the CMake
// target memkern_cuda_check). The torch-facing code that checks tensors and picks the
// stream lives in the *_ops.cpp files, compiled only in CUDA builds. Each op family
// declares its launchers in a header of its own (this one: FloatKind and quantize).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace memkern::cuda {

enum class FloatKind { f32, f16, bf16 };

// Symmetric absmax int8 per row of a (rows x cols) matrix with arbitrary strides (in
// elements). Writes q (rows x cols, contiguous) and scale (rows).
cudaError_t launch_quantize_rowwise(const void* x, FloatKind kind, int64_t rows, int64_t cols,
                                    int64_t row_stride, int64_t col_stride, int8_t* q,
                                    float* scale, cudaStream_t stream);

}  // namespace memkern::cuda
