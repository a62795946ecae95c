"""Plain-PyTorch reference of every memkern op: the test oracle and last-resort fallback.

Each function here states the op's semantics in the most direct PyTorch; kernels must match
it (bit-exactly for integer outputs, within the dtype tolerances of tests/conftest.py for
floating outputs).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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
def block_sparse_to_dense(
    values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n_out: int, n_in: int
) -> torch.Tensor:
    """The dense (n_out, n_in) weight held by kept blocks ``values`` (nnzb, BN, BK) at
    block rows given by ``crow`` (BSR row pointer) and block columns ``col``; blocks not
    listed are zero and the padding of edge blocks is cut off."""
    nnzb, bn, bk = values.shape
    n_block_rows, n_block_cols = -(-n_out // bn), -(-n_in // bk)
    rows = torch.repeat_interleave(torch.arange(n_block_rows, device=values.device), crow.diff())
    grid = values.new_zeros(n_block_rows, n_block_cols, bn, bk)
    grid[rows, col] = values
    return grid.permute(0, 2, 1, 3).reshape(n_block_rows * bn, n_block_cols * bk)[:n_out, :n_in]


def block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    n_out: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
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


def sparse24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
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

# Masked and non-finite logits: the semantics every kernel mirrors (the functions below
# are their statement). Per row, p = softmax(t / T) (teacher), q = softmax(s / T) (student).
#
# * Probabilities come from max-shifted logits, (z - max z) / T, so huge finite logits
#   (+-1e30) are exact. An entry whose logit is -inf, or whose shifted value passes the
#   float range (finfo.min at T < 1), or whose exponential underflows, has probability
#   exactly 0. Log-probabilities of entries with finite shifted logits stay finite,
#   however small the probability: a student logit of -1e4 under teacher mass gives a
#   large finite forward KL, not +inf.
# * Every term a * log(a / b) with a = 0 is 0, also where b = 0 (0 log 0 = 0, 0 log 0/0 = 0).
#   So an entry masked in the distribution that weights it adds nothing, and a teacher
#   masked with finfo.min or -inf gives the same loss as dropping the entry.
# * forward_kl = KL(p || q) is +inf where p > 0 and log q = -inf (the student's logit is
#   -inf); reverse_kl = KL(q || p) is +inf where q > 0 and log p = -inf; jsd is finite.
#   A finite mask value is a logit like any other: under the other side's mass it gives a
#   term of order mass * |mask| / T (use -inf to mark an entry as impossible).
# * The cross entropy is +inf when the label's student logit is -inf.
# * A term whose weight is 0 adds 0 even where it is +inf (alpha = 1 ignores the teacher,
#   alpha = 0 the labels).
# * Gradients (d loss / d student logits) are finite wherever the loss is finite, and 0 at
#   entries whose student probability is 0. Where forward_kl or the cross entropy is +inf
#   the gradient is still the finite closed form (q - p, softmax(s) - onehot(y)): the
#   limit of the gradient as the masked logits go to -inf. Where reverse_kl is +inf that
#   limit does not exist, and the row's gradient is NaN.
# * A row is undefined when its student or teacher logits hold a NaN or +inf, or are all
#   -inf (no distribution): its loss and gradient are NaN (0 when its label is ignored).


def kd_rows_defined(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per row of 2-D logits: whether student and teacher each define a distribution (no
    NaN, no +inf, some entry above -inf). amax propagates NaN, so one test covers all."""
    return torch.isfinite(student_logits.amax(-1)) & torch.isfinite(teacher_logits.amax(-1))


def kd_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) per row, from the max-shifted logits as in every kernel
    (the max is a constant shift: detached, it leaves the gradient exact)."""
    shifted = logits - logits.detach().amax(-1, keepdim=True)
    return torch.log_softmax(shifted / temperature, dim=-1)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) per entry with a = e^log_a, and 0 wherever a is 0. The ratio is
    zeroed before the product, so autograd sees no 0 * inf either."""
    a = log_a.exp()
    return a * torch.where(a == 0, torch.zeros_like(log_a), log_a - log_b)


def _kd_log_mix(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """log m = log(beta p + (1 - beta) q); -inf where p and q are both 0 (logaddexp's
    gradient at (-inf, -inf) is NaN, so those entries never enter it)."""
    a, b = log_p + math.log(beta), log_q + math.log1p(-beta)
    both_zero = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros_like(a)
    mixed = torch.logaddexp(torch.where(both_zero, zero, a), torch.where(both_zero, zero, b))
    return torch.where(both_zero, torch.full_like(a, -math.inf), mixed)


def kd_divergence_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, divergence: str, beta: float
) -> torch.Tensor:
    """D(softmax(t/T), softmax(s/T)) per row of 2-D logits, computed in their dtype.

    forward_kl = KL(p || q); reverse_kl = KL(q || p); jsd = beta * KL(p || m) +
    (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q; p is the teacher's
    distribution and q the student's. Masked entries: see the notes above.
    """
    log_q = kd_log_probs(student_logits, temperature)
    log_p = kd_log_probs(teacher_logits, temperature)
    if divergence == "forward_kl":
        return _kl_terms(log_p, log_q).sum(-1)
    if divergence == "reverse_kl":
        return _kl_terms(log_q, log_p).sum(-1)
    if divergence == "jsd":
        log_m = _kd_log_mix(log_p, log_q, beta)
        return beta * _kl_terms(log_p, log_m).sum(-1) + (1 - beta) * _kl_terms(log_q, log_m).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


class RowOptions(NamedTuple):
    """The keyword options of the per-row references (kd_scale: k of the soft term)."""

    alpha: float
    temperature: float
    divergence: str
    beta: float
    ignore_index: int
    kd_scale: float


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: where the references compute."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)


def kd_loss_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels, **options) -> torch.Tensor:
    """Per-row loss l_i of 2-D (rows, V) logits (see :func:`kd_loss`); 0 for ignored rows,
    NaN for rows that are not (kd_rows_defined). ``options``: the fields of RowOptions."""
    o = RowOptions(**options)
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    soft = lambda: kd_divergence_rows(s, t, temperature=o.temperature, divergence=o.divergence, beta=o.beta)  # noqa: E731
    return combine_rows(s, t, labels, soft, o)


def combine_rows(s: torch.Tensor, teacher: torch.Tensor, labels, soft, o: RowOptions) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * k * soft() per row of the student logits ``s`` (in the
    compute dtype), NaN in rows undefined in ``s`` or ``teacher``, 0 in ignored ones."""
    rows = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    if o.alpha != 1:  # with weight 0 the soft term adds 0, even where it is +inf
        rows = (1 - o.alpha) * o.kd_scale * soft()
    if labels is not None and o.alpha != 0:
        safe = torch.where(labels != o.ignore_index, labels, torch.zeros_like(labels))
        # -log softmax(s)[y]: shifted by the max first, like lse(s) - s_y but exact for huge logits
        rows = rows - o.alpha * torch.log_softmax(s, dim=-1).gather(1, safe[:, None]).squeeze(1)
    return _defined_and_counted(rows, s, teacher, labels, o.ignore_index)


def combine_grads(s: torch.Tensor, teacher: torch.Tensor, labels, row_weight, soft_grad, o: RowOptions):
    """The gradient of :func:`combine_rows`, each row times row_weight: c * soft_grad() +
    alpha * (softmax(s) - onehot(y)) with c = (1 - alpha) * k / T."""
    grad = torch.zeros_like(s)
    c = (1 - o.alpha) * o.kd_scale / o.temperature
    if c != 0:  # with weight 0 the soft term adds 0, even where it is +inf
        grad = c * soft_grad()
    if labels is not None and o.alpha != 0:
        safe = torch.where(labels != o.ignore_index, labels, torch.zeros_like(labels))
        ce = torch.softmax(s, dim=-1)
        ce.scatter_add_(1, safe[:, None], -torch.ones_like(ce[:, :1]))
        grad = grad + o.alpha * ce
    return _defined_and_counted(grad, s, teacher, labels, o.ignore_index) * row_weight.to(s.dtype)[:, None]


def _defined_and_counted(per_row: torch.Tensor, s, t, labels, ignore_index: int) -> torch.Tensor:
    """``per_row`` (rows or rows x V) with NaN in undefined rows, then 0 in ignored ones."""
    defined = kd_rows_defined(s, t).reshape(-1, *([1] * (per_row.dim() - 1)))
    per_row = torch.where(defined, per_row, torch.full_like(per_row, math.nan))
    if labels is None:
        return per_row
    counted = (labels != ignore_index).reshape(defined.shape)
    return torch.where(counted, per_row, torch.zeros_like(per_row))


def kd_loss_rows_grad(student_logits, teacher_logits, labels, row_weight: torch.Tensor, **options) -> torch.Tensor:
    """d(sum_i row_weight[i] * l_i) / d student_logits for :func:`kd_loss_rows`, in closed form
    (the formulas the compiled kernels use), in the compute dtype of kd_loss_rows.

    With z = s / T, q = softmax(z), p = softmax(t / T) and c = (1 - alpha) * k / T:

    * forward_kl: c * (q - p);
    * reverse_kl and jsd: c * q * (g - sum(q * g)), the softmax chain rule for a loss f(q)
      with g = df/dq: g = log q - log p for reverse_kl, g = (1 - beta) * (log q - log m) for
      jsd (in both, the remaining terms of df/dq are constant over the row and cancel);
      q * g is 0 where q is 0, and sum(q * g) is reverse_kl itself: where that is +inf the
      row's gradient is NaN;
    * cross entropy: alpha * (softmax(s) - onehot(y)).

    Rows whose label is ignore_index get zeros, undefined rows NaN.
    """
    o = RowOptions(**options)
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)

    def soft_grad() -> torch.Tensor:
        log_q = kd_log_probs(s, o.temperature)
        log_p = kd_log_probs(t, o.temperature)
        q = log_q.exp()
        if o.divergence == "forward_kl":
            return q - log_p.exp()
        g = chain_rule_g(log_q, log_p, o)
        qg = torch.where(q == 0, torch.zeros_like(q), q * g)
        total = qg.sum(-1, keepdim=True)
        return torch.where(total == math.inf, torch.full_like(q, math.nan), qg - q * total)

    return combine_grads(s, t, labels, row_weight, soft_grad, o)


def chain_rule_g(log_q: torch.Tensor, log_p: torch.Tensor, o: RowOptions) -> torch.Tensor:
    """g of the softmax chain rule: df/dq of reverse_kl or jsd up to a constant of the row."""
    if o.divergence == "reverse_kl":
        return log_q - log_p
    if o.divergence == "jsd":
        return (1 - o.beta) * (log_q - _kd_log_mix(log_p, log_q, o.beta))
    raise ValueError(f"unknown divergence {o.divergence!r}")


class LossOptions(NamedTuple):
    """The keyword options of the reference losses, with the defaults of memkern.ops.kd_loss."""

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "mean"
    soft_loss_scale: str = "t2"

    def rows(self) -> dict:  # the keyword options of the per-row references
        k = soft_loss_factor(self.soft_loss_scale, self.temperature)
        return RowOptions(self.alpha, self.temperature, self.divergence, self.beta, self.ignore_index, k)._asdict()


def reduced_loss(rows_of, lead, labels: torch.Tensor | None, **options) -> torch.Tensor:
    """``rows_of(labels as rows, **RowOptions)`` reduced as ``options`` (LossOptions) say."""
    o = LossOptions(**options)
    y = labels.reshape(-1) if labels is not None else None
    return reduce_rows(rows_of(y, **o.rows()), o.reduction, lead, y, o.ignore_index)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels=None, **options) -> torch.Tensor:
    """Distillation loss on logits of shape (..., V), differentiable in plain PyTorch;
    ``options``: the fields of LossOptions (keyword), those of memkern.ops.kd_loss.

    Per row i with label y_i that is not ``ignore_index`` (every row when labels is None):

        l_i = alpha * (lse(s_i) - s_i[y_i]) + (1 - alpha) * k * D(softmax(t_i/T), softmax(s_i/T))

    with k = T^2 (``soft_loss_scale="t2"``) or 1 (``"none"``). Ignored rows give l_i = 0
    whatever their logits hold. ``mean`` divides the sum by the number of rows that are
    not ignored (0 when every row is ignored), ``sum`` sums, ``none`` returns l with the
    logits' leading shape. Computed in float32, or float64 for float64 inputs.
    """
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    return reduced_loss(lambda y, **o: kd_loss_rows(s, t, y, **o), student_logits.shape[:-1], labels, **options)


def soft_loss_factor(soft_loss_scale: str, temperature: float) -> float:
    """k of the soft term: T^2 for ``"t2"``, 1 for ``"none"``."""
    return temperature**2 if soft_loss_scale == "t2" else 1.0


def reduce_rows(rows: torch.Tensor, reduction: str, lead, labels: torch.Tensor | None, ignore_index: int):
    """Per-row losses reduced: ``none`` in the leading shape, ``sum``, or ``mean`` over the
    rows whose label is not ignore_index (every row without labels; 0 when none counts)."""
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    n_valid = rows.shape[0] if labels is None else int((labels != ignore_index).sum())
    return rows.sum() / max(n_valid, 1)


def of_linear_heads(loss_of_logits):
    """``loss_of_logits`` of the logits ``hidden @ weight.T + bias``, as memkern.ops.linear_kd_loss."""

    def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, **options):
        s = torch.nn.functional.linear(student_hidden, student_weight, options.pop("student_bias", None))
        t = torch.nn.functional.linear(teacher_hidden, teacher_weight, options.pop("teacher_bias", None))
        return loss_of_logits(s, t, labels, **options)

    loss.__doc__ = f":func:`{loss_of_logits.__name__}` of the logits ``hidden @ weight.T + bias`` of both."
    return loss


linear_kd_loss = of_linear_heads(kd_loss)


# -- low-precision linear layers (memkern/ops/lowp.py) ------------------------------------
def _linear_epilogue(
    acc: torch.Tensor, col_scale: torch.Tensor | None, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    out = acc.to(compute_dtype)
    if col_scale is not None:
        out = out * col_scale.to(compute_dtype)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out


def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
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


def int8_weight_only_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W8A16 linear layer: ``(x @ w_q.T) * w_scale[col] + bias[col]``, accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype. The scale applies
    after the accumulation (the int8 weight widens exactly to any float type), so
    |x| * 127 * K must stay inside the compute dtype's range."""
    acc = x.to(compute_dtype) @ w_q.to(compute_dtype).t()
    return _linear_epilogue(acc, w_scale, bias, compute_dtype).to(x.dtype)


def fp16_linear(
    x: torch.Tensor, w_half: torch.Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Linear layer with half-precision weights: ``x @ w_half.T + bias`` accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype."""
    acc = x.to(compute_dtype) @ w_half.to(compute_dtype).t()
    return _linear_epilogue(acc, None, bias, compute_dtype).to(x.dtype)
