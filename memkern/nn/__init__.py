"""Thin ``nn.Module`` wrappers over memkern's public ops."""
from memkern.nn.kd import KDLoss, LinearKDLoss

__all__: list[str] = ["KDLoss", "LinearKDLoss"]
