// The top-k distillation loss per row on CUDA (torch-free; see kd_topk_launchers.h).
//
// One block per row; the passes are those of csrc/cpu/kd_topk.cpp: the maxima of the row and
// of its tail (the entries in none of the k indices), the normalisers (the tail's relative
// to its own maximum), the O(k) bucket arithmetic on one thread, the gradient. The row's k
// indices and bucket values sit in shared memory; an entry's membership is a scan of the
// indices (k is small next to V).
#include "kd_loss.cuh"
#include "kd_topk_launchers.h"

namespace memkern::cuda {
namespace {

constexpr int kThreads = 256;

// The bucket of entry v: its position among the k indices, or -1 (the tail).
__device__ __forceinline__ int64_t bucket_of(int64_t v, const int64_t* idx, int64_t k) {
  for (int64_t j = 0; j < k; ++j)
    if (idx[j] == v) return j;
  return -1;
}

__device__ __forceinline__ float log1mexp(float x) {
  if (x != x) return x;
  if (x >= 0.0f) return -INFINITY;
  return x > -0.693147180559945309f ? logf(-expm1f(x)) : log1pf(-expf(x));
}

struct RowScalars {
  float d, G, p_tail, g_tail, log_z, log_zc;
  bool undefined;
};

template <typename S, typename GradT>
__global__ void __launch_bounds__(kThreads) kd_topk_rows_kernel(
    const S* s_base, int64_t s_stride, const float* __restrict__ lp_base, const int64_t* __restrict__ idx_base,
    int64_t k, const int64_t* __restrict__ labels, const float* __restrict__ row_scale, GradT* g_base, int64_t g_stride,
    float* __restrict__ loss, int64_t V, KDParams p) {
  __shared__ float smem[kThreads / 32];
  __shared__ RowScalars rs;
  extern __shared__ unsigned char dynamic[];
  int64_t* idx = reinterpret_cast<int64_t*>(dynamic);  // k
  float* lq = reinterpret_cast<float*>(idx + k);      // k + 1 each
  float* lP = lq + (k + 1);
  float* gb = lP + (k + 1);
  const int64_t row = blockIdx.x;
  // Not __restrict__: g may alias s (each element is read before its slot is written).
  const S* s = s_base + row * s_stride;
  GradT* g = g_base ? g_base + row * g_stride : nullptr;
  const int64_t y = labels ? labels[row] : -1;
  if (kd::ignored_row<kThreads>(labels, row, p, loss, g, V)) return;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) idx[j] = idx_base[row * k + j];
  __syncthreads();

  // pass 1: maxima of the row and of its tail, and NaN
  float m = -INFINITY, mc = -INFINITY, nan = 0.0f;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float sv = kd::load_f(s + v);
    nan += sv != sv ? 1.0f : 0.0f;
    m = fmaxf(m, sv);  // fmaxf ignores NaN; the flag carries it
    if (bucket_of(v, idx, k) < 0) mc = fmaxf(mc, sv);
  }
  m = kd::block_reduce<kThreads, true>(m, smem);
  mc = kd::block_reduce<kThreads, true>(mc, smem);
  nan = kd::block_reduce<kThreads, false>(nan, smem);
  const bool student_ok = nan == 0.0f && isfinite(m);
  const bool tail = mc > -INFINITY;

  // pass 2: normalisers, the tail's relative to its own maximum
  const float inv_t = p.inv_t;
  float z = 0.0f, zc = 0.0f, z1 = 0.0f;
  if (student_ok) {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const float sv = kd::load_f(s + v);
      z += expf((sv - m) * inv_t);
      if (p.ce) z1 += expf(sv - m);
      if (tail && bucket_of(v, idx, k) < 0) zc += expf((sv - mc) * inv_t);
    }
  }
  z = kd::block_reduce<kThreads, false>(z, smem);
  zc = kd::block_reduce<kThreads, false>(zc, smem);
  z1 = kd::block_reduce<kThreads, false>(z1, smem);

  // the buckets, on one thread: O(k)
  if (threadIdx.x == 0) {
    const float log_z = logf(z), log_zc = tail ? logf(zc) : -INFINITY;
    for (int64_t j = 0; j < k; ++j) lq[j] = (kd::load_f(s + idx[j]) - m) * inv_t - log_z;
    lq[k] = tail ? (mc - m) * inv_t + log_zc - log_z : -INFINITY;
    // the teacher's buckets: p_j = e^lp_j, the tail 1 - sum p (none when k = V), softened at T
    const float* lp = lp_base + row * k;
    bool t_nan = false;
    float mt = -INFINITY;
    for (int64_t j = 0; j < k; ++j) {
      t_nan |= lp[j] != lp[j];
      mt = fmaxf(mt, lp[j]);
    }
    float covered = -INFINITY;
    if (mt > -INFINITY) {
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) sum += expf(lp[j] - mt);
      covered = mt + logf(sum);
    }
    const float log_tail = k >= V ? -INFINITY : log1mexp(covered);
    float mb = -INFINITY;
    for (int64_t b = 0; b <= k; ++b) {
      lP[b] = (b < k ? lp[b] : log_tail) * inv_t;
      mb = fmaxf(mb, lP[b]);
    }
    const bool teacher_ok = !t_nan && isfinite(mb);
    float sum_b = 0.0f;
    for (int64_t b = 0; b <= k; ++b) sum_b += teacher_ok ? expf(lP[b] - mb) : 0.0f;
    const float lse_b = mb + logf(sum_b);
    float d = 0.0f, G = 0.0f, dp = 0.0f;
    for (int64_t b = 0; b <= k; ++b) {
      lP[b] -= lse_b;
      const float P = expf(lP[b]), Q = expf(lq[b]);
      if (p.divergence == 0) {
        d += kd::kl_term(P, lP[b] - lq[b]);
      } else {
        // jsd: log m is -inf only where P = Q = 0, which kl_term selects away
        const float lm = p.divergence == 1 ? lP[b] : kd::log_mix(lP[b], lq[b], p.log_beta, p.log_1mb);
        gb[b] = lq[b] - lm;
        dp += kd::kl_term(P, lP[b] - lm);
        G += kd::kl_term(Q, gb[b]);
      }
    }
    if (p.divergence == 1) d = G;
    if (p.divergence == 2) d = p.beta * dp + (1.0f - p.beta) * G;
    const float ce = p.ce ? logf(z1) - (kd::load_f(s + y) - m) : 0.0f;
    const bool kd_on = p.c_kd != 0.0f;  // a soft term of weight 0 (alpha = 1) adds 0, even if +inf
    const bool undefined = !student_ok || !teacher_ok;
    loss[row] = undefined ? NAN : p.alpha * ce + (kd_on ? p.c_kd * d : 0.0f);
    rs = RowScalars{d, G, expf(lP[k]), p.divergence == 0 ? 0.0f : gb[k] - G, log_z, log_zc,
                    undefined || (p.divergence == 1 && kd_on && d == INFINITY)};
  }
  __syncthreads();
  if (g == nullptr) return;

  // pass 3: the gradient, each entry by its bucket
  const float w = p.grad_scale * (row_scale ? row_scale[row] : 1.0f);
  const float w_ce = p.ce ? p.alpha * w / z1 : 0.0f;
  const float w_kd = p.c_kd != 0.0f ? p.c_kd * inv_t * w : 0.0f;
  const float w_q = p.divergence == 2 ? w_kd * (1.0f - p.beta) : w_kd;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    if (rs.undefined) {
      kd::store_f(g + v, NAN);
      continue;
    }
    const float sv = kd::load_f(s + v);
    const int64_t b = bucket_of(v, idx, k);
    const float q = expf((sv - m) * inv_t - rs.log_z);
    float gv;
    if (p.divergence == 0) {  // q - P_b * share: the tail's P shared out as the student shares its tail
      const float target = b >= 0 ? expf(lP[b]) : rs.p_tail * (tail ? expf((sv - mc) * inv_t - rs.log_zc) : 0.0f);
      gv = w_kd == 0.0f ? 0.0f : w_kd * (q - target);
    } else {
      gv = (q == 0.0f || w_q == 0.0f) ? 0.0f : w_q * q * (b >= 0 ? gb[b] - rs.G : rs.g_tail);
    }
    if (p.ce) gv += w_ce * expf(sv - m) - (v == y ? p.alpha * w : 0.0f);
    kd::store_f(g + v, gv);
  }
}

template <typename S, typename G>
cudaError_t launch_typed(const void* s, int64_t s_stride, const float* lp, const int64_t* idx, int64_t k,
                         const int64_t* labels, const float* row_scale, void* grad, int64_t g_stride, float* loss,
                         int64_t rows, int64_t V, const KDParams& p, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(k) * sizeof(int64_t) + 3 * static_cast<size_t>(k + 1) * sizeof(float);
  kd_topk_rows_kernel<S, G><<<static_cast<unsigned>(rows), kThreads, shared, stream>>>(
      static_cast<const S*>(s), s_stride, lp, idx, k, labels, row_scale, static_cast<G*>(grad), g_stride, loss, V,
      p);
  return cudaGetLastError();
}

template <typename S>
cudaError_t dispatch_grad(const void* s, int64_t s_stride, const float* lp, const int64_t* idx, int64_t k,
                          const int64_t* labels, const float* row_scale, void* grad, FloatKind g_kind,
                          int64_t g_stride, float* loss, int64_t rows, int64_t V, const KDParams& p,
                          cudaStream_t stream) {
  // The gradient is in the student's dtype, or fp32 (a float32 buffer for a low-precision student).
  if (g_kind == FloatKind::f32)
    return launch_typed<S, float>(s, s_stride, lp, idx, k, labels, row_scale, grad, g_stride, loss, rows, V, p,
                                  stream);
  return launch_typed<S, S>(s, s_stride, lp, idx, k, labels, row_scale, grad, g_stride, loss, rows, V, p, stream);
}

}  // namespace

cudaError_t launch_kd_topk_rows(const void* s, FloatKind s_kind, int64_t s_stride, const float* lp,
                                const int64_t* idx, int64_t k, const int64_t* labels, const float* row_scale,
                                void* grad, FloatKind g_kind, int64_t g_stride, float* loss, int64_t rows,
                                int64_t V, const KDParams& p, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (k < 1 || k > kTopkMaxK) return cudaErrorInvalidValue;
  switch (s_kind) {
    case FloatKind::f32:
      return dispatch_grad<float>(s, s_stride, lp, idx, k, labels, row_scale, grad, g_kind, g_stride, loss, rows,
                                  V, p, stream);
    case FloatKind::f16:
      return dispatch_grad<__half>(s, s_stride, lp, idx, k, labels, row_scale, grad, g_kind, g_stride, loss, rows,
                                   V, p, stream);
    case FloatKind::bf16:
      return dispatch_grad<__nv_bfloat16>(s, s_stride, lp, idx, k, labels, row_scale, grad, g_kind, g_stride, loss,
                                          rows, V, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace memkern::cuda
