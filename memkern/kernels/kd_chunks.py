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


def chunk_rows(rows: int, vocab: int, device: torch.device) -> int:
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
    rows, vocab = hs.shape[0], ws.shape[0]
    acc = acc_dtype(hs.dtype)
    kept = kept_rows(labels, opts)
    n_kept = rows if kept is None else kept.numel()
    new = torch.empty if kept is None else torch.zeros  # ignored rows: loss 0, gradient 0
    loss = new(rows, dtype=acc, device=hs.device)
    grad_h = new(hs.shape, dtype=hs.dtype, device=hs.device) if want_grad else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if want_grad else None
    grad_b = torch.zeros(vocab, dtype=acc, device=ws.device) if want_grad and bs is not None else None
    none = hs.new_empty(0)
    step = chunk_rows(max(n_kept, 1), vocab, hs.device)
    for start in range(0, n_kept, step):
        if kept is None:
            sel = slice(start, min(rows, start + step))
            take = lambda x, sel=sel: x[sel] if x is not None else None
        else:
            sel = kept[start : start + step]
            take = lambda x, sel=sel: x.index_select(0, sel) if x is not None else None
        h = take(hs)
        s = chunk_logits(h, ws, bs)
        t = chunk_logits(take(ht), wt, bt)
        # The student chunk is overwritten with d loss / d logits.
        loss[sel] = rows_impl(s, t, take(labels), take(row_scale), s if want_grad else none, opts, grad_scale)
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
    return loss, grad_h, grad_w, grad_b
