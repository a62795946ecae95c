"""Model-level tools: the memory footprint report (and, with the low-precision ops,
``convert``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from memkern._replace import chosen_layers, find_layers, record_for_transformers, replace_layers
from memkern._validate import dtype_name


@dataclass
class Footprint:
    """Bytes held by a model's parameters and buffers."""

    total_bytes: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    by_layer_type: dict[str, int] = field(default_factory=dict)
    parameters: int = 0
    """Number of parameter elements (shared parameters counted once)."""

    def __str__(self) -> str:
        dtypes = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(self.by_dtype.items()))
        return f"{self.total_bytes / 2**20:.2f} MiB ({dtypes}); {self.parameters:,} parameters"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_footprint(model: nn.Module) -> Footprint:
    """Count the bytes of every parameter and buffer of ``model`` once.

    Tensors shared between modules (tied weights, shared layers) are counted once, under
    the first module that holds them. Bytes are reported by dtype and by the type name of
    the module that directly owns the tensor (``Linear``, ``Int8Linear``, ...). Tensors on
    the meta device count as the bytes they will take.
    """
    seen: set[int] = set()
    by_dtype: dict[str, int] = defaultdict(int)
    by_type: dict[str, int] = defaultdict(int)
    total = params = 0
    for module in model.modules():
        owned = [(p, True) for p in module.parameters(recurse=False)]
        owned += [(b, False) for b in module.buffers(recurse=False)]
        for tensor, is_param in owned:
            key = id(tensor)
            if key in seen:
                continue
            seen.add(key)
            nbytes = _tensor_bytes(tensor)
            total += nbytes
            by_dtype[dtype_name(tensor.dtype)] += nbytes
            by_type[type(module).__name__] += nbytes
            if is_param:
                params += tensor.numel()
    return Footprint(total, dict(by_dtype), dict(by_type), params)


# -- convert: nn.Linear -> low-precision layers --------------------------------------------
def _schemes() -> dict[str, type]:
    from memkern.nn.int4 import Int4WeightOnlyLinear
    from memkern.nn.quantized import Fp16Linear, Int8Linear, Int8WeightOnlyLinear

    return {
        "int8": Int8Linear,
        "int8_weight_only": Int8WeightOnlyLinear,
        "fp16": Fp16Linear,
        "int4_weight_only": Int4WeightOnlyLinear,
    }


# Schemes that also convert pruned layers (SparseLinear -> SparseInt8Linear).
SPARSE_SCHEMES = ("int8", "int8_weight_only")

# Modules that read their linear children's weights directly: converting those children
# breaks the parent (nn.TransformerEncoderLayer in eval under no_grad: "self and mat2 must
# have the same dtype, but got Float and Char").
_READ_BY_PARENT = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _skipped(fqn: str, skip) -> bool:
    # "lm_head" matches the layer named lm_head at any depth ("model.lm_head" too).
    return any(fqn == s or fqn.endswith("." + s) for s in skip)


def _check_options(scheme: str, group_size, smooth, calibration) -> None:
    if group_size is not None and scheme != "int4_weight_only":
        raise ValueError(
            f"convert: group_size applies to scheme 'int4_weight_only' only; got group_size="
            f"{group_size!r} with scheme {scheme!r}"
        )
    if (smooth is None) != (calibration is None):
        raise ValueError(
            "convert: smooth (the SmoothQuant migration strength) and calibration (batches of model "
            f"inputs) go together; got smooth={smooth!r} and calibration "
            f"{'given' if calibration is not None else 'None'}"
        )
    if smooth is not None and scheme != "int8":
        raise ValueError(
            f"convert: smooth applies to scheme 'int8' (W8A8, whose activations are quantised); got scheme {scheme!r}"
        )


def convert(
    model: nn.Module,
    scheme: str = "int8",
    *,
    filter_fn=None,
    skip=("lm_head",),
    inplace: bool = True,
    group_size: int | None = None,
    smooth: float | None = None,
    calibration=None,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` with memkern's low-precision layers.

    Args:
        model: any module (a bare ``nn.Linear`` is converted and returned).
        scheme: ``"int8"`` (:class:`memkern.nn.Int8Linear`, W8A8 dynamic),
            ``"int8_weight_only"`` (:class:`memkern.nn.Int8WeightOnlyLinear`, W8A16),
            ``"int4_weight_only"`` (:class:`memkern.nn.Int4WeightOnlyLinear`, W4A16) or
            ``"fp16"`` (:class:`memkern.nn.Fp16Linear`).
        filter_fn: ``filter_fn(module, fqn) -> bool`` chooses among the candidate layers
            (default: every one); ``fqn`` is the layer's dotted name in ``model``.
        skip: layer names never converted; a name matches the layer of that name at any
            depth (default ``("lm_head",)``: the output projection is the most sensitive
            layer and is often tied to the embedding).
        inplace: modify ``model`` (default) or convert a deep copy.
        group_size: ``"int4_weight_only"`` only: inputs per quantisation group, a multiple
            of 32 (default 128).
        smooth, calibration: ``"int8"`` only: SmoothQuant with migration strength
            ``smooth`` (e.g. 0.5) from ``calibration``, an iterable of model inputs
            (memkern/smoothquant.py: what is folded where). Layers whose factors cannot be
            folded into the module before them become :class:`memkern.nn.SmoothedInt8Linear`.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Candidates are ``nn.Linear`` layers (subclasses included) and layers memkern already
    converted; for ``"int8"`` and ``"int8_weight_only"`` also pruned layers
    (:class:`memkern.nn.SparseLinear`), which become :class:`memkern.nn.SparseInt8Linear`
    (W8A8, or W8A16 for ``"int8_weight_only"``): their kept weights quantised per output
    channel, their index and element mask kept, nothing densified. Layers whose parent
    reads their weights directly are left alone: the projections inside
    ``nn.MultiheadAttention``, and ``linear1``/``linear2`` of
    ``nn.TransformerEncoderLayer`` (its fused inference path, taken in eval mode without
    autograd, hands them to one kernel that expects float weights). A chosen layer that is already converted is an error
    (its weights are no longer the original ones). A warning says when nothing was
    replaced. Works on models on the meta device: build, convert, then
    ``load_state_dict(converted_state_dict, assign=True)``.

    A layer held under several names (:func:`memkern.share_layers`, tied weights) is
    converted once and the converted layer put under every name, so it stays shared;
    ``skip`` and ``filter_fn`` must choose all its names or none. All or nothing: every
    chosen layer is converted before any is replaced, and a layer that fails leaves the
    model as it was, with an error naming the layer (while the call runs, the converted
    layers and the originals both exist).
    """
    from memkern.nn.quantized import QUANTIZED_LINEAR_TYPES
    from memkern.nn.sparse import SparseLinear
    from memkern.nn.sparse_int8 import SparseInt8Linear

    schemes = _schemes()
    if scheme not in schemes:
        raise ValueError(f"convert: scheme must be one of {', '.join(map(repr, schemes))}; got {scheme!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"convert: filter_fn must be callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    _check_options(scheme, group_size, smooth, calibration)
    if isinstance(skip, str):
        skip = (skip,)
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    layer_type = schemes[scheme]
    converted_types = (*QUANTIZED_LINEAR_TYPES, schemes["int4_weight_only"], SparseInt8Linear)
    # Pruned layers keep their sparsity through the int8 schemes (SparseInt8Linear); the
    # other schemes have no sparse layer, so they leave pruned layers as they are.
    sources = (nn.Linear, SparseLinear) if scheme in SPARSE_SCHEMES else (nn.Linear,)

    def chosen(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, (*sources, *converted_types)) or _skipped(fqn, skip):
            return False
        if filter_fn is not None and not filter_fn(module, fqn):
            return False
        if isinstance(module, converted_types):
            raise ValueError(
                f"convert: layer {fqn or '<model>'!r} is already converted "
                f"({type(module).__name__}, scheme {module.scheme.split()[0]}); "
                f"convert the original nn.Linear instead, or exclude it with skip or filter_fn"
            )
        return True

    def build(fqn: str, linear: nn.Module, pending: dict) -> nn.Module:
        if isinstance(linear, SparseLinear):
            return SparseInt8Linear.from_sparse(linear, weight_only=scheme == "int8_weight_only")
        if fqn in pending:
            from memkern.nn.smoothed import SmoothedInt8Linear

            return SmoothedInt8Linear.from_linear(linear, pending[fqn])
        if scheme == "int4_weight_only":
            return layer_type.from_linear(linear, group_size=128 if group_size is None else group_size)
        return layer_type.from_linear(linear)

    def smoothing(layers: dict[str, nn.Module]) -> dict:
        if smooth is None:
            return {}
        pruned = [name for name, layer in layers.items() if isinstance(layer, SparseLinear)]
        if pruned:
            raise ValueError(
                f"convert: smooth applies to nn.Linear layers; {pruned[0]!r} is a SparseLinear "
                "(exclude the pruned layers with skip or filter_fn to smooth the others)"
            )
        from memkern.smoothquant import smooth as smooth_model

        return smooth_model(model, calibration, smooth, layers=layers).pending

    if chosen(model, ""):
        return build("", model, smoothing({"": model}))

    candidates = find_layers(
        model,
        lambda m: isinstance(m, (*sources, *converted_types)),
        descend=lambda m: not isinstance(m, _READ_BY_PARENT),
    )
    layers = chosen_layers("convert", candidates, chosen)
    pending = smoothing({layer.name: layer.module for layer in layers})
    replace_layers("convert", layers, lambda layer: build(layer.name, layer.module, pending))
    if not layers:
        import warnings

        warnings.warn(
            f"convert: no layer was replaced (scheme {scheme!r}, skip={tuple(skip)}, "
            f"filter_fn={'given' if filter_fn is not None else 'none'}); the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
    record_for_transformers(model)
    return model
