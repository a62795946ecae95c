"""Vocabulary-parallel distillation loss: :func:`memkern.ops.kd_loss` and
:func:`memkern.ops.linear_kd_loss` on DTensors sharded on the vocabulary over a device mesh
(tensor-parallel lm_heads), built on torch.distributed alone.

Each rank holds a slice of the vocabulary (student and teacher alike) and works on it row
chunk by row chunk; per chunk the ranks all-reduce, over the mesh dimension that shards the
vocabulary, O(rows) numbers:

1. MAX of the row maxima of student and teacher logits (2 per row);
2. SUM of the rescaled sums of exponentials (student at T = 1 and at T, teacher at T) and of
   the label's logit, which only the rank owning the label contributes (4 per row);
3. SUM of the shards' shares of the divergence (2 per row; jsd needs the global statistics
   of step 2 before its per-entry log m, reverse_kl and jsd need the total before the
   gradient); skipped when alpha = 1.

Then the loss of every row is known on every rank, and each rank writes the gradient of its
own logit slice. Nothing of vocabulary size is communicated and no rank holds rows x V.
The per-shard arithmetic is in memkern.distributed.vocab_shard (torch, cpp = torch, and the
Triton kernels of memkern.kernels.kd_shard). Argument checks run on metadata every rank
shares (global shapes, meshes, placements, replicated labels) before any collective, so a
bad call raises the same ValueError on every rank instead of leaving one waiting.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from memkern import _dense
from memkern.distributed import vocab_shard
from memkern.distributed.vocab_parallel_args import Call, check_kd_call, check_linear_call
from memkern.kd_options import CORE_OPTIONS, KDOptions, check_label_range, kept_rows
from memkern.kernels.kd_chunks import accumulate_fp32, chunk_logits, chunk_rows

__all__ = ["kd_loss", "linear_kd_loss"]


# -- one chunk of rows on this rank's vocabulary shard ------------------------------------------
def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _global_stats(s, t, labels, call: Call):
    """Steps 1-2 of the module docstring for one chunk: (G, the global statistics of
    vocab_shard's docstring; s_y - M_s per row; the labels local to this shard, -1 where
    another rank owns them; whether each row is defined)."""
    T = call.opts.temperature
    local = vocab_shard.row_stats(s, t, T)
    maxima = local[:, :2].clone()
    maxima.masked_fill_(maxima.isnan(), float("inf"))  # NaN must win the MAX (the row is undefined)
    maxima = _all_reduce(maxima, dist.ReduceOp.MAX, call.group)
    defined = torch.isfinite(maxima).all(1)
    shift = torch.where(local[:, :2] == float("-inf"), float("-inf"), local[:, :2] - maxima)
    sums = torch.zeros(s.shape[0], 4, dtype=local.dtype, device=s.device)
    sums[:, 0] = local[:, 2] * shift[:, 0].exp()
    sums[:, 1] = local[:, 3] * (shift[:, 0] / T).exp()
    sums[:, 2] = local[:, 4] * (shift[:, 1] / T).exp()
    local_labels = None
    if labels is not None:
        local_labels = labels - call.vocab_start
        owned = (local_labels >= 0) & (local_labels < s.shape[1])
        local_labels = torch.where(owned, local_labels, -1)
        rows = owned.nonzero().squeeze(1)
        sums[rows, 3] = s[rows, local_labels[rows]].to(local.dtype) - maxima[rows, 0]
    sums = _all_reduce(sums, dist.ReduceOp.SUM, call.group)
    stats = torch.stack([maxima[:, 0], maxima[:, 1], *sums[:, :3].log().unbind(1)], 1)
    return stats, sums[:, 3], local_labels, defined


def _chunk(s, t, labels, row_weight, call: Call, grad_out) -> torch.Tensor:
    """Per-row losses of one chunk; with grad_out, d(sum_i w_i l_i) / d s of this shard in it."""
    opts: KDOptions = call.opts
    stats, label_logit, local_labels, defined = _global_stats(s, t, labels, call)
    loss = torch.zeros(s.shape[0], dtype=stats.dtype, device=s.device)
    totals = torch.zeros(s.shape[0], 2, dtype=stats.dtype, device=s.device)
    if opts.alpha != 1:  # with weight 0 the soft term adds 0, even where it is +inf
        totals = _all_reduce(vocab_shard.divergence_partials(s, t, stats, opts), dist.ReduceOp.SUM, call.group)
        divergence = (
            totals[:, 0] if opts.divergence != "jsd" else opts.beta * totals[:, 0] + (1 - opts.beta) * totals[:, 1]
        )
        loss = (1 - opts.alpha) * opts.kd_scale * divergence
    if labels is not None and opts.alpha != 0:
        loss = loss + opts.alpha * (stats[:, 2] - label_logit)  # log Z_s1 - (s_y - M_s)
    if grad_out is not None:
        vocab_shard.shard_grad(s, t, local_labels, stats, totals, row_weight, opts, grad_out)
        grad_out.masked_fill_(~defined[:, None], float("nan"))
    return torch.where(defined, loss, float("nan"))


def _rows_pass(rows, logits_of, labels, row_weight, call: Call, on_grad) -> torch.Tensor:
    """The loss of every row (0 for ignored ones), chunk by chunk over the rows that count;
    ``logits_of(sel)`` gives a chunk's (student, teacher) shard logits and ``on_grad(sel, g)``
    takes its gradient (None: no gradient). Every rank takes the same chunks: the labels are
    replicated and the chunk size comes from the global vocabulary."""
    kept = kept_rows(labels, call.opts)
    n_kept = rows if kept is None else kept.numel()
    loss = torch.zeros(rows, dtype=torch.float64 if call.dtype == torch.float64 else torch.float32, device=call.device)
    step = chunk_rows(max(n_kept, 1), call.vocab, call.device)
    for start in range(0, n_kept, step):
        sel = slice(start, min(rows, start + step)) if kept is None else kept[start : start + step]
        take = (lambda x, sel=sel: x[sel]) if kept is None else (lambda x, sel=sel: x.index_select(0, sel))
        s, t = logits_of(sel, take)
        y = take(labels) if labels is not None else None
        w = take(row_weight) if row_weight is not None else None
        grad = None if on_grad is None else on_grad.buffer(s)
        loss[sel] = _chunk(s, t, y, w, call, grad).to(loss.dtype)
        del t  # freed before the gradient matmuls write the weight gradient's accumulator
        if on_grad is not None:
            on_grad(sel, take, grad)
    return loss


def _reduce(loss_rows, call: Call, lead):
    if call.reduction == "none":
        return loss_rows.reshape(lead)
    return loss_rows.sum() * call.loss_scale


# -- logits form ----------------------------------------------------------------------------------
class _LogitsGrad:
    """Collects the gradient of the student's logit shard into one (rows, V_shard) buffer."""

    def __init__(self, like: torch.Tensor):
        self.grad = torch.zeros_like(like)  # ignored rows: 0

    def buffer(self, s):
        return torch.empty_like(s)

    def __call__(self, sel, take, g):
        self.grad[sel] = g


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, call: Call):
        rows = s.shape[0]
        row_weight = torch.full((rows,), 1.0, dtype=torch.float64, device=s.device)
        if call.reduction != "none":
            row_weight = row_weight * call.loss_scale
        collect = _LogitsGrad(s) if call.compute_grad else None
        loss = _rows_pass(rows, lambda sel, take: (take(s), take(t)), labels, row_weight, call, collect)
        ctx.reduction = call.reduction
        ctx.save_for_backward(collect.grad if collect is not None else None)
        return _reduce(loss, call, (rows,))

    @staticmethod
    def backward(ctx, grad_loss):
        (g,) = ctx.saved_tensors
        if g is None:
            return None, None, None, None
        scale = grad_loss[:, None] if ctx.reduction == "none" else grad_loss
        return g * scale.to(g.dtype), None, None, None


def kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_loss_scale: str = "t2",
    normalizer=None,
) -> torch.Tensor:
    """:func:`memkern.ops.kd_loss` on logits that are DTensors sharded on the last dimension
    (a column-parallel lm_head's output); ``normalizer``: the summed loss is divided by it
    (reduction "mean" or "sum"). See docs/tensor_parallel.md."""
    core = (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)
    options = dict(zip(CORE_OPTIONS, core))
    call = check_kd_call(student_logits, teacher_logits, labels, normalizer, options)
    s, t = call.local(student_logits), call.local(teacher_logits).detach()
    rows, vocab_local = math.prod(call.lead), s.shape[-1]  # (not -1: a shard may be empty)
    s2, t2 = s.reshape(rows, vocab_local), t.reshape(rows, vocab_local)
    y = call.labels
    check_label_range("kd_loss", y, call.vocab, call.opts.ignore_index)
    loss = _VocabParallelKD.apply(s2, t2, y, call)
    return loss.reshape(call.lead) if call.reduction == "none" else loss


# -- fused-linear form ------------------------------------------------------------------------------
class _LinearGrads:
    """Accumulates the gradients of the hidden states (this shard's share), weight and bias."""

    def __init__(self, hs, ws, bs):
        self.hs, self.ws = hs, ws
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        self.grad_h = torch.zeros(hs.shape, dtype=hs.dtype, device=hs.device)
        self.grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device)
        self.grad_b = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if bs is not None else None

    def buffer(self, s):
        return s  # the student's logit chunk is overwritten with its gradient

    def __call__(self, sel, take, g):
        if self.ws.shape[0] == 0:  # an empty shard (fewer entries than ranks): grad_h stays 0 here
            return
        h = take(self.hs)
        self.grad_h[sel] = _dense.linear(g, self.ws.t())
        accumulate_fp32(self.grad_w, g.t(), h)
        if self.grad_b is not None:
            self.grad_b += g.sum(0, dtype=self.grad_b.dtype)

    def result(self, ws, bs):
        gb = self.grad_b.to(bs.dtype) if self.grad_b is not None else None
        return self.grad_h, self.grad_w.to(ws.dtype), gb


def _linear_pass(hs, ws, bs, ht, wt, bt, labels, row_weight, call: Call, want_grad: bool):
    def logits_of(sel, take):
        return chunk_logits(take(hs), ws, bs), chunk_logits(take(ht), wt, bt)

    grads = _LinearGrads(hs, ws, bs) if want_grad else None
    loss = _rows_pass(hs.shape[0], logits_of, labels, row_weight, call, grads)
    return loss, (grads.result(ws, bs) if want_grad else None)


class _VocabParallelLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, call: Call):
        rows = hs.shape[0]
        ctx.call = call
        ctx.has_bias = bs is not None
        # mean / sum: the upstream gradient is a scalar, so the gradients come with the loss in
        # one pass; none: backward recomputes the chunks with the per-row upstream gradient.
        in_forward = call.compute_grad and call.reduction != "none"
        row_weight = torch.full((rows,), 1.0, dtype=torch.float64, device=hs.device) * call.loss_scale
        loss, grads = _linear_pass(hs, ws, bs, ht, wt, bt, labels, row_weight, call, in_forward)
        if in_forward:
            ctx.save_for_backward(*grads[:2], grads[2])
        elif call.compute_grad:
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels)
        return _reduce(loss, call, (rows,))

    @staticmethod
    def backward(ctx, grad_loss):
        call: Call = ctx.call
        if not call.compute_grad:
            return (None,) * 8
        if call.reduction == "none":
            hs, ws, bs, ht, wt, bt, labels = ctx.saved_tensors
            _, (gh, gw, gb) = _linear_pass(hs, ws, bs, ht, wt, bt, labels, grad_loss.reshape(-1), call, True)
        else:
            gh, gw, gb = (g * grad_loss.to(g.dtype) if g is not None else None for g in ctx.saved_tensors)
        # Each shard's logits depend on the whole hidden state: its gradient is the sum over shards.
        gh = _all_reduce(gh, dist.ReduceOp.SUM, call.group)
        return gh, gw, gb if ctx.has_bias else None, None, None, None, None, None


def linear_kd_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels=None,
    *,
    student_bias=None,
    teacher_bias=None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_loss_scale: str = "t2",
    normalizer=None,
) -> torch.Tensor:
    """:func:`memkern.ops.linear_kd_loss` with lm_head weights (and biases) that are DTensors
    sharded on the vocabulary (``Shard(0)``); ``normalizer`` as in :func:`kd_loss`. See
    docs/tensor_parallel.md."""
    core = (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)
    options = dict(zip(CORE_OPTIONS, core))
    call = check_linear_call(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias,
        teacher_bias,
        normalizer,
        options,
    )
    hs = call.local(student_hidden)
    ht = call.local(teacher_hidden).detach()
    hs, ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    ws, bs = call.local(student_weight), call.local(student_bias)
    wt, bt = call.local(teacher_weight).detach(), call.local(teacher_bias)
    bt = bt.detach() if bt is not None else None
    check_label_range("linear_kd_loss", call.labels, call.vocab, call.opts.ignore_index)
    loss = _VocabParallelLinearKD.apply(hs, ws, bs, ht, wt, bt, call.labels, call)
    return loss.reshape(call.lead) if call.reduction == "none" else loss
