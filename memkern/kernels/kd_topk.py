"""Triton kernel of the top-k distillation loss's per-row form (memkern.ops.kd_topk).

``_kd_topk_rows_kernel``: one program per row of (rows x V) student logits: the row's loss
against the teacher's k + 1 buckets and, in the same launch, w * d loss / d student logits.
The passes are csrc/cpu/kd_topk.cpp's: maxima (of the row, and of the tail: the entries in
none of the k indices), normalisers (the tail's relative to its own maximum, so its log-mass
is exact where 1 - sum q would be rounding), the O(k) bucket arithmetic, the gradient.
Each pass streams the row in BLOCK-wide tiles; whether a column is one of the k indices is
a BLOCK x K_PAD comparison per tile, which also picks the column's bucket values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern import kd_options
from memkern.kernels.kd import (
    kl_term,
    log_mix,
    row_kernel_args,
    row_label,
    row_loss,
    row_weight,
    store_grad_tile,
    tile_columns,
)


@triton.jit
def _expm1(x):
    """e^x - 1 to a few ulp with exp and log only (Kahan: (u - 1) * x / log u, u = e^x)."""
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))


@triton.jit
def _log1p(x):
    """log(1 + x) for x > -1 (Kahan: log(v) * x / (v - 1), v = 1 + x)."""
    v = 1.0 + x
    return tl.where(v == 1.0, x, tl.log(v) * x / (v - 1.0))


@triton.jit
def _log1mexp(x):
    """log(1 - e^x) for x <= 0 (switch at -log 2); -inf at or past 0 (no tail mass)."""
    near_zero = x > -0.6931471805599453
    out = tl.where(near_zero, tl.log(-_expm1(tl.minimum(x, 0.0))), _log1p(-tl.exp(x)))
    return tl.where(x >= 0.0, float("-inf"), out)


@triton.jit
def _member(cols, idx):
    """(BLOCK x K_PAD) whether column c is index j, and (BLOCK,) whether c is any index."""
    eq = cols[:, None] == idx[None, :]
    return eq, tl.max(eq.to(tl.int32), axis=1) > 0


@triton.jit
def _kd_topk_rows_kernel(
    s_ptr, lp_ptr, idx_ptr, y_ptr, rs_ptr, g_ptr, loss_ptr, V, K, stride_s, stride_g,
    inv_t, alpha, c_kd, beta, log_beta, log_1mb, ignore_index,  # kernel_scalars(opts)
    grad_scale,
    HAS_LABELS: tl.constexpr, CE: tl.constexpr, DIV: tl.constexpr, COVERS_VOCAB: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    inf = float("inf")
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    offs = tl.arange(0, BLOCK).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    idx = tl.load(idx_ptr + row * K + ks, mask=kmask, other=-1)
    lp = tl.load(lp_ptr + row * K + ks, mask=kmask, other=-inf).to(tl.float32)
    y, valid = row_label(y_ptr, row, ignore_index, HAS_LABELS)
    idx = tl.where(valid, idx, -1)  # an ignored row's indices are never followed

    # pass 1: maxima of the row and of its tail, and NaN
    m_v = tl.full([BLOCK], -inf, tl.float32)
    mc_v = tl.full([BLOCK], -inf, tl.float32)
    nan_v = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
        s = tl.load(s_row + cols, mask=mask, other=-inf).to(tl.float32)
        _, member = _member(cols, idx)
        nan_v = nan_v | (s != s).to(tl.int32)
        s = tl.where(s == s, s, -inf)
        m_v = tl.maximum(m_v, s)
        mc_v = tl.maximum(mc_v, tl.where(member, -inf, s))
    m = tl.max(m_v, axis=0)
    mc = tl.max(mc_v, axis=0)
    student_ok = (tl.max(nan_v, axis=0) == 0) & (m > -inf) & (m < inf)
    tail = mc > -inf
    mc_safe = tl.where(tail, mc, 0.0)
    m_safe = tl.where(student_ok, m, 0.0)

    # pass 2: normalisers, the tail's relative to its own maximum
    z_v = tl.zeros([BLOCK], tl.float32)
    zc_v = tl.zeros([BLOCK], tl.float32)
    z1_v = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
        s = tl.load(s_row + cols, mask=mask, other=-inf).to(tl.float32)
        _, member = _member(cols, idx)
        z_v += tl.where(mask, tl.exp((s - m_safe) * inv_t), 0.0)
        zc_v += tl.where(mask & ~member, tl.exp((s - mc_safe) * inv_t), 0.0)  # 0 without a tail
        if CE:
            z1_v += tl.where(mask, tl.exp(s - m_safe), 0.0)
    log_z = tl.log(tl.sum(z_v, axis=0))
    log_zc = tl.where(tail, tl.log(tl.sum(zc_v, axis=0)), -inf)
    s_top = tl.load(s_row + idx, mask=kmask & (idx >= 0), other=-inf).to(tl.float32)
    lq = tl.where(kmask, (s_top - m_safe) * inv_t - log_z, -inf)
    lq_t = tl.where(tail, (mc_safe - m_safe) * inv_t + log_zc - log_z, -inf)

    # the teacher's buckets: p_j = e^lp_j, the tail 1 - sum p (none when k = V), softened at T
    t_nan = tl.max((lp != lp).to(tl.int32), axis=0) > 0
    mt = tl.max(tl.where(lp == lp, lp, -inf), axis=0)
    mt_safe = tl.where(mt > -inf, mt, 0.0)
    covered = tl.where(mt > -inf, mt_safe + tl.log(tl.sum(tl.where(kmask, tl.exp(lp - mt_safe), 0.0), axis=0)), -inf)
    log_tail = _log1mexp(covered)
    if COVERS_VOCAB:
        log_tail = -inf
    b = lp * inv_t
    b_t = log_tail * inv_t
    mb = tl.maximum(tl.max(b, axis=0), b_t)
    mb_safe = tl.where((mb > -inf) & (mb < inf), mb, 0.0)
    lse_b = mb_safe + tl.log(tl.sum(tl.where(kmask, tl.exp(b - mb_safe), 0.0), axis=0) + tl.exp(b_t - mb_safe))
    lP = b - lse_b
    lP_t = b_t - lse_b
    undefined = (student_ok == 0) | t_nan | (mb == -inf) | (mb == inf)

    # the divergence over the k + 1 buckets; gb and G = sum_b Q_b gb_b for the gradient
    P = tl.where(kmask, tl.exp(lP), 0.0)
    Q = tl.where(kmask, tl.exp(lq), 0.0)
    P_t = tl.exp(lP_t)
    Q_t = tl.exp(lq_t)
    G = 0.0
    gb = lq - lP
    gb_t = lq_t - lP_t
    if DIV == 0:
        d = tl.sum(kl_term(P, lP - lq), axis=0) + kl_term(P_t, lP_t - lq_t)
    elif DIV == 1:
        G = tl.sum(kl_term(Q, gb), axis=0) + kl_term(Q_t, gb_t)
        d = G
    else:
        lm = log_mix(lP, lq, log_beta, log_1mb)
        lm_t = log_mix(lP_t, lq_t, log_beta, log_1mb)
        gb = lq - lm
        gb_t = lq_t - lm_t
        dp = tl.sum(kl_term(P, lP - lm), axis=0) + kl_term(P_t, lP_t - lm_t)
        G = tl.sum(kl_term(Q, gb), axis=0) + kl_term(Q_t, gb_t)
        d = beta * dp + (1.0 - beta) * G
    ce = 0.0
    z1 = 1.0
    if CE:
        z1 = tl.sum(z1_v, axis=0)
        ce = tl.log(z1) - (tl.load(s_row + y).to(tl.float32) - m_safe)
    tl.store(loss_ptr + row, row_loss(alpha, ce, c_kd, d, valid, undefined))

    if WRITE_GRAD:
        # pass 3: the gradient (each tile is read before its slots are written, so g may be
        # the student tensor itself)
        w = row_weight(grad_scale, rs_ptr, row, valid, HAS_ROW_SCALE)
        w_ce = alpha * w / z1
        w_kd = c_kd * inv_t * w
        if DIV == 2:
            w_kd = w_kd * (1.0 - beta)
        no_grad = undefined | ((DIV == 1) & (c_kd != 0.0) & (d == inf))
        g_row = g_ptr + row * stride_g
        for start in range(0, V, BLOCK):
            cols, mask = tile_columns(start, offs, V)
            s = tl.load(s_row + cols, mask=mask, other=-inf).to(tl.float32)
            eq, member = _member(cols, idx)
            q = tl.exp((s - m_safe) * inv_t - log_z)
            if DIV == 0:
                # q - P_b * share: an index takes its own P, the tail's P is shared out as
                # the student shares its tail
                share = tl.where(tail, tl.exp((s - mc_safe) * inv_t - log_zc), 0.0)
                p_top = tl.sum(tl.where(eq, P[None, :], 0.0), axis=1)
                g = q - tl.where(member, p_top, P_t * share)
            else:
                g_top = tl.sum(tl.where(eq, (gb - G)[None, :], 0.0), axis=1)
                g = kl_term(q, tl.where(member, g_top, gb_t - G))
            store_grad_tile(g_row, cols, mask, g, w_kd, s - m_safe, w_ce, y, alpha * w, valid, no_grad, CE)


def _tiles(vocab: int, k: int) -> tuple[int, int]:
    """(BLOCK, K_PAD): a tile's membership test is BLOCK x K_PAD comparisons, kept to 16K."""
    k_pad = max(16, triton.next_power_of_2(k))
    block = min(1024, max(16, triton.next_power_of_2(max(vocab, 1))), max(16, 16384 // k_pad))
    return block, k_pad


def kd_topk_loss_rows(
    s, lp, idx, labels, row_scale, grad, opts: kd_options.KDOptions, grad_scale: float
) -> torch.Tensor:
    rows, vocab = s.shape
    k = lp.shape[1]
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    block, k_pad = _tiles(vocab, k)
    _kd_topk_rows_kernel[(rows,)](
        s,
        lp,
        idx,
        V=vocab,
        K=k,
        stride_s=s.stride(0),
        **row_kernel_args(labels, row_scale, grad, loss, opts, grad_scale),
        COVERS_VOCAB=k >= vocab,
        BLOCK=block,
        K_PAD=k_pad,
    )
    return loss
