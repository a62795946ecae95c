"""memkern's operators. Each is a ``torch.library`` op (``torch.ops.memkern.<name>``) with
a fake implementation, so it works under ``torch.compile(fullgraph=True)``."""

from memkern.ops.int4 import dequantize_int4, int4_cpu_kernel_simd, int4_weight_only_linear, quantize_int4
from memkern.ops.kd import kd_loss, linear_kd_loss
from memkern.ops.kd_topk import kd_loss_topk, linear_kd_loss_topk
from memkern.ops.int8_packing import int8_packed_kernel_native, pack_int8_weight, unpack_int8_weight
from memkern.ops.lowp import fp16_linear, int8_linear, int8_linear_packed, int8_weight_only_linear
from memkern.ops.quantize import quantize_rowwise
from memkern.ops.sparse import BlockSparseWeight, Sparse24Weight, masked_matmul
from memkern.ops.sparse_int8 import block_sparse_int8_linear, sparse24_int8_linear

__all__ = [
    "BlockSparseWeight",
    "Sparse24Weight",
    "block_sparse_int8_linear",
    "dequantize_int4",
    "fp16_linear",
    "int4_cpu_kernel_simd",
    "int4_weight_only_linear",
    "int8_linear",
    "int8_linear_packed",
    "int8_packed_kernel_native",
    "int8_weight_only_linear",
    "kd_loss",
    "kd_loss_topk",
    "linear_kd_loss",
    "linear_kd_loss_topk",
    "masked_matmul",
    "pack_int8_weight",
    "quantize_int4",
    "quantize_rowwise",
    "sparse24_int8_linear",
    "unpack_int8_weight",
]
