// The epilogue shared by the CPU linear layers (int8_linear.cpp, scaled_linear.cpp):
// accumulator -> scaled, biased output, in the reference's order,
// (float)acc * (row_scale * col_scale) + bias in float32 (the compiler may fuse the last
// multiply-add: a rounding, not more). In an unnamed namespace, a copy per including file
// (int8_vnni.h says why).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace memkern {
namespace {

// Output elements per parallel task: small tasks cost more in scheduling than they earn.
constexpr int64_t kGrain = 16384;

// The bias as a contiguous float32 tensor (undefined when there is none).
at::Tensor float_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return at::Tensor();
  return bias->to(at::kFloat).contiguous();
}

// One output of the W8A8 layers: acc * (row_scale * col_scale) + *bias (bias optional).
// The scales multiply first (reference.int8_linear says why: overflow).
inline float epilogue_value(float acc, float row_scale, float col_scale, const float* bias) {
  const float v = acc * (row_scale * col_scale);
  return bias ? v + *bias : v;
}

// out[m, n] = (float)acc[m, n] * (row_scale[m] * col_scale[n]) + bias[n]; each factor is
// optional (nullptr). acc is row-major with leading dimension lda.
template <typename acc_t, typename out_t>
void epilogue_rows(const acc_t* acc, int64_t lda, int64_t rows, int64_t cols, const float* row_scale,
                   const float* col_scale, const float* bias, out_t* out, int64_t ldo) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* a = acc + m * lda;
      out_t* o = out + m * ldo;
      const float rs = row_scale ? row_scale[m] : 1.0f;
      for (int64_t n = 0; n < cols; ++n) {
        float v = static_cast<float>(a[n]);
        if (row_scale && col_scale) {
          v = epilogue_value(v, rs, col_scale[n], bias ? bias + n : nullptr);
        } else {
          if (col_scale) v = v * col_scale[n];
          else if (row_scale) v = v * rs;
          if (bias) v = v + bias[n];
        }
        o[n] = static_cast<out_t>(v);
      }
    }
  });
}

}  // namespace
}  // namespace memkern
