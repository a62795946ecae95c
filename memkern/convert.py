"""Model-level tools: the memory footprint report (and, with the low-precision ops,
``convert``)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Footprint:
    """Bytes held by a model's parameters and buffers."""

    total_bytes: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    by_layer_type: dict[str, int] = field(default_factory=dict)
    parameters: int = 0
    """Number of parameter elements (shared parameters counted once)."""

    def __str__(self) -> str:
        dtypes = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(self.by_dtype.items()))
        return f"{self.total_bytes / 2**20:.2f} MiB ({dtypes}); {self.parameters:,} parameters"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_footprint(model: nn.Module) -> Footprint:
    """Count the bytes of every parameter and buffer of ``model`` once.

    Tensors shared between modules (tied weights, shared layers) are counted once, under
    the first module that holds them. Bytes are reported by dtype and by the type name of
    the module that directly owns the tensor (``Linear``, ``Int8Linear``, ...). Tensors on
    the meta device count as the bytes they will take.
    """
    seen: set[int] = set()
    by_dtype: dict[str, int] = defaultdict(int)
    by_type: dict[str, int] = defaultdict(int)
    total = params = 0
    for module in model.modules():
        owned = [(p, True) for p in module.parameters(recurse=False)]
        owned += [(b, False) for b in module.buffers(recurse=False)]
        for tensor, is_param in owned:
            key = id(tensor)
            if key in seen:
                continue
            seen.add(key)
            nbytes = _tensor_bytes(tensor)
            total += nbytes
            by_dtype[str(tensor.dtype).removeprefix("torch.")] += nbytes
            by_type[type(module).__name__] += nbytes
            if is_param:
                params += tensor.numel()
    return Footprint(total, dict(by_dtype), dict(by_type), params)
