"""Bridges to other libraries, each in its own module and imported only on request:
``memkern.integrations.hf`` (transformers) and ``memkern.integrations.peft`` (PEFT LoRA).
``import memkern`` never imports them."""

from __future__ import annotations

import sys

from torch import nn


def record_for_transformers(model: nn.Module) -> None:
    """After memkern changed ``model``'s layers: if it is a transformers model, record the
    memkern layers in its config so transformers' save_pretrained / from_pretrained handle
    them (memkern/integrations/hf_quantizer.py). Costs nothing for other models: a model
    can only be a transformers model if transformers is already imported."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not isinstance(model, pretrained):
        return
    from memkern.integrations import hf_quantizer

    hf_quantizer.attach(model)
