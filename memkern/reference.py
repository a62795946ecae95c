"""Plain-PyTorch reference of every memkern op: the test oracle and last-resort fallback.

Each function here states the op's semantics in the most direct PyTorch; kernels must match
it (bit-exactly for integer outputs, within the dtype tolerances of tests/conftest.py for
floating outputs).
"""
from __future__ import annotations

import math

import torch

INT8_MAX = 127


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantisation of each row of a 2-D tensor.

    scale = max|x_row| / 127 (fp32); q = round_half_to_even(x / scale) clamped to
    [-127, 127]. A row whose scale is 0 (all zeros) gets scale 1 and q 0. A row holding
    NaN or +-inf gets scale NaN and q 0.
    """
    xf = x.float()
    rows, cols = xf.shape
    if cols == 0:
        return torch.empty_like(xf, dtype=torch.int8), torch.ones(rows, dtype=torch.float32, device=x.device)
    finite = torch.isfinite(xf).all(dim=1)
    absmax = xf.abs().amax(dim=1)
    scale = absmax / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(xf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    return q.to(torch.int8).contiguous(), scale


# -- sparse: block-sparse and 2:4 weights (memkern/ops/sparse.py) ------------------------
def block_sparse_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n_out: int,
                          n_in: int) -> torch.Tensor:
    """The dense (n_out, n_in) weight held by kept blocks ``values`` (nnzb, BN, BK) at
    block rows given by ``crow`` (BSR row pointer) and block columns ``col``; blocks not
    listed are zero and the padding of edge blocks is cut off."""
    nnzb, bn, bk = values.shape
    n_block_rows, n_block_cols = -(-n_out // bn), -(-n_in // bk)
    rows = torch.repeat_interleave(torch.arange(n_block_rows, device=values.device), crow.diff())
    grid = values.new_zeros(n_block_rows, n_block_cols, bn, bk)
    grid[rows, col] = values
    return grid.permute(0, 2, 1, 3).reshape(n_block_rows * bn, n_block_cols * bk)[:n_out, :n_in]


def block_sparse_matmul(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                        n_out: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W the dense weight of the kept blocks (x: (M, K)), computed
    in float32 (float64 stays float64) and returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = block_sparse_to_dense(values.to(acc), crow, col, n_out, x.shape[1])
    y = x.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def sparse24_compress(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 compression of ``weight * mask`` (every group of 4 columns keeps <= 2 values).

    Returns values (rows, cols/2): group g's kept values, in column order, at columns 2g and
    2g+1; and meta (rows, ceil(cols/8)) uint8: group g's code i0 | (i1 << 2) (its kept
    positions, i0 < i1) in byte g // 2 at bit 4 * (g % 2). Free slots of a group keeping
    fewer than 2 values take the lowest unused positions with value 0.
    """
    rows, cols = weight.shape
    groups = cols // 4
    m = mask.reshape(rows, groups, 4)
    # Rank positions: kept ones first (in column order), then the free ones (in column order).
    order = torch.argsort((~m).to(torch.int8) * 4 + torch.arange(4, device=m.device), dim=-1)
    pos = order[..., :2].sort(dim=-1).values
    w = (weight * mask).reshape(rows, groups, 4)
    values = torch.gather(w, 2, pos).reshape(rows, cols // 2)
    code = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int32)
    if groups % 2:
        code = torch.cat([code, code.new_zeros(rows, 1)], dim=1)
    code = code.reshape(rows, -1, 2)
    meta = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8)
    return values.contiguous(), meta.contiguous()


def sparse24_decompress(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense (rows, cols) weight of 2:4 ``values`` and ``meta`` (see sparse24_compress)."""
    rows = values.shape[0]
    groups = cols // 4
    byte = meta.to(torch.int32).repeat_interleave(2, dim=1)[:, :groups]
    code = (byte >> (4 * (torch.arange(groups, device=meta.device) % 2))) & 15
    pos = torch.stack([code & 3, code >> 2], dim=-1).to(torch.int64)
    w = values.new_zeros(rows, groups, 4)
    w.scatter_add_(2, pos, values.reshape(rows, groups, 2))
    return w.reshape(rows, cols)


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W the dense weight of a 2:4 compressed one, computed in
    float32 (float64 stays float64) and returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = sparse24_decompress(values.to(acc), meta, x.shape[1])
    y = x.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
# -- knowledge distillation ---------------------------------------------------------------
KD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
KD_REDUCTIONS = ("mean", "sum", "none")


def kd_divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                       temperature: float, divergence: str, beta: float) -> torch.Tensor:
    """D(softmax(t/T), softmax(s/T)) per row of 2-D logits, computed in their dtype.

    forward_kl = KL(p || q); reverse_kl = KL(q || p); jsd = beta * KL(p || m) +
    (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q; p is the teacher's
    distribution and q the student's.
    """
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
                + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
    raise ValueError(f"unknown divergence {divergence!r}")


def kd_loss_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor | None, *, alpha: float, temperature: float, divergence: str,
                 beta: float, ignore_index: int, kd_scale: float) -> torch.Tensor:
    """Per-row loss l_i of 2-D (rows, V) logits (see :func:`kd_loss`); 0 for ignored rows."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    rows = (1 - alpha) * kd_scale * kd_divergence_rows(s, t, temperature=temperature,
                                                       divergence=divergence, beta=beta)
    if labels is None:
        return rows
    valid = labels != ignore_index
    if alpha != 0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = torch.logsumexp(s, dim=-1) - s.gather(1, safe[:, None]).squeeze(1)
        rows = rows + alpha * ce
    return torch.where(valid, rows, torch.zeros_like(rows))


def kd_loss_rows_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None, row_weight: torch.Tensor, *, alpha: float,
                      temperature: float, divergence: str, beta: float, ignore_index: int,
                      kd_scale: float) -> torch.Tensor:
    """d(sum_i row_weight[i] * l_i) / d student_logits for :func:`kd_loss_rows`, in closed form
    (the formulas the compiled kernels use), in the compute dtype of kd_loss_rows.

    With z = s / T, q = softmax(z), p = softmax(t / T) and c = (1 - alpha) * k / T:

    * forward_kl: c * (q - p);
    * reverse_kl and jsd: c * q * (g - sum(q * g)), the softmax chain rule for a loss f(q)
      with g = df/dq: g = log q - log p for reverse_kl, g = (1 - beta) * (log q - log m) for
      jsd (in both, the remaining terms of df/dq are constant over the row and cancel);
    * cross entropy: alpha * (softmax(s) - onehot(y)).

    Rows whose label is ignore_index get zeros.
    """
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    q = log_q.exp()
    c = (1 - alpha) * kd_scale / temperature
    if divergence == "forward_kl":
        grad = c * (q - log_p.exp())
    elif divergence in ("reverse_kl", "jsd"):
        if divergence == "reverse_kl":
            g = log_q - log_p
        else:
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            g = (1 - beta) * (log_q - log_m)
        qg = torch.where(q > 0, q * g, torch.zeros_like(q))  # q log q -> 0 as q -> 0
        grad = c * (qg - q * qg.sum(-1, keepdim=True))
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    if labels is not None:
        valid = labels != ignore_index
        if alpha != 0:
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            ce = torch.softmax(s, dim=-1)
            ce.scatter_add_(1, safe[:, None], -torch.ones_like(ce[:, :1]))
            grad = grad + alpha * ce
        grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
    return grad * row_weight.to(dtype)[:, None]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, *, alpha: float = 0.5, temperature: float = 1.0,
            divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
            reduction: str = "mean", soft_loss_scale: str = "t2") -> torch.Tensor:
    """Distillation loss on logits of shape (..., V), differentiable in plain PyTorch.

    Per row i with label y_i that is not ``ignore_index`` (every row when labels is None):

        l_i = alpha * (lse(s_i) - s_i[y_i]) + (1 - alpha) * k * D(softmax(t_i/T), softmax(s_i/T))

    with k = T^2 (``soft_loss_scale="t2"``) or 1 (``"none"``). Ignored rows give l_i = 0
    whatever their logits hold. ``mean`` divides the sum by the number of rows that are
    not ignored (0 when every row is ignored), ``sum`` sums, ``none`` returns l with the
    logits' leading shape. Computed in float32, or float64 for float64 inputs.
    """
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    y = labels.reshape(-1) if labels is not None else None
    rows = kd_loss_rows(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), y,
                        alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                        ignore_index=ignore_index,
                        kd_scale=temperature**2 if soft_loss_scale == "t2" else 1.0)
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    n_valid = rows.shape[0] if y is None else (y != ignore_index).sum().item()
    return rows.sum() / max(n_valid, 1)


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                   labels: torch.Tensor | None = None, *, student_bias: torch.Tensor | None = None,
                   teacher_bias: torch.Tensor | None = None, **options) -> torch.Tensor:
    """:func:`kd_loss` of the logits ``hidden @ weight.T + bias`` of student and teacher."""
    s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    t = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
    return kd_loss(s, t, labels, **options)
# -- low-precision linear layers (memkern/ops/lowp.py) ------------------------------------
def _linear_epilogue(acc: torch.Tensor, col_scale: torch.Tensor | None, bias: torch.Tensor | None,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    out = acc.to(compute_dtype)
    if col_scale is not None:
        out = out * col_scale.to(compute_dtype)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 dynamic linear layer: ``x`` (M, K) float, ``w_q`` (N, K) int8, ``w_scale`` (N,).

    x is quantised per row exactly as :func:`quantize_rowwise`; the integer product
    ``acc = x_q @ w_q.T`` is exact (computed in float64, whose 53-bit mantissa holds every
    partial sum of K < 2^39 products of int8 values; int64 matmul does not exist on CUDA);
    the epilogue is ``acc * (x_scale[row] * w_scale[col]) + bias[col]`` in ``compute_dtype``
    (float32 in every kernel), then cast to ``out_dtype`` (default: x's dtype). The scales
    are multiplied first: their product is about |x|max * |w|max / 127^2, so the result
    overflows only where the true product does (huge bfloat16 activations give x_scale
    near 2.7e36, and acc * x_scale alone would overflow float32).
    """
    x_q, x_scale = quantize_rowwise(x)
    acc = x_q.double() @ w_q.double().t()
    scale = x_scale.to(compute_dtype)[:, None] * w_scale.to(compute_dtype)[None, :]
    out = acc.to(compute_dtype) * scale
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(out_dtype or x.dtype)


def int8_weight_only_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None,
                            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A16 linear layer: ``(x @ w_q.T) * w_scale[col] + bias[col]``, accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype. The scale applies
    after the accumulation (the int8 weight widens exactly to any float type), so
    |x| * 127 * K must stay inside the compute dtype's range."""
    acc = x.to(compute_dtype) @ w_q.to(compute_dtype).t()
    return _linear_epilogue(acc, w_scale, bias, compute_dtype).to(x.dtype)


def fp16_linear(x: torch.Tensor, w_half: torch.Tensor, bias: torch.Tensor | None = None,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Linear layer with half-precision weights: ``x @ w_half.T + bias`` accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype."""
    acc = x.to(compute_dtype) @ w_half.to(compute_dtype).t()
    return _linear_epilogue(acc, None, bias, compute_dtype).to(x.dtype)
