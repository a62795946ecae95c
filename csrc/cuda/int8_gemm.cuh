// Device code of the int8 x int8 -> int32 tensor-core GEMM with the fused dequant/bias
// epilogue (no torch headers).
//
// Tiles: a block computes 128 x 128 outputs with 8 warps (2 x 4), each warp 64 x 32 as
// 4 x 4 mma.sync.m16n8k32 tiles, stepping K by 64 bytes through shared memory. Shared rows
// are padded to 80 bytes (20 words), which puts the 32 lanes' 4-byte fragment loads
// (8 rows x 4 words) on 32 different banks. Global loads are 16-byte vectors when K and
// both base pointers allow it, byte loads with zero fill at the edges otherwise, so any
// M, N and K (including K = 1 or not a multiple of 16) is computed exactly; past
// kExactChunkK the int32 accumulators are emptied into int64 ones (see there).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace memkern::cuda {

constexpr int kGemmBM = 128;
constexpr int kGemmBN = 128;
constexpr int kGemmBK = 64;
constexpr int kGemmThreads = 256;
constexpr int kSmemStride = kGemmBK + 16;  // bytes per shared row
static_assert(kGemmBM == kGemmBN, "load_tile copies both operands' tiles with one row count");
static_assert(kGemmThreads == 8 * 32 && kGemmBM == 2 * 64 && kGemmBN == 4 * 32, "2 x 4 warps of 64 x 32");

// The longest stretch of K whose int8 x int8 products always sum inside int32: quantised
// activations are at most 127 in magnitude and weights at most 128 (-128 is accepted), and
// 2^17 * 127 * 128 < 2^31. Longer rows (kLongK) add the int32 sums of each stretch in
// int64, so the exact sum rounds once to float32, as in the reference. The same length as
// kExactChunkK in csrc/cpu/int8_linear.cpp and EXACT_CHUNK_K in memkern/kernels/int8.py.
constexpr int64_t kExactChunkK = int64_t{1} << 17;
static_assert(kExactChunkK % kGemmBK == 0, "int32 partial sums end on a K step");

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A warp's 4 x 4 mma tiles of 4 accumulators each, set to zero (in registers: unrolled).
template <typename T>
__device__ __forceinline__ void zero_fragments(T (&frag)[4][4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) frag[i][j][r] = 0;
}

__device__ __forceinline__ void mma_s8_m16n8k32(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copy a (rows x 64) byte tile whose rows start ld bytes apart into shared memory,
// zero-filling everything outside (row_limit, k_limit).
template <bool kVec>
__device__ __forceinline__ void load_tile(uint8_t* smem, const int8_t* __restrict__ g, int64_t ld, int64_t row0,
                                          int64_t row_limit, int64_t k0, int64_t k_limit) {
  constexpr int kChunks = kGemmBM * kGemmBK / 16;  // 16-byte chunks per tile
  for (int c = threadIdx.x; c < kChunks; c += kGemmThreads) {
    const int r = c / (kGemmBK / 16);
    const int col = (c % (kGemmBK / 16)) * 16;
    const int64_t row = row0 + r;
    const int64_t k = k0 + col;
    uint8_t* dst = smem + r * kSmemStride + col;
    if (kVec && row < row_limit && k + 16 <= k_limit) {
      *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(g + row * ld + k);
    } else {
      for (int i = 0; i < 16; ++i)
        dst[i] = (row < row_limit && k + i < k_limit) ? static_cast<uint8_t>(g[row * ld + k + i]) : uint8_t{0};
    }
  }
}

template <typename OutT, bool kVec, bool kLongK>
__global__ void __launch_bounds__(kGemmThreads)
int8_linear_gemm_kernel(const int8_t* __restrict__ xq, const float* __restrict__ x_scale,
                        const int8_t* __restrict__ wq, int64_t ldw, const float* __restrict__ w_scale,
                        const float* __restrict__ bias, OutT* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  __shared__ __align__(16) uint8_t As[kGemmBM * kSmemStride];
  __shared__ __align__(16) uint8_t Bs[kGemmBN * kSmemStride];

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemmBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kGemmBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm*64.., cols wn*32..
  const int g = lane / 4, t = lane % 4;    // mma fragment coordinates

  int32_t acc[4][4][4];
  zero_fragments(acc);
  // K > kExactChunkK only: the int64 sum of acc's stretches. ptxas for sm_90: 240
  // registers a thread and no spill with it, 98-105 in the instantiations without it.
  int64_t total[4][4][4];
  if constexpr (kLongK) {
    zero_fragments(total);
  }

  for (int64_t k0 = 0; k0 < K; k0 += kGemmBK) {
    load_tile<kVec>(As, xq, K, m0, M, k0, K);
    load_tile<kVec>(Bs, wq, ldw, n0, N, k0, K);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kGemmBK; ks += 32) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint8_t* base = As + (wm * 64 + i * 16 + g) * kSmemStride + ks + t * 4;
        a[i][0] = *reinterpret_cast<const uint32_t*>(base);
        a[i][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kSmemStride);
        a[i][2] = *reinterpret_cast<const uint32_t*>(base + 16);
        a[i][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kSmemStride + 16);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint8_t* base = Bs + (wn * 32 + j * 8 + g) * kSmemStride + ks + t * 4;
        b[j][0] = *reinterpret_cast<const uint32_t*>(base);
        b[j][1] = *reinterpret_cast<const uint32_t*>(base + 16);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8_m16n8k32(acc[i][j], a[i], b[j]);
    }
    __syncthreads();
    if constexpr (kLongK) {
      if ((k0 + kGemmBK) % kExactChunkK == 0 || k0 + kGemmBK >= K) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              total[i][j][r] += acc[i][j][r];
              acc[i][j][r] = 0;
            }
      }
    }
  }

  // Epilogue: c0, c1 at (g, 2t + {0, 1}), c2, c3 at (g + 8, 2t + {0, 1}) of each 16 x 8 tile.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = m0 + wm * 64 + i * 16 + g + half * 8;
      if (row >= M) continue;
      const float xs = x_scale[row];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = n0 + wn * 32 + j * 8 + t * 2 + e;
          if (col >= N) continue;
          const float sum = kLongK ? static_cast<float>(total[i][j][half * 2 + e])
                                   : static_cast<float>(acc[i][j][half * 2 + e]);
          float v = sum * (xs * w_scale[col]);
          if (bias != nullptr) v += bias[col];
          store_out(out + row * N + col, v);
        }
      }
    }
  }
}

}  // namespace memkern::cuda
