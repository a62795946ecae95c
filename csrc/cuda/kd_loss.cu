// Launcher for kd_loss_rows (torch-free; see kd_launchers.h).
#include "kd_launchers.h"
#include "kd_loss.cuh"

namespace memkern::cuda {
namespace {

constexpr int kThreads = 512;  // 16 warps: a 128K-wide row is 250 elements per thread

template <typename S, typename T, typename G>
cudaError_t launch_typed(const void* s, int64_t s_stride, const void* t, int64_t t_stride,
                         const int64_t* labels, const float* row_scale, void* grad, int64_t g_stride,
                         float* loss, int64_t rows, int64_t V, const KDParams& p, cudaStream_t stream) {
  kd::kd_rows_kernel<S, T, G, kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const S*>(s), s_stride, static_cast<const T*>(t), t_stride, labels, row_scale,
      static_cast<G*>(grad), g_stride, loss, V, p);
  return cudaGetLastError();
}

template <typename S, typename T>
cudaError_t dispatch_grad(const void* s, int64_t s_stride, const void* t, int64_t t_stride,
                          const int64_t* labels, const float* row_scale, void* grad, FloatKind g_kind,
                          int64_t g_stride, float* loss, int64_t rows, int64_t V, const KDParams& p,
                          cudaStream_t stream) {
  // The gradient is in the student's dtype, or fp32 (a float32 buffer for a low-precision student).
  if (g_kind == FloatKind::f32)
    return launch_typed<S, T, float>(s, s_stride, t, t_stride, labels, row_scale, grad, g_stride, loss,
                                     rows, V, p, stream);
  return launch_typed<S, T, S>(s, s_stride, t, t_stride, labels, row_scale, grad, g_stride, loss, rows, V,
                               p, stream);
}

template <typename S>
cudaError_t dispatch_teacher(const void* s, int64_t s_stride, const void* t, FloatKind t_kind,
                             int64_t t_stride, const int64_t* labels, const float* row_scale, void* grad,
                             FloatKind g_kind, int64_t g_stride, float* loss, int64_t rows, int64_t V,
                             const KDParams& p, cudaStream_t stream) {
  switch (t_kind) {
    case FloatKind::f32:
      return dispatch_grad<S, float>(s, s_stride, t, t_stride, labels, row_scale, grad, g_kind, g_stride,
                                     loss, rows, V, p, stream);
    case FloatKind::f16:
      return dispatch_grad<S, __half>(s, s_stride, t, t_stride, labels, row_scale, grad, g_kind, g_stride,
                                      loss, rows, V, p, stream);
    case FloatKind::bf16:
      return dispatch_grad<S, __nv_bfloat16>(s, s_stride, t, t_stride, labels, row_scale, grad, g_kind,
                                             g_stride, loss, rows, V, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_kd_loss_rows(const void* s, FloatKind s_kind, int64_t s_stride, const void* t,
                                FloatKind t_kind, int64_t t_stride, const int64_t* labels,
                                const float* row_scale, void* grad, FloatKind g_kind, int64_t g_stride,
                                float* loss, int64_t rows, int64_t V, const KDParams& p,
                                cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (s_kind) {
    case FloatKind::f32:
      return dispatch_teacher<float>(s, s_stride, t, t_kind, t_stride, labels, row_scale, grad, g_kind,
                                     g_stride, loss, rows, V, p, stream);
    case FloatKind::f16:
      return dispatch_teacher<__half>(s, s_stride, t, t_kind, t_stride, labels, row_scale, grad, g_kind,
                                      g_stride, loss, rows, V, p, stream);
    case FloatKind::bf16:
      return dispatch_teacher<__nv_bfloat16>(s, s_stride, t, t_kind, t_stride, labels, row_scale, grad,
                                             g_kind, g_stride, loss, rows, V, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memkern::cuda
