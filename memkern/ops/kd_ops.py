"""The distillation operators: the per-row kernel table (cpp | cuda | triton | torch), the
``memkern::kd_loss`` op (schema, fake, autograd), the fused-linear table and the
``memkern::linear_kd_loss`` ops. The public functions, with their argument checks, are in
memkern.ops.kd; the options in memkern.kd_options; the chunk loop in memkern.kernels.kd_chunks.
"""

from __future__ import annotations


import torch

from memkern import _autocast, _validate, backends, reference
from memkern.kd_options import (
    KD_DTYPES,
    KDOptions,
    acc_dtype,
    check_label_range,
    mean_scale,
)
from memkern.kernels.kd_chunks import linear_chunks
from memkern.ops.kd_autograd import (
    BACKWARD_OPTIONS,
    LOGITS,
    OPTIONS,
    PARAMETER_GRADS,
    STUDENT_HEAD,
    TEACHER_HEAD,
    declare,
    linear_forward_fake,
    logits_forward_fake,
    parameter_grads,
    parameter_grads_fake,
    register_linear_autograd,
    register_logits_autograd,
    split_options,
)


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
    return loss.to(acc_dtype(s.dtype))


def _row_weights(loss: torch.Tensor, row_scale: torch.Tensor | None, grad_scale: float) -> torch.Tensor:
    """w_i of the gradient of sum_i w_i l_i."""
    return torch.full_like(loss, grad_scale) if row_scale is None else row_scale.to(loss.dtype) * grad_scale


@_rows.register("cpp", dtypes=KD_DTYPES)
@_rows.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _rows_compiled(s, t, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    return torch.ops.memkern.kd_loss_rows_kernel(
        s,
        t,
        labels,
        row_scale,
        grad,
        *kernel_options(opts),
        grad_scale,
    )


def kernel_options(opts: KDOptions) -> tuple:
    """The options in the order of the compiled per-row kernels' schemas."""
    return opts.alpha, opts.temperature, opts.divergence_id, opts.beta, opts.ignore_index, opts.kd_scale


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
def kd_loss_body(student, teacher, labels, *options) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, d loss / d student) where the gradient is for a unit upstream
    gradient (per row for reduction='none'); an empty tensor when compute_grad (the
    argument after the OPTIONS) is False."""
    opts, reduction, (compute_grad,) = split_options(options)
    s, t, y = logit_rows(student, teacher, labels, opts)
    return logits_forward(_rows, student, s, (t,), y, opts, reduction, compute_grad)


def logits_forward(rows, student, s, teacher: tuple, y, opts: KDOptions, reduction: str, compute_grad: bool):
    """(loss, gradient) of a logits-form operator: its per-row table ``rows`` over the
    student rows ``s`` and the teacher's row inputs."""
    n_valid, inv_n = mean_scale(y, s.shape[0], opts)
    grad = torch.empty(s.shape, dtype=s.dtype, device=s.device) if compute_grad else s.new_empty(0)
    loss_rows = rows(s, *teacher, y, None, grad, opts, inv_n if reduction == "mean" else 1.0)
    loss = _reduce(loss_rows, reduction, tuple(student.shape[:-1]), n_valid)
    return loss, grad.view(student.shape) if compute_grad else grad


def logit_rows(student, teacher, labels, opts: KDOptions):
    """(student rows, teacher rows, labels) of the logits-form operators, the labels checked."""
    s, t = _rows_2d(student, student.shape[-1]), _rows_2d(teacher, teacher.shape[-1])
    y = labels.reshape(-1).contiguous() if labels is not None else None
    check_label_range("kd_loss", y, student.shape[-1], opts.ignore_index)
    return s, t, y


kd_loss_op = declare("kd_loss", (LOGITS, OPTIONS, "bool compute_grad"), "(Tensor, Tensor)")(kd_loss_body)


@kd_loss_op.register_fake
def _kd_loss_fake(student, *args):
    return logits_forward_fake(student, reduction=args[-3], compute_grad=args[-1])


register_logits_autograd(kd_loss_op, "kd_loss", n_inputs=11, reduction_at=8)
# Autocast: the logits go in as they are (the kernels read any float dtype and keep their
# statistics in float32; a float32 copy would double the largest tensor of a step).
_autocast.register("kd_loss")


# Implementations: (hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad)
#   -> (loss per row, grad_h | None, grad_w (fp32, or the weight's dtype once complete) | None,
#       grad_b (fp32) | None)
# On CUDA, Triton's fused kernels go first: no rows x vocab tensor and a weight-gradient
# accumulator of one vocabulary slab; the CUDA backend's chunks keep a chunk of logits and
# an fp32 V x H accumulator.
_linear = backends.op_table("linear_kd_loss", preference=backends.TRITON_FIRST)


def chunked(chunks, rows: backends.OpTable, backend: str):
    """The fused-linear implementation of ``backend``: ``chunks`` (linear_chunks, or the
    top-k form's) over that backend's per-row kernel in ``rows``."""

    def impl(*args):
        *inputs, row_scale, grad_scale, want_grad = args
        rows_impl = rows.impls[backend].fn
        return chunks(rows_impl, *inputs, row_scale=row_scale, grad_scale=grad_scale, want_grad=want_grad)

    return impl


# The torch backend runs the same chunk loop over the reference's rows: ignored rows stay
# out of every product there too (a NaN hidden state in one must not reach the weight
# gradient), and without memkern._C or Triton no rows x V tensor exists either.
_linear.register("torch")(chunked(linear_chunks, _rows, "torch"))
_linear.register("cpp", dtypes=KD_DTYPES)(chunked(linear_chunks, _rows, "cpp"))
_linear.register("cuda", dtypes=_validate.FLOAT_DTYPES)(chunked(linear_chunks, _rows, "cuda"))


@_linear.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _linear_triton(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad):
    from memkern.kernels import kd_linear as kernels

    return kernels.linear_kd_loss(hs, ws, bs, ht, wt, bt, labels, opts, row_scale, grad_scale, want_grad)


# -- operators: fused-linear form ---------------------------------------------------------------
def linear_kd_loss_body(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, *options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias). With compute_grad and reduction
    'mean' or 'sum' the gradients (for a unit upstream gradient) are computed here, in the
    same pass; otherwise they are empty and backward recomputes."""
    opts, reduction, (compute_grad,) = split_options(options)
    hs, ht, y = linear_rows("linear_kd_loss", student_hidden, teacher_hidden, labels, student_weight.shape[0], opts)
    head, teacher = (student_hidden, student_weight, student_bias), (ht, teacher_weight, teacher_bias)
    return linear_forward(_linear, head, hs, teacher, y, opts, reduction, compute_grad)


def linear_forward(table, head, hs, teacher: tuple, y, opts: KDOptions, reduction: str, compute_grad: bool):
    """(loss, grad_hidden, grad_weight, grad_bias) of a fused-linear operator: its table over
    the student's (hidden, weight, bias) ``head``, hidden rows ``hs``, and the teacher's inputs."""
    n_valid, inv_n = mean_scale(y, hs.shape[0], opts)
    want_grad = compute_grad and reduction != "none"
    scale = inv_n if reduction == "mean" else 1.0
    loss_rows, gh, gw, gb = table(hs, *head[1:], *teacher, y, opts, None, scale, want_grad)
    loss = _reduce(loss_rows, reduction, tuple(head[0].shape[:-1]), n_valid)
    if not want_grad:
        empty = hs.new_empty(0)
        return loss, empty, empty.clone(), empty.clone()
    return loss, *parameter_grads(head, gh, gw, gb)


def linear_backward(table, grad_rows, head, hs, teacher: tuple, y, opts: KDOptions):
    """Gradients of sum_i grad_rows[i] * l_i for the student's ``head``, recomputed by a
    fused-linear table (reduction='none', whose upstream gradient differs per row)."""
    row_scale = grad_rows.reshape(-1).to(acc_dtype(hs.dtype)).contiguous()  # may be an expanded 0-stride view
    _, gh, gw, gb = table(hs, *head[1:], *teacher, y, opts, row_scale, 1.0, True)
    return parameter_grads(head, gh, gw, gb)


def linear_rows(op: str, student_hidden, teacher_hidden, labels, vocab: int, opts: KDOptions):
    """(student rows, teacher rows, labels) of the fused-linear operators, the labels checked."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    y = labels.reshape(-1).contiguous() if labels is not None else None
    check_label_range(op, y, vocab, opts.ignore_index)
    return hs, ht, y


_LINEAR_INPUTS = (STUDENT_HEAD, TEACHER_HEAD, "Tensor? labels")
linear_kd_loss_op = declare(
    "linear_kd_loss", (*_LINEAR_INPUTS, OPTIONS, "bool compute_grad"), "(Tensor, Tensor, Tensor, Tensor)"
)(linear_kd_loss_body)


@linear_kd_loss_op.register_fake
def _linear_kd_loss_fake(student_hidden, student_weight, student_bias, *args):
    reduction, compute_grad = args[-3], args[-1]
    return linear_forward_fake(student_hidden, student_weight, student_bias, reduction, compute_grad)


@declare("linear_kd_loss_backward", ("Tensor grad_rows", *_LINEAR_INPUTS, BACKWARD_OPTIONS), PARAMETER_GRADS)
def linear_kd_loss_backward_op(
    grad_rows,
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    labels,
    *options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows[i] * l_i, recomputing the logits chunk by chunk
    (reduction='none', whose upstream gradient differs per row)."""
    opts = KDOptions(*options)
    hs, ht, y = linear_rows("linear_kd_loss", student_hidden, teacher_hidden, labels, student_weight.shape[0], opts)
    head, teacher = (student_hidden, student_weight, student_bias), (ht, teacher_weight, teacher_bias)
    return linear_backward(_linear, grad_rows, head, hs, teacher, y, opts)


@linear_kd_loss_backward_op.register_fake
def _linear_kd_loss_backward_fake(grad_rows, student_hidden, student_weight, student_bias, *rest):
    return parameter_grads_fake(student_hidden, student_weight, student_bias)


register_linear_autograd(linear_kd_loss_op, linear_kd_loss_backward_op, "linear_kd_loss", n_tensors=7)
# Autocast: the lm_head products run in the autocast dtype, as torch.nn.functional.linear's
# would (the usual loop: bf16 hidden states, float32 lm_head weights); statistics in float32.
_autocast.register(
    "linear_kd_loss",
    cast=("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias"),
)
_autocast.register("linear_kd_loss_backward")
