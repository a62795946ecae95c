"""What the public distillation functions (memkern.ops.kd, memkern.ops.kd_topk) share: the
checks of their lm_head inputs, the refusal of the options the vocabulary-parallel path does
not take, and the call path from the checked options to an operator and back."""

from __future__ import annotations

import torch

from memkern import _autocast, _validate, backends
from memkern.kd_options import (
    EXTRA_OPTIONS,
    KD_DTYPES,
    KDExtras,
    check_labels,
    check_normalizer,
    check_options,
    divide_by_normalizer,
)


def check_vocab(op: str, vocab: int, what: str) -> None:
    if vocab < 1:
        raise ValueError(
            f"{op}: the vocabulary must hold at least one entry (a softmax over none is undefined), got {what}"
        )


def check_heads(op: str, *heads: tuple[str, torch.Tensor, torch.Tensor]) -> None:
    """The (who, hidden, weight) pairs of the fused-linear losses: tensors of a KD dtype,
    hidden (N, H) or (B, T, H), weight (V, H) of the hidden's size and dtype (as autocast
    sees them: it casts both). Each check runs over every pair before the next."""
    for who, h, w in heads:
        for name, x in ((f"{who}_hidden", h), (f"{who}_weight", w)):
            _validate.check_tensor(op, name, x)
            _validate.check_dtype(op, name, x, KD_DTYPES)
    for who, h, _ in heads:
        _validate.check_dim(op, f"{who}_hidden", h, (2, 3))
    for who, _, w in heads:
        _validate.check_dim(op, f"{who}_weight", w, 2)
    for who, h, w in heads:
        if h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{op}: {who}_hidden has hidden size {h.shape[-1]} but {who}_weight "
                f"{tuple(w.shape)} expects {w.shape[1]} (weight is (vocab, hidden))"
            )
        if _autocast.dtype_seen(h) != _autocast.dtype_seen(w):  # autocast casts both
            raise TypeError(
                f"{op}: {who}_hidden ({_validate.dtype_name(h.dtype)}) and {who}_weight "
                f"({_validate.dtype_name(w.dtype)}) must have the same dtype"
            )


def check_head_biases(op: str, *biases: tuple[str, torch.Tensor | None, torch.Tensor]) -> None:
    """Each (who, bias, weight): a bias, where given, is (V,) in its weight's dtype."""
    for who, b, w in biases:
        if b is not None:
            _validate.check_tensor(op, f"{who}_bias", b)
            if tuple(b.shape) != (w.shape[0],) or _autocast.dtype_seen(b) != _autocast.dtype_seen(w):
                raise ValueError(
                    f"{op}: {who}_bias must have shape ({w.shape[0]},) and dtype "
                    f"{_validate.dtype_name(w.dtype)}, got {tuple(b.shape)} "
                    f"{_validate.dtype_name(b.dtype)}"
                )


def refuse_sharded_extras(op: str, given: dict) -> None:
    """The vocabulary-parallel path (memkern.distributed.vocab_parallel) takes the core
    options and normalizer; the logit transforms, shared_vocab and return_components (the
    ``given`` EXTRA_OPTIONS) are refused there, on every rank alike, before any collective."""
    transforms = EXTRA_OPTIONS[:5]  # the scales, the caps and shared_vocab
    unsupported = [name for name in transforms if given[name] is not None] + (
        ["return_components"] if given["return_components"] else []
    )
    if unsupported:
        raise ValueError(
            f"{op}: {', '.join(unsupported)} cannot be used with DTensor (vocabulary-parallel) inputs; "
            "the sharded loss takes alpha, temperature, divergence, beta, ignore_index, reduction, "
            "soft_loss_scale and normalizer"
        )


def op_options(opts, reduction: str) -> tuple:
    """The options in the order of the operators' schemas (alpha .. kd_scale)."""
    return opts.alpha, opts.temperature, opts.divergence, opts.beta, opts.ignore_index, reduction, opts.kd_scale


_NO_EXTRAS = KDExtras()


def run_loss(
    op: str,
    operators: tuple,
    tensors: tuple,
    labels: torch.Tensor | None,
    grad_inputs: tuple,
    core: dict,
    extras: KDExtras = _NO_EXTRAS,
    normalizer=None,
):
    """The checks every distillation function ends with, then its operator and the public
    result. ``operators``: (op, body) of the plain operator, then those of the options
    operator where the function has one (run when ``extras`` need it); ``tensors``: the
    operator's inputs before the labels, the teacher's detached; ``grad_inputs``: the
    student's, its logits or hidden states first (whose leading shape the labels have)."""
    opts = check_options(op, has_labels=labels is not None, **core)
    normalizer = check_normalizer(op, normalizer, core["reduction"])
    labels = check_labels(op, labels, tuple(grad_inputs[0].shape[:-1]), grad_inputs[0].device)
    reduction = "sum" if normalizer is not None else core["reduction"]  # the sum, divided by it below
    args = (*tensors, labels, *op_options(opts, reduction))
    if extras.needs_options_path:
        options_op, options_body = operators[2:]
        out = backends.call(options_op, options_body, *args, extras.transform, extras.shared_vocab, extras.chunk_size)
    else:
        compute_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in grad_inputs)
        out = backends.call(*operators[:2], *args, compute_grad)
    terms = out if extras.needs_options_path else (out[0],)
    if normalizer is not None:
        terms = tuple(divide_by_normalizer(x, normalizer) for x in terms)
    return tuple(terms) if extras.return_components else terms[0]
