"""memkern's operators. Each is a ``torch.library`` op (``torch.ops.memkern.<name>``) with
a fake implementation, so it works under ``torch.compile(fullgraph=True)``."""
from memkern.ops.quantize import quantize_rowwise

__all__ = ["quantize_rowwise"]
from memkern.ops.lowp import fp16_linear, int8_linear, int8_weight_only_linear

__all__ += ["fp16_linear", "int8_linear", "int8_weight_only_linear"]
