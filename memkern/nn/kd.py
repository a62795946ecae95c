"""Loss modules over :func:`memkern.ops.kd_loss` and :func:`memkern.ops.linear_kd_loss`."""

from __future__ import annotations


import torch
from torch import nn

from memkern.kd_options import CORE_OPTIONS, EXTRA_OPTIONS, check_extras
from memkern.ops import kd as _kd


class _CoreKDLossBase(nn.Module):
    """Holds the options every distillation loss takes, checked once at construction."""

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        soft_loss_scale: str = "t2",
    ) -> None:
        super().__init__()
        core = (alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)
        self.options = dict(zip(CORE_OPTIONS, core))
        # Whether labels come is only known per call; the op checks alpha == 0 without them.
        _kd.check_options(type(self).__name__, has_labels=True, **self.options)

    def extra_repr(self) -> str:
        # the options left at their defaults (None, False) are not listed
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None and v is not False)


class _KDLossBase(_CoreKDLossBase):
    """The options of :func:`memkern.ops.kd_loss` and :func:`memkern.ops.linear_kd_loss`:
    the core ones and the logit transforms, shared vocabulary, chunk size and terms."""

    def __init__(
        self,
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
        return_components: bool = False,
    ) -> None:
        super().__init__(alpha, temperature, divergence, beta, ignore_index, reduction, soft_loss_scale)
        given = (student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap, shared_vocab, chunk_size)
        extras = dict(zip(EXTRA_OPTIONS, (*given, return_components)))
        check_extras(type(self).__name__, extras)
        self.options.update(extras)


class KDLoss(_KDLossBase):
    """``alpha * CE + (1 - alpha) * k * D`` on student and teacher logits; see
    :func:`memkern.ops.kd_loss` for the semantics and every argument. ``normalizer`` is
    per call (it changes with every batch, e.g. HF's ``num_items_in_batch``)."""

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        normalizer: float | torch.Tensor | None = None,
    ):
        return _kd.kd_loss(student_logits, teacher_logits, labels, normalizer=normalizer, **self.options)


class LinearKDLoss(_KDLossBase):
    """The distillation loss of two lm_heads with the projection fused in (no rows x vocab
    tensor); see :func:`memkern.ops.linear_kd_loss`. Holds no parameters: pass the heads'
    weights (and biases) to ``forward``, e.g. ``student.lm_head.weight``; ``normalizer`` is
    per call, as for :class:`KDLoss`."""

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ):
        return _kd.linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            normalizer=normalizer,
            **self.options,
        )
