"""Thin ``nn.Module`` wrappers over memkern's public ops."""

from memkern.nn.sparse import SparseLinear

__all__: list[str] = []
__all__ += ["SparseLinear"]
