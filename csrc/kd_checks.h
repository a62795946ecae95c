// Argument checks of the kd_loss_rows kernels, shared by the CPU (cpu/kd_loss.cpp) and CUDA
// (cuda/kd_ops.cpp) registrations. The public operators check every argument in Python
// before any kernel runs (memkern/kd_options.py, memkern/ops/kd.py); these checks guard a
// direct call of torch.ops.memkern.kd_loss_rows_kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memkern::kd {

inline void check_rows_arg(const at::Tensor& x, const char* name, int64_t rows, int64_t V, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, "kd_loss_rows: ", name, " must be a ", c10::DeviceTypeName(device),
              " tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == V, "kd_loss_rows: ", name,
              " must have shape (", rows, ", ", V, "), got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1 || V <= 1, "kd_loss_rows: ", name, " must be contiguous along the vocabulary");
}

// Checks every argument; returns whether a gradient is written (a 1-D (0,) grad stands for
// "no gradient"). row_scale must have the kernel's compute type, acc_type.
inline bool check_rows_args(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& row_scale, const at::Tensor& grad, int64_t divergence,
                            double temperature, c10::DeviceType device, at::ScalarType acc_type) {
  TORCH_CHECK(s.dim() == 2, "kd_loss_rows: student must be 2-D, got ", s.dim(), "-D");
  const int64_t rows = s.size(0), V = s.size(1);
  check_rows_arg(s, "student", rows, V, device);
  check_rows_arg(t, "teacher", rows, V, device);
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "kd_loss_rows: unknown divergence ", divergence);
  TORCH_CHECK(temperature > 0, "kd_loss_rows: temperature must be > 0, got ", temperature);
  const bool write_grad = grad.dim() == 2;
  if (write_grad) {
    check_rows_arg(grad, "grad", rows, V, device);
    TORCH_CHECK(grad.scalar_type() == s.scalar_type() || grad.scalar_type() == at::kFloat,
                "kd_loss_rows: grad must have the student's dtype or float32");
  }
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->numel() == rows,
                "kd_loss_rows: labels must be int64 with one entry per row");
  }
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == acc_type && row_scale->numel() == rows, "kd_loss_rows: row_scale must be ",
                acc_type, " with one entry per row");
  }
  return write_grad;
}

}  // namespace memkern::kd
