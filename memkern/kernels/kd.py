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
def tile_columns(start, offs, V):
    """(cols, mask): the row columns of the BLOCK-wide tile at ``start`` and which of them are
    in the row (the last tile runs past V)."""
    cols = start + offs
    return cols, cols < V


# What the row kernels (_kd_rows_kernel below, memkern.kernels.kd_topk's) do alike with a
# row's label, its loss and its gradient tiles; the fused-linear stats kernel takes row_loss too.
@triton.jit
def row_label(y_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """(y, valid): the row's label (0 where it is ignored, so that it still indexes) and
    whether the row counts (always, without labels)."""
    valid = True
    y = 0
    if HAS_LABELS:
        y = tl.load(y_ptr + row)
        valid = y != ignore_index
        y = tl.where(valid, y, 0)
    return y, valid


@triton.jit
def row_loss(alpha, ce, c_kd, d, valid, undefined):
    """alpha * ce + c_kd * d for a row (or a block of rows): 0 where the row does not count,
    NaN where it counts but is no distribution (undefined_row)."""
    loss = alpha * ce + soft_weight(c_kd, d)
    loss = tl.where(valid, loss, 0.0)
    return tl.where(undefined & valid, float("nan"), loss)


@triton.jit
def row_weight(grad_scale, rs_ptr, row, valid, HAS_ROW_SCALE: tl.constexpr):
    """The row's gradient weight w = grad_scale * row_scale[row], 0 where it does not count."""
    w = grad_scale
    if HAS_ROW_SCALE:
        w = w * tl.load(rs_ptr + row).to(tl.float32)
    return tl.where(valid, w, 0.0)


@triton.jit
def store_grad_tile(g_row, cols, mask, g_kd, w_kd, ds, w_ce, y, alpha_w, valid, no_grad, CE: tl.constexpr):
    """Writes a tile of w * d loss / d logits: w_kd * g_kd, the divergence's part (0 with no
    soft term, alpha = 1, even where g_kd is +inf), and with CE the cross entropy's
    w_ce * e^ds - alpha * w at the label (ds: the logits less their maximum); 0 in a row that
    does not count (NaN logits included), NaN where the gradient is undefined."""
    g = tl.where(w_kd == 0.0, 0.0, w_kd * g_kd)
    if CE:
        g += w_ce * tl.exp(ds) - tl.where(cols == y, alpha_w, 0.0)
    g = tl.where(valid, g, 0.0)
    g = tl.where(no_grad & valid, float("nan"), g)
    tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def _shifted_tile(s_row, t_row, cols, mask, ms, mt, inv_t):
    """(ds, a, b) of a tile: the student's logits less their maximum, and both sides' at
    temperature T, a = ds / T and b = (t - mt) / T. Scaled before they are subtracted: a
    shifted logit past the float range (finfo.min at T < 1) is -inf in the log-ratio as in
    the weight."""
    ds = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) - ms
    a = ds * inv_t
    b = (tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) - mt) * inv_t
    return ds, a, b


@triton.jit
def _kd_rows_kernel(
    s_ptr, t_ptr, y_ptr, rs_ptr, g_ptr, loss_ptr, V, stride_s, stride_t, stride_g,
    inv_t, alpha, c_kd, beta, log_beta, log_1mb, ignore_index,  # kernel_scalars(opts)
    grad_scale,
    HAS_LABELS: tl.constexpr, CE: tl.constexpr, DIV: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK).to(tl.int64)
    y, valid = row_label(y_ptr, row, ignore_index, HAS_LABELS)

    # pass 1: maxima and NaN
    ms_v = tl.full([BLOCK], float("-inf"), tl.float32)
    mt_v = tl.full([BLOCK], float("-inf"), tl.float32)
    nan_v = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
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
        cols, mask = tile_columns(start, offs, V)
        ds, a, b = _shifted_tile(s_row, t_row, cols, mask, ms, mt, inv_t)
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
            cols, mask = tile_columns(start, offs, V)
            _, a, b = _shifted_tile(s_row, t_row, cols, mask, ms, mt, inv_t)
            lq = a - log_zs
            lp = b - log_zt
            lm = log_mix(lp, lq, log_beta, log_1mb)
            dp_v += tl.where(mask, kl_term(tl.exp(lp), lp - lm), 0.0)
            dq_v += tl.where(mask, kl_term(tl.exp(lq), lq - lm), 0.0)
        kq = tl.sum(dq_v, axis=0)
        d = beta * tl.sum(dp_v, axis=0) + (1.0 - beta) * kq
    tl.store(loss_ptr + row, row_loss(alpha, ce, c_kd, d, valid, undefined))

    if WRITE_GRAD:
        # pass 4: the gradient (the student tile is read before its slot is written, so
        # g may be the student tensor itself)
        w = row_weight(grad_scale, rs_ptr, row, valid, HAS_ROW_SCALE)
        w_ce = alpha * w / z1
        w_kd = c_kd * inv_t * w
        # reverse_kl of +inf: the gradient has no limit
        no_grad = undefined | ((DIV == 1) & (c_kd != 0.0) & (mean_ab == float("inf")))
        g_row = g_ptr + row * stride_g
        for start in range(0, V, BLOCK):
            cols, mask = tile_columns(start, offs, V)
            ds, a, b = _shifted_tile(s_row, t_row, cols, mask, ms, mt, inv_t)
            lq = a - log_zs
            lp = b - log_zt
            q = tl.exp(lq)
            if DIV == 0:
                g = q - tl.exp(lp)
            elif DIV == 1:
                g = kl_term(q, (a - b) - mean_ab)  # = log q - log p - d
            else:
                g = (1.0 - beta) * kl_term(q, lq - log_mix(lp, lq, log_beta, log_1mb) - kq)
            store_grad_tile(g_row, cols, mask, g, w_kd, ds, w_ce, y, alpha * w, valid, no_grad, CE)


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


def row_kernel_args(labels, row_scale, grad, loss, opts: kd_options.KDOptions, grad_scale: float) -> dict:
    """The arguments the row kernels (_kd_rows_kernel, kd_topk's) take alike, by name: the
    label, row-scale, gradient (written when ``grad`` is 2-D) and loss pointers, ``loss``
    standing in for absent ones (never read: the constexpr flags say so), the options'
    scalars and the flags."""
    write_grad = grad.dim() == 2
    return dict(
        y_ptr=labels if labels is not None else loss,
        rs_ptr=row_scale if row_scale is not None else loss,
        g_ptr=grad if write_grad else loss,
        loss_ptr=loss,
        stride_g=grad.stride(0) if write_grad else 0,
        grad_scale=grad_scale,
        **kernel_scalars(opts),
        HAS_LABELS=labels is not None,
        CE=labels is not None and opts.alpha != 0.0,
        DIV=opts.divergence_id,
        HAS_ROW_SCALE=row_scale is not None,
        WRITE_GRAD=write_grad,
    )


def kd_loss_rows(s, t, labels, row_scale, grad, opts, grad_scale: float) -> torch.Tensor:
    rows, vocab = s.shape
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    _kd_rows_kernel[(rows,)](
        s,
        t,
        V=vocab,
        stride_s=s.stride(0),
        stride_t=t.stride(0),
        **row_kernel_args(labels, row_scale, grad, loss, opts, grad_scale),
        BLOCK=_block(vocab),
    )
    return loss
