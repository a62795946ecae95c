"""Thin ``nn.Module`` wrappers over memkern's public ops."""
from memkern.nn.kd import KDLoss, LinearKDLoss
from memkern.nn.sparse import SparseLinear

__all__ = ["KDLoss", "LinearKDLoss", "SparseLinear"]
