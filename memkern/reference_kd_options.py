"""Plain-PyTorch reference of the distillation options (docs/numerics.md, "Distillation
options"): logit scales and soft-caps, a shared vocabulary, the terms returned apart and the
normaliser, built on memkern.reference's divergences. Differentiable in the student (also
twice: use it for a gradient penalty on the distillation loss), computed in float32, or
float64 for float64 inputs. The kernels are tested against float64 formulas written out in
tests/test_kd_options.py; this module states the same definitions once more as code."""

from __future__ import annotations

import math

import torch

from memkern import reference


def transform_logits(logits: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
    """scale * z, then cap * tanh(z / cap); -inf stays -inf (a masked entry stays masked)."""
    z = logits * scale if scale is not None else logits
    if softcap is None:
        return z
    return torch.where(logits == -math.inf, logits, softcap * torch.tanh(z / softcap))


def kd_loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    shared_vocab: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd), reduced alike, with loss = alpha * ce + (1 - alpha) * k * kd;
    ``options``: the fields of memkern.reference.LossOptions (keyword).

    ce_i = logsumexp(s'_i) - s'_i[y_i] over the student's whole vocabulary; kd_i =
    D(softmax(t'_i[:n] / T), softmax(s'_i[:n] / T)) over the first n = shared_vocab entries
    (each side renormalised over them); s', t' the transformed logits. Ignored rows are 0
    in both terms; with a normalizer each term is its sum divided by it."""
    o = reference.LossOptions(**options)
    dtype = reference.compute_dtype(student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    s = transform_logits(student_logits.to(dtype), student_logit_scale, student_softcap)
    t = transform_logits(teacher_logits.to(dtype), teacher_logit_scale, teacher_softcap)
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    n = shared_vocab or s.shape[-1]
    kd = reference.kd_divergence_rows(
        s[:, :n], t[:, :n], temperature=o.temperature, divergence=o.divergence, beta=o.beta
    )
    y = labels.reshape(-1) if labels is not None else None
    if y is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        ce = torch.zeros_like(kd)
    else:
        counted = y != o.ignore_index
        target = torch.where(counted, y, torch.zeros_like(y))
        ce = -torch.log_softmax(s, dim=-1).gather(1, target[:, None]).squeeze(1)
    zero = torch.zeros_like(kd)
    ce, kd = torch.where(counted, ce, zero), torch.where(counted, kd, zero)
    if normalizer is not None:
        ce, kd = ce.sum() / normalizer, kd.sum() / normalizer
    else:
        ce, kd = (reference.reduce_rows(x, o.reduction, lead, y, o.ignore_index) for x in (ce, kd))
    k = reference.soft_loss_factor(o.soft_loss_scale, o.temperature)
    soft = torch.zeros_like(kd) if o.alpha == 1 else (1 - o.alpha) * k * kd
    return o.alpha * ce + soft, ce, kd


linear_kd_loss_terms = reference.of_linear_heads(kd_loss_terms)
