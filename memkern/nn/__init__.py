"""Thin ``nn.Module`` wrappers over memkern's public ops."""

from memkern.nn.int4 import Int4WeightOnlyLinear
from memkern.nn.kd import KDLoss, LinearKDLoss
from memkern.nn.kd_topk import KDLossTopK, LinearKDLossTopK
from memkern.nn.quantized import Fp16Linear, Int8Linear, Int8WeightOnlyLinear
from memkern.nn.smoothed import SmoothedInt8Linear
from memkern.nn.sparse import SparseLinear
from memkern.nn.sparse_int8 import SparseInt8Linear

__all__ = [
    "Fp16Linear",
    "Int4WeightOnlyLinear",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "KDLoss",
    "KDLossTopK",
    "LinearKDLoss",
    "LinearKDLossTopK",
    "SmoothedInt8Linear",
    "SparseInt8Linear",
    "SparseLinear",
]
