"""What rebuilds each memkern layer: its class, constructor settings and tensor shapes as
JSON data (:func:`layer_record`), and an empty layer built from that record
(:func:`build_layer`). memkern.checkpoint writes the records into its manifest and
memkern.integrations.hf_quantizer into a transformers config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}


def layer_types() -> dict[str, type[nn.Module]]:
    """Every memkern layer a checkpoint can hold, by class name."""
    from memkern.nn import (
        Fp16Linear,
        Int4WeightOnlyLinear,
        Int8Linear,
        Int8WeightOnlyLinear,
        SparseInt8Linear,
        SparseLinear,
    )
    from memkern.nn.smoothed import SmoothedInt8Linear

    classes = (
        Int8Linear,
        Int8WeightOnlyLinear,
        SmoothedInt8Linear,
        Fp16Linear,
        Int4WeightOnlyLinear,
        SparseLinear,
        SparseInt8Linear,
    )
    return {cls.__name__: cls for cls in classes}


def layer_record(name: str, layer: nn.Module, tied: list[str] | None = None) -> dict[str, Any]:
    """What rebuilds ``layer`` (class, constructor settings) and what it holds (tensor
    shapes and dtypes), as JSON data."""
    from memkern.nn import Fp16Linear, Int4WeightOnlyLinear, SparseInt8Linear, SparseLinear

    config: dict[str, Any] = {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, SparseLinear):
        scheme, fmt = "sparse", layer.format
        config.update(format=layer.format, block=list(layer.block), dtype=dtype_name(layer.values.dtype))
    elif isinstance(layer, SparseInt8Linear):
        scheme, fmt = layer.scheme.split()[0], layer.format
        config.update(format=layer.format, block=list(layer.block), weight_only=layer.weight_only)
        config["bias_dtype"] = None if layer.bias is None else dtype_name(layer.bias.dtype)
    else:
        scheme, fmt = layer.scheme.split()[0], dtype_name(layer.weight.dtype)
        config["bias_dtype"] = None if layer.bias is None else dtype_name(layer.bias.dtype)
        if isinstance(layer, Fp16Linear):
            config["weight_dtype"] = dtype_name(layer.weight.dtype)
        if isinstance(layer, Int4WeightOnlyLinear):
            config["group_size"] = layer.group_size
    tensors = {k: tensor_spec(v) for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    return {
        "name": name,
        "class": type(layer).__name__,
        "scheme": scheme,
        "format": fmt,
        "config": config,
        "tensors": tensors,
        "tied": list(tied or []),
    }


def build_layer(record: dict[str, Any], device: torch.device | str) -> nn.Module:
    """An empty layer of ``record`` (from :func:`layer_record`) on ``device``, ready to
    load its tensors."""
    cls = layer_types()[record["class"]]
    c = dict(record["config"])
    args = (c.pop("in_features"), c.pop("out_features"), c.pop("bias"))
    if record["class"] == "SparseLinear":
        return cls(*args, format=c["format"], block=tuple(c["block"]), dtype=dtype_of(c["dtype"]), device=device)
    if record["class"] == "SparseInt8Linear":
        return cls(
            *args,
            format=c["format"],
            block=tuple(c["block"]),
            weight_only=c["weight_only"],
            bias_dtype=dtype_of(c["bias_dtype"]),
            device=device,
        )
    kwargs = {"bias_dtype": dtype_of(c["bias_dtype"])}
    if "weight_dtype" in c:
        kwargs["weight_dtype"] = dtype_of(c["weight_dtype"])
    if "group_size" in c:
        kwargs["group_size"] = c["group_size"]
    return cls(*args, device=device, **kwargs)
