// Device code of the distillation loss per row (no torch headers).
//
// One block per row; the passes are those of csrc/cpu/kd_loss.cpp (maxima; normalisers and
// KL numerators relative to the maxima; the JSD sums; the gradient), each a strided sweep
// of the row by the block followed by a block reduction. Rows are read up to four times,
// from L2 for rows up to a few MB; the gradient is written once.
//
// Masked logits follow memkern/reference.py (its notes on masked and non-finite logits),
// as the CPU kernel does: an entry of probability 0 adds nothing to a KL sum even where
// the other side's log-probability is -inf (kl_term); reverse_kl of +inf leaves a NaN
// gradient; rows holding NaN or +inf, or all -inf, are NaN.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "kd_launchers.h"

namespace memkern::cuda::kd {

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Reduction over the block; every thread gets the result. `smem` holds kThreads / 32 floats.
template <int kThreads, bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = kMax ? -INFINITY : 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) v = kMax ? fmaxf(v, smem[w]) : v + smem[w];
  return v;
}

// a * log_ratio, 0 where a == 0 (0 log 0 = 0, also against a -inf log-probability)
__device__ __forceinline__ float kl_term(float a, float log_ratio) { return a == 0.0f ? 0.0f : a * log_ratio; }

// NaN where lp and lq are both -inf: it only meets kl_term with a == 0 there
__device__ __forceinline__ float log_mix(float lp, float lq, float log_beta, float log_1mb) {
  const float a = lp + log_beta, b = lq + log_1mb;
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  return hi + log1pf(expf(lo - hi));
}

// A row whose label is ignore_index: loss 0 and a zero gradient, written by the whole block,
// which then leaves together. True for such a row.
template <int kThreads, typename G>
__device__ __forceinline__ bool ignored_row(const int64_t* labels, int64_t row, const KDParams& p, float* loss, G* g,
                                            int64_t V) {
  if (!labels || labels[row] != p.ignore_index) return false;
  if (threadIdx.x == 0) loss[row] = 0.0f;
  if (g)
    for (int64_t j = threadIdx.x; j < V; j += kThreads) store_f(g + j, 0.0f);
  return true;
}

template <typename S, typename T, typename G, int kThreads>
__global__ void __launch_bounds__(kThreads) kd_rows_kernel(
    const S* __restrict__ s_base, int64_t s_stride, const T* __restrict__ t_base, int64_t t_stride,
    const int64_t* __restrict__ labels, const float* __restrict__ row_scale, G* g_base,
    int64_t g_stride, float* __restrict__ loss, int64_t V, KDParams p) {
  __shared__ float smem[kThreads / 32];
  const int64_t row = blockIdx.x;
  // Not __restrict__: g may alias s (each element is read before its slot is written).
  const S* s = s_base + row * s_stride;
  const T* t = t_base + row * t_stride;
  G* g = g_base ? g_base + row * g_stride : nullptr;
  const int64_t y = labels ? labels[row] : -1;
  if (ignored_row<kThreads>(labels, row, p, loss, g, V)) return;

  // pass 1: maxima and NaN
  float ms = -INFINITY, mt = -INFINITY, nan = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float sv = load_f(s + j), tv = load_f(t + j);
    nan += (sv != sv) || (tv != tv) ? 1.0f : 0.0f;
    ms = fmaxf(ms, sv);  // fmaxf ignores NaN; the flag carries it
    mt = fmaxf(mt, tv);
  }
  ms = block_reduce<kThreads, true>(ms, smem);
  mt = block_reduce<kThreads, true>(mt, smem);
  nan = block_reduce<kThreads, false>(nan, smem);
  // NaN or +inf anywhere, or all -inf (V == 0 too): no distribution, NaN
  if (nan > 0.0f || !(isfinite(ms) && isfinite(mt))) {
    if (threadIdx.x == 0) loss[row] = NAN;
    if (g)
      for (int64_t j = threadIdx.x; j < V; j += kThreads) store_f(g + j, NAN);
    return;
  }

  // pass 2: normalisers and the KL numerator relative to the maxima; a = (s-ms)/T and
  // b = (t-mt)/T are scaled before they are subtracted (finfo.min at T < 1 is -inf)
  const float inv_t = p.inv_t;
  float z1 = 0.0f, zs = 0.0f, zt = 0.0f, num = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float ds = load_f(s + j) - ms;
    const float a = ds * inv_t, b = (load_f(t + j) - mt) * inv_t;
    const float es = expf(a), et = expf(b);
    if (p.ce) z1 += expf(ds);
    zs += es;
    zt += et;
    num += p.divergence == 1 ? kl_term(es, a - b) : kl_term(et, b - a);
  }
  z1 = block_reduce<kThreads, false>(z1, smem);
  zs = block_reduce<kThreads, false>(zs, smem);
  zt = block_reduce<kThreads, false>(zt, smem);
  num = block_reduce<kThreads, false>(num, smem);
  const float log_zs = logf(zs), log_zt = logf(zt);
  const float ce = p.ce ? logf(z1) - (load_f(s + y) - ms) : 0.0f;
  // mean_ab: reverse_kl's E_q[a - b]; its gradient takes log q - log p - d as
  // (a - b) - mean_ab, exactly 0 where q is one-hot however huge the logits
  float d = 0.0f, kq = 0.0f, mean_ab = 0.0f;
  if (p.divergence == 0) {
    d = num / zt - log_zt + log_zs;
  } else if (p.divergence == 1) {
    mean_ab = num / zs;
    d = mean_ab - log_zs + log_zt;
  } else {
    float dp = 0.0f, dq = 0.0f;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float lq = (load_f(s + j) - ms) * inv_t - log_zs, lp = (load_f(t + j) - mt) * inv_t - log_zt;
      const float lm = log_mix(lp, lq, p.log_beta, p.log_1mb);
      dp += kl_term(expf(lp), lp - lm);
      dq += kl_term(expf(lq), lq - lm);
    }
    dp = block_reduce<kThreads, false>(dp, smem);
    kq = block_reduce<kThreads, false>(dq, smem);
    d = p.beta * dp + (1.0f - p.beta) * kq;
  }
  const bool kd = p.c_kd != 0.0f;  // a soft term of weight 0 (alpha = 1) adds 0, even if +inf
  if (threadIdx.x == 0) loss[row] = p.alpha * ce + (kd ? p.c_kd * d : 0.0f);
  if (!g) return;
  if (p.divergence == 1 && kd && d == INFINITY) {  // reverse_kl of +inf: the gradient has no limit
    for (int64_t j = threadIdx.x; j < V; j += kThreads) store_f(g + j, NAN);
    return;
  }

  // pass 4: the gradient
  const float w = p.grad_scale * (row_scale ? row_scale[row] : 1.0f);
  const float w_ce = p.ce ? p.alpha * w / z1 : 0.0f;
  const float w_kd = kd ? p.c_kd * inv_t * w : 0.0f;
  const float inv_zs = 1.0f / zs, inv_zt = 1.0f / zt;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float ds = load_f(s + j) - ms;
    const float a = ds * inv_t, b = (load_f(t + j) - mt) * inv_t;
    float gj;
    if (p.divergence == 0) {
      gj = w_kd * (expf(a) * inv_zs - expf(b) * inv_zt);
    } else {
      const float lq = a - log_zs;
      const float ratio = p.divergence == 1 ? (a - b) - mean_ab
                                            : lq - log_mix(b - log_zt, lq, p.log_beta, p.log_1mb) - kq;
      const float w_q = p.divergence == 1 ? w_kd : w_kd * (1.0f - p.beta);
      gj = w_q == 0.0f ? 0.0f : w_q * kl_term(expf(lq), ratio);
    }
    if (p.ce) gj += w_ce * expf(ds) - (j == y ? p.alpha * w : 0.0f);
    store_f(g + j, gj);
  }
}

}  // namespace memkern::cuda::kd
