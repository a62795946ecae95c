"""The forward of the fused-linear distillation loss in Triton: ``_linear_kd_stats_kernel``
computes logit tiles with tl.dot and folds them into online per-row statistics (the loss per
row and eight float32 statistics for the gradient, columns ST_*), so logits never reach
memory; and what the gradient kernel (memkern.kernels.kd_linear) shares with it: the
statistics' columns, ``logit_tiles``, the launch flags and the contiguity rule.
memkern.kernels.kd_linear describes the design.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern import _library
from memkern.kernels.kd import (
    kernel_scalars,
    kl_term,
    log_mix,
    row_loss,
    undefined_row,
)

# Columns of the per-row statistics (rows x N_STATS float32) that the stats kernel leaves for
# the gradient kernel (memkern.kernels.kd_linear): the maxima of the student and teacher
# logits, the logs of the temperature-T normalisers and the temperature-1 normaliser of the
# cross entropy (all relative to the maxima), reverse KL's E_q[a - b] (its gradient needs
# it), JSD's KL(q || m) term kq, and whether the row is undefined (memkern.kernels.kd's
# undefined_row).
ST_MS, ST_MT, ST_LOG_ZS, ST_LOG_ZT, ST_Z1, ST_MEAN_AB, ST_KQ, ST_UNDEFINED = (tl.constexpr(i) for i in range(8))
N_STATS = tl.constexpr(8)


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows_m,
    mask_m,
    cols_v,
    mask_v,
    H,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    scale=1.0,
    cap=0.0,
    HAS_CAP: tl.constexpr = False,
):
    """(BLOCK_M x BLOCK_V) logits h[rows] @ w[cols].T (+ b[cols]) in fp32, then times
    ``scale`` and, with HAS_CAP, soft-capped: cap * tanh(z / cap), -inf kept as -inf
    (memkern.kernels.kd_chunks.transform_logits; the gradient kernel multiplies by
    logit_slope)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    for k in range(0, H, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < H
        h = tl.load(h_ptr + rows_m[:, None] * stride_h + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + cols_v[:, None] * stride_w + kk[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter multiplies bf16 operands of tl.dot wrongly
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if HAS_CAP:
        # tanh(x) = 1 - 2 / (e^2x + 1): +-1 at +-inf without NaN; the absolute error near 0
        # (~1e-7 * cap) is float32's rounding of a logit of size cap.
        capped = cap * (1.0 - 2.0 / (tl.exp(2.0 * (acc / cap)) + 1.0))
        acc = tl.where(acc == float("-inf"), acc, capped)
    return acc


@triton.jit
def logit_slope(z, scale, cap, HAS_CAP: tl.constexpr):
    """d z' / d z of logits_tile's transform, from the transformed tile z': scale * (1 -
    tanh^2), with tanh = z' / cap; 0 at -inf (a masked entry gets no gradient)."""
    if HAS_CAP:
        th = z / cap
        return tl.where(z == float("-inf"), 0.0, scale * (1.0 - th * th))
    return tl.zeros_like(z) + scale


@triton.jit
def logit_tiles(
    cols, V, rows_m, mask_m, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    hs_ptr, ws_ptr, bs_ptr, HS, stride_hs, stride_ws, s_scale, s_cap,
    HAS_BS: tl.constexpr, PREC_S: tl.constexpr, UPCAST_S: tl.constexpr, HAS_S_CAP: tl.constexpr,
    ht_ptr, wt_ptr, bt_ptr, HT, stride_ht, stride_wt, t_scale, t_cap,
    HAS_BT: tl.constexpr, PREC_T: tl.constexpr, UPCAST_T: tl.constexpr, HAS_T_CAP: tl.constexpr,
):  # fmt: skip
    """(mask_v, s, t): which of the vocabulary columns ``cols`` are below V, and the student's
    and the teacher's (BLOCK_M x BLOCK_V) logit tiles there, each head's through logits_tile.
    The stats and gradient kernels both take their tiles here, so that the gradient's
    recomputed logits are the very ones the statistics were taken from."""
    mask_v = cols < V
    s = logits_tile(hs_ptr, ws_ptr, bs_ptr, rows_m, mask_m, cols, mask_v, HS, stride_hs, stride_ws, HAS_BS,
                    BLOCK_M, BLOCK_V, BLOCK_K, PREC_S, UPCAST_S, s_scale, s_cap, HAS_S_CAP)  # fmt: skip
    t = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows_m, mask_m, cols, mask_v, HT, stride_ht, stride_wt, HAS_BT,
                    BLOCK_M, BLOCK_V, BLOCK_K, PREC_T, UPCAST_T, t_scale, t_cap, HAS_T_CAP)  # fmt: skip
    return mask_v, s, t


@triton.jit
def _linear_kd_stats_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, loss_ptr, stats_ptr,
    N, V, HS, HT, stride_hs, stride_ws, stride_ht, stride_wt,
    inv_t, alpha, c_kd, beta, log_beta, log_1mb, ignore_index,  # kernel_scalars(opts)
    s_scale, s_cap, t_scale, t_cap,  # transform_args(transform), with its HAS_*_CAP
    parts_ptr,
    HAS_LABELS: tl.constexpr, CE: tl.constexpr, DIV: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr, WRITE_STATS: tl.constexpr, WRITE_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows_m = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = rows_m < N
    offs_v = tl.arange(0, BLOCK_V).to(tl.int64)
    valid = mask_m
    y = tl.zeros([BLOCK_M], tl.int64)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows_m, mask=mask_m, other=ignore_index)
        valid = mask_m & (y != ignore_index)

    neg_inf = float("-inf")
    # Online statistics per row: running maxima of s and t, normalisers relative to them,
    # the label logit, and the KL numerator sum e^b (b - a) (reverse: e^a (a - b)) with
    # a = (s - ms) / T and b = (t - mt) / T relative to the running maxima, as in the row
    # kernel (scaled before they are subtracted). A new maximum rescales the normaliser by
    # r = e^-shift and moves every old a - b by the difference of the scaled shifts.
    ms = tl.full([BLOCK_M], neg_inf, tl.float32)
    mt = tl.full([BLOCK_M], neg_inf, tl.float32)
    z1 = tl.zeros([BLOCK_M], tl.float32)
    zs = tl.zeros([BLOCK_M], tl.float32)
    zt = tl.zeros([BLOCK_M], tl.float32)
    num = tl.zeros([BLOCK_M], tl.float32)
    s_y = tl.zeros([BLOCK_M], tl.float32)
    nan = tl.zeros([BLOCK_M], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs_v
        mask_v, s, t = logit_tiles(cols, V, rows_m, mask_m, BLOCK_M, BLOCK_V, BLOCK_K,
            hs_ptr, ws_ptr, bs_ptr, HS, stride_hs, stride_ws, s_scale, s_cap, HAS_BS, PREC_S, UPCAST_S, HAS_S_CAP,
            ht_ptr, wt_ptr, bt_ptr, HT, stride_ht, stride_wt, t_scale, t_cap, HAS_BT, PREC_T, UPCAST_T, HAS_T_CAP,
        )  # fmt: skip
        nan = nan | tl.max(((s != s) | (t != t)).to(tl.int32), axis=1)
        ms_new = tl.maximum(ms, tl.max(tl.where(mask_v[None, :], s, neg_inf), axis=1))
        mt_new = tl.maximum(mt, tl.max(tl.where(mask_v[None, :], t, neg_inf), axis=1))
        # Weight 0 for padding columns and -inf logits (where a row that has seen only -inf
        # gives -inf - (-inf)); padding's a and b are 0, so plain inputs meet no NaN. The
        # shift from a maximum of -inf is taken as 0: what it would move is 0 or +inf.
        live_s = mask_v[None, :] & (s != neg_inf)
        live_t = mask_v[None, :] & (t != neg_inf)
        a = tl.where(mask_v[None, :], (s - ms_new[:, None]) * inv_t, 0.0)
        b = tl.where(mask_v[None, :], (t - mt_new[:, None]) * inv_t, 0.0)
        es = tl.where(live_s, tl.exp(a), 0.0)
        et = tl.where(live_t, tl.exp(b), 0.0)
        shift_s = tl.where((ms == ms_new) | (ms == neg_inf), 0.0, (ms_new - ms) * inv_t)
        shift_t = tl.where((mt == mt_new) | (mt == neg_inf), 0.0, (mt_new - mt) * inv_t)
        rs = tl.exp(-shift_s)
        rt = tl.exp(-shift_t)
        if CE:
            r1 = tl.where((ms == ms_new) | (ms == neg_inf), 1.0, tl.exp(ms - ms_new))
            z1 = z1 * r1 + tl.sum(tl.where(live_s, tl.exp(s - ms_new[:, None]), 0.0), axis=1)
            s_y += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), axis=1)
        # Old terms whose weights the new maximum makes underflow (r == 0) add 0, as the
        # row kernel's final weights would; with nothing seen yet (z == 0) there are none.
        if DIV == 0:
            moved = tl.where(zt == 0.0, 0.0, num - zt * (shift_t - shift_s))
            num = kl_term(rt, moved) + tl.sum(kl_term(et, b - a), axis=1)
        if DIV == 1:
            moved = tl.where(zs == 0.0, 0.0, num - zs * (shift_s - shift_t))
            num = kl_term(rs, moved) + tl.sum(kl_term(es, a - b), axis=1)
        zs = zs * rs + tl.sum(es, axis=1)
        zt = zt * rt + tl.sum(et, axis=1)
        ms = ms_new
        mt = mt_new
    log_zs = tl.log(zs)
    log_zt = tl.log(zt)
    ce = tl.zeros([BLOCK_M], tl.float32)
    if CE:
        ce = tl.log(z1) + ms - s_y
    kq = tl.zeros([BLOCK_M], tl.float32)
    mean_ab = tl.zeros([BLOCK_M], tl.float32)  # reverse_kl's E_q[a - b], as in _kd_rows_kernel
    if DIV == 0:
        d = num / zt - log_zt + log_zs
    elif DIV == 1:
        mean_ab = num / zs
        d = mean_ab - log_zs + log_zt
    else:
        # second sweep: the JSD needs the normalised distributions
        dp = tl.zeros([BLOCK_M], tl.float32)
        dq = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            mask_v, s, t = logit_tiles(v0 + offs_v, V, rows_m, mask_m, BLOCK_M, BLOCK_V, BLOCK_K,
                hs_ptr, ws_ptr, bs_ptr, HS, stride_hs, stride_ws, s_scale, s_cap, HAS_BS, PREC_S, UPCAST_S, HAS_S_CAP,
                ht_ptr, wt_ptr, bt_ptr, HT, stride_ht, stride_wt, t_scale, t_cap, HAS_BT, PREC_T, UPCAST_T, HAS_T_CAP,
            )  # fmt: skip
            lq = (s - ms[:, None]) * inv_t - log_zs[:, None]
            lp = (t - mt[:, None]) * inv_t - log_zt[:, None]
            lm = log_mix(lp, lq, log_beta, log_1mb)
            dp += tl.sum(tl.where(mask_v[None, :], kl_term(tl.exp(lp), lp - lm), 0.0), axis=1)
            dq += tl.sum(tl.where(mask_v[None, :], kl_term(tl.exp(lq), lq - lm), 0.0), axis=1)
        kq = dq
        d = beta * dp + (1.0 - beta) * dq
    undefined = undefined_row(nan > 0, ms, mt)
    tl.store(loss_ptr + rows_m, row_loss(alpha, ce, c_kd, d, valid, undefined), mask=mask_m)
    if WRITE_PARTS:
        # the two terms apart (rows x 2: ce, D), each 0 for ignored rows and NaN for undefined ones
        for_row = valid & undefined
        tl.store(parts_ptr + rows_m * 2, tl.where(for_row, float("nan"), tl.where(valid, ce, 0.0)), mask=mask_m)
        tl.store(parts_ptr + rows_m * 2 + 1, tl.where(for_row, float("nan"), tl.where(valid, d, 0.0)), mask=mask_m)
    if WRITE_STATS:
        # what the gradient kernel needs to rebuild d loss / d logits from recomputed tiles
        st = stats_ptr + rows_m * N_STATS
        tl.store(st + ST_MS, ms, mask=mask_m)
        tl.store(st + ST_MT, mt, mask=mask_m)
        tl.store(st + ST_LOG_ZS, log_zs, mask=mask_m)
        tl.store(st + ST_LOG_ZT, log_zt, mask=mask_m)
        tl.store(st + ST_Z1, z1, mask=mask_m)
        tl.store(st + ST_MEAN_AB, mean_ab, mask=mask_m)
        tl.store(st + ST_KQ, kq, mask=mask_m)
        tl.store(st + ST_UNDEFINED, undefined.to(tl.float32), mask=mask_m)


def contiguous_all(*xs):
    return tuple(x.contiguous() if x is not None else None for x in xs)


def transform_args(transform) -> dict:
    """The logit transform's kernel arguments; ``transform`` is (student scale, student cap,
    teacher scale, teacher cap) with cap 0 for none (memkern.kd_options.KDExtras.transform),
    or None."""
    s_scale, s_cap, t_scale, t_cap = transform if transform is not None else (1.0, 0.0, 1.0, 0.0)
    return dict(
        s_scale=s_scale,
        s_cap=s_cap or 1.0,
        t_scale=t_scale,
        t_cap=t_cap or 1.0,
        HAS_S_CAP=s_cap != 0.0,
        HAS_T_CAP=t_cap != 0.0,
    )


def linear_operands(hs, ws, bs, ht, wt, bt, labels, dummy) -> dict:
    """The two heads and the labels as the fused-linear kernels take them, by name: pointers
    (``dummy`` standing in for an absent bias or labels, never read: the flags say so),
    hidden sizes and row strides."""
    return dict(
        hs_ptr=hs,
        ws_ptr=ws,
        bs_ptr=bs if bs is not None else dummy,
        ht_ptr=ht,
        wt_ptr=wt,
        bt_ptr=bt if bt is not None else dummy,
        y_ptr=labels if labels is not None else dummy,
        HS=hs.shape[1],
        HT=ht.shape[1],
        stride_hs=hs.stride(0),
        stride_ws=ws.stride(0),
        stride_ht=ht.stride(0),
        stride_wt=wt.stride(0),
    )


def linear_flags(hs, bs, ht, bt, labels, opts, *, terms_apart: bool = False) -> dict:
    """Compile-time flags shared by the fused-linear kernels. ``terms_apart``: the cross
    entropy is computed whatever alpha (its weights come per row)."""
    interpret = _library.triton_interpret()
    return dict(
        HAS_LABELS=labels is not None,
        CE=labels is not None and (opts.alpha != 0.0 or terms_apart),
        DIV=opts.divergence_id,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
        # fp32 products in full fp32 (tf32 would cost ~1e-3 relative on the logits)
        PREC_S="ieee" if hs.dtype == torch.float32 else None,
        PREC_T="ieee" if ht.dtype == torch.float32 else None,
        UPCAST_S=interpret and hs.dtype == torch.bfloat16,
        UPCAST_T=interpret and ht.dtype == torch.bfloat16,
    )


def linear_kd_stats(
    hs, ws, bs, ht, wt, bt, labels, opts, stats=None, *, parts=None, transform=None, terms_apart=False
) -> torch.Tensor:
    """Per-row losses of the fused-linear form, logits never leaving the chip; with
    ``stats`` (rows x N_STATS float32) also the row statistics of the gradient kernel; with
    ``parts`` (rows x 2 float32) the cross entropy and the divergence apart; ``transform``:
    see transform_args; ``terms_apart``: the cross entropy's statistics whatever alpha."""
    rows, vocab = hs.shape[0], ws.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=hs.device)
    if rows == 0:
        return loss
    hs, ws, bs, ht, wt, bt = contiguous_all(hs, ws, bs, ht, wt, bt)
    config = stats_launch_config(hs.dtype, ht.dtype)
    dummy = loss
    _linear_kd_stats_kernel[(triton.cdiv(rows, config["BLOCK_M"]),)](
        **linear_operands(hs, ws, bs, ht, wt, bt, labels, dummy),
        loss_ptr=loss,
        stats_ptr=stats if stats is not None else dummy,
        N=rows,
        V=vocab,
        **kernel_scalars(opts),
        **transform_args(transform),
        parts_ptr=parts if parts is not None else dummy,
        **linear_flags(hs, bs, ht, bt, labels, opts, terms_apart=terms_apart or parts is not None),
        WRITE_STATS=stats is not None,
        WRITE_PARTS=parts is not None,
        **config,
    )
    return loss


def grad_launch_config(hs_dtype: torch.dtype, ht_dtype: torch.dtype) -> dict:
    """Tiles and launch options of the gradient kernel. Its BLOCK_K is the stats kernel's
    too, so that both sum each logit in the same order and the recomputed logits match the
    statistics they are normalised with."""
    if _library.triton_interpret():
        # Small tiles, so test shapes of a few rows and ~100-200 columns still cross row,
        # column and hidden tile boundaries and several programs add into each accumulator.
        return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16)
    if torch.float32 in (hs_dtype, ht_dtype):
        # fp32 products ("ieee") run on the FMA units with their operand tiles in registers:
        # at 64 x 128 x 64 ptxas spilled 0.8 KB a thread on sm_90 and 2.5 KB on sm_80;
        # 64 x 64 x 16 takes 196 / 254 registers and spills nothing (bench/NOTES.md).
        return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=2)
    # Chosen for sm_80/sm_90 from the compiler's report (tools/triton_aot.py): bf16/fp16
    # tensor-core products; 198-255 registers, no spill on sm_90 (80-124 bytes on sm_80);
    # 72-112 KiB of shared memory.
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=2)


def stats_launch_config(hs_dtype: torch.dtype, ht_dtype: torch.dtype) -> dict:
    """Tiles and launch options of the stats kernel; its BLOCK_K is the gradient kernel's."""
    block_k = grad_launch_config(hs_dtype, ht_dtype)["BLOCK_K"]
    if _library.triton_interpret():
        return dict(BLOCK_M=16, BLOCK_V=64, BLOCK_K=block_k)
    # 64 rows a program: bf16/fp16 products compile to Hopper's wgmma (16 rows gave
    # mma.sync), no spill on sm_80 or sm_90, and at 8192 rows the 128 programs fill an H200's
    # 132 SMs in one wave, walking the vocabulary nearly in step so that each weight tile
    # is read from HBM about once and shared through L2 (16 rows: 512 programs, 4 waves).
    return dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=block_k, num_warps=8)
