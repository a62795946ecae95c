"""Triton kernels of the vocabulary-parallel distillation loss: the three per-shard steps of
memkern.distributed.vocab_shard (whose docstring defines them) over a (chunk x V_shard) block
of student and teacher logits, one program per row streaming the shard in BLOCK-wide tiles.
Statistics in float32; masked entries follow memkern/reference.py through the helpers of
memkern.kernels.kd (kl_term, log_mix)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memkern.kd_options import KDOptions
from memkern.kernels.kd import _block, kl_term, log_mix, tile_columns

N_STATS = 5


@triton.jit
def _row_stats_kernel(s_ptr, t_ptr, out_ptr, V, stride_s, stride_t, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK).to(tl.int64)
    ms_v = tl.full([BLOCK], float("-inf"), tl.float32)
    mt_v = tl.full([BLOCK], float("-inf"), tl.float32)
    nan_s = tl.zeros([BLOCK], tl.int32)
    nan_t = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        nan_s = nan_s | (s != s).to(tl.int32)
        nan_t = nan_t | (t != t).to(tl.int32)
        ms_v = tl.maximum(ms_v, tl.where(s == s, s, float("-inf")))
        mt_v = tl.maximum(mt_v, tl.where(t == t, t, float("-inf")))
    # A NaN makes the row undefined: report +inf, which wins the MAX across shards as NaN would.
    ms = tl.where(tl.max(nan_s, axis=0) > 0, float("inf"), tl.max(ms_v, axis=0))
    mt = tl.where(tl.max(nan_t, axis=0) > 0, float("inf"), tl.max(mt_v, axis=0))
    # an all -inf shard adds exp(-inf) = 0: shift by 0 there (-inf - -inf would be NaN)
    shift_s = tl.where(ms == float("-inf"), 0.0, ms)
    shift_t = tl.where(mt == float("-inf"), 0.0, mt)
    z1_v = tl.zeros([BLOCK], tl.float32)
    zs_v = tl.zeros([BLOCK], tl.float32)
    zt_v = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
        ds = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) - shift_s
        dt = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) - shift_t
        z1_v += tl.where(mask, tl.exp(ds), 0.0)
        zs_v += tl.where(mask, tl.exp(ds * inv_t), 0.0)
        zt_v += tl.where(mask, tl.exp(dt * inv_t), 0.0)
    out = out_ptr + row * 5
    tl.store(out, ms)
    tl.store(out + 1, mt)
    tl.store(out + 2, tl.sum(z1_v, axis=0))
    tl.store(out + 3, tl.sum(zs_v, axis=0))
    tl.store(out + 4, tl.sum(zt_v, axis=0))


@triton.jit
def _log_probs(s_row, t_row, cols, mask, m_s, m_t, log_zs, log_zt, inv_t):
    """log q and log p of the entries ``cols`` from the global statistics (-inf past V)."""
    s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    return (s - m_s) * inv_t - log_zs, (t - m_t) * inv_t - log_zt


@triton.jit
def _partials_kernel(
    s_ptr, t_ptr, g_ptr, out_ptr, V, stride_s, stride_t, inv_t, log_beta, log_1mb,
    DIV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g = g_ptr + row * 5
    m_s, m_t = tl.load(g), tl.load(g + 1)
    log_zs, log_zt = tl.load(g + 3), tl.load(g + 4)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    a_v = tl.zeros([BLOCK], tl.float32)
    b_v = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
        lq, lp = _log_probs(s_row, t_row, cols, mask, m_s, m_t, log_zs, log_zt, inv_t)
        if DIV == 0:
            a_v += tl.where(mask, kl_term(tl.exp(lp), lp - lq), 0.0)
        elif DIV == 1:
            a_v += tl.where(mask, kl_term(tl.exp(lq), lq - lp), 0.0)
        else:
            lm = log_mix(lp, lq, log_beta, log_1mb)
            a_v += tl.where(mask, kl_term(tl.exp(lp), lp - lm), 0.0)
            b_v += tl.where(mask, kl_term(tl.exp(lq), lq - lm), 0.0)
    tl.store(out_ptr + row * 2, tl.sum(a_v, axis=0))
    tl.store(out_ptr + row * 2 + 1, tl.sum(b_v, axis=0))


@triton.jit
def _grad_kernel(
    s_ptr, t_ptr, y_ptr, g_ptr, tot_ptr, w_ptr, out_ptr, V, stride_s, stride_t, stride_o,
    inv_t, alpha, c_kd, beta, log_beta, log_1mb,
    CE: tl.constexpr, DIV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    o_row = out_ptr + row * stride_o
    g = g_ptr + row * 5
    m_s, m_t = tl.load(g), tl.load(g + 1)
    log_z1, log_zs, log_zt = tl.load(g + 2), tl.load(g + 3), tl.load(g + 4)
    total_a, total_b = tl.load(tot_ptr + row * 2), tl.load(tot_ptr + row * 2 + 1)
    w = tl.load(w_ptr + row)
    w_kd = c_kd * inv_t * w
    y = -1
    if CE:
        y = tl.load(y_ptr + row)
    # reverse_kl of +inf: the gradient has no limit
    no_grad = (DIV == 1) & (c_kd != 0.0) & (total_a == float("inf"))
    offs = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(0, V, BLOCK):
        cols, mask = tile_columns(start, offs, V)
        lq, lp = _log_probs(s_row, t_row, cols, mask, m_s, m_t, log_zs, log_zt, inv_t)
        q = tl.exp(lq)
        if DIV == 0:
            d = q - tl.exp(lp)
        elif DIV == 1:
            d = kl_term(q, lq - lp - total_a)
        else:
            d = (1.0 - beta) * kl_term(q, lq - log_mix(lp, lq, log_beta, log_1mb) - total_b)
        grad = tl.where(w_kd == 0.0, 0.0, w_kd * d)  # no soft term (alpha = 1), even if +inf
        if CE:
            s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad += alpha * w * (tl.exp(s - m_s - log_z1) - tl.where(cols == y, 1.0, 0.0))
        grad = tl.where(no_grad, float("nan"), grad)
        # the student tile is read above before its slot is written: out may be the student itself
        tl.store(o_row + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _mix_logs(opts: KDOptions) -> dict:
    jsd = opts.divergence == "jsd"
    return dict(log_beta=math.log(opts.beta) if jsd else 0.0, log_1mb=math.log1p(-opts.beta) if jsd else 0.0)


def row_stats(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    rows, vocab = s.shape
    out = torch.empty(rows, N_STATS, dtype=torch.float32, device=s.device)
    if rows:
        s, t = _rows(s), _rows(t)
        _row_stats_kernel[(rows,)](s, t, out, vocab, s.stride(0), t.stride(0), 1.0 / temperature, BLOCK=_block(vocab))
    return out


def divergence_partials(s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    rows, vocab = s.shape
    out = torch.empty(rows, 2, dtype=torch.float32, device=s.device)
    if rows:
        s, t = _rows(s), _rows(t)
        _partials_kernel[(rows,)](
            s, t, stats.float().contiguous(), out, vocab, s.stride(0), t.stride(0), 1.0 / opts.temperature,
            **_mix_logs(opts), DIV=opts.divergence_id, BLOCK=_block(vocab),
        )  # fmt: skip
    return out


def shard_grad(s, t, local_labels, stats, totals, row_weight, opts: KDOptions, out: torch.Tensor) -> None:
    rows, vocab = s.shape
    if rows == 0 or vocab == 0:
        return
    if out.stride(1) != 1:
        raise ValueError(f"kd_shard.shard_grad: out must have unit stride on the vocabulary, got {out.stride()}")
    s, t = (x if x is out else _rows(x) for x in (s, t))
    ce = local_labels is not None and opts.alpha != 0.0
    _grad_kernel[(rows,)](
        s,
        t,
        local_labels.contiguous() if ce else out,
        stats.float().contiguous(),
        totals.float().contiguous(),
        row_weight.float().contiguous(),
        out,
        vocab,
        s.stride(0),
        t.stride(0),
        out.stride(0),
        1.0 / opts.temperature,
        opts.alpha,
        (1.0 - opts.alpha) * opts.kd_scale,
        opts.beta,
        **_mix_logs(opts),
        CE=ce,
        DIV=opts.divergence_id,
        BLOCK=_block(vocab),
    )
