// CPU kernel for memkern::kd_loss_rows_kernel: the distillation loss of each row of (rows x V)
// student and teacher logits and, in the same call, the gradient of that loss with respect
// to the student logits.
//
// Memory: nothing of size rows x V is allocated here; the caller passes the gradient buffer
// (which may be the student logits themselves, as the fused-linear path does with its fp32
// chunk of logits). Per row, the passes below run over one row of s and t, which stays in
// the core's L2 cache (a 32000-wide fp32 row pair is 250 KiB), so DRAM sees one read of s
// and t and one write of the gradient: a single streaming pass over the logits.
//
//   pass 1: row maxima of s and t (and a NaN flag)
//   pass 2: Z1 = sum e^(s-ms), Zs = sum e^((s-ms)/T), Zt = sum e^((t-mt)/T) and the
//           forward/reverse KL numerators, all in one sweep
//   pass 3: (jsd only) the divergence, which needs the normalised distributions
//   pass 4: the gradient
//
// exp and log are written out (Cephes polynomials, ~1 ulp in fp32) so that the compiler
// vectorises the loops; std::exp is not vectorised without -ffast-math. float64 inputs
// (used by gradcheck) compute in double with std::exp/std::log.
//
// Masked logits follow memkern/reference.py (its notes on masked and non-finite logits):
// an entry of probability 0 (-inf logit, or an exponential that underflows) adds nothing
// to a KL sum even where the other side's log-probability is -inf, so every product
// e * (log ratio) below is selected away where e == 0; reverse_kl of +inf leaves a NaN
// gradient; rows holding NaN or +inf, or all -inf, are NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kd_checks.h"

namespace memkern {
namespace {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// e^x for x <= 88, and exactly 0 below the normal range (e^-87.34 = FLT_MIN) and at -inf:
// a masked entry's probability must be 0, not a tiny number that a log-probability of
// -3.4e38 (a finfo.min mask) turns back into O(1) (clamping at e^-87 gave 5.6 for 0).
// The subnormal range is flushed too, as CUDA's fast exp does: weights below 1.2e-38 move
// no sum, and building exact subnormals (2^n as 2^(n+64) * 2^-64) made a vectorised loop
// of 32000 exps 30% slower than this (0.19 vs 0.145 ms; 0.13 ms for the old clamp). NaN
// gives 0 (no undefined int conversion), and so does -inf - (-inf) in log_mix: both only
// ever meet products that are selected away (rows holding NaN are flagged in pass 1).
inline float vexp(float x) {
  const bool zero = !(x >= -87.33f);
  x = zero ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  return zero ? 0.0f : y * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}
inline double vexp(double x) { return std::exp(x); }

// log(1 + u) for u in [0, 1]: 1 + u is a normal number in [1, 2], so no edge cases.
inline float vlog1p_unit(float u) {
  const float x = 1.0f + u;
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}
inline double vlog1p_unit(double u) { return std::log1p(u); }

// log(beta * e^lp + (1 - beta) * e^lq), given log_beta = log(beta), log_1mb = log(1-beta).
template <typename acc_t>
inline acc_t log_mix(acc_t lp, acc_t lq, acc_t log_beta, acc_t log_1mb) {
  const acc_t a = lp + log_beta, b = lq + log_1mb;
  const acc_t hi = a > b ? a : b;
  const acc_t lo = a > b ? b : a;
  return hi + vlog1p_unit(vexp(lo - hi));
}

struct Params {
  double alpha;        // weight of the cross-entropy term
  double temperature;
  int64_t divergence;  // Divergence
  double beta;         // jsd only
  int64_t ignore_index;
  double kd_scale;     // T^2 or 1
  double grad_scale;   // e.g. 1 / N for reduction="mean"
};

// Converts one row into the compute type, or points at it when it already is.
template <typename acc_t, typename in_t>
inline const acc_t* row_as(const in_t* src, int64_t n, acc_t* scratch) {
  if constexpr (std::is_same_v<acc_t, in_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<acc_t>(src[j]);
    return scratch;
  }
}

// Constants of a call, in the compute type.
template <typename acc_t>
struct Consts {
  acc_t inv_t, alpha, c_kd, beta, log_beta, log_1mb;
};

// The loss of one row that counts (label y, or -1 without labels) and, when g is not null,
// w * d loss / d s written into g. CE and DIV are compile-time so that every loop is a
// straight vectorisable body (a runtime branch inside kept gcc from vectorising pass 2).
template <typename acc_t, bool CE, int64_t DIV>
acc_t kd_row(const acc_t* __restrict s, const acc_t* __restrict t, int64_t V, int64_t y,
             const Consts<acc_t>& c, acc_t w, acc_t* g) {
  // pass 1: maxima and NaN
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t ms = -inf, mt = ms;
  int nan = 0;
#pragma omp simd reduction(max : ms, mt) reduction(| : nan)
  for (int64_t j = 0; j < V; ++j) {
    ms = s[j] > ms ? s[j] : ms;
    mt = t[j] > mt ? t[j] : mt;
    nan |= (s[j] != s[j]) | (t[j] != t[j]);
  }
  // NaN or +inf anywhere, or all -inf (V == 0 too): no distribution, NaN
  if (nan || !(ms > -inf && ms < inf && mt > -inf && mt < inf)) {
    if (g) std::fill(g, g + V, std::numeric_limits<acc_t>::quiet_NaN());
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  const acc_t inv_t = c.inv_t;
  // pass 2: normalisers and the KL numerator, relative to the maxima so that huge logits
  // cancel exactly before anything is multiplied; a = (s-ms)/T and b = (t-mt)/T are scaled
  // before they are subtracted, so that a shifted logit past the float range (finfo.min at
  // T < 1) is -inf in the log-ratio as in the weight
  acc_t z1 = 0, zs = 0, zt = 0, num = 0;
#pragma omp simd reduction(+ : z1, zs, zt, num)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t ds = s[j] - ms;
    const acc_t a = ds * inv_t, b = (t[j] - mt) * inv_t;
    const acc_t es = vexp(a), et = vexp(b);
    if constexpr (CE) z1 += vexp(ds);
    zs += es;
    zt += et;
    if constexpr (DIV == kReverseKL) num += es == 0 ? acc_t(0) : es * (a - b);
    if constexpr (DIV == kForwardKL) num += et == 0 ? acc_t(0) : et * (b - a);
  }
  const acc_t log_zs = std::log(zs), log_zt = std::log(zt);
  const acc_t ce = CE ? std::log(z1) - (s[y] - ms) : acc_t(0);
  // mean_ab: reverse_kl's E_q[a - b], which its gradient needs without the normalisers
  // (huge logits: (a - b) - E_q[a - b] is exactly 0 where q is one-hot)
  acc_t d = 0, kq = 0, mean_ab = 0;
  if constexpr (DIV == kForwardKL) {
    d = num / zt - log_zt + log_zs;
  } else if constexpr (DIV == kReverseKL) {
    mean_ab = num / zs;
    d = mean_ab - log_zs + log_zt;
  } else {
    // pass 3 (jsd): beta KL(p||m) + (1-beta) KL(q||m); KL(q||m) is also in the gradient
    acc_t dp = 0, dq = 0;
#pragma omp simd reduction(+ : dp, dq)
    for (int64_t j = 0; j < V; ++j) {
      const acc_t lq = (s[j] - ms) * inv_t - log_zs, lp = (t[j] - mt) * inv_t - log_zt;
      const acc_t lm = log_mix(lp, lq, c.log_beta, c.log_1mb);
      const acc_t p = vexp(lp), q = vexp(lq);
      dp += p == 0 ? acc_t(0) : p * (lp - lm);
      dq += q == 0 ? acc_t(0) : q * (lq - lm);
    }
    d = c.beta * dp + (acc_t(1) - c.beta) * dq;
    kq = dq;
  }
  // A soft term of weight 0 (alpha = 1) adds 0, even where it is +inf.
  const bool kd = c.c_kd != 0;
  const acc_t loss = c.alpha * ce + (kd ? c.c_kd * d : acc_t(0));
  if (g == nullptr) return loss;
  if (DIV == kReverseKL && kd && d == inf) {  // its gradient has no limit (reference.py)
    std::fill(g, g + V, std::numeric_limits<acc_t>::quiet_NaN());
    return loss;
  }

  // pass 4: the gradient
  const acc_t w_ce = CE ? c.alpha * w / z1 : acc_t(0);
  const acc_t w_kd = kd ? c.c_kd * inv_t * w : acc_t(0);
  const acc_t inv_zs = acc_t(1) / zs, inv_zt = acc_t(1) / zt;
  const acc_t w_q = DIV == kJSD ? w_kd * (acc_t(1) - c.beta) : w_kd;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const acc_t ds = s[j] - ms;
    const acc_t a = ds * inv_t, b = (t[j] - mt) * inv_t;
    acc_t gj;
    if constexpr (DIV == kForwardKL) {
      gj = w_kd * (vexp(a) * inv_zs - vexp(b) * inv_zt);
    } else {
      const acc_t lq = a - log_zs;
      const acc_t q = vexp(lq);
      acc_t ratio;  // g - sum(q g) of reference.kd_loss_rows_grad (jsd: without 1 - beta)
      if constexpr (DIV == kReverseKL) {
        ratio = (a - b) - mean_ab;  // = log q - log p - d
      } else {
        ratio = lq - log_mix(b - log_zt, lq, c.log_beta, c.log_1mb) - kq;
      }
      gj = q == 0 || w_q == 0 ? acc_t(0) : w_q * q * ratio;
    }
    if constexpr (CE) gj += w_ce * vexp(ds);
    g[j] = gj;
  }
  if (CE) g[y] -= c.alpha * w;
  return loss;
}

template <typename acc_t, bool CE, int64_t DIV, typename s_t, typename t_t, typename g_t>
void kd_rows_typed(const s_t* s_base, int64_t s_stride, const t_t* t_base, int64_t t_stride,
                   const int64_t* labels, const acc_t* row_scale, g_t* g_base, int64_t g_stride,
                   acc_t* loss, int64_t rows, int64_t V, const Params& P, const Consts<acc_t>& c) {
  constexpr bool convert_in = !std::is_same_v<acc_t, s_t> || !std::is_same_v<acc_t, t_t>;
  constexpr bool convert_out = !std::is_same_v<acc_t, g_t>;
  const bool write_grad = g_base != nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch((convert_in ? 2 * V : 0) + (convert_out && write_grad ? V : 0));
    acc_t* s_buf = scratch.data();
    acc_t* t_buf = s_buf + V;
    acc_t* g_buf = scratch.data() + (convert_in ? 2 * V : 0);
    for (int64_t r = begin; r < end; ++r) {
      g_t* g = write_grad ? g_base + r * g_stride : nullptr;
      const int64_t y = labels ? labels[r] : -1;
      if (labels && y == P.ignore_index) {
        loss[r] = acc_t(0);
        if (g) std::fill(g, g + V, g_t(0));
        continue;
      }
      if (CE) TORCH_CHECK(y >= 0 && y < V, "kd_loss: label ", y, " of row ", r, " is outside [0, ", V, ")");
      const acc_t* s = row_as<acc_t>(s_base + r * s_stride, V, s_buf);
      const acc_t* t = row_as<acc_t>(t_base + r * t_stride, V, t_buf);
      const acc_t w = acc_t(P.grad_scale) * (row_scale ? row_scale[r] : acc_t(1));
      acc_t* gr = nullptr;
      if constexpr (convert_out) {
        gr = g ? g_buf : nullptr;
      } else {
        gr = g;  // may be s itself: every loop reads s[j] before it writes g[j]
      }
      loss[r] = kd_row<acc_t, CE, DIV>(s, t, V, y, c, w, gr);
      if constexpr (convert_out) {
        if (g) for (int64_t j = 0; j < V; ++j) g[j] = static_cast<g_t>(g_buf[j]);
      }
    }
  });
}

template <typename acc_t, typename s_t, typename t_t, typename g_t>
void kd_rows(const s_t* s_base, int64_t s_stride, const t_t* t_base, int64_t t_stride,
             const int64_t* labels, const acc_t* row_scale, g_t* g_base, int64_t g_stride,
             acc_t* loss, int64_t rows, int64_t V, const Params& P) {
  Consts<acc_t> c;
  c.inv_t = acc_t(1) / acc_t(P.temperature);
  c.alpha = acc_t(P.alpha);
  c.c_kd = acc_t((1.0 - P.alpha) * P.kd_scale);
  c.beta = acc_t(P.beta);
  c.log_beta = P.divergence == kJSD ? acc_t(std::log(P.beta)) : acc_t(0);
  c.log_1mb = P.divergence == kJSD ? acc_t(std::log1p(-P.beta)) : acc_t(0);
  const bool ce = labels != nullptr && P.alpha != 0.0;
  auto run = [&](auto ce_tag, auto div_tag) {
    kd_rows_typed<acc_t, decltype(ce_tag)::value, decltype(div_tag)::value>(
        s_base, s_stride, t_base, t_stride, labels, row_scale, g_base, g_stride, loss, rows, V, P, c);
  };
  using F = std::false_type;
  using T = std::true_type;
  using FKL = std::integral_constant<int64_t, kForwardKL>;
  using RKL = std::integral_constant<int64_t, kReverseKL>;
  using JSD = std::integral_constant<int64_t, kJSD>;
  switch (P.divergence) {
    case kForwardKL: ce ? run(T{}, FKL{}) : run(F{}, FKL{}); break;
    case kReverseKL: ce ? run(T{}, RKL{}) : run(F{}, RKL{}); break;
    default: ce ? run(T{}, JSD{}) : run(F{}, JSD{}); break;
  }
}

// Writes grad (when it has s's shape; it may be s itself) and returns the per-row loss.
at::Tensor kd_loss_rows_cpu(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& row_scale, at::Tensor grad, double alpha,
                            double temperature, int64_t divergence, double beta, int64_t ignore_index,
                            double kd_scale, double grad_scale) {
  // The loss and row_scale are in the compute type: float64 for float64 students
  // (gradcheck), float32 otherwise.
  const auto acc_type = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool write_grad =
      kd::check_rows_args(s, t, labels, row_scale, grad, divergence, temperature, c10::DeviceType::CPU, acc_type);
  const int64_t rows = s.size(0), V = s.size(1);
  at::Tensor lab_c, rs_c;
  const int64_t* lab = nullptr;
  if (labels.has_value()) {
    lab_c = labels->contiguous();
    lab = lab_c.const_data_ptr<int64_t>();
  }
  if (row_scale.has_value()) rs_c = row_scale->contiguous();
  auto loss = at::empty({rows}, s.options().dtype(acc_type));
  const Params P{alpha, temperature, divergence, beta, ignore_index, kd_scale, grad_scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_rows", [&] {
    using s_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<s_t, double>, double, float>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kd_loss_rows_teacher", [&] {
      using t_t = scalar_t;
      const s_t* sp = s.const_data_ptr<s_t>();
      const t_t* tp = t.const_data_ptr<t_t>();
      const acc_t* rs = rs_c.defined() ? rs_c.const_data_ptr<acc_t>() : nullptr;
      acc_t* lp = loss.mutable_data_ptr<acc_t>();
      if (write_grad && grad.scalar_type() != s.scalar_type()) {  // float32 gradient buffer
        kd_rows<acc_t, s_t, t_t, float>(sp, s.stride(0), tp, t.stride(0), lab, rs,
                                        grad.mutable_data_ptr<float>(), grad.stride(0), lp, rows, V, P);
      } else {
        s_t* gp = write_grad ? grad.mutable_data_ptr<s_t>() : nullptr;
        kd_rows<acc_t, s_t, t_t, s_t>(sp, s.stride(0), tp, t.stride(0), lab, rs, gp,
                                      write_grad ? grad.stride(0) : 0, lp, rows, V, P);
      }
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("kd_loss_rows_kernel", &kd_loss_rows_cpu);
}

}  // namespace memkern
