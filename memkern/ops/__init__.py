"""memkern's operators. Each is a ``torch.library`` op (``torch.ops.memkern.<name>``) with
a fake implementation, so it works under ``torch.compile(fullgraph=True)``."""
from memkern.ops.kd import kd_loss, linear_kd_loss
from memkern.ops.int8_packing import int8_packed_kernel_native, pack_int8_weight, unpack_int8_weight
from memkern.ops.lowp import fp16_linear, int8_linear, int8_linear_packed, int8_weight_only_linear
from memkern.ops.quantize import quantize_rowwise
from memkern.ops.sparse import BlockSparseWeight, Sparse24Weight, masked_matmul

__all__ = [
    "BlockSparseWeight",
    "Sparse24Weight",
    "fp16_linear",
    "int8_linear",
    "int8_linear_packed",
    "int8_packed_kernel_native",
    "int8_weight_only_linear",
    "kd_loss",
    "linear_kd_loss",
    "masked_matmul",
    "pack_int8_weight",
    "quantize_rowwise",
    "unpack_int8_weight",
]
