"""Fused knowledge-distillation loss: ``kd_loss`` (logits form) and ``linear_kd_loss``
(the lm_head projection fused in).

Where each part lives: the options and their checks in memkern.kd_options, the operators
and their backend tables in memkern.ops.kd_ops, the chunk loop of the fused-linear form in
memkern.kernels.kd_chunks and its Triton kernels in memkern.kernels.kd, the checks and the
call path shared with the top-k losses in memkern.ops.kd_args; this module holds the public
functions and the checks of their logits.

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


import torch

from memkern import _validate
from memkern.distributed import detect
from memkern.kd_options import (
    CORE_OPTIONS,
    EXTRA_OPTIONS,
    KD_DTYPES,
    TEMPERATURE_RANGE,
    check_extras,
    check_options,
    check_vocabularies,
)
from memkern.ops import kd_ops, kd_options_ops
from memkern.ops.kd_args import check_head_biases, check_heads, check_vocab, refuse_sharded_extras, run_loss

__all__ = ["TEMPERATURE_RANGE", "check_options", "kd_loss", "linear_kd_loss"]


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
    * Masked logits (-inf, or torch.finfo(dtype).min): 0 * log 0 = 0; forward_kl is +inf
      where the teacher has mass on an entry the student masks with -inf, reverse_kl the
      other way round; jsd is always finite (docs/numerics.md, "Masked logits").
    * ``temperature`` must be in [1e-4, 100] (memkern.kd_options.TEMPERATURE_RANGE).

    Options (docs/numerics.md, "Distillation options"):

    * ``student_logit_scale`` / ``teacher_logit_scale`` and ``student_softcap`` /
      ``teacher_softcap`` (None = off): each side's logits z become
      cap * tanh(scale * z / cap) (or scale * z) before the temperature, in both terms;
      ``-inf`` stays ``-inf``.
    * ``shared_vocab=n``: teacher and student vocabularies may differ; the divergence compares
      the softmaxes over the first n entries of each (each renormalised over those n), the
      cross entropy stays over the student's whole vocabulary (labels in [0, V_student)).
    * ``normalizer``: a positive number or 0-dim tensor; with reduction "mean" or "sum" the
      result is sum_i l_i / normalizer (refused with "none").
    * ``return_components=True``: returns ``(loss, ce, kd)``, reduced alike, with
      loss = alpha * ce + (1 - alpha) * k * kd; all three differentiable.
    * ``chunk_size``: rows per chunk where rows are chunked (default: an element budget).
    Setting any of them but ``normalizer`` runs memkern.ops.kd_options_ops, which chunks
    rows and recomputes in backward.
"""


def _check_logits(op: str, student: torch.Tensor, teacher: torch.Tensor, shared_vocab: int) -> None:
    _validate.check_tensor(op, "student_logits", student)
    _validate.check_tensor(op, "teacher_logits", teacher)
    _validate.check_dim(op, "student_logits", student, (2, 3))
    _validate.check_dtype(op, "student_logits", student, KD_DTYPES)
    _validate.check_dtype(op, "teacher_logits", teacher, KD_DTYPES)
    check_vocabularies(
        op,
        student.shape[-1],
        teacher.shape[-1],
        shared_vocab,
        f"student_logits {tuple(student.shape)}, teacher_logits {tuple(teacher.shape)}",
    )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"{op}: student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    check_vocab(op, student.shape[-1], f"student_logits of shape {tuple(student.shape)}")
    check_vocab(op, teacher.shape[-1], f"teacher_logits of shape {tuple(teacher.shape)}")
    _validate.check_same_device(op, student_logits=student, teacher_logits=teacher)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_loss_scale: str = "t2",
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    shared_vocab: int | None = None,
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    return_components: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "kd_loss"
    core = dict(zip(CORE_OPTIONS, (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)))
    given = (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap, shared_vocab, chunk_size)
    given = dict(zip(EXTRA_OPTIONS, (*given, return_components)))
    if detect.any_dtensor(student_logits, teacher_logits, labels):
        from memkern.distributed import vocab_parallel  # lazily: memkern.distributed builds on the ops

        refuse_sharded_extras(op, given)
        return vocab_parallel.kd_loss(student_logits, teacher_logits, labels, **core, normalizer=normalizer)
    extras = check_extras(op, given)
    _check_logits(op, student_logits, teacher_logits, extras.shared_vocab)
    operators = (kd_ops.kd_loss_op, kd_ops.kd_loss_body)
    operators += (kd_options_ops.kd_loss_options_op, kd_options_ops.kd_loss_options_body)
    tensors = (student_logits, teacher_logits.detach())
    return run_loss(op, operators, tensors, labels, (student_logits,), core, extras, normalizer)


kd_loss.__doc__ = (
    """Distillation loss ``alpha * CE + (1 - alpha) * k * D`` on logits, fused.

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

        The options below the semantics: logit scales and soft-caps, shared_vocab,
        normalizer, return_components, chunk_size.

    Returns: a scalar, or per-row losses of shape ``(N,)`` / ``(B, T)`` for ``"none"``;
    ``(loss, ce, kd)`` so shaped with ``return_components=True``.
"""
    + _SEMANTICS
    + """
    Memory: besides its inputs, a call keeps one buffer the size of the student logits
    (the gradient, written during forward) and O(rows) statistics. Backward hands that
    buffer on as it is for an upstream gradient of 1 and scales it in place for any other
    scalar (so a second backward through the same graph is then refused); a per-row
    upstream gradient (reduction="none") is applied out of place.
"""
)


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_loss_scale: str = "t2",
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    shared_vocab: int | None = None,
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    return_components: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "linear_kd_loss"
    core = dict(zip(CORE_OPTIONS, (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)))
    given = (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap, shared_vocab, chunk_size)
    given = dict(zip(EXTRA_OPTIONS, (*given, return_components)))
    sharded = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias)
    if detect.any_dtensor(*sharded):
        from memkern.distributed import vocab_parallel  # lazily: memkern.distributed builds on the ops

        refuse_sharded_extras(op, given)
        return vocab_parallel.linear_kd_loss(
            *sharded[:5], student_bias=student_bias, teacher_bias=teacher_bias, **core, normalizer=normalizer
        )
    extras = check_extras(op, given)
    check_heads(op, ("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight))
    check_vocabularies(
        op,
        student_weight.shape[0],
        teacher_weight.shape[0],
        extras.shared_vocab,
        f"student_weight {tuple(student_weight.shape)}, teacher_weight {tuple(teacher_weight.shape)}",
    )
    check_vocab(op, student_weight.shape[0], f"student_weight of shape {tuple(student_weight.shape)}")
    check_vocab(op, teacher_weight.shape[0], f"teacher_weight of shape {tuple(teacher_weight.shape)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"{op}: student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must have the same leading shape (the same rows)"
        )
    check_head_biases(op, ("student", student_bias, student_weight), ("teacher", teacher_bias, teacher_weight))
    _validate.check_same_device(
        op,
        student_hidden=student_hidden,
        student_weight=student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
    )
    detach = lambda x: x.detach() if x is not None else None  # noqa: E731
    teacher = (detach(teacher_hidden), detach(teacher_weight), detach(teacher_bias))
    operators = (kd_ops.linear_kd_loss_op, kd_ops.linear_kd_loss_body)
    operators += (kd_options_ops.linear_kd_loss_options_op, kd_options_ops.linear_kd_loss_options_body)
    student = (student_hidden, student_weight, student_bias)
    return run_loss(op, operators, (*student, *teacher), labels, student, core, extras, normalizer)


linear_kd_loss.__doc__ = (
    """Distillation loss of two lm_heads, the projection fused in.

    The student's logits are ``student_hidden @ student_weight.T + student_bias`` and the
    teacher's likewise; the loss is exactly :func:`kd_loss` of those logits, but no tensor
    of rows x V is ever materialised (see the module docstring for how).

    Args:
        student_hidden: ``(N, H_s)`` or ``(B, T, H_s)``; float32, float16, bfloat16 (float64).
        student_weight: ``(V, H_s)``, the dtype of student_hidden; student_bias: ``(V,)``.
        teacher_hidden: ``(N, H_t)`` or ``(B, T, H_t)``: same rows, any hidden size.
        teacher_weight: ``(V, H_t)`` (``(V_t, H_t)`` with shared_vocab), the dtype of
            teacher_hidden; teacher_bias: ``(V,)``.
        labels and the options: as :func:`kd_loss`.

    Gradients flow to student_hidden, student_weight and student_bias (weight and bias
    gradients accumulated in float32: over row chunks, or tile by tile with atomic adds on
    the triton backend, whose sums are therefore not bitwise repeatable on a GPU), never
    to the teacher.
"""
    + _SEMANTICS
)
