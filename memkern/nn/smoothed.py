"""W8A8 with SmoothQuant's input scaling kept in the layer: :class:`SmoothedInt8Linear`,
what ``memkern.convert(model, "int8", smooth=..., calibration=...)`` builds for a layer
whose smoothing factors could not be folded into the module before it
(memkern/smoothquant.py)."""

from __future__ import annotations

import torch
from torch import nn

from memkern.nn.quantized import Int8Linear


class SmoothedInt8Linear(Int8Linear):
    """:class:`Int8Linear` of the smoothed weight ``W * s`` (columns scaled), run on the
    smoothed input ``x * input_scale`` with ``input_scale = 1 / s``: the same function as
    the float layer, with the activation outliers moved into the weight before both are
    quantised.

    Buffers: those of :class:`Int8Linear` and ``input_scale`` float32 ``(in_features,)``.
    The scaling is one elementwise pass over x before the per-token quantisation (M x K,
    small beside the GEMM).
    """

    scheme = "int8 (W8A8 dynamic with SmoothQuant input scaling)"

    def _init_storage(self, device) -> None:
        super()._init_storage(device)
        self.register_buffer("input_scale", torch.ones(self.in_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth_scale: torch.Tensor | None = None) -> SmoothedInt8Linear:
        """Quantise ``linear`` with its input channels scaled by ``smooth_scale`` ``s``
        (``(in_features,)``, positive; default all ones): weight ``W * s``, input
        ``x / s``."""
        if smooth_scale is None:
            return super().from_linear(linear)
        s = smooth_scale.detach().float().to(linear.weight.device)
        if tuple(s.shape) != (linear.in_features,):
            raise ValueError(
                f"{cls.__name__}.from_linear: smooth_scale must have shape ({linear.in_features},) "
                f"(linear.in_features), got {tuple(s.shape)}"
            )
        scaled = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        scaled.weight = nn.Parameter(linear.weight.detach().float() * s, requires_grad=False)
        scaled.bias = linear.bias
        layer = super().from_linear(scaled)
        layer.input_scale = 1.0 / s
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x * self.input_scale).to(x.dtype))
