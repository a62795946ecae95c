"""Thin ``nn.Module`` wrappers over memkern's public ops."""
from memkern.nn.kd import KDLoss, LinearKDLoss
from memkern.nn.quantized import Fp16Linear, Int8Linear, Int8WeightOnlyLinear
from memkern.nn.sparse import SparseLinear

__all__ = ["Fp16Linear", "Int8Linear", "Int8WeightOnlyLinear", "KDLoss", "LinearKDLoss", "SparseLinear"]
