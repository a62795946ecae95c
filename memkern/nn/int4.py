"""Drop-in replacement for ``nn.Linear`` with 4-bit group-wise weights (W4A16):
:class:`Int4WeightOnlyLinear`, :func:`memkern.ops.int4_weight_only_linear`."""

from __future__ import annotations

import torch
from torch import nn

from memkern import ops
from memkern.nn.quantized import check_linear, LowPrecisionLinear
from memkern.ops.int4 import check_group_size

# The buffers of the storage format: their dtypes never follow a module cast.
_FORMAT_DTYPES = {"weight": torch.uint8, "weight_scale": torch.float32, "weight_zero": torch.float32}


class Int4WeightOnlyLinear(LowPrecisionLinear):
    """W4A16 linear layer: ``y = int4_weight_only_linear(x, weight, weight_scale,
    weight_zero, group_size, bias)``.

    Buffers (all in ``state_dict``, none trained):

    * ``weight``: uint8 ``(out_features, ceil(in_features / 2))``, two 4-bit codes a byte,
      the even input in the low nibble (memkern/reference_int4.py);
    * ``weight_scale``, ``weight_zero``: float32 ``(out_features, ceil(in_features /
      group_size))``, one scale and one zero point per group of ``group_size`` inputs;
      ``W = (code - zero) * scale``.

    ``group_size`` is a constructor argument, not saved: build the module with the group
    size its checkpoint was quantised with (a different one that gives the same number of
    groups would load without error and compute with the wrong groups).

    Casts: the storage dtypes are part of the format, so ``.half()``, ``.bfloat16()``,
    ``.double()`` and ``.to(dtype)`` leave ``weight`` uint8 and the scales and zero points
    float32 (reference_int4.py says why); they cast the bias, which stays a parameter.
    Device moves apply to everything. Input ``(..., in_features)`` float32/float16/bfloat16;
    output in the input's dtype.
    """

    scheme = "int4_weight_only (W4A16: 4-bit group-wise asymmetric weights, activations unquantised)"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: int = 128,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        group_size = check_group_size(type(self).__name__, group_size)
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self.group_size = group_size
        groups = -(-in_features // group_size)
        self.register_buffer(
            "weight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4WeightOnlyLinear:
        """Quantise ``linear``'s weight per group of ``group_size`` inputs
        (:func:`memkern.ops.quantize_int4`), keep its bias. Works on the meta device."""
        linear = check_linear(cls.__name__, linear)
        weight = linear.weight.detach()
        layer = cls._fresh_like(linear, weight.device, group_size=group_size)
        layer.weight, layer.weight_scale, layer.weight_zero = ops.quantize_int4(weight, layer.group_size)
        layer._set_bias(linear)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return ops.dequantize_int4(self.weight, self.weight_scale, self.weight_zero, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_weight_only_linear(
            x, self.weight, self.weight_scale, self.weight_zero, self.group_size, self.bias
        )

    def _apply(self, fn, recurse=True):
        # A cast reaches every floating-point buffer; put the format's buffers back in their
        # dtypes (on the device the cast chose), from the untouched originals.
        before = {name: getattr(self, name) for name in _FORMAT_DTYPES}
        module = super()._apply(fn, recurse)
        for name, dtype in _FORMAT_DTYPES.items():
            after = getattr(self, name)
            if after.dtype != dtype:
                setattr(self, name, before[name].to(after.device))
        return module

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
