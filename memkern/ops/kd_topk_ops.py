"""The operators of the top-k distillation losses (memkern.ops.kd_topk has the public
functions): the per-row kernel table (cpp | cuda | triton | torch), the ``memkern::kd_loss_topk``
op, the fused-linear chunk loop, its table and the ``memkern::linear_kd_loss_topk`` ops, and
the checks that read the teacher's values.
"""

from __future__ import annotations

import torch

from memkern import _autocast, _validate, backends, reference_topk
from memkern.kd_options import KD_DTYPES, KDOptions, acc_dtype, check_label_range
from memkern.kernels.kd_chunks import linear_chunk_loop
from memkern.ops.kd_autograd import (
    BACKWARD_OPTIONS,
    OPTIONS,
    PARAMETER_GRADS,
    STUDENT_HEAD,
    TOPK_TEACHER,
    declare,
    linear_forward_fake,
    logits_forward_fake,
    parameter_grads_fake,
    register_linear_autograd,
    register_logits_autograd,
    split_options,
)
from memkern.ops.kd_ops import (
    _row_weights,
    _rows_2d,
    chunked,
    kernel_options,
    linear_backward,
    linear_forward,
    linear_rows,
    logits_forward,
)


def logprob_tolerance(dtype: torch.dtype) -> float:
    """How far above 0 a log-probability, and past 1 a row's mass, may be: rounding (a served
    fp16 log-probability of a near-certain token), after which the teacher's buckets are
    renormalised (memkern.reference_topk). 0.03 for bfloat16, 0.004 for float16, 1e-5 for
    float32 and float64."""
    return max(1e-5, 4 * torch.finfo(dtype).eps)


CUDA_MAX_K = 1024  # csrc/cuda/kd_topk_launchers.h, kTopkMaxK


# -- per-row kernel table ----------------------------------------------------------------------
# Signature: (student (R, V), logprobs (R, k) in the compute dtype, indices (R, k) int64,
#   labels (R,) int64 | None, row_scale (R,) | None, grad (R, V) or 1-D "none", opts,
#   grad_scale) -> loss (R,) in the compute dtype. grad may be the student tensor itself.
# On CUDA, Triton goes first, as for kd_loss: its arithmetic is proven under
# TRITON_INTERPRET=1, while the .cu kernel is only compile-checked without a GPU.
_rows = backends.op_table("kd_loss_topk_rows", preference=backends.TRITON_FIRST)


@_rows.register("torch")
def _rows_torch(s, lp, idx, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    options = opts.reference_options()
    loss = reference_topk.kd_topk_loss_rows(s, lp, idx, labels, **options)
    if grad.dim() == 2:  # grad may be s itself: the loss above has already read it
        weights = _row_weights(loss, row_scale, grad_scale)
        grad.copy_(reference_topk.kd_topk_loss_rows_grad(s, lp, idx, labels, weights, **options))
    return loss.to(acc_dtype(s.dtype))


def _cuda_reason(s, lp, *rest) -> str | None:
    if lp.shape[1] > CUDA_MAX_K:
        return f"k={lp.shape[1]} is above the CUDA kernel's {CUDA_MAX_K} (its buckets live in shared memory)"
    return None


@_rows.register("cpp", dtypes=KD_DTYPES)
@_rows.register("cuda", dtypes=_validate.FLOAT_DTYPES, check=_cuda_reason)
def _rows_compiled(s, lp, idx, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    return torch.ops.memkern.kd_loss_topk_rows_kernel(
        s,
        lp,
        idx,
        labels,
        row_scale,
        grad,
        *kernel_options(opts),
        grad_scale,
    )


@_rows.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _rows_triton(s, lp, idx, labels, row_scale, grad, opts: KDOptions, grad_scale: float) -> torch.Tensor:
    from memkern.kernels.kd_topk import kd_topk_loss_rows as launch

    return launch(s, lp, idx, labels, row_scale, grad, opts, grad_scale)


# -- argument checks -----------------------------------------------------------------------------
def check_topk_values(op: str, logprobs: torch.Tensor, indices: torch.Tensor, vocab: int, tol: float) -> None:
    """What only the values say (it reads them, which torch.compile cannot trace, so it runs
    inside the operator, before any kernel): indices in [0, vocab) and distinct within a row,
    log-probabilities <= 0 whose probabilities sum to at most 1 (both up to rounding).
    A NaN passes: like a NaN logit, it makes its row's loss NaN instead of being hidden."""
    if logprobs.numel() == 0:
        return
    bad = (indices < 0) | (indices >= vocab)
    if bool(bad.any()):
        raise ValueError(
            f"{op}: teacher_topk_indices must be in [0, {vocab}); found {indices[bad][0].item()} "
            f"({int(bad.sum())} such indices)"
        )
    ordered = indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    if bool(repeated.any()):
        row = ordered[repeated][0]
        raise ValueError(
            f"{op}: teacher_topk_indices must be distinct within a row (each is one bucket); "
            f"found a row holding {row[1:][row[1:] == row[:-1]][0].item()} twice ({int(repeated.sum())} such rows)"
        )
    lp = logprobs  # in the compute dtype: float32 or float64
    if bool((lp > tol).any()):
        raise ValueError(
            f"{op}: teacher_topk_logprobs must be log-probabilities (<= 0, up to {tol:g}); "
            f"found {lp[lp > tol][0].item():g} ({int((lp > tol).sum())} such entries)"
        )
    mass = lp.exp().sum(-1)
    if bool((mass > 1 + tol).any()):
        raise ValueError(
            f"{op}: the probabilities exp(teacher_topk_logprobs) of a row must sum to at most 1 "
            f"(up to {tol:g}); found a row summing to {mass[mass > 1 + tol][0].item():g} "
            f"({int((mass > 1 + tol).sum())} such rows); pass log-probabilities at temperature 1, not logits"
        )


def _kernel_inputs(op, logprobs, indices, labels, vocab, opts: KDOptions, compute: torch.dtype):
    """The teacher's (rows, k) inputs in the kernels' layout, checked."""
    k = logprobs.shape[-1]
    lp = logprobs.reshape(-1, k).to(compute).contiguous()
    idx = indices.reshape(-1, k).long().contiguous()
    y = labels.reshape(-1).contiguous() if labels is not None else None
    check_label_range(op, y, vocab, opts.ignore_index)
    check_topk_values(op, lp, idx, vocab, logprob_tolerance(logprobs.dtype))
    return lp, idx, y


# -- operator: logits form -------------------------------------------------------------------
def kd_loss_topk_body(
    student, teacher_logprobs, teacher_indices, labels, *options
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student for a unit upstream gradient, or an empty tensor)."""
    opts, reduction, (compute_grad,) = split_options(options)
    vocab = student.shape[-1]
    s = _rows_2d(student, vocab)
    compute = acc_dtype(student.dtype)
    lp, idx, y = _kernel_inputs("kd_loss_topk", teacher_logprobs, teacher_indices, labels, vocab, opts, compute)
    return logits_forward(_rows, student, s, (lp, idx), y, opts, reduction, compute_grad)


_TOPK_INPUTS = (TOPK_TEACHER, "Tensor? labels", OPTIONS)
kd_loss_topk_op = declare("kd_loss_topk", ("Tensor student", *_TOPK_INPUTS, "bool compute_grad"), "(Tensor, Tensor)")(
    kd_loss_topk_body
)


@kd_loss_topk_op.register_fake
def _kd_loss_topk_fake(student, *args):
    return logits_forward_fake(student, reduction=args[-3], compute_grad=args[-1])


register_logits_autograd(kd_loss_topk_op, "kd_loss_topk", n_inputs=12, reduction_at=9)
_autocast.register("kd_loss_topk")  # logits go in as they are; statistics in float32


# -- fused-linear form: the chunk loop ---------------------------------------------------------
def linear_topk_chunks(rows_impl, hs, ws, bs, lp, idx, labels, opts: KDOptions, *, row_scale, grad_scale, want_grad):
    """Loss per row and, when ``want_grad``, the gradients of sum_i w_i l_i (w_i = grad_scale *
    row_scale[i]) with respect to hs, ws and bs: memkern.kernels.kd_chunks.linear_chunk_loop
    with the teacher's (rows, k) buckets in place of its logits. Ignored rows stay out of every
    matmul; one chunk of student logits exists at a time, overwritten with its gradient."""
    none = hs.new_empty(0)

    def rows_fn(s, _no_teacher_logits, take):
        return (
            rows_impl(
                s, take(lp), take(idx), take(labels), take(row_scale), s if want_grad else none, opts, grad_scale
            ),
        )

    (loss,), grad_h, grad_w, grad_b = linear_chunk_loop(
        rows_fn, 1, hs, ws, bs, None, None, None, labels, opts, want_grad
    )
    return loss, grad_h, grad_w, grad_b


# Implementations: (hs, ws, bs, lp, idx, labels, opts, row_scale, grad_scale, want_grad)
#   -> (loss per row, grad_h | None, grad_w (fp32 | fp64) | None, grad_b | None).
# Every backend chunks its own per-row kernel: no rows x V tensor, one chunk of logits.
_linear = backends.op_table("linear_kd_loss_topk", preference=backends.TRITON_FIRST)


_linear.register("torch")(chunked(linear_topk_chunks, _rows, "torch"))
_linear.register("cpp", dtypes=KD_DTYPES)(chunked(linear_topk_chunks, _rows, "cpp"))
_linear.register("cuda", dtypes=_validate.FLOAT_DTYPES, check=lambda hs, ws, bs, lp, *rest: _cuda_reason(hs, lp))(
    chunked(linear_topk_chunks, _rows, "cuda")
)
_linear.register("triton", dtypes=_validate.FLOAT_DTYPES)(chunked(linear_topk_chunks, _rows, "triton"))


# -- operators: fused-linear form ---------------------------------------------------------------
def _linear_inputs(student_hidden, student_weight, teacher_logprobs, teacher_indices, labels, opts: KDOptions):
    hs, _, y = linear_rows("linear_kd_loss_topk", student_hidden, None, labels, student_weight.shape[0], opts)
    compute = acc_dtype(student_hidden.dtype)
    lp, idx, _ = _kernel_inputs(
        "linear_kd_loss_topk", teacher_logprobs, teacher_indices, None, student_weight.shape[0], opts, compute
    )
    return hs, lp, idx, y


def linear_kd_loss_topk_body(
    student_hidden, student_weight, student_bias, teacher_logprobs, teacher_indices, labels, *options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias); the gradients (for a unit upstream
    gradient) with compute_grad and reduction 'mean' or 'sum', else empty: backward
    recomputes the chunks."""
    opts, reduction, (compute_grad,) = split_options(options)
    hs, lp, idx, y = _linear_inputs(student_hidden, student_weight, teacher_logprobs, teacher_indices, labels, opts)
    head = (student_hidden, student_weight, student_bias)
    return linear_forward(_linear, head, hs, (lp, idx), y, opts, reduction, compute_grad)


linear_kd_loss_topk_op = declare(
    "linear_kd_loss_topk", (STUDENT_HEAD, *_TOPK_INPUTS, "bool compute_grad"), "(Tensor, Tensor, Tensor, Tensor)"
)(linear_kd_loss_topk_body)


@linear_kd_loss_topk_op.register_fake
def _linear_fake(hs, ws, bs, *args):
    return linear_forward_fake(hs, ws, bs, reduction=args[-3], compute_grad=args[-1])


_BACKWARD_INPUTS = ("Tensor grad_rows", STUDENT_HEAD, TOPK_TEACHER, "Tensor? labels", BACKWARD_OPTIONS)


@declare("linear_kd_loss_topk_backward", _BACKWARD_INPUTS, PARAMETER_GRADS)
def linear_kd_loss_topk_backward_op(
    grad_rows, student_hidden, student_weight, student_bias, teacher_logprobs, teacher_indices, labels, *options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows[i] * l_i, recomputing the logit chunks (reduction
    'none', whose upstream gradient differs per row)."""
    opts = KDOptions(*options)
    hs, lp, idx, y = _linear_inputs(student_hidden, student_weight, teacher_logprobs, teacher_indices, labels, opts)
    head = (student_hidden, student_weight, student_bias)
    return linear_backward(_linear, grad_rows, head, hs, (lp, idx), y, opts)


@linear_kd_loss_topk_backward_op.register_fake
def _linear_backward_fake(grad_rows, hs, ws, bs, *rest):
    return parameter_grads_fake(hs, ws, bs)


register_linear_autograd(linear_kd_loss_topk_op, linear_kd_loss_topk_backward_op, "linear_kd_loss_topk", n_tensors=6)
# Autocast: the lm_head product runs in the autocast dtype, as torch.nn.functional.linear's would.
_autocast.register("linear_kd_loss_topk", cast=("student_hidden", "student_weight", "student_bias"))
_autocast.register("linear_kd_loss_topk_backward")
