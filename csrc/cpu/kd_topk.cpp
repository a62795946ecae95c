// CPU kernel for memkern::kd_loss_topk_rows_kernel: the distillation loss of each row of
// (rows x V) student logits against a teacher known by its top-k log-probabilities at k
// indices, compared over k + 1 buckets (the indices and the tail: every other entry), and
// in the same call the gradient with respect to the student logits. memkern/reference_topk.py
// states the semantics; memkern/ops/kd_topk.py documents them.
//
// Per row:
//   pass 1: the maximum m of s, the maximum mc over the complement of the indices (the
//           tail; a per-thread membership mask of V bytes marks the indices) and a NaN flag
//   pass 2: Z = sum e^((s-m)/T), the tail's Zc = sum over the complement of e^((s-mc)/T)
//           (its own maximum: the tail's log-mass is exact even far below float precision,
//           where 1 - sum of the top-k q would be all rounding), Z1 = sum e^(s-m) for the CE
//   buckets: log Q and log P of the k + 1 buckets and the divergence, O(k)
//   pass 3: the gradient, the tail's formula at every entry, then the k indices rewritten
//           (their student logits were saved first: the gradient may overwrite s in place)
// Nothing of size rows x V is allocated here; the caller passes the gradient buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace memkern {
namespace {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

template <typename acc_t>
struct TopkConsts {
  acc_t inv_t, alpha, c_kd, beta, log_beta, log_1mb;
  int64_t divergence;
  bool ce;
};

// log(1 - e^x) for x <= 0 (Maechler's switch at -log 2); -inf at or past 0, NaN stays NaN.
template <typename acc_t>
acc_t log1mexp(acc_t x) {
  if (x != x) return x;
  if (x >= 0) return -std::numeric_limits<acc_t>::infinity();
  return x > acc_t(-0.693147180559945309) ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

// log(beta * e^lp + (1 - beta) * e^lq); -inf where both are -inf.
template <typename acc_t>
acc_t log_mix(acc_t lp, acc_t lq, acc_t log_beta, acc_t log_1mb) {
  const acc_t a = lp + log_beta, b = lq + log_1mb;
  const acc_t hi = std::max(a, b), lo = std::min(a, b);
  if (hi == -std::numeric_limits<acc_t>::infinity()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// a * log_ratio, 0 where a == 0 (0 log 0 = 0, also against a -inf log-probability).
template <typename acc_t>
acc_t kl_term(acc_t a, acc_t log_ratio) {
  return a == 0 ? acc_t(0) : a * log_ratio;
}

template <typename acc_t>
struct Scratch {
  std::vector<uint8_t> member;        // V, all 0 between rows
  std::vector<acc_t> s_top, lq, lP, gb;  // k and k + 1 entries
  Scratch(int64_t V, int64_t k) : member(V, 0), s_top(k), lq(k + 1), lP(k + 1), gb(k + 1) {}
};

// The loss of one row that counts (label y, or -1) and, when g is not null, w * d loss / d s
// written into g (which may be s itself).
template <typename acc_t>
acc_t topk_row(const acc_t* s, int64_t V, const acc_t* lp, const int64_t* idx, int64_t k, int64_t y,
               const TopkConsts<acc_t>& c, acc_t w, acc_t* g, Scratch<acc_t>& sc) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  auto undefined = [&] {
    if (g) std::fill(g, g + V, nan);
    return nan;
  };
  uint8_t* member = sc.member.data();
  for (int64_t j = 0; j < k; ++j) member[idx[j]] = 1;
  // pass 1
  acc_t m = -inf, mc = -inf;
  int has_nan = 0;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t x = s[v];
    has_nan |= x != x;
    m = x > m ? x : m;
    mc = (!member[v] && x > mc) ? x : mc;
  }
  for (int64_t j = 0; j < k; ++j) sc.s_top[j] = s[idx[j]];
  // pass 2
  const bool tail = mc > -inf;
  const bool student_ok = !has_nan && m > -inf && m < inf;
  acc_t z = 0, zc = 0, z1 = 0;
  if (student_ok) {
    for (int64_t v = 0; v < V; ++v) {
      z += std::exp((s[v] - m) * c.inv_t);
      if (c.ce) z1 += std::exp(s[v] - m);
      if (tail && !member[v]) zc += std::exp((s[v] - mc) * c.inv_t);
    }
  }
  for (int64_t j = 0; j < k; ++j) member[idx[j]] = 0;
  if (!student_ok) return undefined();
  const acc_t log_z = std::log(z), log_zc = tail ? std::log(zc) : -inf;
  acc_t* lq = sc.lq.data();
  acc_t* lP = sc.lP.data();
  acc_t* gb = sc.gb.data();
  for (int64_t j = 0; j < k; ++j) lq[j] = (sc.s_top[j] - m) * c.inv_t - log_z;
  lq[k] = tail ? (mc - m) * c.inv_t + log_zc - log_z : -inf;

  // the teacher's buckets: p_j = e^lp_j, the tail 1 - sum p (none when k = V), softened at T
  acc_t mt = -inf;
  for (int64_t j = 0; j < k; ++j) {
    if (lp[j] != lp[j]) return undefined();
    mt = std::max(mt, lp[j]);
  }
  acc_t covered = -inf;
  if (mt > -inf) {
    acc_t sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += std::exp(lp[j] - mt);
    covered = mt + std::log(sum);
  }
  const acc_t log_tail = k >= V ? -inf : log1mexp(covered);
  acc_t mb = -inf;
  for (int64_t b = 0; b <= k; ++b) {
    lP[b] = (b < k ? lp[b] : log_tail) * c.inv_t;
    mb = std::max(mb, lP[b]);
  }
  if (!(mb > -inf && mb < inf)) return undefined();  // no teacher mass anywhere
  acc_t sum_b = 0;
  for (int64_t b = 0; b <= k; ++b) sum_b += std::exp(lP[b] - mb);
  const acc_t lse_b = mb + std::log(sum_b);
  for (int64_t b = 0; b <= k; ++b) lP[b] -= lse_b;

  // the divergence over the k + 1 buckets; gb and G = sum_b Q_b gb_b for the gradient
  acc_t d = 0, G = 0, dp = 0;
  for (int64_t b = 0; b <= k; ++b) {
    const acc_t P = std::exp(lP[b]), Q = std::exp(lq[b]);
    if (c.divergence == kForwardKL) {
      d += kl_term(P, lP[b] - lq[b]);
    } else if (c.divergence == kReverseKL) {
      gb[b] = lq[b] - lP[b];
      G += kl_term(Q, gb[b]);
    } else {
      const acc_t lm = log_mix(lP[b], lq[b], c.log_beta, c.log_1mb);
      gb[b] = lq[b] - lm;
      dp += kl_term(P, lP[b] - lm);
      G += kl_term(Q, gb[b]);
    }
  }
  if (c.divergence == kReverseKL) d = G;
  if (c.divergence == kJSD) d = c.beta * dp + (acc_t(1) - c.beta) * G;
  const bool kd = c.c_kd != 0;  // a soft term of weight 0 (alpha = 1) adds 0, even if +inf
  const acc_t ce = c.ce ? std::log(z1) - (s[y] - m) : acc_t(0);
  const acc_t loss = c.alpha * ce + (kd ? c.c_kd * d : acc_t(0));
  if (g == nullptr) return loss;
  if (c.divergence == kReverseKL && kd && d == inf) {  // its gradient has no limit (reference.py)
    std::fill(g, g + V, nan);
    return loss;
  }

  // pass 3
  const acc_t w_ce = c.ce ? c.alpha * w / z1 : acc_t(0);
  const acc_t w_kd = kd ? c.c_kd * c.inv_t * w : acc_t(0);
  const acc_t w_q = c.divergence == kJSD ? w_kd * (acc_t(1) - c.beta) : w_kd;
  const bool forward = c.divergence == kForwardKL;
  const acc_t p_tail = std::exp(lP[k]);
  const acc_t g_tail = forward ? acc_t(0) : gb[k] - G;
  for (int64_t v = 0; v < V; ++v) {
    const acc_t sv = s[v];
    const acc_t q = std::exp((sv - m) * c.inv_t - log_z);
    acc_t gv;
    if (forward) {  // the teacher's tail mass shared out as the student shares its own
      const acc_t share = tail ? std::exp((sv - mc) * c.inv_t - log_zc) : acc_t(0);
      gv = w_kd == 0 ? acc_t(0) : w_kd * (q - p_tail * share);
    } else {
      gv = (q == 0 || w_q == 0) ? acc_t(0) : w_q * q * g_tail;
    }
    if (c.ce) gv += w_ce * std::exp(sv - m);
    g[v] = gv;
  }
  for (int64_t j = 0; j < k; ++j) {
    const acc_t q = std::exp(lq[j]);
    acc_t gv;
    if (forward) {
      gv = w_kd == 0 ? acc_t(0) : w_kd * (q - std::exp(lP[j]));
    } else {
      gv = (q == 0 || w_q == 0) ? acc_t(0) : w_q * q * (gb[j] - G);
    }
    if (c.ce) gv += w_ce * std::exp(sc.s_top[j] - m);
    g[idx[j]] = gv;
  }
  if (c.ce) g[y] -= c.alpha * w;
  return loss;
}

template <typename acc_t, typename s_t, typename g_t>
void topk_rows(const s_t* s_base, int64_t s_stride, const acc_t* lp_base, const int64_t* idx_base, int64_t k,
               const int64_t* labels, const acc_t* row_scale, g_t* g_base, int64_t g_stride, acc_t* loss,
               int64_t rows, int64_t V, int64_t ignore_index, double grad_scale, const TopkConsts<acc_t>& c) {
  constexpr bool convert_in = !std::is_same_v<acc_t, s_t>;
  constexpr bool convert_out = !std::is_same_v<acc_t, g_t>;
  const bool write_grad = g_base != nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> sc(V, k);
    std::vector<acc_t> s_buf(convert_in ? V : 0), g_buf(convert_out && write_grad ? V : 0);
    for (int64_t r = begin; r < end; ++r) {
      g_t* g = write_grad ? g_base + r * g_stride : nullptr;
      const int64_t y = labels ? labels[r] : -1;
      if (labels && y == ignore_index) {
        loss[r] = acc_t(0);
        if (g) std::fill(g, g + V, g_t(0));
        continue;
      }
      if (c.ce) TORCH_CHECK(y >= 0 && y < V, "kd_loss_topk: label ", y, " of row ", r, " is outside [0, ", V, ")");
      const int64_t* idx = idx_base + r * k;
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK(idx[j] >= 0 && idx[j] < V, "kd_loss_topk: index ", idx[j], " of row ", r, " is outside [0, ", V,
                    ")");
      }
      const s_t* src = s_base + r * s_stride;
      const acc_t* s;
      if constexpr (convert_in) {
        for (int64_t v = 0; v < V; ++v) s_buf[v] = static_cast<acc_t>(src[v]);
        s = s_buf.data();
      } else {
        s = src;
      }
      const acc_t w = acc_t(grad_scale) * (row_scale ? row_scale[r] : acc_t(1));
      acc_t* gr = nullptr;
      if constexpr (convert_out) {
        gr = g ? g_buf.data() : nullptr;
      } else {
        gr = g;  // may be s itself: topk_row reads every s[v] before it writes g[v]
      }
      loss[r] = topk_row<acc_t>(s, V, lp_base + r * k, idx, k, y, c, w, gr, sc);
      if constexpr (convert_out) {
        if (g) for (int64_t v = 0; v < V; ++v) g[v] = static_cast<g_t>(g_buf[v]);
      }
    }
  });
}

at::Tensor kd_loss_topk_rows_cpu(const at::Tensor& s, const at::Tensor& lp, const at::Tensor& idx,
                                 const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_scale,
                                 at::Tensor grad, double alpha, double temperature, int64_t divergence, double beta,
                                 int64_t ignore_index, double kd_scale, double grad_scale) {
  const auto acc_type = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(s.dim() == 2 && s.device().is_cpu(), "kd_loss_topk_rows: student must be a 2-D CPU tensor");
  const int64_t rows = s.size(0), V = s.size(1);
  TORCH_CHECK(s.stride(1) == 1 || V <= 1, "kd_loss_topk_rows: student must be contiguous along the vocabulary");
  TORCH_CHECK(lp.dim() == 2 && lp.size(0) == rows && lp.size(1) >= 1 && lp.size(1) <= V && lp.is_contiguous() &&
                  lp.scalar_type() == acc_type,
              "kd_loss_topk_rows: teacher_logprobs must be contiguous (", rows, ", k) ", acc_type,
              " with 1 <= k <= ", V, ", got ", lp.sizes(), " ", lp.scalar_type());
  const int64_t k = lp.size(1);
  TORCH_CHECK(idx.sizes() == lp.sizes() && idx.is_contiguous() && idx.scalar_type() == at::kLong,
              "kd_loss_topk_rows: teacher_indices must be contiguous int64 of teacher_logprobs' shape");
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "kd_loss_topk_rows: unknown divergence ", divergence);
  TORCH_CHECK(temperature > 0, "kd_loss_topk_rows: temperature must be > 0, got ", temperature);
  const bool write_grad = grad.dim() == 2;
  if (write_grad) {
    TORCH_CHECK(grad.sizes() == s.sizes() && (grad.stride(1) == 1 || V <= 1) &&
                    (grad.scalar_type() == s.scalar_type() || grad.scalar_type() == at::kFloat),
                "kd_loss_topk_rows: grad must have the student's shape and dtype (or float32)");
  }
  at::Tensor lab_c, rs_c;
  const int64_t* lab = nullptr;
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->numel() == rows,
                "kd_loss_topk_rows: labels must be int64 with one entry per row");
    lab_c = labels->contiguous();
    lab = lab_c.const_data_ptr<int64_t>();
  }
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->scalar_type() == acc_type && row_scale->numel() == rows,
                "kd_loss_topk_rows: row_scale must be ", acc_type, " with one entry per row");
    rs_c = row_scale->contiguous();
  }
  auto loss = at::empty({rows}, s.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_topk_rows", [&] {
    using s_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<s_t, double>, double, float>;
    TopkConsts<acc_t> c;
    c.inv_t = acc_t(1.0 / temperature);
    c.alpha = acc_t(alpha);
    c.c_kd = acc_t((1.0 - alpha) * kd_scale);
    c.beta = acc_t(beta);
    c.log_beta = divergence == kJSD ? acc_t(std::log(beta)) : acc_t(0);
    c.log_1mb = divergence == kJSD ? acc_t(std::log1p(-beta)) : acc_t(0);
    c.divergence = divergence;
    c.ce = lab != nullptr && alpha != 0.0;
    const s_t* sp = s.const_data_ptr<s_t>();
    const acc_t* lpp = lp.const_data_ptr<acc_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const acc_t* rs = rs_c.defined() ? rs_c.const_data_ptr<acc_t>() : nullptr;
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    if (write_grad && grad.scalar_type() != s.scalar_type()) {  // float32 gradient buffer
      topk_rows<acc_t, s_t, float>(sp, s.stride(0), lpp, ip, k, lab, rs, grad.mutable_data_ptr<float>(),
                                   grad.stride(0), out, rows, V, ignore_index, grad_scale, c);
    } else {
      s_t* gp = write_grad ? grad.mutable_data_ptr<s_t>() : nullptr;
      topk_rows<acc_t, s_t, s_t>(sp, s.stride(0), lpp, ip, k, lab, rs, gp, write_grad ? grad.stride(0) : 0, out,
                                 rows, V, ignore_index, grad_scale, c);
    }
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(memkern, CPU, m) {
  m.impl("kd_loss_topk_rows_kernel", &kd_loss_topk_rows_cpu);
}

}  // namespace memkern
