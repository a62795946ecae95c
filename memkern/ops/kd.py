"""Fused knowledge-distillation loss: ``kd_loss`` (logits form) and ``linear_kd_loss``
(the lm_head projection fused in).

Reads top to bottom: options and checks -> the per-row kernel table (cpp | cuda | triton |
torch) -> the fused-linear chunk loop and its table -> the operators (schema, fake,
autograd) -> the public functions.

How memory is saved:

* Logits form: one kernel call computes the per-row loss and writes d loss / d student
  logits into one buffer the size of the student logits; backward only scales it by the
  upstream gradient, in place, and hands it on. Extra memory is that buffer plus O(rows).
* Fused-linear form: rows go through in chunks; each chunk's student and teacher logits
  (chunk x V) are computed with a matmul, the per-row kernel overwrites the student
  chunk with its gradient, and two more matmuls turn that into the gradients of the hidden
  states, weight and bias. No rows x V tensor exists at any time. With a scalar upstream
  gradient (reduction "mean" or "sum") this happens in forward and backward scales the
  results; with reduction "none" the upstream gradient differs per row, so forward keeps
  only the per-row losses and backward recomputes the logit chunks. That is the cpp,
  cuda and torch backends; the triton backend does not chunk: its kernels tile the matmul and the
  online softmax together, keep eight statistics per row and recompute logit tiles for the
  gradient (memkern/kernels/kd.py), so its extra memory is O(rows) besides the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from memkern import _autocast, _dense, _validate, backends, reference
from memkern.ops._autograd import refuse_double_backward

DIVERGENCES = reference.KD_DIVERGENCES
REDUCTIONS = reference.KD_REDUCTIONS
SOFT_LOSS_SCALES = ("t2", "none")
KD_DTYPES = (*_validate.FLOAT_DTYPES, torch.float64)  # float64 for gradcheck and oracles
# Temperatures T accepted. Above 100, the float32 statistics lose the soft term: the
# softened distributions differ by O(logit gap / T), so KL(p || q) ~ (gap / T)^2 comes out of
# a cancellation between terms ~gap / T, and T^2 * KL of N(0, 3^2) logits was off by 1e-4
# relative at T = 100, 1e-2 at 1e3 and 70% at 1e4 (every backend, against float64). Below
# 1e-4, exp(-gap / T) underflows float32 for every gap above 0.01, so both distributions are
# one-hot and the T^2-scaled soft term vanishes below float32's resolution.
TEMPERATURE_RANGE = (1e-4, 100.0)


# -- options and checks --------------------------------------------------------------------
@dataclass(frozen=True)
class KDOptions:
    """The scalar options of a call, checked. ``kd_scale`` is T^2 or 1."""

    alpha: float
    temperature: float
    divergence: str
    beta: float
    ignore_index: int
    kd_scale: float

    @property
    def divergence_id(self) -> int:
        return DIVERGENCES.index(self.divergence)

    def reference_options(self) -> dict:
        """The keyword arguments of reference.kd_loss_rows and kd_loss_rows_grad."""
        return dict(alpha=self.alpha, temperature=self.temperature, divergence=self.divergence, beta=self.beta,
                    ignore_index=self.ignore_index, kd_scale=self.kd_scale)


def check_options(op: str, *, has_labels: bool, alpha: float, temperature: float, divergence: str,
                  beta: float, ignore_index: int, reduction: str, soft_loss_scale: str) -> KDOptions:
    for name, value in (("alpha", alpha), ("temperature", temperature), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{op}: alpha must be in [0, 1], got {alpha}")
    low, high = TEMPERATURE_RANGE
    if not (low <= temperature <= high):  # comparisons only: NaN fails, and a SymFloat traces
        raise ValueError(f"{op}: temperature must be in [{low:g}, {high:g}] (where float32 statistics "
                         f"stay meaningful), got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"{op}: divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if divergence == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(f"{op}: beta must be in (0, 1) for divergence='jsd' (at 0 and 1 the "
                         f"generalised JSD is identically 0), got {beta}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if soft_loss_scale not in SOFT_LOSS_SCALES:
        raise ValueError(f"{op}: soft_loss_scale must be 't2' or 'none', got {soft_loss_scale!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not has_labels and alpha != 0.0:
        raise ValueError(f"{op}: labels=None means the soft loss alone, so alpha must be 0; got alpha={alpha}")
    kd_scale = float(temperature) ** 2 if soft_loss_scale == "t2" else 1.0
    return KDOptions(float(alpha), float(temperature), divergence, float(beta), ignore_index, kd_scale)


def _check_labels(op: str, labels: Optional[torch.Tensor], lead: tuple[int, ...], device: torch.device
                  ) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    _validate.check_tensor(op, "labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must have dtype int64 or int32; got {_validate.dtype_name(labels.dtype)}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"{op}: labels must have shape {lead} (the rows of the logits), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels must be on {device}, got {labels.device}")
    return labels.long()


def check_label_range(op: str, labels: Optional[torch.Tensor], vocab: int, ignore_index: int) -> None:
    """Labels must be ignore_index or in [0, vocab). Runs inside the operator (it reads
    values, which torch.compile cannot trace), before any kernel."""
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{op}: labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {first} ({int(bad.sum())} such labels)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_scale(labels: Optional[torch.Tensor], rows: int, opts: KDOptions) -> tuple[int, float]:
    """(N, 1 / max(N, 1)) with N the rows that count (a host sync on GPUs, once a call)."""
    n = rows if labels is None else int((labels != opts.ignore_index).sum())
    return n, 1.0 / max(n, 1)


# -- per-row kernel: loss of each row, gradient written into `grad` -------------------------
# Signature of every implementation:
#   (student (R, V), teacher (R, V), labels (R,) int64 | None, row_scale (R,) | None,
#    grad (R, V) or 1-D "none", opts, grad_scale) -> loss (R,) in the compute dtype
# grad may be the student tensor itself (the fused-linear path overwrites its logits chunk).
# On CUDA, Triton goes first: its arithmetic is proven in CI under TRITON_INTERPRET=1, while
# the .cu kernel is only compile-checked there (no GPU). Both are bandwidth-bound per row.
_rows = backends.op_table("kd_loss_rows", preference=backends.TRITON_FIRST)


@_rows.register("torch")
def _rows_torch(s, t, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    options = opts.reference_options()
    loss = reference.kd_loss_rows(s, t, labels, **options)
    if grad.dim() == 2:  # grad may be s itself: the loss above has already read it
        grad.copy_(reference.kd_loss_rows_grad(s, t, labels, _row_weights(loss, row_scale, grad_scale), **options))
    return loss.to(_acc_dtype(s.dtype))


def _row_weights(loss: torch.Tensor, row_scale: Optional[torch.Tensor], grad_scale: float) -> torch.Tensor:
    """w_i of the gradient of sum_i w_i l_i."""
    return torch.full_like(loss, grad_scale) if row_scale is None else row_scale.to(loss.dtype) * grad_scale


@_rows.register("cpp", dtypes=KD_DTYPES)
@_rows.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _rows_compiled(s, t, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    return torch.ops.memkern.kd_loss_rows(s, t, labels, row_scale, grad, opts.alpha, opts.temperature,
                                          opts.divergence_id, opts.beta, opts.ignore_index,
                                          opts.kd_scale, grad_scale)


@_rows.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _rows_triton(s, t, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    from memkern.kernels.kd import kd_loss_rows as launch

    return launch(s, t, labels, row_scale, grad, opts, grad_scale)


def _rows_2d(x: torch.Tensor, vocab: int) -> torch.Tensor:
    x = x.reshape(-1, vocab)
    return x if x.stride(-1) == 1 or vocab <= 1 else x.contiguous()


def _reduce(loss_rows: torch.Tensor, reduction: str, lead: tuple[int, ...], n_valid: int) -> torch.Tensor:
    if reduction == "none":
        return loss_rows.reshape(lead)
    total = loss_rows.sum()
    return total if reduction == "sum" else total / max(n_valid, 1)


# -- operator: logits form -------------------------------------------------------------------
@torch.library.custom_op("memkern::kd_loss", mutates_args=())
def _kd_loss_op(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                alpha: float, temperature: float, divergence: str, beta: float, ignore_index: int,
                reduction: str, kd_scale: float, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss / d student) where the gradient is for a unit upstream
    gradient (per row for reduction='none'); an empty tensor when compute_grad is False."""
    opts = KDOptions(alpha, temperature, divergence, beta, ignore_index, kd_scale)
    vocab, lead = student.shape[-1], tuple(student.shape[:-1])
    s, t = _rows_2d(student, vocab), _rows_2d(teacher, vocab)
    y = labels.reshape(-1).contiguous() if labels is not None else None
    check_label_range("kd_loss", y, vocab, ignore_index)
    n_valid, inv_n = _mean_scale(y, s.shape[0], opts)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if compute_grad else s.new_empty(0)
    loss_rows = _rows(s, t, y, None, grad, opts, inv_n if reduction == "mean" else 1.0)
    return _reduce(loss_rows, reduction, lead, n_valid), grad.view(student.shape) if compute_grad else grad


@_kd_loss_op.register_fake
def _kd_loss_fake(student, teacher, labels, alpha, temperature, divergence, beta, ignore_index,
                  reduction, kd_scale, compute_grad):
    shape = student.shape[:-1] if reduction == "none" else ()
    loss = student.new_empty(shape, dtype=_acc_dtype(student.dtype))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return loss, grad


def _no_zero_gradients(ctx, gradient_outputs) -> None:
    """The gradient outputs are not differentiable, and autograd must not build a zero
    "gradient" of their size for backward (with materialised grads it does: +1x memory)."""
    ctx.mark_non_differentiable(*gradient_outputs)
    ctx.set_materialize_grads(False)


def _kd_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.compute_grad = inputs[10]
    ctx.save_for_backward(output[1])
    _no_zero_gradients(ctx, output[1:])


def scale_saved_gradients(grads: list[torch.Tensor], upstream: torch.Tensor, *, per_row: bool
                          ) -> list[torch.Tensor]:
    """The gradients computed in forward (for a unit upstream gradient) times ``upstream``.

    Memory is the point of these ops, so the saved buffers are handed on as they are when
    the upstream gradient is exactly 1 (``loss.backward()``), and scaled in place for any
    other scalar, so no second gradient-sized buffer ever exists. The price of the in-place
    case: a second backward through the same graph (retain_graph=True) is refused by
    autograd's saved-tensor version check. Per-row upstream gradients (reduction="none")
    and traced graphs (torch.compile, which cannot read values) get an out-of-place product.
    """
    if type(upstream) is not torch.Tensor:  # FakeTensor / FunctionalTensor while tracing
        return [g * upstream.to(g.dtype) for g in grads]
    if bool((upstream == 1).all()):
        return grads
    if per_row:
        return [g * upstream.to(g.dtype) for g in grads]
    for g in grads:
        g.mul_(upstream.to(g.dtype))
    return grads


# Double backward would need the second derivative of the loss, i.e. the logits (or hidden
# states and weights) kept until backward: the memory these ops exist to save.
_NOT_TWICE = "its gradient is computed by a fused kernel, which keeps no inputs for a second derivative"


def _kd_backward(ctx, grad_loss, _grad_of_grad):
    (g,) = ctx.saved_tensors
    if not ctx.compute_grad or grad_loss is None:
        return (None,) * 11
    per_row = ctx.reduction == "none"
    (g,) = scale_saved_gradients([g], grad_loss.unsqueeze(-1) if per_row else grad_loss, per_row=per_row)
    (g,) = refuse_double_backward("kd_loss", _NOT_TWICE, g)
    return (g,) + (None,) * 10


backends.register_autograd(_kd_loss_op, _kd_backward, setup_context=_kd_setup_context)
# Autocast: the logits go in as they are (the kernels read any float dtype and keep their
# statistics in float32; a float32 copy would double the largest tensor of a step).
_autocast.register("kd_loss")


# -- fused-linear: the chunk loop ---------------------------------------------------------------
# Elements of one chunk of logits (chunk x V), per matrix. On the CPU, 2^23 (32 MiB in fp32,
# 262 rows at V=32000): the two chunks stay a small fraction of the eager composition's
# rows x V tensors, and the weight-gradient accumulator (V x H fp32) is read and written
# once per chunk, so halving the chunk (2^22) cost ~20% more time at 2048x1024x32000.
# On CUDA 2^25 elements.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 25}


def _chunk_rows(rows: int, vocab: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS.get(device.type, 1 << 22)
    return max(1, min(rows, budget // max(vocab, 1)))


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return _dense.linear(h, w, b)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without an a @ b temporary in a's dtype where the device allows."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def kept_rows(labels: Optional[torch.Tensor], opts: KDOptions) -> Optional[torch.Tensor]:
    """Indices of the rows whose label counts, or None when every row counts. The fused-linear
    paths run only these rows: padding is often a large share of a batch, and an ignored row
    contributes nothing (at 10% padding this saves 10% of the matmuls)."""
    if labels is None:
        return None
    counts = labels != opts.ignore_index
    return None if bool(counts.all()) else counts.nonzero().squeeze(1)


def linear_chunks(rows_impl, hs, ws, bs, ht, wt, bt, labels, opts: KDOptions, *,
                  row_scale: Optional[torch.Tensor], grad_scale: float, want_grad: bool):
    """Loss per row and, when ``want_grad``, the gradients of sum_i w_i l_i with respect to
    hs, ws and bs (w_i = grad_scale * row_scale[i]). ``rows_impl`` is a per-row kernel.

    Rows whose label is ignore_index are left out of every matmul (kept_rows)."""
    rows, vocab = hs.shape[0], ws.shape[0]
    acc = _acc_dtype(hs.dtype)
    kept = kept_rows(labels, opts)
    n_kept = rows if kept is None else kept.numel()
    new = torch.empty if kept is None else torch.zeros  # ignored rows: loss 0, gradient 0
    loss = new(rows, dtype=acc, device=hs.device)
    grad_h = new(hs.shape, dtype=hs.dtype, device=hs.device) if want_grad else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if want_grad else None
    grad_b = torch.zeros(vocab, dtype=acc, device=ws.device) if want_grad and bs is not None else None
    none = hs.new_empty(0)
    step = _chunk_rows(max(n_kept, 1), vocab, hs.device)
    for start in range(0, n_kept, step):
        if kept is None:
            sel = slice(start, min(rows, start + step))
            take = lambda x: x[sel] if x is not None else None  # noqa: E731
        else:
            sel = kept[start:start + step]
            take = lambda x: x.index_select(0, sel) if x is not None else None  # noqa: E731
        h = take(hs)
        s = _logits(h, ws, bs)
        t = _logits(take(ht), wt, bt)
        # The student chunk is overwritten with d loss / d logits.
        loss[sel] = rows_impl(s, t, take(labels), take(row_scale), s if want_grad else none, opts, grad_scale)
        del t
        if want_grad:
            gh = _dense.linear(s, ws.t())  # d loss / d h = d loss / d logits @ W
            if kept is None:
                grad_h[sel] = gh
            else:
                grad_h.index_copy_(0, sel, gh)
            _accumulate_fp32(grad_w, s.t(), h)
            if grad_b is not None:
                grad_b += s.sum(0, dtype=acc)
    return loss, grad_h, grad_w, grad_b


# Implementations: (hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad)
#   -> (loss per row, grad_h | None, grad_w (fp32, or the weight's dtype once complete) | None,
#       grad_b (fp32) | None)
# On CUDA, Triton's fused kernels go first: no rows x vocab tensor and a weight-gradient
# accumulator of one vocabulary slab; the CUDA backend's chunks keep a chunk of logits and
# an fp32 V x H accumulator.
_linear = backends.op_table("linear_kd_loss", preference=backends.TRITON_FIRST)


def _linear_chunked(backend: str):
    def impl(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad):
        return linear_chunks(_rows.impls[backend].fn, hs, ws, bs, ht, wt, bt, labels, opts,
                             row_scale=row_scale, grad_scale=grad_scale, want_grad=want_grad)

    return impl


# The torch backend runs the same chunk loop over the reference's rows: ignored rows stay
# out of every product there too (a NaN hidden state in one must not reach the weight
# gradient), and without memkern._C or Triton no rows x V tensor exists either.
_linear.register("torch")(_linear_chunked("torch"))
_linear.register("cpp", dtypes=KD_DTYPES)(_linear_chunked("cpp"))
_linear.register("cuda", dtypes=_validate.FLOAT_DTYPES)(_linear_chunked("cuda"))


@_linear.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _linear_triton(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad):
    from memkern.kernels import kd as kernels

    return kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad)


# -- operators: fused-linear form ---------------------------------------------------------------
def _linear_opts(alpha, temperature, divergence, beta, ignore_index, kd_scale) -> KDOptions:
    return KDOptions(alpha, temperature, divergence, beta, ignore_index, kd_scale)


def _grads_out(hs, ws, bs, gh, gw, gb):
    """Gradients in the parameters' dtypes (accumulated in fp32 or fp64 before)."""
    gb_out = gb.to(bs.dtype) if gb is not None else hs.new_empty(0)
    return gh, gw.to(ws.dtype), gb_out


@torch.library.custom_op("memkern::linear_kd_loss", mutates_args=())
def _linear_kd_loss_op(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       student_bias: Optional[torch.Tensor], teacher_hidden: torch.Tensor,
                       teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
                       labels: Optional[torch.Tensor], alpha: float, temperature: float,
                       divergence: str, beta: float, ignore_index: int, reduction: str,
                       kd_scale: float, compute_grad: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias). With compute_grad and reduction
    'mean' or 'sum' the gradients (for a unit upstream gradient) are computed here, in the
    same pass; otherwise they are empty and backward recomputes."""
    opts = _linear_opts(alpha, temperature, divergence, beta, ignore_index, kd_scale)
    hidden, vocab = student_hidden.shape[-1], student_weight.shape[0]
    lead = tuple(student_hidden.shape[:-1])
    hs = student_hidden.reshape(-1, hidden)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    y = labels.reshape(-1).contiguous() if labels is not None else None
    check_label_range("linear_kd_loss", y, vocab, ignore_index)
    n_valid, inv_n = _mean_scale(y, hs.shape[0], opts)
    want_grad = compute_grad and reduction != "none"
    loss_rows, gh, gw, gb = _linear(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, y,
                                    opts, None, inv_n if reduction == "mean" else 1.0, want_grad)
    loss = _reduce(loss_rows, reduction, lead, n_valid)
    empty = hs.new_empty(0)
    if not want_grad:
        return loss, empty, empty.clone(), empty.clone()
    gh, gw, gb = _grads_out(hs, student_weight, student_bias, gh, gw, gb)
    return loss, gh.view(student_hidden.shape), gw, gb


@_linear_kd_loss_op.register_fake
def _linear_kd_loss_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                         teacher_bias, labels, alpha, temperature, divergence, beta, ignore_index,
                         reduction, kd_scale, compute_grad):
    lead = student_hidden.shape[:-1]
    loss = student_hidden.new_empty(lead if reduction == "none" else (), dtype=_acc_dtype(student_hidden.dtype))
    empty = student_hidden.new_empty(0)
    if not (compute_grad and reduction != "none"):
        return loss, empty, empty.clone(), empty.clone()
    gb = student_bias.new_empty(student_bias.shape) if student_bias is not None else empty.clone()
    return loss, student_hidden.new_empty(student_hidden.shape), student_weight.new_empty(student_weight.shape), gb


@torch.library.custom_op("memkern::linear_kd_loss_backward", mutates_args=())
def _linear_kd_loss_backward_op(grad_rows: torch.Tensor, student_hidden: torch.Tensor,
                                student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
                                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                teacher_bias: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                                alpha: float, temperature: float, divergence: str, beta: float,
                                ignore_index: int, kd_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows[i] * l_i, recomputing the logits chunk by chunk
    (reduction='none', whose upstream gradient differs per row)."""
    opts = _linear_opts(alpha, temperature, divergence, beta, ignore_index, kd_scale)
    hidden = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, hidden)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    y = labels.reshape(-1).contiguous() if labels is not None else None
    row_scale = grad_rows.reshape(-1).to(_acc_dtype(hs.dtype)).contiguous()  # may be an expanded 0-stride view
    _, gh, gw, gb = _linear(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, y,
                            opts, row_scale, 1.0, True)
    gh, gw, gb = _grads_out(hs, student_weight, student_bias, gh, gw, gb)
    return gh.view(student_hidden.shape), gw, gb


@_linear_kd_loss_backward_op.register_fake
def _linear_kd_loss_backward_fake(grad_rows, student_hidden, student_weight, student_bias, *rest):
    gb = student_bias.new_empty(student_bias.shape) if student_bias is not None else student_hidden.new_empty(0)
    return student_hidden.new_empty(student_hidden.shape), student_weight.new_empty(student_weight.shape), gb


_LINEAR_OPT_NAMES = ("alpha", "temperature", "divergence", "beta", "ignore_index", "reduction", "kd_scale",
                     "compute_grad")


def _linear_setup_context(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, labels = inputs[:7]
    ctx.opts = dict(zip(_LINEAR_OPT_NAMES, inputs[7:]))
    ctx.has_bias = bs is not None
    _no_zero_gradients(ctx, output[1:])
    if not ctx.opts["compute_grad"]:
        return
    if ctx.opts["reduction"] == "none":
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels)
    else:
        ctx.save_for_backward(*output[1:])


def _linear_backward(ctx, grad_loss, *_grads_of_grads):
    o = ctx.opts
    if not o["compute_grad"] or grad_loss is None:
        return (None,) * 15
    if o["reduction"] == "none":
        hs, ws, bs, ht, wt, bt, labels = ctx.saved_tensors
        gh, gw, gb = _linear_kd_loss_backward_op(grad_loss, hs, ws, bs, ht, wt, bt, labels, o["alpha"],
                                                 o["temperature"], o["divergence"], o["beta"],
                                                 o["ignore_index"], o["kd_scale"])
    else:
        gh, gw, gb = scale_saved_gradients(list(ctx.saved_tensors), grad_loss, per_row=False)
    gh, gw, gb = refuse_double_backward("linear_kd_loss", _NOT_TWICE, gh, gw, gb if ctx.has_bias else None)
    return (gh, gw, gb) + (None,) * 12


backends.register_autograd(_linear_kd_loss_op, _linear_backward, setup_context=_linear_setup_context)
# Autocast: the lm_head products run in the autocast dtype, as torch.nn.functional.linear's
# would (the usual loop: bf16 hidden states, float32 lm_head weights); statistics in float32.
_autocast.register("linear_kd_loss", cast=("student_hidden", "student_weight", "student_bias",
                                           "teacher_hidden", "teacher_weight", "teacher_bias"))
_autocast.register("linear_kd_loss_backward")


# -- public functions ---------------------------------------------------------------------------
_SEMANTICS = """
    Per row i (a position of the leading dimensions) with label y_i, student logits s_i,
    teacher logits t_i (both of vocabulary size V) and temperature T:

        l_i = alpha * (logsumexp(s_i) - s_i[y_i])
              + (1 - alpha) * k * D(softmax(t_i / T), softmax(s_i / T))

    * D is ``divergence``: ``"forward_kl"`` = KL(teacher || student) (default),
      ``"reverse_kl"`` = KL(student || teacher), or ``"jsd"`` = beta * KL(p || m) +
      (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q, p the teacher's and q the
      student's distribution (the generalised JSD of GKD; beta must be in (0, 1)).
    * k = T^2 with ``soft_loss_scale="t2"`` (default, Hinton et al.) or 1 with ``"none"``
      (what some other libraries do).
    * The cross-entropy term uses the raw (temperature 1) student logits.
    * Rows whose label equals ``ignore_index`` are excluded from BOTH terms: l_i = 0 and no
      gradient, whatever their logits hold. ``labels=None`` gives the soft loss over every
      row, and then alpha must be 0.
    * ``reduction``: ``"mean"`` = sum_i l_i / N with N the number of rows not ignored
      (0 when every row is ignored, never NaN), ``"sum"``, or ``"none"`` (l with the
      leading shape; backward accepts any upstream gradient).
    * The teacher gets no gradient. Statistics are in float32 (float64 for float64 inputs)
      with max-subtracted logsumexp, so logits of +-1e4 in fp16/bf16 give finite results;
      a NaN in a row that counts makes the loss NaN (it is not hidden).
    * The loss is float32 (float64 for a float64 student).
"""


def _check_vocab(op: str, vocab: int, what: str) -> None:
    if vocab < 1:
        raise ValueError(f"{op}: the vocabulary must hold at least one entry (a softmax over none is "
                         f"undefined), got {what}")


def _check_logits(op: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    _validate.check_tensor(op, "student_logits", student)
    _validate.check_tensor(op, "teacher_logits", teacher)
    _validate.check_dim(op, "student_logits", student, (2, 3))
    _validate.check_dtype(op, "student_logits", student, KD_DTYPES)
    _validate.check_dtype(op, "teacher_logits", teacher, KD_DTYPES)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"{op}: student vocabulary size {student.shape[-1]} != teacher vocabulary size "
                         f"{teacher.shape[-1]} (student_logits {tuple(student.shape)}, teacher_logits "
                         f"{tuple(teacher.shape)}); memkern does not pad or truncate vocabularies")
    if student.shape != teacher.shape:
        raise ValueError(f"{op}: student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    _check_vocab(op, student.shape[-1], f"student_logits of shape {tuple(student.shape)}")
    _validate.check_same_device(op, student_logits=student, teacher_logits=teacher)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: Optional[torch.Tensor] = None, *, alpha: float = 0.5, temperature: float = 1.0,
            divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
            reduction: str = "mean", soft_loss_scale: str = "t2") -> torch.Tensor:
    op = "kd_loss"
    _check_logits(op, student_logits, teacher_logits)
    opts = check_options(op, has_labels=labels is not None, alpha=alpha, temperature=temperature,
                         divergence=divergence, beta=beta, ignore_index=ignore_index,
                         reduction=reduction, soft_loss_scale=soft_loss_scale)
    labels = _check_labels(op, labels, tuple(student_logits.shape[:-1]), student_logits.device)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = _kd_loss_op(student_logits, teacher_logits.detach(), labels, opts.alpha, opts.temperature,
                          opts.divergence, opts.beta, opts.ignore_index, reduction, opts.kd_scale,
                          compute_grad)
    return loss


kd_loss.__doc__ = """Distillation loss ``alpha * CE + (1 - alpha) * k * D`` on logits, fused.

    Args:
        student_logits: ``(N, V)`` or ``(B, T, V)``; float32, float16, bfloat16 (or float64).
        teacher_logits: same shape as the student's, any of those dtypes (it may differ from
            the student's); never gets a gradient.
        labels: ``(N,)`` or ``(B, T)`` int64/int32 targets in [0, V) or ``ignore_index``;
            ``None`` for the soft loss alone (alpha must then be 0).
        alpha: weight of the hard-label cross entropy, in [0, 1].
        temperature: T in [1e-4, 100] (TEMPERATURE_RANGE: where float32 statistics stay
            meaningful), applied to both distributions of the soft term.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``; beta: JSD weight.
        ignore_index: label value of rows to leave out.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        soft_loss_scale: ``"t2"`` (multiply the soft term by T^2) or ``"none"``.

    Returns: a scalar, or per-row losses of shape ``(N,)`` / ``(B, T)`` for ``"none"``.
""" + _SEMANTICS + """
    Memory: besides its inputs, a call keeps one buffer the size of the student logits
    (the gradient, written during forward) and O(rows) statistics. Backward hands that
    buffer on as it is for an upstream gradient of 1 and scales it in place for any other
    scalar (so a second backward through the same graph is then refused); a per-row
    upstream gradient (reduction="none") is applied out of place.
"""


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                   labels: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                   teacher_bias: Optional[torch.Tensor] = None, alpha: float = 0.5,
                   temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                   ignore_index: int = -100, reduction: str = "mean", soft_loss_scale: str = "t2"
                   ) -> torch.Tensor:
    op = "linear_kd_loss"
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        _validate.check_tensor(op, name, x)
        _validate.check_dtype(op, name, x, KD_DTYPES)
    _validate.check_dim(op, "student_hidden", student_hidden, (2, 3))
    _validate.check_dim(op, "teacher_hidden", teacher_hidden, (2, 3))
    _validate.check_dim(op, "student_weight", student_weight, 2)
    _validate.check_dim(op, "teacher_weight", teacher_weight, 2)
    for who, h, w in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"{op}: {who}_hidden has hidden size {h.shape[-1]} but {who}_weight "
                             f"{tuple(w.shape)} expects {w.shape[1]} (weight is (vocab, hidden))")
        if _autocast.dtype_seen(h) != _autocast.dtype_seen(w):  # autocast casts both
            raise TypeError(f"{op}: {who}_hidden ({_validate.dtype_name(h.dtype)}) and {who}_weight "
                            f"({_validate.dtype_name(w.dtype)}) must have the same dtype")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"{op}: student vocabulary size {student_weight.shape[0]} != teacher vocabulary size "
                         f"{teacher_weight.shape[0]}; memkern does not pad or truncate vocabularies")
    _check_vocab(op, student_weight.shape[0], f"student_weight of shape {tuple(student_weight.shape)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"{op}: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same leading shape (the same rows)")
    for who, b, w in (("student", student_bias, student_weight), ("teacher", teacher_bias, teacher_weight)):
        if b is not None:
            _validate.check_tensor(op, f"{who}_bias", b)
            if tuple(b.shape) != (w.shape[0],) or _autocast.dtype_seen(b) != _autocast.dtype_seen(w):
                raise ValueError(f"{op}: {who}_bias must have shape ({w.shape[0]},) and dtype "
                                 f"{_validate.dtype_name(w.dtype)}, got {tuple(b.shape)} "
                                 f"{_validate.dtype_name(b.dtype)}")
    _validate.check_same_device(op, student_hidden=student_hidden, student_weight=student_weight,
                                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                                student_bias=student_bias, teacher_bias=teacher_bias)
    opts = check_options(op, has_labels=labels is not None, alpha=alpha, temperature=temperature,
                         divergence=divergence, beta=beta, ignore_index=ignore_index,
                         reduction=reduction, soft_loss_scale=soft_loss_scale)
    labels = _check_labels(op, labels, tuple(student_hidden.shape[:-1]), student_hidden.device)
    compute_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    detach = lambda x: x.detach() if x is not None else None  # noqa: E731
    out = _linear_kd_loss_op(student_hidden, student_weight, student_bias, detach(teacher_hidden),
                             detach(teacher_weight), detach(teacher_bias), labels, opts.alpha,
                             opts.temperature, opts.divergence, opts.beta, opts.ignore_index, reduction,
                             opts.kd_scale, compute_grad)
    return out[0]


linear_kd_loss.__doc__ = """Distillation loss of two lm_heads, the projection fused in.

    The student's logits are ``student_hidden @ student_weight.T + student_bias`` and the
    teacher's likewise; the loss is exactly :func:`kd_loss` of those logits, but no tensor
    of rows x V is ever materialised (see the module docstring for how).

    Args:
        student_hidden: ``(N, H_s)`` or ``(B, T, H_s)``; float32, float16, bfloat16 (float64).
        student_weight: ``(V, H_s)``, the dtype of student_hidden; student_bias: ``(V,)``.
        teacher_hidden: ``(N, H_t)`` or ``(B, T, H_t)``: same rows, any hidden size.
        teacher_weight: ``(V, H_t)``, the dtype of teacher_hidden; teacher_bias: ``(V,)``.
        labels and the options: as :func:`kd_loss`.

    Gradients flow to student_hidden, student_weight and student_bias (weight and bias
    gradients accumulated in float32: over row chunks, or tile by tile with atomic adds on
    the triton backend, whose sums are therefore not bitwise repeatable on a GPU), never
    to the teacher.
""" + _SEMANTICS
