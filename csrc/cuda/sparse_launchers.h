// Host-side entry points of the sparse family's CUDA kernels (2:4 compress/decompress).
// Torch-free, like launchers.h; the torch-facing checks live in sparse_ops.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "cuda/launchers.h"  // FloatKind

namespace memkern::cuda {

// 2:4 compression of a contiguous (rows x cols) weight under a contiguous bool mask that keeps
// at most 2 of every 4 columns (cols % 4 == 0). Writes values (rows x cols/2) and meta
// (rows x ceil(cols/8) bytes); the format is described in csrc/cpu/sparse24.cpp.
cudaError_t launch_sparse24_compress(const void* weight, const bool* mask, FloatKind kind, int64_t rows,
                                     int64_t cols, void* values, uint8_t* meta, cudaStream_t stream);

// The dense (rows x cols) weight of contiguous values and meta.
cudaError_t launch_sparse24_decompress(const void* values, const uint8_t* meta, FloatKind kind, int64_t rows,
                                       int64_t cols, void* weight, cudaStream_t stream);

}  // namespace memkern::cuda
