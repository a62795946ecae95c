"""The per-shard arithmetic of the vocabulary-parallel distillation loss: what one rank
computes on a (chunk x V_shard) block of student and teacher logits, between the
all-reduces of memkern.distributed.vocab_parallel. Three steps, each an op table
(torch | cpp | triton):

* ``row_stats(s, t, T)`` -> (R, 5): this shard's row maxima m_s, m_t and sums
  exp(s - m_s), exp((s - m_s) / T), exp((t - m_t) / T) (0 where the shard is all -inf).
* ``divergence_partials(s, t, G, opts)`` -> (R, 2): this shard's share of the divergence,
  given the global statistics G = (M_s, M_t, log Z_s1, log Z_sT, log Z_tT) per row:
  (KL(p||q), 0) for forward_kl, (KL(q||p), 0) for reverse_kl, (KL(p||m), KL(q||m)) for jsd.
* ``shard_grad(s, t, local_labels, G, totals, row_weight, opts, out)``: d loss / d s on the
  shard given G and the all-reduced partials, times row_weight, written into ``out`` (which
  may be ``s`` itself). local_labels is the label minus the shard's first vocabulary entry,
  -1 where this shard does not own the label (or the row has none).

With these, log q = (s - M_s) / T - log Z_sT and log p = (t - M_t) / T - log Z_tT are the
one-process log-probabilities (memkern.reference.kd_log_probs), so every per-entry term is
the one-process term. There is no C++ kernel of these steps: the cpp backend runs the torch
implementation.
"""

from __future__ import annotations

import math

import torch

from memkern import _validate, backends, reference
from memkern.kd_options import KDOptions

STATS = 5  # m_s, m_t, Z_s1, Z_sT, Z_tT (per shard) or M_s, M_t, log Z_s1, log Z_sT, log Z_tT (global)


def compute_dtype(s: torch.Tensor, t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when either side is float64 (as memkern.reference.kd_loss_rows)."""
    return torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)


row_stats = backends.op_table("kd_shard_row_stats", preference=backends.TRITON_FIRST)
divergence_partials = backends.op_table("kd_shard_divergence_partials", preference=backends.TRITON_FIRST)
shard_grad = backends.op_table("kd_shard_grad", preference=backends.TRITON_FIRST)


# -- torch (and cpp) ------------------------------------------------------------------------
# The torch steps build several temporaries the size of their input (log q, log p, the terms);
# they run on blocks of rows of at most this many elements, so the temporaries stay a few
# MiB whatever the chunk: on a 256 x 32000 float32 chunk, whole-chunk temporaries had made
# the peak 4.5x the one-process path's.
TEMP_ELEMENTS = 1 << 20


def _row_blocks(rows: int, vocab: int):
    step = max(1, TEMP_ELEMENTS // max(vocab, 1))
    return (slice(start, min(rows, start + step)) for start in range(0, rows, step))


@row_stats.register("torch")
@row_stats.register("cpp")
def _row_stats_torch(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    out = torch.empty(s.shape[0], STATS, dtype=compute_dtype(s, t), device=s.device)
    for rows in _row_blocks(*s.shape):
        out[rows] = _row_stats_block(s[rows], t[rows], temperature)
    return out


def _row_stats_block(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    dtype = compute_dtype(s, t)
    s, t = s.to(dtype), t.to(dtype)
    out = torch.zeros(s.shape[0], STATS, dtype=dtype, device=s.device)
    if s.shape[1] == 0:  # an empty shard (vocabulary smaller than the rank count)
        out[:, :2] = -math.inf
        return out
    ms, mt = s.amax(1), t.amax(1)
    out[:, 0], out[:, 1] = ms, mt
    # A shard that is all -inf adds exp(-inf) = 0: shift by 0 there, not by -inf (-inf - -inf is NaN).
    ms = torch.where(ms == -math.inf, torch.zeros_like(ms), ms)[:, None]
    mt = torch.where(mt == -math.inf, torch.zeros_like(mt), mt)[:, None]
    out[:, 2] = (s - ms).exp().sum(1)
    out[:, 3] = ((s - ms) / temperature).exp().sum(1)
    out[:, 4] = ((t - mt) / temperature).exp().sum(1)
    return out


def _log_probs(s, t, stats, temperature):
    log_q = (s - stats[:, 0:1]) / temperature - stats[:, 3:4]
    log_p = (t - stats[:, 1:2]) / temperature - stats[:, 4:5]
    return log_q, log_p


@divergence_partials.register("torch")
@divergence_partials.register("cpp")
def _partials_torch(s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    out = torch.empty(s.shape[0], 2, dtype=stats.dtype, device=s.device)
    for rows in _row_blocks(*s.shape):
        out[rows] = _partials_block(s[rows], t[rows], stats[rows], opts)
    return out


def _partials_block(s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    dtype = stats.dtype
    out = torch.zeros(s.shape[0], 2, dtype=dtype, device=s.device)
    if s.shape[1] == 0:
        return out
    log_q, log_p = _log_probs(s.to(dtype), t.to(dtype), stats, opts.temperature)
    if opts.divergence == "forward_kl":
        out[:, 0] = reference._kl_terms(log_p, log_q).sum(1)
    elif opts.divergence == "reverse_kl":
        out[:, 0] = reference._kl_terms(log_q, log_p).sum(1)
    else:
        log_m = reference._kd_log_mix(log_p, log_q, opts.beta)
        out[:, 0] = reference._kl_terms(log_p, log_m).sum(1)
        out[:, 1] = reference._kl_terms(log_q, log_m).sum(1)
    return out


def soft_gradient_total(totals: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """sum_j q_j g_j over the whole vocabulary for reverse_kl and jsd (the softmax chain
    rule's row constant; memkern.reference.kd_loss_rows_grad): KL(q||p), or (1 - beta) KL(q||m)."""
    return totals[:, 0] if opts.divergence == "reverse_kl" else (1 - opts.beta) * totals[:, 1]


@shard_grad.register("torch")
@shard_grad.register("cpp")
def _grad_torch(s, t, local_labels, stats, totals, row_weight, opts: KDOptions, out) -> None:
    for rows in _row_blocks(*s.shape):  # out may be s: each block is read before it is written
        labels = local_labels[rows] if local_labels is not None else None
        _grad_block(s[rows], t[rows], labels, stats[rows], totals[rows], row_weight[rows], opts, out[rows])


def _grad_block(s, t, local_labels, stats, totals, row_weight, opts: KDOptions, out) -> None:
    if s.shape[1] == 0:
        return
    dtype = stats.dtype
    s32, t32 = s.to(dtype), t.to(dtype)
    grad = torch.zeros_like(s32)
    c = (1 - opts.alpha) * opts.kd_scale / opts.temperature
    if c != 0:  # with weight 0 the soft term adds 0, even where it is +inf
        log_q, log_p = _log_probs(s32, t32, stats, opts.temperature)
        q = log_q.exp()
        if opts.divergence == "forward_kl":
            grad = c * (q - log_p.exp())
        else:
            if opts.divergence == "reverse_kl":
                g = log_q - log_p
            else:
                g = (1 - opts.beta) * (log_q - reference._kd_log_mix(log_p, log_q, opts.beta))
            total = soft_gradient_total(totals, opts)[:, None]
            qg = torch.where(q == 0, torch.zeros_like(q), q * g)
            grad = c * (qg - q * total)
            grad = torch.where(total == math.inf, torch.full_like(grad, math.nan), grad)
    if local_labels is not None and opts.alpha != 0:
        ce = (s32 - stats[:, 0:1] - stats[:, 2:3]).exp()
        owned = (local_labels >= 0).nonzero().squeeze(1)
        ce[owned, local_labels[owned]] -= 1
        grad = grad + opts.alpha * ce
    out.copy_(grad * row_weight.to(dtype)[:, None])


# -- triton ---------------------------------------------------------------------------------
@row_stats.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _row_stats_triton(s, t, temperature):
    from memkern.kernels import kd_shard

    return kd_shard.row_stats(s, t, temperature)


@divergence_partials.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _partials_triton(s, t, stats, opts):
    from memkern.kernels import kd_shard

    return kd_shard.divergence_partials(s, t, stats, opts)


@shard_grad.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _grad_triton(s, t, local_labels, stats, totals, row_weight, opts, out):
    from memkern.kernels import kd_shard

    kd_shard.shard_grad(s, t, local_labels, stats, totals, row_weight, opts, out)
