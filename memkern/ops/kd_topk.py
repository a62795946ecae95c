"""Distillation from a top-k teacher: ``kd_loss_topk`` (student logits) and
``linear_kd_loss_topk`` (the student's lm_head fused in), for teachers that supply only the
log-probabilities of their k most likely tokens per position (served APIs, offline dumps).

The per-row kernels (cpp: csrc/cpu/kd_topk.cpp, cuda: csrc/cuda/kd_topk.cu, triton:
memkern.kernels.kd_topk, torch: memkern.reference_topk) compute a row's loss and d loss / d
student logits in one call; the operators are in memkern.ops.kd_topk_ops. The fused-linear
form runs the per-row kernel over row chunks of student logits (each overwritten with its
gradient), so memory beyond the inputs and gradients is one chunk plus O(rows x k). On CUDA
tensors Triton goes first, as for kd_loss.
"""

from __future__ import annotations

import torch

from memkern import _validate
from memkern.kd_options import CORE_OPTIONS, KD_DTYPES
from memkern.ops import kd_topk_ops
from memkern.ops.kd_args import check_head_biases, check_heads, run_loss

__all__ = ["kd_loss_topk", "linear_kd_loss_topk"]

_SEMANTICS = """
    Per row i with student logits s (vocabulary V), teacher log-probabilities lp_1..lp_k
    (at temperature 1, as a served API returns them) at distinct indices I_1..I_k, label y
    and temperature T, both sides are compared over k + 1 buckets: the k indices and a
    tail bucket holding the rest of the vocabulary.

    * Teacher: bucket probabilities p_j = exp(lp_j) and tail p_tail = 1 - sum_j p_j
      (computed as -expm1(logsumexp(lp)); 0 when k = V, or when rounding puts sum_j p_j at
      or past 1). At temperature T the buckets are softened like logits of their own,
      P = softmax(log p / T) over the k + 1 buckets: the ratios between the top-k entries
      are exactly the teacher's at T (exp((t_a - t_b) / T)), and T = 1 is p itself. The
      teacher's logits of the tail tokens are unknown, so its true softened tail cannot be
      had; softening the tail bucket as one outcome undercounts it for T > 1.
    * Student: q = softmax(s / T) over the FULL vocabulary, Q_j = q[I_j] and Q_tail = the
      sum of q over the complement of I, taken as a log-sum-exp over the complement (no
      1 - sum cancellation, exact when Q_tail is far below float precision).
    * l_i = alpha * (logsumexp(s) - s[y]) + (1 - alpha) * k_T * D(P, Q), D over the k + 1
      buckets: ``"forward_kl"`` KL(P || Q), ``"reverse_kl"`` KL(Q || P) or ``"jsd"`` as
      in :func:`memkern.ops.kd_loss`; k_T = T^2 (``soft_loss_scale="t2"``) or 1 (``"none"``).
      The cross entropy is over the full vocabulary at temperature 1.
    * ignore_index, labels=None (alpha must be 0), reduction, masked (-inf) and undefined
      rows (NaN in the student or the teacher, or a student all -inf) behave as in
      :func:`memkern.ops.kd_loss`: 0 * log 0 = 0, forward_kl is +inf where the teacher has
      mass on a bucket the student cannot reach (and its gradient the finite closed form).
    * Gradient with respect to the student logits (the teacher inputs get none), with
      c = (1 - alpha) k_T / T: forward_kl c * (q_v - P_b(v) * q_v / Q_b(v)), i.e. q - P at
      an index and, in the tail, q_v minus the teacher's tail mass shared out as the
      student shares its own; reverse_kl and jsd c * q_v * (g_b(v) - sum_b Q_b g_b).
    * Checked: indices int64/int32 in [0, V), distinct within each row, 1 <= k <= V;
      log-probabilities <= 0 whose probabilities sum to at most 1, both up to
      max(1e-5, 4 * eps of their dtype), beyond which a ValueError names
      teacher_topk_logprobs (logits passed by mistake are the usual cause).
"""


def _check_topk_teacher(op: str, logprobs, indices, lead: tuple[int, ...], vocab: int) -> None:
    """Shapes and dtypes of the teacher's inputs (the values are checked in the operator)."""
    _validate.check_tensor(op, "teacher_topk_logprobs", logprobs)
    _validate.check_tensor(op, "teacher_topk_indices", indices)
    _validate.check_dtype(op, "teacher_topk_logprobs", logprobs, KD_DTYPES)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{op}: teacher_topk_indices must have dtype int64 or int32; got {_validate.dtype_name(indices.dtype)}"
        )
    if logprobs.dim() != len(lead) + 1 or tuple(logprobs.shape[:-1]) != lead:
        raise ValueError(
            f"{op}: teacher_topk_logprobs must have shape {lead} + (k,) (the student's rows), "
            f"got {tuple(logprobs.shape)}"
        )
    if indices.shape != logprobs.shape:
        raise ValueError(
            f"{op}: teacher_topk_indices must have the shape of teacher_topk_logprobs "
            f"{tuple(logprobs.shape)}, got {tuple(indices.shape)}"
        )
    k = logprobs.shape[-1]
    if not (1 <= k <= vocab):
        raise ValueError(
            f"{op}: teacher_topk_logprobs must hold k in [1, {vocab}] entries a row (V = {vocab}), got k={k}"
        )


def kd_loss_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_loss_scale: str = "t2",
) -> torch.Tensor:
    op = "kd_loss_topk"
    _validate.check_tensor(op, "student_logits", student_logits)
    _validate.check_dim(op, "student_logits", student_logits, (2, 3))
    _validate.check_dtype(op, "student_logits", student_logits, KD_DTYPES)
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    _check_topk_teacher(op, teacher_topk_logprobs, teacher_topk_indices, lead, vocab)
    _validate.check_same_device(
        op,
        student_logits=student_logits,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_indices=teacher_topk_indices,
    )
    core = dict(zip(CORE_OPTIONS, (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)))
    tensors = (student_logits, teacher_topk_logprobs.detach(), teacher_topk_indices)
    operators = (kd_topk_ops.kd_loss_topk_op, kd_topk_ops.kd_loss_topk_body)
    return run_loss(op, operators, tensors, labels, (student_logits,), core)


kd_loss_topk.__doc__ = (
    """Distillation loss ``alpha * CE + (1 - alpha) * k * D`` of student logits against a
    teacher known only by its top-k log-probabilities, fused.

    Args:
        student_logits: ``(N, V)`` or ``(B, T, V)``; float32, float16, bfloat16 (or float64).
        teacher_topk_logprobs: ``(N, k)`` or ``(B, T, k)`` log-probabilities at temperature
            1, any of those dtypes; never gets a gradient.
        teacher_topk_indices: the same shape, int64/int32 vocabulary indices, distinct per row.
        labels, alpha, temperature, divergence, beta, ignore_index, reduction,
            soft_loss_scale: as :func:`memkern.ops.kd_loss`.

    Returns: a scalar, or per-row losses of shape ``(N,)`` / ``(B, T)`` for ``"none"``.
"""
    + _SEMANTICS
    + """
    Memory: as :func:`memkern.ops.kd_loss`, one buffer the size of the student logits (the
    gradient, written during forward) and O(rows x k).
"""
)


def linear_kd_loss_topk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    soft_loss_scale: str = "t2",
) -> torch.Tensor:
    op = "linear_kd_loss_topk"
    check_heads(op, ("student", student_hidden, student_weight))
    vocab = student_weight.shape[0]
    check_head_biases(op, ("student", student_bias, student_weight))
    lead = tuple(student_hidden.shape[:-1])
    _check_topk_teacher(op, teacher_topk_logprobs, teacher_topk_indices, lead, vocab)
    _validate.check_same_device(
        op,
        student_hidden=student_hidden,
        student_weight=student_weight,
        student_bias=student_bias,
        teacher_topk_logprobs=teacher_topk_logprobs,
        teacher_topk_indices=teacher_topk_indices,
    )
    core = dict(zip(CORE_OPTIONS, (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)))
    student = (student_hidden, student_weight, student_bias)
    tensors = (*student, teacher_topk_logprobs.detach(), teacher_topk_indices)
    operators = (kd_topk_ops.linear_kd_loss_topk_op, kd_topk_ops.linear_kd_loss_topk_body)
    return run_loss(op, operators, tensors, labels, student, core)


linear_kd_loss_topk.__doc__ = (
    """:func:`kd_loss_topk` of the student logits ``student_hidden @ student_weight.T +
    student_bias``, the projection fused in: rows go through in chunks, each chunk's logits
    are overwritten with their gradient by the per-row kernel and turned into the hidden,
    weight and bias gradients, so no rows x V tensor exists (memory: one chunk of logits,
    the gradients and O(rows x k)). With reduction ``"none"`` backward recomputes the chunks.

    Args:
        student_hidden: ``(N, H)`` or ``(B, T, H)``; float32, float16, bfloat16 (float64).
        student_weight: ``(V, H)`` of the same dtype; student_bias: ``(V,)`` or None.
        teacher_topk_logprobs, teacher_topk_indices, labels and the options: as
            :func:`kd_loss_topk`.

    Gradients flow to student_hidden, student_weight and student_bias (weight and bias
    gradients accumulated in float32 over the chunks), never to the teacher.
"""
    + _SEMANTICS
)
