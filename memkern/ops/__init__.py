"""memkern's operators. Each is a ``torch.library`` op (``torch.ops.memkern.<name>``) with
a fake implementation, so it works under ``torch.compile(fullgraph=True)``."""
from memkern.ops.quantize import quantize_rowwise
from memkern.ops.sparse import BlockSparseWeight, Sparse24Weight, masked_matmul

__all__ = ["quantize_rowwise"]
__all__ += ["BlockSparseWeight", "Sparse24Weight", "masked_matmul"]
