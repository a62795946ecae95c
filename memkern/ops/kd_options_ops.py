"""The distillation operators with options (memkern.kd_options.KDExtras: logit scales and
soft-caps, a shared vocabulary, the chunk size, the terms returned apart):
``memkern::kd_loss_options`` and ``memkern::linear_kd_loss_options``, each with its backward
operator. memkern.ops.kd calls them when a call sets one of those options; the plain
operators of memkern.ops.kd_ops run otherwise.

Each returns (loss, ce, kd), reduced alike, and recomputes in backward: the upstream
gradients of the three outputs make two per-row weights, w_ce = c * (alpha * g_loss + g_ce)
and w_kd = c * ((1 - alpha) * k * g_loss + g_kd) (c = 1 / N for "mean", 1 for "sum"), and one
chunked pass writes the gradient of sum_i w_ce[i] * ce_i + w_kd[i] * kd_i. So any weighted
sum of the three outputs gets its exact gradient, at the price of a second pass over the
logits (and, for the fused-linear form, of their matmuls) in backward. Memory: the logits
form keeps its inputs for backward instead of a gradient buffer; neither form builds a
rows x V tensor besides the logits form's gradient, only chunks (memkern.kernels.kd_chunks),
and on Triton the fused-linear form not even those (memkern.kernels.kd_linear.linear_kd_terms).
"""

from __future__ import annotations

import torch

from memkern import _autocast, backends
from memkern.kd_options import KDExtras, KDOptions, acc_dtype, mean_scale
from memkern.kernels.kd_chunks import linear_chunk_loop, logits_option_chunks, option_rows
from memkern.ops._autograd import refuse_double_backward
from memkern.ops.kd_autograd import (
    EXTRAS,
    LOGITS,
    NOT_TWICE,
    OPTIONS,
    PARAMETER_GRADS,
    STUDENT_HEAD,
    TEACHER_HEAD,
    TERM_GRADS,
    declare,
    parameter_grads,
    parameter_grads_fake,
    split_options,
)
from memkern.ops.kd_ops import _linear, _reduce, _rows, linear_rows, logit_rows


_TERMS = "(Tensor, Tensor, Tensor)"  # loss, ce, kd
_REDUCTION_AT = 5  # in OPTIONS


def _split(options: tuple) -> tuple[KDOptions, str, KDExtras]:
    """(KDOptions, reduction, KDExtras) of an operator's arguments from OPTIONS on."""
    opts, reduction, (transform, shared_vocab, chunk_size) = split_options(options)
    s_scale, s_cap, t_scale, t_cap = transform
    return opts, reduction, KDExtras(s_scale, t_scale, s_cap, t_cap, shared_vocab, chunk_size)


def _terms(ce_rows, kd_rows, opts: KDOptions, reduction: str, lead, n_valid: int):
    """(loss, ce, kd) reduced alike, with loss = alpha * ce + (1 - alpha) * k * kd computed
    from the reduced terms, so the identity holds exactly for the returned values."""
    ce = _reduce(ce_rows, reduction, lead, n_valid)
    kd = _reduce(kd_rows, reduction, lead, n_valid)
    c_kd = (1.0 - opts.alpha) * opts.kd_scale
    soft = torch.zeros_like(kd) if c_kd == 0.0 else c_kd * kd  # alpha = 1: no soft term, even an infinite one
    return opts.alpha * ce + soft, ce, kd


def _term_weights(grad_loss, grad_ce, grad_kd, opts: KDOptions, reduction: str, labels, rows: int, dtype):
    """Per-row weights (w_ce, w_kd) of the two terms' gradients (module docstring)."""
    _, inv_n = mean_scale(labels, rows, opts)
    c = inv_n if reduction == "mean" else 1.0
    c_kd = (1.0 - opts.alpha) * opts.kd_scale
    as_rows = lambda g: g.to(dtype).reshape(-1).expand(rows)  # noqa: E731  (a scalar, or one per row)
    w_ce = (as_rows(grad_loss) * (opts.alpha * c) + as_rows(grad_ce) * c).contiguous()
    w_kd = (as_rows(grad_loss) * (c_kd * c) + as_rows(grad_kd) * c).contiguous()
    return w_ce, w_kd


def _upstream(grads):
    """The three upstream gradients with zeros for the absent ones; None when all are absent."""
    present = next((g for g in grads if g is not None), None)
    if present is None:
        return None
    return [g if g is not None else torch.zeros_like(present) for g in grads]


# -- logits form ------------------------------------------------------------------------------
def kd_loss_options_body(student, teacher, labels, *options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts, reduction, extras = _split(options)
    s, t, y = logit_rows(student, teacher, labels, opts)
    n_valid, _ = mean_scale(y, s.shape[0], opts)
    ce, kd, _ = logits_option_chunks(_rows, s, t, y, opts, extras)
    return _terms(ce, kd, opts, reduction, tuple(student.shape[:-1]), n_valid)


kd_loss_options_op = declare("kd_loss_options", (LOGITS, OPTIONS, EXTRAS), _TERMS)(kd_loss_options_body)


def _terms_fake(lead_input: torch.Tensor, reduction: str):
    shape = lead_input.shape[:-1] if reduction == "none" else ()
    dtype = acc_dtype(lead_input.dtype)
    return tuple(lead_input.new_empty(shape, dtype=dtype) for _ in range(3))


@kd_loss_options_op.register_fake
def _kd_loss_options_fake(student, teacher, labels, *options):
    return _terms_fake(student, options[_REDUCTION_AT])


@declare("kd_loss_options_backward", (TERM_GRADS, LOGITS, OPTIONS, EXTRAS), "Tensor")
def kd_loss_options_backward_op(grad_loss, grad_ce, grad_kd, student, teacher, labels, *options) -> torch.Tensor:
    """d (sum of the upstream gradients times the three outputs) / d student, recomputed in chunks."""
    opts, reduction, extras = _split(options)
    s, t, y = logit_rows(student, teacher, labels, opts)
    w_ce, w_kd = _term_weights(grad_loss, grad_ce, grad_kd, opts, reduction, y, s.shape[0], acc_dtype(s.dtype))
    _, _, grad = logits_option_chunks(_rows, s, t, y, opts, extras, w_ce, w_kd)
    return grad.view(student.shape)


@kd_loss_options_backward_op.register_fake
def _kd_loss_options_backward_fake(grad_loss, grad_ce, grad_kd, student, *_):
    return student.new_empty(student.shape)


def _kd_options_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused output's upstream gradient stays None
    ctx.options = inputs[3:]
    ctx.save_for_backward(*inputs[:3])


def _kd_options_backward(ctx, *grads):
    upstream = _upstream(grads)
    if upstream is None or not ctx.needs_input_grad[0]:
        return (None,) * 13
    student, teacher, labels = ctx.saved_tensors
    grad = kd_loss_options_backward_op(*upstream, student, teacher, labels, *ctx.options)
    (grad,) = refuse_double_backward("kd_loss", NOT_TWICE, grad)
    return (grad,) + (None,) * 12


backends.register_autograd(kd_loss_options_op, _kd_options_backward, setup_context=_kd_options_setup_context)
_autocast.register("kd_loss_options")
_autocast.register("kd_loss_options_backward")


# -- fused-linear form ------------------------------------------------------------------------
# Where linear_kd_loss's table picks Triton, its tiled kernels run the options too (logits
# transformed in registers, the terms kept apart), so no chunk of logits exists; except with
# shared_vocab (those kernels walk one vocabulary), which takes the chunk loop with Triton's
# per-row kernel. chunk_size means nothing to the tiled kernels.
def _tiled_triton(hs, ws, bs, ht, wt, bt, y, opts: KDOptions, extras: KDExtras) -> bool:
    if extras.shared_vocab:
        return False
    return _linear.select(hs, ws, bs, ht, wt, bt, y, opts, None, 1.0, False).backend == "triton"


def linear_kd_loss_options_body(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, *options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    opts, reduction, extras = _split(options)
    hs, ht, y = linear_rows("linear_kd_loss", student_hidden, teacher_hidden, labels, student_weight.shape[0], opts)
    n_valid, _ = mean_scale(y, hs.shape[0], opts)
    heads = (hs, student_weight, student_bias, ht, teacher_weight, teacher_bias)
    if _tiled_triton(*heads, y, opts, extras):
        from memkern.kernels.kd_linear import linear_kd_terms

        ce, kd = linear_kd_terms(*heads, y, opts.divergence_alone(), extras.transform)
    else:
        rows_fn = lambda s, t, take: option_rows(_rows, s, t, take(y), opts, extras)  # noqa: E731
        (ce, kd), *_ = linear_chunk_loop(rows_fn, 2, *heads, y, opts, False, extras.chunk_size)
    return _terms(ce, kd, opts, reduction, tuple(student_hidden.shape[:-1]), n_valid)


_LINEAR_INPUTS = (STUDENT_HEAD, TEACHER_HEAD, "Tensor? labels", OPTIONS, EXTRAS)
linear_kd_loss_options_op = declare("linear_kd_loss_options", _LINEAR_INPUTS, _TERMS)(linear_kd_loss_options_body)


@linear_kd_loss_options_op.register_fake
def _linear_kd_loss_options_fake(student_hidden, student_weight, student_bias, teacher_hidden, *args):
    return _terms_fake(student_hidden, args[3 + _REDUCTION_AT])


@declare("linear_kd_loss_options_backward", (TERM_GRADS, *_LINEAR_INPUTS), PARAMETER_GRADS)
def linear_kd_loss_options_backward_op(
    grad_loss, grad_ce, grad_kd, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
    teacher_bias, labels, *options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of hidden states, weight and bias, recomputing the logits chunk by chunk."""
    opts, reduction, extras = _split(options)
    hs, ht, y = linear_rows("linear_kd_loss", student_hidden, teacher_hidden, labels, student_weight.shape[0], opts)
    w_ce, w_kd = _term_weights(grad_loss, grad_ce, grad_kd, opts, reduction, y, hs.shape[0], acc_dtype(hs.dtype))
    heads = (hs, student_weight, student_bias, ht, teacher_weight, teacher_bias)
    if _tiled_triton(*heads, y, opts, extras):
        from memkern.kernels.kd_linear import linear_kd_terms

        gh, gw, gb = linear_kd_terms(*heads, y, opts.divergence_alone(), extras.transform, w_ce, w_kd)
    else:

        def rows_fn(s, t, take):  # leaves the gradient in the logits chunk s
            return option_rows(_rows, s, t, take(y), opts, extras, take(w_ce), take(w_kd), s)

        _, gh, gw, gb = linear_chunk_loop(rows_fn, 2, *heads, y, opts, True, extras.chunk_size)
    return parameter_grads((student_hidden, student_weight, student_bias), gh, gw, gb)


@linear_kd_loss_options_backward_op.register_fake
def _linear_kd_loss_options_backward_fake(
    grad_loss, grad_ce, grad_kd, student_hidden, student_weight, student_bias, *_
):
    return parameter_grads_fake(student_hidden, student_weight, student_bias)


def _linear_options_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.options = inputs[7:]
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*inputs[:7])


def _linear_options_backward(ctx, *grads):
    upstream = _upstream(grads)
    if upstream is None or not any(ctx.needs_input_grad[:3]):
        return (None,) * 17
    gh, gw, gb = linear_kd_loss_options_backward_op(*upstream, *ctx.saved_tensors, *ctx.options)
    gh, gw, gb = refuse_double_backward("linear_kd_loss", NOT_TWICE, gh, gw, gb if ctx.has_bias else None)
    return (gh, gw, gb) + (None,) * 14


backends.register_autograd(
    linear_kd_loss_options_op, _linear_options_backward, setup_context=_linear_options_setup_context
)
_LINEAR_CAST = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")
_autocast.register("linear_kd_loss_options", cast=_LINEAR_CAST)
_autocast.register("linear_kd_loss_options_backward")
