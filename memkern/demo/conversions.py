"""The demo's conversions of a pruned or distilled student: quantised copies that keep the
pruned layers sparse where memkern has the layer for it, and the int4 group size."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

import memkern
from memkern._replace import find_layers, replace_layers


def int4_group_size(in_features: Iterable[int]) -> int:
    """The largest int4 group (32, 64 or 128 inputs) that divides every layer's input width,
    so no group straddles a row's end: 32 for the quick demo's 32-wide student."""
    widths = list(in_features)
    return next((g for g in (128, 64) if all(k % g == 0 for k in widths)), 32)


def _dense_copy(sparse: nn.Module) -> nn.Linear:
    dense = nn.Linear(
        sparse.in_features,
        sparse.out_features,
        bias=sparse.bias is not None,
        device=sparse.values.device,
        dtype=sparse.values.dtype,
    )
    with torch.no_grad():
        dense.weight.copy_(sparse.to_dense())
        if sparse.bias is not None:
            dense.bias.copy_(sparse.bias)
    return dense


def _densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each SparseLinear back as an nn.Linear holding W * M (the
    pruned zeros stay), so it can be converted to int8 or fp16. Shared blocks stay shared."""
    from memkern.nn import SparseLinear

    model = copy.deepcopy(model)
    layers = find_layers(model, lambda module: isinstance(module, SparseLinear))
    replace_layers("densify", layers, lambda layer: _dense_copy(layer.module))
    return model


def quantised_stage(pruned: nn.Module, scheme: str) -> tuple[nn.Module, str]:
    """A quantised copy of the pruned model, and the stage's note. The int8 schemes keep
    every saving: each SparseLinear becomes a SparseInt8Linear (kept weights in int8, the
    index as it was, nothing densified). fp16 has no sparse layer, so the pruned layers are
    densified first (their zeros kept) and converted as dense layers."""
    from memkern.convert import SPARSE_SCHEMES
    from memkern.nn import SparseInt8Linear

    source = copy.deepcopy(pruned) if scheme in SPARSE_SCHEMES else _densify(pruned)
    converted = memkern.convert(source, scheme=scheme)
    note = f"memkern.convert scheme={scheme}"
    sparse = sum(isinstance(m, SparseInt8Linear) for m in converted.modules())
    if sparse:
        note += f"; {sparse} pruned layers kept sparse as SparseInt8Linear"
    elif scheme not in SPARSE_SCHEMES:
        note += "; pruned layers densified first (no sparse fp16 layer)"
    return converted, note
