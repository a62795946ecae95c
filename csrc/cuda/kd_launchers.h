// Host-side entry point of the distillation-loss CUDA kernel (torch-free; see launchers.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "launchers.h"

namespace memkern::cuda {

// Scalars of one kd_loss_rows call (see csrc/cpu/kd_loss.cpp for the arithmetic).
struct KDParams {
  float inv_t;       // 1 / temperature
  float alpha;       // weight of the cross entropy
  float c_kd;        // (1 - alpha) * (T^2 or 1)
  float beta;        // jsd weight
  float log_beta;    // log(beta), jsd only
  float log_1mb;     // log(1 - beta), jsd only
  float grad_scale;  // gradient multiplier (e.g. 1 / N for reduction="mean")
  int64_t ignore_index;
  int divergence;    // 0 forward_kl, 1 reverse_kl, 2 jsd
  bool ce;           // labels given and alpha != 0
};

// The KDParams of an operator's options (kd_loss_rows_kernel and kd_loss_topk_rows_kernel).
inline KDParams make_kd_params(double alpha, double temperature, int64_t divergence, double beta,
                               int64_t ignore_index, double kd_scale, double grad_scale, bool has_labels) {
  KDParams p;
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.alpha = static_cast<float>(alpha);
  p.c_kd = static_cast<float>((1.0 - alpha) * kd_scale);
  p.beta = static_cast<float>(beta);
  p.log_beta = divergence == 2 ? static_cast<float>(std::log(beta)) : 0.0f;
  p.log_1mb = divergence == 2 ? static_cast<float>(std::log1p(-beta)) : 0.0f;
  p.grad_scale = static_cast<float>(grad_scale);
  p.ignore_index = ignore_index;
  p.divergence = static_cast<int>(divergence);
  p.ce = has_labels && alpha != 0.0;
  return p;
}

// Per-row loss of (rows x V) student and teacher logits (row strides in elements, unit
// column stride) into loss (rows, fp32), and grad_scale * row_scale[r] * d loss_r / d s_r
// into grad (which may alias s) when grad is not null. labels (int64) and row_scale (fp32)
// may be null.
cudaError_t launch_kd_loss_rows(const void* s, FloatKind s_kind, int64_t s_stride, const void* t,
                                FloatKind t_kind, int64_t t_stride, const int64_t* labels,
                                const float* row_scale, void* grad, FloatKind g_kind, int64_t g_stride,
                                float* loss, int64_t rows, int64_t V, const KDParams& params,
                                cudaStream_t stream);

}  // namespace memkern::cuda
