"""Hugging Face transformers: the fused distillation loss for any ``*ForCausalLM``, a
``Trainer`` that distils with it, and checkpoints of memkern models beside a config.

:func:`distillation_loss` runs the student's and the teacher's base models (no lm_head)
and hands the last hidden states and the output-embedding weights to
:func:`memkern.ops.linear_kd_loss`, so no batch x sequence x vocabulary logits tensor is
ever built.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Trainer

from memkern import checkpoint
from memkern.integrations import hf_quantizer  # noqa: F401  (registers the "memkern" method with transformers)
from memkern.nn import LinearKDLoss
from memkern.ops import linear_kd_loss


def _unwrap(model: nn.Module) -> nn.Module:
    # A PEFT model computes through the modules it replaced inside the transformers model,
    # so the transformers model's own parts (base model, lm_head) carry the adapters.
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _base_model(model: nn.Module, who: str) -> nn.Module:
    """The model without its lm_head: ``get_decoder()``, else the ``base_model_prefix`` attribute."""
    base = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if base is None or base is model:
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(base, nn.Module) or base is model:
        raise TypeError(
            f"distillation_loss: {who} ({type(model).__name__}) has no base model to run without its "
            "lm_head (neither get_decoder() nor its base_model_prefix attribute gives one); pass a "
            "transformers *ForCausalLM model"
        )
    return base


def _logit_scale(model: nn.Module) -> float:
    """The factor the model multiplies its lm_head output by."""
    config = getattr(model, "config", None)
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if logit_scale is not None:
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if logits_scaling is not None:
        scale /= float(logits_scaling)
    return scale


def _softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-cap (Gemma 2: cap * tanh(logits / cap)), or None."""
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(softcap) if softcap is not None else None


def _head(model: nn.Module, who: str, hidden_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(
            f"distillation_loss: {who}'s output embeddings must be a dense linear layer with a 2-D "
            f"floating weight, got {type(head).__name__} (a converted or pruned lm_head cannot be fused; "
            "convert and prune_model skip lm_head by default)"
        )
    bias = getattr(head, "bias", None)
    # Under autocast the hidden states may be bf16 while the head is fp32: compute in the hidden dtype,
    # as the lm_head's own matmul would.
    return weight.to(hidden_dtype), (bias.to(hidden_dtype) if bias is not None else None)


def _last_hidden(
    model: nn.Module, who: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    out = _base_model(model, who)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def shifted_targets(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The ``(batch, seq - 1)`` next-token targets: ``labels`` (default ``input_ids``) with
    padding (``attention_mask == 0``) set to ``ignore_index``, shifted left by one."""
    targets = input_ids if labels is None else labels
    if tuple(targets.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"distillation_loss: labels must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"distillation_loss: attention_mask must have the shape of input_ids "
                f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        targets = targets.masked_fill(attention_mask == 0, ignore_index)
    return targets[:, 1:]


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    **kd_options: Any,
) -> torch.Tensor:
    """``alpha * CE + (1 - alpha) * T^2 * KL`` of a causal LM student against a teacher,
    without logits.

    Args:
        student, teacher: transformers ``*ForCausalLM`` models (or PEFT models of them) with
            the same vocabulary (or pass ``shared_vocab``). The teacher runs under ``torch.no_grad()``.
        input_ids: ``(batch, seq)`` token ids; attention_mask: ``(batch, seq)``, 0 at padding.
        labels: ``(batch, seq)`` targets aligned with ``input_ids`` (default ``input_ids``);
            shifted here, as the models' own loss does. Padding and ``ignore_index`` count
            in neither term.
        num_items_in_batch: the number of counted targets in the whole (accumulated,
            all-device) batch: the loss is then ``sum / num_items_in_batch``, so accumulated
            micro-batches add up to the large batch's mean exactly. ``None``: the mean over
            this call's counted targets.
        kd_options: the options of :func:`memkern.ops.linear_kd_loss` (``alpha``,
            ``temperature``, ``divergence``, ``beta``, ``ignore_index``, ``soft_loss_scale``,
            the logit scales and soft-caps, ``shared_vocab``, ``chunk_size``,
            ``return_components``), except ``reduction`` and ``normalizer``, which follow from
            ``num_items_in_batch``.

    Models that multiply their logits by a constant (``config.logit_scale``,
    ``config.logits_scaling``) are handled by scaling the hidden states; a model's
    ``config.final_logit_softcapping`` (Gemma 2) becomes its ``student_softcap`` /
    ``teacher_softcap`` unless kd_options sets that. With ``return_components=True`` the
    result is ``(loss, ce, kd)``.
    """
    for fixed in ("reduction", "normalizer"):
        if fixed in kd_options:
            raise TypeError(
                f"distillation_loss: {fixed} is not an option here: pass num_items_in_batch for a sum "
                "divided by it, or nothing for the mean over counted targets"
            )
    student, teacher = _unwrap(student), _unwrap(teacher)
    scales = _logit_scale(student), _logit_scale(teacher)
    kd_options.setdefault("student_softcap", _softcap(student))
    kd_options.setdefault("teacher_softcap", _softcap(teacher))
    targets = shifted_targets(input_ids, attention_mask, labels, kd_options.get("ignore_index", -100))
    student_hidden = _last_hidden(student, "student", input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        teacher_hidden = _last_hidden(teacher, "teacher", input_ids, attention_mask)[:, :-1]
    student_weight, student_bias = _head(student, "student", student_hidden.dtype)
    teacher_weight, teacher_bias = _head(teacher, "teacher", teacher_hidden.dtype)
    # s * (h W^T + b) = (s h) W^T + s b
    if scales[0] != 1.0:
        student_hidden = student_hidden * scales[0]
        student_bias = student_bias * scales[0] if student_bias is not None else None
    if scales[1] != 1.0:
        teacher_hidden = teacher_hidden * scales[1]
        teacher_bias = teacher_bias * scales[1] if teacher_bias is not None else None
    return linear_kd_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        targets,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        normalizer=num_items_in_batch,
        **kd_options,
    )


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is :func:`distillation_loss` against ``teacher``.

    Args:
        teacher: a ``*ForCausalLM`` with the student's vocabulary (or kd_options
            ``shared_vocab``); it is put in eval mode,
            frozen and moved to the training device.
        kd_options: keyword options of :func:`distillation_loss` (alpha, temperature, ...).
        Everything else: as ``Trainer``. Batches hold ``input_ids`` and optionally
        ``attention_mask`` and ``labels``.

    Each optimizer step's loss is the sum over its micro-batches divided by the number of
    counted targets of all of them (and of all devices with
    ``average_tokens_across_devices``), so gradient accumulation reproduces one large
    batch. Evaluation reports each batch's mean.
    """

    # compute_loss divides by the token count of the whole accumulated batch already.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, teacher: nn.Module, kd_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kd_options = dict(kd_options or {})
        LinearKDLoss(**self.kd_options)  # checks the options now rather than at the first step
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)

    def _count_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        ignore_index = self.kd_options.get("ignore_index", -100)
        targets = shifted_targets(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"), ignore_index)
        return (targets != ignore_index).sum()

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        count = sum(self._count_targets(b) for b in batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ):
        count = num_items_in_batch if model.training else None
        out = distillation_loss(
            self.accelerator.unwrap_model(model),
            self.teacher,
            inputs["input_ids"],
            inputs.get("attention_mask"),
            inputs.get("labels"),
            num_items_in_batch=count,
            **self.kd_options,
        )
        loss, outputs = (
            (out[0], {"loss": out[0], "ce": out[1], "kd": out[2]}) if isinstance(out, tuple) else (out, None)
        )
        if count is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Data parallelism averages the ranks' gradients; each rank divided by the global count.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs or {"loss": loss}) if return_outputs else loss


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save a converted, pruned or tied transformers model: ``config.json`` and
    :func:`memkern.save` (``model.safetensors`` + ``memkern.json``). Load it with
    :func:`from_pretrained`. Unlike transformers' own ``save_pretrained`` (which takes
    quantised memkern models, memkern/integrations/hf_quantizer.py) it also stores pruned
    models and layers tied by ``share_layers``."""
    model.config.save_pretrained(directory)
    checkpoint.save(model, directory)


def from_pretrained(directory: str | os.PathLike, model_class: Any = AutoModelForCausalLM) -> nn.Module:
    """Build ``model_class.from_config`` from the config in ``directory`` and
    :func:`memkern.load` the saved model into it."""
    model = model_class.from_config(AutoConfig.from_pretrained(directory))
    return checkpoint.load(directory, model)
