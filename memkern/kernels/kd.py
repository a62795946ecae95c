"""Triton kernel of the distillation loss's logits form, and what the fused-linear kernels
(memkern.kernels.kd_linear) share with it.

``_kd_rows_kernel``: one program per row of (rows x V) logits: the row's loss and, in the
same launch, w * d loss / d student logits. Same passes as csrc/cpu/kd_loss.cpp: maxima,
normalisers and KL numerators relative to the maxima (exact cancellation of huge logits),
the JSD pass, the gradient pass; each pass streams the row in BLOCK-wide tiles. The
@triton.jit helpers below (log_mix, kl_term, undefined_row, soft_weight, ...) are the other
distillation kernels' too (top-k, vocabulary shards, fused linear).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memkern import kd_options

FKL, RKL, JSD = 0, 1, 2


@triton.jit
def log_mix(lp, lq, log_beta, log_1mb):
    # log(beta * e^lp + (1 - beta) * e^lq) without overflow (NaN where both are -inf: it
    # only meets kl_term with a == 0 there)
    a = lp + log_beta
    b = lq + log_1mb
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


# Masked logits follow memkern/reference.py (its notes on masked and non-finite logits):
# an entry of probability 0 adds nothing to a KL sum, even where the other side's
# log-probability is -inf; reverse_kl of +inf leaves a NaN gradient; rows holding NaN or
# +inf, or all -inf, are NaN. These three helpers are those rules for every kernel here.
@triton.jit
def kl_term(a, log_ratio):
    """a * log_ratio, 0 where a == 0 (0 log 0 = 0, also against a -inf log-probability)."""
    return tl.where(a == 0.0, 0.0, a * log_ratio)


@triton.jit
def undefined_row(has_nan, ms, mt):
    """A row is no distribution: NaN or +inf in it (NaN-free maxima ms, mt), or all -inf."""
    inf = float("inf")
    return has_nan | (ms == inf) | (ms == -inf) | (mt == inf) | (mt == -inf)


@triton.jit
def soft_weight(c_kd, d):
    """c_kd * d, with 0 for a switched-off soft term (alpha = 1) even where d is +inf."""
    return tl.where(c_kd == 0.0, 0.0, c_kd * d)


@triton.jit
def _kd_rows_kernel(
    s_ptr,
    t_ptr,
    y_ptr,
    rs_ptr,
    g_ptr,
    loss_ptr,
    V,
    stride_s,
    stride_t,
    stride_g,
    inv_t,
    alpha,
    c_kd,
    beta,
    log_beta,
    log_1mb,
    ignore_index,
    grad_scale,
    HAS_LABELS: tl.constexpr,
    CE: tl.constexpr,
    DIV: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK).to(tl.int64)
    valid = True
    y = 0
    if HAS_LABELS:
        y = tl.load(y_ptr + row)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)

    # pass 1: maxima and NaN
    ms_v = tl.full([BLOCK], float("-inf"), tl.float32)
    mt_v = tl.full([BLOCK], float("-inf"), tl.float32)
    nan_v = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        nan_v = nan_v | ((s != s) | (t != t)).to(tl.int32)
        ms_v = tl.maximum(ms_v, tl.where(s == s, s, float("-inf")))
        mt_v = tl.maximum(mt_v, tl.where(t == t, t, float("-inf")))
    ms = tl.max(ms_v, axis=0)
    mt = tl.max(mt_v, axis=0)
    undefined = undefined_row(tl.max(nan_v, axis=0) > 0, ms, mt)

    # pass 2: normalisers and the KL numerator, relative to the maxima
    z1_v = tl.zeros([BLOCK], tl.float32)
    zs_v = tl.zeros([BLOCK], tl.float32)
    zt_v = tl.zeros([BLOCK], tl.float32)
    num_v = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        ds = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) - ms
        # scaled before they are subtracted: a shifted logit past the float range
        # (finfo.min at T < 1) is -inf in the log-ratio as in the weight
        a = ds * inv_t
        b = (tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) - mt) * inv_t
        es = tl.where(mask, tl.exp(a), 0.0)
        et = tl.where(mask, tl.exp(b), 0.0)
        if CE:
            z1_v += tl.where(mask, tl.exp(ds), 0.0)
        zs_v += es
        zt_v += et
        if DIV == 0:
            num_v += kl_term(et, b - a)
        if DIV == 1:
            num_v += kl_term(es, a - b)
    zs = tl.sum(zs_v, axis=0)
    zt = tl.sum(zt_v, axis=0)
    log_zs = tl.log(zs)
    log_zt = tl.log(zt)
    ce = 0.0
    z1 = 1.0
    if CE:
        z1 = tl.sum(z1_v, axis=0)
        s_y = tl.load(s_row + y).to(tl.float32)
        ce = tl.log(z1) - (s_y - ms)
    kq = 0.0
    # reverse_kl's E_q[a - b]: its gradient takes log q - log p - d as (a - b) - E_q[a - b],
    # without the normalisers, which is exactly 0 where q is one-hot however huge the logits
    mean_ab = 0.0
    if DIV == 0:
        d = tl.sum(num_v, axis=0) / zt - log_zt + log_zs
    elif DIV == 1:
        mean_ab = tl.sum(num_v, axis=0) / zs
        d = mean_ab - log_zs + log_zt
    else:
        # pass 3 (jsd)
        dp_v = tl.zeros([BLOCK], tl.float32)
        dq_v = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            lq = (tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) - ms) * inv_t - log_zs
            lp = (tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) - mt) * inv_t - log_zt
            lm = log_mix(lp, lq, log_beta, log_1mb)
            dp_v += tl.where(mask, kl_term(tl.exp(lp), lp - lm), 0.0)
            dq_v += tl.where(mask, kl_term(tl.exp(lq), lq - lm), 0.0)
        kq = tl.sum(dq_v, axis=0)
        d = beta * tl.sum(dp_v, axis=0) + (1.0 - beta) * kq
    loss = alpha * ce + soft_weight(c_kd, d)
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(undefined & valid, float("nan"), loss)
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        # pass 4: the gradient (the student tile is read before its slot is written, so
        # g may be the student tensor itself)
        w = grad_scale
        if HAS_ROW_SCALE:
            w = w * tl.load(rs_ptr + row).to(tl.float32)
        w = tl.where(valid, w, 0.0)
        w_ce = alpha * w / z1
        w_kd = c_kd * inv_t * w
        # reverse_kl of +inf: the gradient has no limit
        no_grad = undefined | ((DIV == 1) & (c_kd != 0.0) & (mean_ab == float("inf")))
        g_row = g_ptr + row * stride_g
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            ds = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) - ms
            a = ds * inv_t
            b = (tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) - mt) * inv_t
            lq = a - log_zs
            lp = b - log_zt
            q = tl.exp(lq)
            if DIV == 0:
                g = q - tl.exp(lp)
            elif DIV == 1:
                g = kl_term(q, (a - b) - mean_ab)  # = log q - log p - d
            else:
                g = (1.0 - beta) * kl_term(q, lq - log_mix(lp, lq, log_beta, log_1mb) - kq)
            g = tl.where(w_kd == 0.0, 0.0, w_kd * g)  # no soft term (alpha = 1), even if +inf
            if CE:
                g += w_ce * tl.exp(ds) - tl.where(cols == y, alpha * w, 0.0)
            g = tl.where(valid, g, 0.0)  # NaN logits of an ignored row give 0, not NaN
            g = tl.where(no_grad & valid, float("nan"), g)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def _block(vocab: int) -> int:
    # 1024-wide tiles keep a 128K vocabulary to 125 trips per pass; small rows get one tile.
    return min(1024, max(16, triton.next_power_of_2(max(vocab, 1))))


def kernel_scalars(opts: kd_options.KDOptions) -> dict:
    jsd = opts.divergence == "jsd"
    return dict(
        inv_t=1.0 / opts.temperature,
        alpha=opts.alpha,
        c_kd=(1.0 - opts.alpha) * opts.kd_scale,
        beta=opts.beta,
        log_beta=math.log(opts.beta) if jsd else 0.0,
        log_1mb=math.log1p(-opts.beta) if jsd else 0.0,
        ignore_index=opts.ignore_index,
    )


def kd_loss_rows(s, t, labels, row_scale, grad, opts, grad_scale: float) -> torch.Tensor:
    rows, vocab = s.shape
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    write_grad = grad.dim() == 2
    dummy = loss  # stands in for absent pointers (never read: the constexpr flags say so)
    _kd_rows_kernel[(rows,)](
        s,
        t,
        labels if labels is not None else dummy,
        row_scale if row_scale is not None else dummy,
        grad if write_grad else dummy,
        loss,
        vocab,
        s.stride(0),
        t.stride(0),
        grad.stride(0) if write_grad else 0,
        grad_scale=grad_scale,
        **kernel_scalars(opts),
        HAS_LABELS=labels is not None,
        CE=labels is not None and opts.alpha != 0.0,
        DIV=opts.divergence_id,
        HAS_ROW_SCALE=row_scale is not None,
        WRITE_GRAD=write_grad,
        BLOCK=_block(vocab),
    )
    return loss
