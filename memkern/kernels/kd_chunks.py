"""The fused-linear distillation loss in row chunks: each chunk's student and teacher logits
come from one matmul each, a per-row kernel turns the student's into its gradient in place,
and two more matmuls give the hidden-state, weight and bias gradients. The cpp, cuda and torch
backends of memkern.ops.linear_kd_loss run this loop; only one chunk of logits exists at a time."""

from __future__ import annotations


import torch

from memkern import _dense
from memkern.kd_options import KDOptions, acc_dtype, kept_rows

# Elements of one chunk of logits (chunk x V), per matrix. On the CPU, 2^23 (32 MiB in fp32,
# 262 rows at V=32000): the two chunks stay a small fraction of the eager composition's
# rows x V tensors, and the weight-gradient accumulator (V x H fp32) is read and written
# once per chunk, so halving the chunk (2^22) cost ~20% more time at 2048x1024x32000.
# On CUDA 2^25 elements.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 25}


def chunk_rows(rows: int, vocab: int, device: torch.device, chunk_size: int = 0) -> int:
    """Rows per chunk: ``chunk_size`` when given (> 0), else the element budget's share."""
    if chunk_size > 0:
        return max(1, min(rows, chunk_size))
    budget = CHUNK_ELEMENTS.get(device.type, 1 << 22)
    return max(1, min(rows, budget // max(vocab, 1)))


def chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _dense.linear(h, w, b)


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without an a @ b temporary in a's dtype where the device allows."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def linear_chunks(
    rows_impl,
    hs,
    ws,
    bs,
    ht,
    wt,
    bt,
    labels,
    opts: KDOptions,
    *,
    row_scale: torch.Tensor | None,
    grad_scale: float,
    want_grad: bool,
):
    """Loss per row and, when ``want_grad``, the gradients of sum_i w_i l_i with respect to
    hs, ws and bs (w_i = grad_scale * row_scale[i]). ``rows_impl`` is a per-row kernel.

    Rows whose label is ignore_index are left out of every matmul (kept_rows)."""
    none = hs.new_empty(0)

    def rows_fn(s, t, take):
        # The student chunk is overwritten with d loss / d logits.
        return (rows_impl(s, t, take(labels), take(row_scale), s if want_grad else none, opts, grad_scale),)

    (loss,), grad_h, grad_w, grad_b = linear_chunk_loop(rows_fn, 1, hs, ws, bs, ht, wt, bt, labels, opts, want_grad)
    return loss, grad_h, grad_w, grad_b


def linear_chunk_loop(rows_fn, n_out, hs, ws, bs, ht, wt, bt, labels, opts: KDOptions, want_grad, chunk_size=0):
    """The chunk loop: ``rows_fn(s, t, take)`` gets a chunk's student and teacher logits
    (``take`` selects the chunk's rows of any per-row tensor), returns ``n_out`` per-row
    values and, when ``want_grad``, leaves d loss / d logits in ``s``; the matmuls here turn
    that into the gradients of hs, ws and bs. Returns (per-row values, grad_h, grad_w, grad_b).

    A teacher given as per-row values rather than a head (the top-k buckets) passes ht, wt
    and bt as None: ``t`` is then None and ``rows_fn`` takes the teacher's rows itself."""
    rows, vocab = hs.shape[0], ws.shape[0]
    acc = acc_dtype(hs.dtype)
    kept = kept_rows(labels, opts)
    n_kept = rows if kept is None else kept.numel()
    new = torch.empty if kept is None else torch.zeros  # ignored rows: loss 0, gradient 0
    outs = [new(rows, dtype=acc, device=hs.device) for _ in range(n_out)]
    grad_h = new(hs.shape, dtype=hs.dtype, device=hs.device) if want_grad else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if want_grad else None
    grad_b = torch.zeros(vocab, dtype=acc, device=ws.device) if want_grad and bs is not None else None
    widest = vocab if wt is None else max(vocab, wt.shape[0])
    step = chunk_rows(max(n_kept, 1), widest, hs.device, chunk_size)
    for start in range(0, n_kept, step):
        if kept is None:
            sel = slice(start, min(rows, start + step))
            take = lambda x, sel=sel: x[sel] if x is not None else None
        else:
            sel = kept[start : start + step]
            take = lambda x, sel=sel: x.index_select(0, sel) if x is not None else None
        h = take(hs)
        s = chunk_logits(h, ws, bs)
        t = chunk_logits(take(ht), wt, bt) if wt is not None else None
        for out, value in zip(outs, rows_fn(s, t, take)):
            out[sel] = value
        del t
        if want_grad:
            gh = _dense.linear(s, ws.t())  # d loss / d h = d loss / d logits @ W
            if kept is None:
                grad_h[sel] = gh
            else:
                grad_h.index_copy_(0, sel, gh)
            accumulate_fp32(grad_w, s.t(), h)
            if grad_b is not None:
                grad_b += s.sum(0, dtype=acc)
    return outs, grad_h, grad_w, grad_b


# -- the distillation options (memkern.kd_options.KDExtras), a chunk at a time --------------------
def transform_logits(z: torch.Tensor, scale: float, cap: float, dtype: torch.dtype, want_slope: bool):
    """(f(z), f'(z)) with f(z) = cap * tanh(scale * z / cap) (cap > 0) or scale * z, in a
    fresh ``dtype`` buffer (the kernels may overwrite it). f' is a tensor, a float where it is
    the constant ``scale``, or None without ``want_slope``. -inf stays -inf (a masked entry
    stays masked; plain soft-capping would give -cap there) with slope 0."""
    x = z.to(dtype, copy=True)
    if scale != 1.0:
        x.mul_(scale)
    if cap == 0.0:
        return x, (scale if want_slope else None)
    masked = z == float("-inf")
    x.div_(cap).tanh_()
    slope = torch.mul(x, x).neg_().add_(1.0).mul_(scale) if want_slope else None  # scale * (1 - tanh^2)
    x.mul_(cap).masked_fill_(masked, float("-inf"))
    return x, slope


def option_rows(rows_impl, s, t, labels, opts: KDOptions, extras, w_ce=None, w_kd=None, grad=None):
    """Per-row cross entropy and divergence (ce (R,), kd (R,), in the compute dtype) of raw
    logit rows s (R, V_s) and t (R, V_t) under ``extras``; with ``grad`` (R, V_s) (it may be
    s itself) also writes the gradient of sum_i w_ce[i] * ce_i + w_kd[i] * kd_i into it.

    ce_i = logsumexp(s'_i) - s'_i[y_i] over the student's whole vocabulary (0 for ignored
    rows or without labels); kd_i = D(softmax(t'_i[:n] / T), softmax(s'_i[:n] / T)) from the
    per-row kernel ``rows_impl`` (called with alpha 0 and k 1, so it returns D itself and its
    gradient), where s', t' are the transformed logits and n the shared vocabulary."""
    acc = acc_dtype(s.dtype)
    want_grad = grad is not None
    student_scale, student_cap, teacher_scale, teacher_cap = extras.transform
    sx, slope = transform_logits(s, student_scale, student_cap, acc, want_grad)
    tx = t
    if teacher_scale != 1.0 or teacher_cap != 0.0:
        tx, _ = transform_logits(t, teacher_scale, teacher_cap, acc, False)
    vocab = sx.shape[1]
    shared = extras.shared_vocab or vocab
    ce = torch.zeros(sx.shape[0], dtype=acc, device=sx.device)
    ce_grad = None
    if labels is not None:
        counted = labels != opts.ignore_index
        target = torch.where(counted, labels, 0).unsqueeze(1)
        lse = torch.logsumexp(sx, 1)
        ce = torch.where(counted, lse - sx.gather(1, target).squeeze(1), 0.0)
        if want_grad:  # softmax - one-hot, read before the kernel overwrites sx
            weight = torch.where(counted, w_ce.to(acc), 0.0).unsqueeze(1)
            ce_grad = torch.exp(sx - lse.unsqueeze(1)).scatter_add_(1, target, torch.full_like(lse, -1.0).unsqueeze(1))
            ce_grad = torch.where(weight != 0.0, ce_grad * weight, 0.0)  # ignored rows' NaNs stay out
    none = sx.new_empty(0)
    row_scale = w_kd.to(acc).contiguous() if want_grad else None
    kd = rows_impl(
        sx[:, :shared],
        tx[:, :shared],
        labels,
        row_scale,
        sx[:, :shared] if want_grad else none,
        opts.divergence_alone(),
        1.0,
    )
    if want_grad:
        sx[:, shared:] = 0.0  # the divergence does not see the entries past the shared vocabulary
        if ce_grad is not None:
            sx += ce_grad
        grad.copy_(sx.mul_(slope))
    return ce, kd.to(acc)


def logits_option_chunks(rows_impl, s, t, labels, opts: KDOptions, extras, w_ce=None, w_kd=None):
    """option_rows over row chunks of s (R, V_s) and t (R, V_t): (ce, kd, grad or None). The
    transformed copies and the softmax are one chunk each, so extra memory is O(chunk x V)
    besides the gradient (allocated only with weights)."""
    rows = s.shape[0]
    acc = acc_dtype(s.dtype)
    ce = torch.zeros(rows, dtype=acc, device=s.device)
    kd = torch.zeros(rows, dtype=acc, device=s.device)
    grad = torch.empty_like(s, memory_format=torch.contiguous_format) if w_ce is not None else None
    step = chunk_rows(max(rows, 1), max(s.shape[1], t.shape[1]), s.device, extras.chunk_size)
    for start in range(0, rows, step):
        sel = slice(start, start + step)
        take = lambda x, sel=sel: x[sel] if x is not None else None  # noqa: E731
        ce[sel], kd[sel] = option_rows(
            rows_impl, s[sel], t[sel], take(labels), opts, extras, take(w_ce), take(w_kd), take(grad)
        )
    return ce, kd, grad
