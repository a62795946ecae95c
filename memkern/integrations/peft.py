"""PEFT LoRA on memkern's layers: Int8Linear, Int8WeightOnlyLinear, Fp16Linear, SparseLinear.

    config = memkern.integrations.peft.lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(model, config)          # base frozen, stays int8 / fp16 / sparse
    ...
    model.save_pretrained(path)                          # the adapters only
    model = memkern.integrations.peft.load_adapter(base_model, path)

The adapted layer computes ``base(x) + scale * B(A(dropout(x)))``: the base runs its own
kernel on its own storage, the adapters train in the base's compute dtype (its bias's
dtype, float32 without a bias), never in the storage dtype.

Merging: a quantised base cannot hold ``W + scale * B @ A`` exactly, so ``merge`` builds
the merged weight from the dequantised base in float32 and stores it in the base's own
format again (int8 requantised per channel, fp16/bf16 rounded); outputs then differ from
the unmerged ones by that one rounding. The base before the first merge is kept, so
``unmerge`` restores it bit for bit. A SparseLinear refuses to merge: its pruned weights
have no storage, so a dense update would be dropped there or make the layer dense.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from memkern.nn import Fp16Linear, Int8Linear, Int8WeightOnlyLinear, SparseLinear

MEMKERN_LAYERS = (Int8Linear, Int8WeightOnlyLinear, Fp16Linear, SparseLinear)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` float32 weight a memkern layer computes with."""
    if isinstance(layer, SparseLinear):
        return layer.to_dense().float()
    return layer.dequantized_weight()


class LoraMemkernLinear(nn.Module, LoraLayer):
    """LoRA adapters around a memkern linear layer (see the module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if config.use_dora or config.lora_bias:
            raise ValueError(
                f"{type(self).__name__}: use_dora and lora_bias are not supported on memkern layers, "
                f"got use_dora={config.use_dora}, lora_bias={config.lora_bias}"
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # Every memkern layer has them; PEFT's generic lookup would warn about an unknown layer type.
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # The adapters live in the dtype the layer computes in, not its int8/fp16 storage dtype.
        if isinstance(base_layer, SparseLinear):
            return base_layer.values.device, base_layer.values.dtype
        dtype = base_layer.bias.dtype if base_layer.bias is not None else torch.float32
        return base_layer.weight.device, dtype

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scale * B @ A`` in float32, ``(out_features, in_features)``."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if isinstance(base, SparseLinear):
            raise ValueError(
                "LoRA merge: a SparseLinear base cannot hold the dense update B @ A (its pruned weights "
                "have no storage); keep the adapters unmerged, or make a dense nn.Linear from "
                "base.to_dense() + get_delta_weight(adapter) yourself"
            )
        weight = dense_weight(base)
        for adapter in adapter_names:
            weight = weight + self.get_delta_weight(adapter)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"LoRA merge: NaN or inf in the merged weight of adapters {adapter_names}")
        merged = nn.Linear(base.in_features, base.out_features, bias=False, device=weight.device)
        with torch.no_grad():
            merged.weight.copy_(weight)
        merged.bias = base.bias
        extra = {"weight_dtype": base.weight.dtype} if isinstance(base, Fp16Linear) else {}
        if not self.merged:
            # Not a submodule (not saved, not trained): what unmerge puts back.
            self.__dict__["_unmerged_base"] = base
        self.base_layer = type(base).from_linear(merged, **extra)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        device = dense_weight(self.base_layer).device
        self.base_layer = self.__dict__.pop("_unmerged_base").to(device)
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a = self.lora_A[adapter]
            update = self.lora_B[adapter](lora_a(self.lora_dropout[adapter](x.to(lora_a.weight.dtype))))
            result = result + (update * self.scaling[adapter]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Let ``config`` wrap memkern layers with :class:`LoraMemkernLinear`; returns it.
    (PEFT keeps this mapping out of the saved adapter_config.json: register again after
    loading a config, as :func:`load_adapter` does.)"""
    config._register_custom_module({cls: LoraMemkernLinear for cls in MEMKERN_LAYERS})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """``peft.LoraConfig(**kwargs)`` that also adapts memkern layers."""
    return register(LoraConfig(**kwargs))


def load_adapter(model: nn.Module, path: str, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, path, **kwargs)`` for a model holding memkern layers."""
    config = register(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(model, path, config=config, **kwargs)
