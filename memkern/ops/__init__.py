"""memkern's operators. Each is a ``torch.library`` op (``torch.ops.memkern.<name>``) with
a fake implementation, so it works under ``torch.compile(fullgraph=True)``."""
from memkern.ops.kd import kd_loss, linear_kd_loss
from memkern.ops.quantize import quantize_rowwise
from memkern.ops.sparse import BlockSparseWeight, Sparse24Weight, masked_matmul

__all__ = [
    "BlockSparseWeight",
    "Sparse24Weight",
    "kd_loss",
    "linear_kd_loss",
    "masked_matmul",
    "quantize_rowwise",
]
