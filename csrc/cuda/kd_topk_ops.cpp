// CUDA registration of kd_loss_topk_rows_kernel: check tensors, pick the stream, launch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kd_topk_launchers.h"
#include "cuda/torch_utils.h"

namespace memkern {
namespace {

at::Tensor kd_loss_topk_rows_cuda(const at::Tensor& s, const at::Tensor& lp, const at::Tensor& idx,
                                  const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale,
                                  at::Tensor grad, double alpha, double temperature, int64_t divergence, double beta,
                                  int64_t ignore_index, double kd_scale, double grad_scale) {
  TORCH_CHECK(s.dim() == 2 && s.is_cuda(), "kd_loss_topk_rows: student must be a 2-D CUDA tensor");
  const int64_t rows = s.size(0), V = s.size(1);
  TORCH_CHECK(s.stride(1) == 1 || V <= 1, "kd_loss_topk_rows: student must be contiguous along the vocabulary");
  TORCH_CHECK(lp.dim() == 2 && lp.size(0) == rows && lp.size(1) >= 1 && lp.size(1) <= V &&
                  lp.size(1) <= cuda::kTopkMaxK && lp.is_contiguous() && lp.scalar_type() == at::kFloat &&
                  lp.device() == s.device(),
              "kd_loss_topk_rows: teacher_logprobs must be contiguous (", rows, ", k) float32 on the student's ",
              "device with 1 <= k <= min(", V, ", ", cuda::kTopkMaxK, "), got ", lp.sizes(), " ", lp.scalar_type());
  TORCH_CHECK(idx.sizes() == lp.sizes() && idx.is_contiguous() && idx.scalar_type() == at::kLong &&
                  idx.device() == s.device(),
              "kd_loss_topk_rows: teacher_indices must be contiguous int64 of teacher_logprobs' shape");
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "kd_loss_topk_rows: unknown divergence ", divergence);
  TORCH_CHECK(temperature > 0, "kd_loss_topk_rows: temperature must be > 0, got ", temperature);
  const bool write_grad = grad.dim() == 2;
  if (write_grad) {
    TORCH_CHECK(grad.sizes() == s.sizes() && (grad.stride(1) == 1 || V <= 1) && grad.device() == s.device() &&
                    (grad.scalar_type() == s.scalar_type() || grad.scalar_type() == at::kFloat),
                "kd_loss_topk_rows: grad must have the student's shape and dtype (or float32)");
  }
  at::Tensor lab, rs;
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->numel() == rows,
                "kd_loss_topk_rows: labels must be int64 with one entry per row");
    lab = labels->contiguous();
  }
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->numel() == rows,
                "kd_loss_topk_rows: row_scale must be float32 with one entry per row");
    rs = row_scale->contiguous();
  }
  const c10::cuda::CUDAGuard guard(s.device());
  auto loss = at::empty({rows}, s.options().dtype(at::kFloat));
  const cuda::KDParams p = cuda::make_kd_params(alpha, temperature, divergence, beta, ignore_index, kd_scale,
                                                grad_scale, labels.has_value());
  const auto s_kind = float_kind(s, "kd_loss_topk_rows", "student");
  check_launch(cuda::launch_kd_topk_rows(s.const_data_ptr(), s_kind, s.stride(0), lp.const_data_ptr<float>(),
                                         idx.const_data_ptr<int64_t>(), lp.size(1),
                                         lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr,
                                         rs.defined() ? rs.const_data_ptr<float>() : nullptr,
                                         write_grad ? grad.mutable_data_ptr() : nullptr,
                                         write_grad ? float_kind(grad, "kd_loss_topk_rows", "grad") : s_kind,
                                         write_grad ? grad.stride(0) : 0, loss.mutable_data_ptr<float>(), rows, V, p,
                                         c10::cuda::getCurrentCUDAStream()),
               "kd_loss_topk_rows");
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CUDA, m) {
  m.impl("kd_loss_topk_rows_kernel", &kd_loss_topk_rows_cuda);
}

}  // namespace memkern
