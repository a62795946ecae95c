"""Triton kernels of the fused-linear distillation loss (the lm_head inside the loss).

* ``_linear_kd_stats_kernel`` (memkern.kernels.kd_linear_stats): the fused-linear forward: a
  program owns BLOCK_M rows and walks the vocabulary in BLOCK_V tiles, computing each tile
  of student and teacher logits with tl.dot over the hidden dimension and folding it into
  running (online) maxima and normalisers at once, so logits never reach memory (the JSD
  takes a second sweep with the final statistics). It writes the loss per row and, when
  gradients are wanted, eight float32 statistics per row (columns ``ST_*`` of
  memkern.kernels.kd_linear_stats): what the gradient needs besides the logits themselves.
* ``_linear_kd_grad_kernel``: the fused-linear gradient, with the structure of "cut cross-
  entropy" (Wijmans et al., 2024). Grid (row tiles x vocabulary tiles); a program recomputes
  its student and teacher logit tiles with the same ``logit_tiles``
  (memkern.kernels.kd_linear_stats) and hidden tile as the stats kernel, turns them and the
  row statistics into g = w_i d l_i / d s (the formulas of the gradient pass of
  memkern.kernels.kd's ``_kd_rows_kernel``), and adds g @ ws[cols] into grad_h[rows], g.T @
  hs[rows] into grad_w[cols] and the column sums of g into grad_b[cols], looping over the
  student's hidden dimension in BLOCK_K slices, with atomic adds into float32 accumulators.

Why this structure for training: no rows x V tensor of any kind exists. Besides the
gradients themselves the extra memory is rows x 8 floats of statistics, grad_h's fp32
accumulator (rows x H_s) and grad_w's: for a float32 weight the gradient itself, for a
half-precision one a slab of at most WEIGHT_GRAD_SLAB_BYTES (256 MiB) of vocabulary rows,
cast into the weight's dtype as soon as it is complete, so the memory does not grow with
the vocabulary. Rows whose label is ignore_index never enter a kernel (kd_options.kept_rows).
The price is recomputation. Predicted from counting, not measured: the stats pass does 2
logit matmuls (student and teacher; 4 with the JSD's second sweep), the gradient pass 2
recomputed logit matmuls and the 2 gradient matmuls, so 6 matmul-equivalents (8 for the
JSD) against the 4 of the eager composition (the teacher's products count in proportion to
its hidden size). bench/NOTES.md has the atomic traffic and the measured figures.

The atomics make the summation order of grad_h, grad_w and grad_b depend on the order in
which programs run: on a GPU two runs differ by float32 rounding (the loss does not: each
row's statistics are summed by one program in a fixed order). Under TRITON_INTERPRET=1
programs run one at a time and runs repeat exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern import kd_options
from memkern.kernels.kd import kernel_scalars, kl_term, log_mix
from memkern.kernels.kd_linear_stats import (
    N_STATS,
    ST_KQ,
    ST_LOG_ZS,
    ST_LOG_ZT,
    ST_MEAN_AB,
    ST_MS,
    ST_MT,
    ST_UNDEFINED,
    ST_Z1,
    contiguous_all,
    grad_launch_config,
    linear_flags,
    linear_kd_stats,
    linear_operands,
    logit_slope,
    logit_tiles,
    transform_args,
)


@triton.jit
def _linear_kd_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, rs_ptr, stats_ptr, gh_ptr, gw_ptr, gb_ptr,
    N, V0, V, HS, HT, stride_hs, stride_ws, stride_ht, stride_wt,
    inv_t, alpha, c_kd, beta, log_beta, log_1mb, ignore_index,  # kernel_scalars(opts)
    grad_scale,
    s_scale, s_cap, t_scale, t_cap,  # transform_args(transform), with its HAS_*_CAP
    ce_rs_ptr,
    HAS_LABELS: tl.constexpr, CE: tl.constexpr, DIV: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    HAS_CE_ROW_SCALE: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    HAS_S_CAP: tl.constexpr, HAS_T_CAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M rows x BLOCK_V columns) tile of g = w_i * d l_i / d s (pass 4 of
    ``_kd_rows_kernel``, from recomputed logits and the saved row statistics), added into
    grad_h[rows] (g @ ws[cols]), grad_w[cols] (g.T @ hs[rows]) and grad_b[cols] (column sums
    of g) with atomics: other programs own the same rows (other column tiles) and the same
    columns (other row tiles). The launch covers vocabulary columns V0 .. V - 1 (one slab);
    gw_ptr points at the slab's accumulator, whose row 0 is column V0."""
    rows_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = V0 + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_m = rows_m < N
    valid = mask_m
    y = tl.zeros([BLOCK_M], tl.int64)
    if HAS_LABELS:
        y = tl.load(y_ptr + rows_m, mask=mask_m, other=ignore_index)
        valid = mask_m & (y != ignore_index)
    st = stats_ptr + rows_m * N_STATS
    ms = tl.load(st + ST_MS, mask=mask_m, other=0.0)
    mt = tl.load(st + ST_MT, mask=mask_m, other=0.0)
    log_zs = tl.load(st + ST_LOG_ZS, mask=mask_m, other=0.0)
    log_zt = tl.load(st + ST_LOG_ZT, mask=mask_m, other=0.0)
    no_grad = tl.load(st + ST_UNDEFINED, mask=mask_m, other=0.0) > 0
    w = tl.zeros([BLOCK_M], tl.float32) + grad_scale
    if HAS_ROW_SCALE:
        w = w * tl.load(rs_ptr + rows_m, mask=mask_m, other=0.0).to(tl.float32)
    w = tl.where(valid, w, 0.0)

    mask_v, s, t = logit_tiles(cols, V, rows_m, mask_m, BLOCK_M, BLOCK_V, BLOCK_K,
        hs_ptr, ws_ptr, bs_ptr, HS, stride_hs, stride_ws, s_scale, s_cap, HAS_BS, PREC_S, UPCAST_S, HAS_S_CAP,
        ht_ptr, wt_ptr, bt_ptr, HT, stride_ht, stride_wt, t_scale, t_cap, HAS_BT, PREC_T, UPCAST_T, HAS_T_CAP,
    )  # fmt: skip
    ds = s - ms[:, None]
    a = ds * inv_t
    b = (t - mt[:, None]) * inv_t
    lq = a - log_zs[:, None]
    lp = b - log_zt[:, None]
    q = tl.exp(lq)
    w_kd = (c_kd * inv_t * w)[:, None]
    if DIV == 0:
        g = q - tl.exp(lp)
    elif DIV == 1:
        mean_ab = tl.load(st + ST_MEAN_AB, mask=mask_m, other=0.0)
        no_grad = no_grad | ((c_kd != 0.0) & (mean_ab == float("inf")))  # reverse_kl of +inf: no limit
        g = kl_term(q, (a - b) - mean_ab[:, None])  # = log q - log p - d
    else:
        kq = tl.load(st + ST_KQ, mask=mask_m, other=0.0)
        g = (1.0 - beta) * kl_term(q, lq - log_mix(lp, lq, log_beta, log_1mb) - kq[:, None])
    g = tl.where(w_kd == 0.0, 0.0, w_kd * g)  # no soft term (alpha = 1), even if +inf
    if CE:
        z1 = tl.load(st + ST_Z1, mask=mask_m, other=1.0)
        w_label = alpha * w
        if HAS_CE_ROW_SCALE:  # the terms' weights apart: the cross entropy's own per row
            w_label = tl.where(valid, grad_scale * tl.load(ce_rs_ptr + rows_m, mask=mask_m, other=0.0), 0.0)
        g += (w_label / z1)[:, None] * tl.exp(ds) - tl.where(cols[None, :] == y[:, None], w_label[:, None], 0.0)
    g = g * logit_slope(s, s_scale, s_cap, HAS_S_CAP)  # d loss / d raw logits
    live = valid[:, None] & mask_v[None, :]
    g = tl.where(live, g, 0.0)  # NaN logits of an ignored row give 0, not NaN
    g = tl.where(live & no_grad[:, None], float("nan"), g)
    if HAS_BS:
        tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=mask_v, sem="relaxed")

    # The products take g in the student's dtype, as the matmuls of the chunked path do.
    gd = g.to(hs_ptr.dtype.element_ty)
    if UPCAST_S:
        gd = gd.to(tl.float32)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    for k in range(0, HS, BLOCK_K):
        kk = k + offs_k
        mask_k = kk < HS
        w_tile = tl.load(
            ws_ptr + cols[:, None] * stride_ws + kk[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0
        )
        # rows that do not count are read as zeros: a NaN in their hidden state stays out of grad_w
        h_tile = tl.load(
            hs_ptr + rows_m[:, None] * stride_hs + kk[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0
        )
        if UPCAST_S:
            w_tile = w_tile.to(tl.float32)
            h_tile = h_tile.to(tl.float32)
        gh = tl.dot(gd, w_tile, input_precision=PREC_S)
        tl.atomic_add(
            gh_ptr + rows_m[:, None] * HS + kk[None, :], gh, mask=valid[:, None] & mask_k[None, :], sem="relaxed"
        )
        gw = tl.dot(tl.trans(gd), h_tile, input_precision=PREC_S)
        tl.atomic_add(
            gw_ptr + (cols - V0)[:, None] * HS + kk[None, :], gw, mask=mask_v[:, None] & mask_k[None, :], sem="relaxed"
        )


# The float32 weight-gradient accumulator of a half-precision weight is kept to this many
# bytes: the vocabulary is run in slabs, and each slab's sums are cast into the weight's
# dtype as soon as they are complete. One accumulator for the whole weight would be V x H
# fp32, 1.96 GiB at 128256 x 4096, twice the bf16 gradient it becomes. A float32 weight's
# gradient is its own accumulator (one slab).
WEIGHT_GRAD_SLAB_BYTES = 256 << 20


def _vocab_slab(vocab: int, hidden: int, weight_dtype: torch.dtype, block_v: int) -> int:
    """Vocabulary columns per slab: whole column tiles, at least one."""
    if weight_dtype == torch.float32:
        return vocab
    columns = WEIGHT_GRAD_SLAB_BYTES // (4 * max(hidden, 1)) // block_v * block_v
    return min(vocab, max(block_v, columns))


def linear_kd_grad(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, *, ce_row_scale=None, transform=None):
    """Loss per row (fp32) and the gradients of sum_i w_i l_i (w_i = grad_scale *
    row_scale[i]): grad_h in hs.dtype, grad_w in fp32 (or in the weight's dtype when it was
    accumulated slab by slab, _vocab_slab) and grad_b (None without a student bias) in fp32.
    Two kernels: the stats kernel (loss and row statistics), then the gradient kernel once
    per vocabulary slab. With ``ce_row_scale`` the cross entropy's weight is grad_scale *
    ce_row_scale[i] instead of alpha * w_i (the terms weighted apart); ``transform``: the
    logit transform (kd_linear_stats.transform_args)."""
    rows, hidden, vocab = hs.shape[0], hs.shape[1], ws.shape[0]
    hs, ws, bs, ht, wt, bt, row_scale, ce_row_scale = contiguous_all(hs, ws, bs, ht, wt, bt, row_scale, ce_row_scale)
    device = hs.device
    terms_apart = ce_row_scale is not None
    stats = torch.empty(rows, int(N_STATS), dtype=torch.float32, device=device)
    loss = linear_kd_stats(hs, ws, bs, ht, wt, bt, labels, opts, stats, transform=transform, terms_apart=terms_apart)
    grad_h = torch.zeros(rows, hidden, dtype=torch.float32, device=device)
    config = grad_launch_config(hs.dtype, ht.dtype)
    slab = _vocab_slab(vocab, hidden, ws.dtype, config["BLOCK_V"])
    if slab >= vocab:
        grad_w = torch.zeros(vocab, hidden, dtype=torch.float32, device=device)
    else:
        grad_w = torch.empty(vocab, hidden, dtype=ws.dtype, device=device)
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if bs is not None else None
    dummy = stats
    for v0 in range(0, vocab, slab):
        v1 = min(vocab, v0 + slab)
        acc = grad_w if slab >= vocab else torch.zeros(v1 - v0, hidden, dtype=torch.float32, device=device)
        if rows > 0:
            grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(v1 - v0, config["BLOCK_V"]))
            _linear_kd_grad_kernel[grid](
                **linear_operands(hs, ws, bs, ht, wt, bt, labels, dummy),
                rs_ptr=row_scale if row_scale is not None else dummy,
                stats_ptr=stats,
                gh_ptr=grad_h,
                gw_ptr=acc,
                gb_ptr=grad_b if grad_b is not None else dummy,
                N=rows,
                V0=v0,
                V=v1,
                grad_scale=grad_scale,
                **kernel_scalars(opts),
                **transform_args(transform),
                ce_rs_ptr=ce_row_scale if terms_apart else dummy,
                **linear_flags(hs, bs, ht, bt, labels, opts, terms_apart=terms_apart),
                HAS_ROW_SCALE=row_scale is not None,
                HAS_CE_ROW_SCALE=terms_apart,
                **config,
            )
        if acc is not grad_w:
            grad_w[v0:v1] = acc  # complete: cast into the weight's dtype
    return loss, grad_h.to(hs.dtype), grad_w, grad_b


def _linear_kd_kept(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad):
    if not want_grad:
        return linear_kd_stats(hs, ws, bs, ht, wt, bt, labels, opts), None, None, None
    return linear_kd_grad(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale)


def linear_kd_loss(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad):
    """The fused-linear form on the rows that count (kd_options.kept_rows); ignored rows get loss
    0 and a zero grad_h row without entering a kernel."""
    kept = kd_options.kept_rows(labels, opts)
    if kept is None:
        return _linear_kd_kept(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad)

    def take(x):
        return x.index_select(0, kept) if x is not None else None

    loss, grad_h, grad_w, grad_b = _linear_kd_kept(
        take(hs), ws, bs, take(ht), wt, bt, take(labels), opts, take(row_scale), grad_scale, want_grad
    )
    loss = loss.new_zeros(hs.shape[0]).index_copy_(0, kept, loss)
    if grad_h is not None:
        grad_h = grad_h.new_zeros(hs.shape).index_copy_(0, kept, grad_h)
    return loss, grad_h, grad_w, grad_b


def linear_kd_terms(hs, ws, bs, ht, wt, bt, labels, opts, transform, w_ce=None, w_kd=None):
    """The options path of memkern.ops.kd_options_ops on these kernels, logits transformed
    in registers: without weights the per-row (cross entropy, divergence), each 0 for
    ignored rows; with per-row weights w_ce, w_kd the gradients (grad_h, grad_w, grad_b) of
    sum_i w_ce[i] ce_i + w_kd[i] D_i. ``opts`` must have alpha 0 and kd_scale 1 (so the
    divergence's weight is w_kd itself); ``transform`` as kd_linear_stats.transform_args."""
    kept = kd_options.kept_rows(labels, opts)

    def take(x):
        return x.index_select(0, kept) if kept is not None and x is not None else x

    hs_k, ht_k, y_k = take(hs), take(ht), take(labels)
    if w_ce is None:
        parts = torch.zeros(hs_k.shape[0], 2, dtype=torch.float32, device=hs.device)
        linear_kd_stats(hs_k, ws, bs, ht_k, wt, bt, y_k, opts, parts=parts, transform=transform)
        if kept is not None:
            parts = parts.new_zeros(hs.shape[0], 2).index_copy_(0, kept, parts)
        return parts[:, 0].clone(), parts[:, 1].clone()  # apart: the outputs must not alias
    _, grad_h, grad_w, grad_b = linear_kd_grad(
        hs_k, ws, bs, ht_k, wt, bt, y_k, opts, take(w_kd), 1.0, ce_row_scale=take(w_ce), transform=transform
    )
    if kept is not None:
        grad_h = grad_h.new_zeros(hs.shape).index_copy_(0, kept, grad_h)
    return grad_h, grad_w, grad_b
