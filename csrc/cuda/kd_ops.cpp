// CUDA registration of kd_loss_rows_kernel: check tensors, pick the stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kd_launchers.h"
#include "kd_checks.h"
#include "cuda/torch_utils.h"

namespace memkern {
namespace {

at::Tensor kd_loss_rows_cuda(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& row_scale, at::Tensor grad, double alpha,
                             double temperature, int64_t divergence, double beta, int64_t ignore_index,
                             double kd_scale, double grad_scale) {
  const bool write_grad =
      kd::check_rows_args(s, t, labels, row_scale, grad, divergence, temperature, c10::DeviceType::CUDA, at::kFloat);
  const int64_t rows = s.size(0), V = s.size(1);
  const c10::cuda::CUDAGuard guard(s.device());
  at::Tensor lab, rs;
  if (labels.has_value()) lab = labels->contiguous();
  if (row_scale.has_value()) rs = row_scale->contiguous();
  auto loss = at::empty({rows}, s.options().dtype(at::kFloat));
  const cuda::KDParams p = cuda::make_kd_params(alpha, temperature, divergence, beta, ignore_index, kd_scale,
                                                grad_scale, labels.has_value());
  const auto s_kind = float_kind(s, "kd_loss_rows", "student");
  check_launch(cuda::launch_kd_loss_rows(
                   s.const_data_ptr(), s_kind, s.stride(0), t.const_data_ptr(),
                   float_kind(t, "kd_loss_rows", "teacher"), t.stride(0),
                   lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr,
                   rs.defined() ? rs.const_data_ptr<float>() : nullptr,
                   write_grad ? grad.mutable_data_ptr() : nullptr,
                   write_grad ? float_kind(grad, "kd_loss_rows", "grad") : s_kind,
                   write_grad ? grad.stride(0) : 0, loss.mutable_data_ptr<float>(), rows, V, p,
                   c10::cuda::getCurrentCUDAStream()),
               "kd_loss_rows");
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CUDA, m) {
  m.impl("kd_loss_rows_kernel", &kd_loss_rows_cuda);
}

}  // namespace memkern
