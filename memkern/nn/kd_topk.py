"""Loss modules over :func:`memkern.ops.kd_loss_topk` and :func:`memkern.ops.linear_kd_loss_topk`."""

from __future__ import annotations

import torch

from memkern.nn.kd import _CoreKDLossBase
from memkern.ops import kd_topk as _kd_topk


class KDLossTopK(_CoreKDLossBase):
    """Distillation of student logits from a teacher's top-k log-probabilities over k + 1
    buckets; see :func:`memkern.ops.kd_loss_topk` for the semantics and every argument."""

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        teacher_topk_indices: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _kd_topk.kd_loss_topk(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, labels, **self.options
        )


class LinearKDLossTopK(_CoreKDLossBase):
    """:class:`KDLossTopK` with the student's lm_head fused in (no rows x vocab tensor); see
    :func:`memkern.ops.linear_kd_loss_topk`. Holds no parameters: pass the head's weight (and
    bias) to ``forward``, e.g. ``student.lm_head.weight``."""

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        teacher_topk_indices: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        student_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _kd_topk.linear_kd_loss_topk(
            student_hidden,
            student_weight,
            teacher_topk_logprobs,
            teacher_topk_indices,
            labels,
            student_bias=student_bias,
            **self.options,
        )
