// Launcher of the int8 tensor-core GEMM with fused epilogue (torch-free; see
// lowp_launchers.h).
#include <type_traits>

#include "int8_gemm.cuh"
#include "lowp_launchers.h"

namespace memkern::cuda {

template <typename OutT>
static cudaError_t launch_typed(const int8_t* x_q, const float* x_scale, const int8_t* w_q, int64_t ldw,
                                const float* w_scale, const float* bias, void* out, int64_t M, int64_t N,
                                int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t grid_m = (M + kGemmBM - 1) / kGemmBM;
  if (grid_m > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y: M > 8.3M rows
  const dim3 grid(static_cast<unsigned>((N + kGemmBN - 1) / kGemmBN), static_cast<unsigned>(grid_m));
  // 16-byte vector loads need every row start 16-byte aligned.
  const bool vec = K % 16 == 0 && ldw % 16 == 0 && reinterpret_cast<uintptr_t>(x_q) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(w_q) % 16 == 0;
  auto* o = static_cast<OutT*>(out);
  auto launch = [&](auto vec_tag, auto long_k_tag) {
    int8_linear_gemm_kernel<OutT, decltype(vec_tag)::value, decltype(long_k_tag)::value>
        <<<grid, kGemmThreads, 0, stream>>>(x_q, x_scale, w_q, ldw, w_scale, bias, o, M, N, K);
  };
  // Rows longer than kExactChunkK add int32 partial sums in int64 (int8_gemm.cuh).
  const bool long_k = K > kExactChunkK;
  if (vec && long_k) launch(std::true_type{}, std::true_type{});
  else if (vec) launch(std::true_type{}, std::false_type{});
  else if (long_k) launch(std::false_type{}, std::true_type{});
  else launch(std::false_type{}, std::false_type{});
  return cudaGetLastError();
}

cudaError_t launch_int8_linear_gemm(const int8_t* x_q, const float* x_scale, const int8_t* w_q, int64_t ldw,
                                    const float* w_scale, const float* bias, void* out, FloatKind out_kind,
                                    int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  switch (out_kind) {
    case FloatKind::f32:
      return launch_typed<float>(x_q, x_scale, w_q, ldw, w_scale, bias, out, M, N, K, stream);
    case FloatKind::f16:
      return launch_typed<__half>(x_q, x_scale, w_q, ldw, w_scale, bias, out, M, N, K, stream);
    case FloatKind::bf16:
      return launch_typed<__nv_bfloat16>(x_q, x_scale, w_q, ldw, w_scale, bias, out, M, N, K, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memkern::cuda
