"""Thin ``nn.Module`` wrappers over memkern's public ops."""

__all__: list[str] = []

from memkern.nn.quantized import Fp16Linear, Int8Linear, Int8WeightOnlyLinear  # noqa: E402

__all__ += ["Fp16Linear", "Int8Linear", "Int8WeightOnlyLinear"]
