"""The schemas and autograd plumbing the distillation operators share (memkern.ops.kd_ops,
memkern.ops.kd_topk_ops, memkern.ops.kd_options_ops): their argument lists, each written
once and joined by ``declare``; the logits form, whose forward
returns (loss, gradient for a unit upstream gradient), and the fused-linear form, whose
forward returns (loss, grad_hidden, grad_weight, grad_bias) and whose reduction='none'
backward recomputes the chunks through a backward operator. Each op differs only in its
name, its tensor inputs and where its options sit in the schema.
"""

from __future__ import annotations

import torch

from memkern import backends
from memkern.kd_options import KDOptions, acc_dtype
from memkern.ops._autograd import refuse_double_backward

# -- schemas: the argument lists the operators share, each written once ---------------------------
OPTIONS = (
    "float alpha, float temperature, str divergence, float beta, SymInt ignore_index, str reduction, float kd_scale"
)
BACKWARD_OPTIONS = OPTIONS.replace(", str reduction", "")  # KDOptions' fields, in their order
EXTRAS = "float[] transform, SymInt shared_vocab, SymInt chunk_size"
LOGITS = "Tensor student, Tensor teacher, Tensor? labels"
STUDENT_HEAD = "Tensor student_hidden, Tensor student_weight, Tensor? student_bias"
TEACHER_HEAD = "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias"
TOPK_TEACHER = "Tensor teacher_logprobs, Tensor teacher_indices"
TERM_GRADS = "Tensor grad_loss, Tensor grad_ce, Tensor grad_kd"
PARAMETER_GRADS = "(Tensor, Tensor, Tensor)"


def declare(name: str, inputs: tuple[str, ...], outputs: str):
    """Decorator: the function as the operator ``memkern::name(inputs) -> outputs``."""
    return torch.library.custom_op(f"memkern::{name}", mutates_args=(), schema=f"({', '.join(inputs)}) -> {outputs}")


def split_options(options: tuple) -> tuple[KDOptions, str, tuple]:
    """(KDOptions, reduction, what follows) of an operator's arguments from OPTIONS on."""
    alpha, temperature, divergence, beta, ignore_index, reduction, kd_scale, *rest = options
    return KDOptions(alpha, temperature, divergence, beta, ignore_index, kd_scale), reduction, tuple(rest)


# Double backward would need the second derivative of the loss, i.e. the logits (or hidden
# states and weights) kept until backward: the memory these ops exist to save.
NOT_TWICE = "its gradient is computed by a fused kernel, which keeps no inputs for a second derivative"


def no_zero_gradients(ctx, gradient_outputs) -> None:
    """The gradient outputs are not differentiable, and autograd must not build a zero
    "gradient" of their size for backward (with materialised grads it does: +1x memory)."""
    ctx.mark_non_differentiable(*gradient_outputs)
    ctx.set_materialize_grads(False)


def scale_saved_gradients(grads: list[torch.Tensor], upstream: torch.Tensor, *, per_row: bool) -> list[torch.Tensor]:
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


# -- logits form: (student, ..., reduction, ..., compute_grad) -> (loss, gradient) ---------------
def logits_forward_fake(student, reduction: str, compute_grad: bool):
    """Fake (loss, gradient) of a logits-form forward."""
    loss = student.new_empty(student.shape[:-1] if reduction == "none" else (), dtype=acc_dtype(student.dtype))
    return loss, student.new_empty(student.shape) if compute_grad else student.new_empty(0)


def register_logits_autograd(op, name: str, n_inputs: int, reduction_at: int) -> None:
    """Autograd of a logits-form op with ``n_inputs`` inputs, the student first, the
    reduction at ``reduction_at`` and compute_grad last: its forward saved the gradient."""

    def setup_context(ctx, inputs, output):
        ctx.reduction, ctx.compute_grad = inputs[reduction_at], inputs[-1]
        ctx.save_for_backward(output[1])
        no_zero_gradients(ctx, output[1:])

    def backward(ctx, grad_loss, _grad_of_grad):
        (g,) = ctx.saved_tensors
        if not ctx.compute_grad or grad_loss is None:
            return (None,) * n_inputs
        per_row = ctx.reduction == "none"
        (g,) = scale_saved_gradients([g], grad_loss.unsqueeze(-1) if per_row else grad_loss, per_row=per_row)
        (g,) = refuse_double_backward(name, NOT_TWICE, g)
        return (g,) + (None,) * (n_inputs - 1)

    backends.register_autograd(op, backward, setup_context=setup_context)


# -- fused-linear form: (hidden, weight, bias, <teacher tensors>, labels, <options>) -------------
LINEAR_OPT_NAMES = (
    "alpha",
    "temperature",
    "divergence",
    "beta",
    "ignore_index",
    "reduction",
    "kd_scale",
    "compute_grad",
)
# The backward operators take the options without reduction and compute_grad.
_BACKWARD_OPT_NAMES = tuple(name for name in LINEAR_OPT_NAMES if name not in ("reduction", "compute_grad"))


def parameter_grads(head, gh, gw, gb):
    """Gradients of the student's (hidden, weight, bias) ``head`` from those of its rows
    (accumulated in fp32 or fp64): in the hidden's shape and the parameters' dtypes."""
    hidden, weight, bias = head
    gb_out = gb.to(bias.dtype) if gb is not None else hidden.new_empty(0)
    return gh.view(hidden.shape), gw.to(weight.dtype), gb_out


def parameter_grads_fake(hidden, weight, bias):
    """Fake (grad_hidden, grad_weight, grad_bias); an empty grad_bias without a bias."""
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


def linear_forward_fake(hidden, weight, bias, reduction: str, compute_grad: bool):
    """Fake (loss, grad_hidden, grad_weight, grad_bias) of a fused-linear forward."""
    loss = hidden.new_empty(hidden.shape[:-1] if reduction == "none" else (), dtype=acc_dtype(hidden.dtype))
    empty = hidden.new_empty(0)
    if not (compute_grad and reduction != "none"):
        return loss, empty, empty.clone(), empty.clone()
    return (loss, *parameter_grads_fake(hidden, weight, bias))


def register_linear_autograd(op, backward_op, name: str, n_tensors: int) -> None:
    """Autograd of a fused-linear op whose first ``n_tensors`` inputs are tensors (student
    hidden, weight and bias first) followed by LINEAR_OPT_NAMES. With reduction='none' the
    tensors are saved and ``backward_op(grad_rows, *tensors, *options)`` recomputes; else
    the gradients computed in forward are saved and scaled."""
    n_inputs = n_tensors + len(LINEAR_OPT_NAMES)

    def setup_context(ctx, inputs, output):
        ctx.opts = dict(zip(LINEAR_OPT_NAMES, inputs[n_tensors:]))
        ctx.has_bias = inputs[2] is not None
        no_zero_gradients(ctx, output[1:])
        if not ctx.opts["compute_grad"]:
            return
        if ctx.opts["reduction"] == "none":
            ctx.save_for_backward(*inputs[:n_tensors])
        else:
            ctx.save_for_backward(*output[1:])

    def backward(ctx, grad_loss, *_grads_of_grads):
        o = ctx.opts
        if not o["compute_grad"] or grad_loss is None:
            return (None,) * n_inputs
        if o["reduction"] == "none":
            gh, gw, gb = backward_op(grad_loss, *ctx.saved_tensors, *(o[k] for k in _BACKWARD_OPT_NAMES))
        else:
            gh, gw, gb = scale_saved_gradients(list(ctx.saved_tensors), grad_loss, per_row=False)
        gh, gw, gb = refuse_double_backward(name, NOT_TWICE, gh, gw, gb if ctx.has_bias else None)
        return (gh, gw, gb) + (None,) * (n_inputs - 3)

    backends.register_autograd(op, backward, setup_context=setup_context)
