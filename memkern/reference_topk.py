"""Plain-PyTorch statement of the distillation loss against a top-k teacher
(memkern.ops.kd_topk): the semantics every kernel mirrors, differentiable, and the closed-form
gradient the kernels compute.

Per row the teacher supplies k log-probabilities lp_j (at temperature 1) at vocabulary
indices I_j. Both distributions are compared over k + 1 buckets: the k indices and a tail
bucket holding every other entry of the vocabulary.

* Teacher: the buckets' probabilities at temperature 1 are p_j = exp(lp_j) and the tail
  1 - sum_j p_j (0 when the indices cover the vocabulary, k = V). At temperature T the
  bucket distribution is softened like logits: P_b = softmax_b(log p_b / T). At T = 1 this
  is p itself (renormalised when rounding makes sum_j p_j exceed 1).
* Student: its full-vocabulary softmax at T, q = softmax(s / T), summed into the same
  buckets: Q_j = q[I_j] and Q_tail = the sum of q over the complement of I, whose log is
  the log-sum-exp over the complement (no 1 - sum cancellation).
* The divergence is kd_loss's (memkern.reference.kd_divergence_rows) over the k + 1 buckets;
  the cross entropy, alpha, the T^2 scale, ignored and undefined rows are kd_loss's.
"""

from __future__ import annotations

import math

import torch

from memkern.reference import (
    RowOptions,
    chain_rule_g,
    combine_grads,
    combine_rows,
    compute_dtype,
    kd_divergence_rows,
    reduced_loss,
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends (Maechler's switch at -log 2); -inf
    for x >= 0, where rounding has put the mass at or past 1."""
    near_zero = x > -math.log(2.0)
    out = torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(x >= 0, torch.full_like(x, -math.inf), out)


def topk_teacher_log_buckets(logprobs: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
    """(rows, k + 1) log P of the teacher's buckets at temperature T, tail last; a row with
    no mass at all (NaN in it, or every bucket empty) is NaN."""
    lp = logprobs.to(torch.promote_types(logprobs.dtype, torch.float32))
    covered = torch.logsumexp(lp, dim=-1, keepdim=True)
    if lp.shape[-1] >= vocab:  # the indices are the whole vocabulary: the tail is empty
        log_tail = torch.full_like(covered, -math.inf)
    else:
        log_tail = log1mexp(covered)
    softened = torch.cat([lp, log_tail], dim=-1) / temperature
    return softened - torch.logsumexp(softened, dim=-1, keepdim=True)


def _complement_mask(student_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """True at the entries of each row that are in no top-k index (the tail)."""
    return torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, indices, False)


def topk_student_log_buckets(student_logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """(rows, k + 1) log Q of the student's buckets, tail last: log softmax(s / T) at the
    indices, and the log-sum-exp over the complement for the tail (-inf when it is empty)."""
    shifted = (student_logits - student_logits.detach().amax(-1, keepdim=True)) / temperature
    log_z = torch.logsumexp(shifted, dim=-1, keepdim=True)
    tail = shifted.masked_fill(~_complement_mask(shifted, indices), -math.inf)
    return torch.cat([shifted.gather(1, indices), torch.logsumexp(tail, dim=-1, keepdim=True)], dim=-1) - log_z


def kd_topk_loss_rows(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor, labels, **options
) -> torch.Tensor:
    """Per-row loss of 2-D (rows, V) student logits against (rows, k) top-k log-probabilities;
    0 for ignored rows, NaN for undefined ones (student or teacher without a distribution).
    ``options``: the fields of memkern.reference.RowOptions."""
    o = RowOptions(**options)
    dtype = compute_dtype(student_logits)
    s = student_logits.to(dtype)
    log_p = topk_teacher_log_buckets(teacher_logprobs.to(dtype), o.temperature, s.shape[-1])

    def soft() -> torch.Tensor:
        log_q = topk_student_log_buckets(s, teacher_indices, o.temperature)
        # bucket log-probabilities are their own logits at T = 1 (log_softmax leaves them be)
        return kd_divergence_rows(log_q, log_p, temperature=1.0, divergence=o.divergence, beta=o.beta)

    return combine_rows(s, log_p, labels, soft, o)


def kd_topk_loss_rows_grad(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_indices: torch.Tensor,
    labels: torch.Tensor | None,
    row_weight: torch.Tensor,
    **options,
) -> torch.Tensor:
    """d(sum_i row_weight[i] * l_i) / d student_logits for :func:`kd_topk_loss_rows` in closed
    form (the formulas of the kernels). With q = softmax(s / T), Q and P the buckets,
    b(v) the bucket of entry v, share_v = q_v / Q_b(v) (1 at an index, the entry's share
    of the student's tail otherwise) and c = (1 - alpha) * k / T:

    * forward_kl: c * (q_v - P_b(v) * share_v);
    * reverse_kl and jsd: c * q_v * (g_b(v) - sum_b Q_b g_b), g = log Q - log P for
      reverse_kl and (1 - beta) * (log Q - log M) for jsd (NaN rows where reverse_kl is +inf);
    * cross entropy: alpha * (softmax(s) - onehot(y)).
    """
    o = RowOptions(**options)
    dtype = compute_dtype(student_logits)
    s = student_logits.to(dtype)
    idx = teacher_indices
    log_p = topk_teacher_log_buckets(teacher_logprobs.to(dtype), o.temperature, s.shape[-1])

    def per_entry(bucket_values: torch.Tensor) -> torch.Tensor:
        """(rows, V): the tail's value everywhere, each index's at its entry."""
        return bucket_values[:, -1:].expand_as(s).clone().scatter_(1, idx, bucket_values[:, :-1])

    def soft_grad() -> torch.Tensor:
        shifted = (s - s.amax(-1, keepdim=True)) / o.temperature
        q = torch.softmax(shifted, dim=-1)
        log_q = topk_student_log_buckets(s, idx, o.temperature)
        if o.divergence == "forward_kl":
            tail = shifted.masked_fill(~_complement_mask(s, idx), -math.inf)
            tail_lse = torch.logsumexp(tail, dim=-1, keepdim=True)
            # the entry's share of the student's tail (q_v / Q_tail without dividing by a Q
            # that may underflow); no tail entries at all: nothing to share
            share = torch.where(tail_lse == -math.inf, torch.zeros_like(tail), (tail - tail_lse).exp())
            share = share.scatter_(1, idx, torch.ones_like(log_p[:, :-1]))
            return q - per_entry(log_p.exp()) * share
        g = chain_rule_g(log_q, log_p, o)
        big_q = log_q.exp()
        total = torch.where(big_q == 0, torch.zeros_like(g), big_q * g).sum(-1, keepdim=True)
        grad = torch.where(q == 0, torch.zeros_like(q), q * (per_entry(g) - total))
        return torch.where(total == math.inf, torch.full_like(grad, math.nan), grad)

    return combine_grads(s, log_p, labels, row_weight, soft_grad, o)


def kd_loss_topk(
    student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor, teacher_topk_indices: torch.Tensor,
    labels=None, **options
) -> torch.Tensor:  # fmt: skip
    """The top-k distillation loss of logits (..., V), differentiable in plain PyTorch
    (unchecked: the public op validates its arguments); ``options``: the fields of
    memkern.reference.LossOptions (keyword), those of memkern.ops.kd_loss_topk."""
    vocab, k = student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    s = student_logits.reshape(-1, vocab)
    lp, idx = teacher_topk_logprobs.reshape(-1, k), teacher_topk_indices.reshape(-1, k).long()
    return reduced_loss(
        lambda y, **o: kd_topk_loss_rows(s, lp, idx, y, **o), student_logits.shape[:-1], labels, **options
    )
