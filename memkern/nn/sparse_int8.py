"""SparseInt8Linear: a pruned linear layer whose kept weights are int8.

Pruning and quantisation composed: the layout of :class:`memkern.nn.SparseLinear`
(block-sparse kept blocks with their index, or 2:4 kept values with their positions, and the
optional element mask) with the kept values in int8 and one float32 scale per output
channel, computed over the row's kept values. Nothing is densified: the layer holds about
a quarter of its SparseLinear's float32 bytes (kept values 1 byte instead of 4, the index
as it was).
"""

from __future__ import annotations

import torch
from torch import nn

from memkern import reference
from memkern.nn.quantized import LowPrecisionLinear
from memkern.nn.sparse import FORMATS, SparseLinear, stored_format, stored_layout
from memkern.ops import sparse_format
from memkern.ops import sparse_int8 as ops
from memkern.ops.linear_checks import check_x

_BLOCK_INDEX = ("crow", "col", "ccol", "csc_row", "csc_block")
# The buffers each format stores next to ``values`` and ``scales``; "mask" may be None.
_LAYOUT = {"block": (*_BLOCK_INDEX, "mask"), "2:4": ("meta", "mask")}
_SCHEMES = {
    False: "int8 (W8A8 dynamic: per-token int8 activations, per-channel int8 kept weights)",
    True: "int8_weight_only (W8A16: per-channel int8 kept weights, activations unquantised)",
}


def _first_two_slots_meta(out_features: int, in_features: int, device) -> torch.Tensor:
    """2:4 positions keeping slots 0 and 1 of every group (code 0 | 1 << 2), by arithmetic
    alone, so that a layer can be built on the meta device."""
    groups = in_features // 4
    codes = torch.full((out_features, groups + groups % 2), 4, dtype=torch.uint8, device=device)
    codes[:, groups:] = 0  # the unused half byte of an odd group count
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


class SparseInt8Linear(LowPrecisionLinear):
    """``y = x @ (W_q * scales[:, None] * M)^T + b`` with only the kept int8 weights stored
    and visited (:func:`memkern.ops.block_sparse_int8_linear`,
    :func:`memkern.ops.sparse24_int8_linear`).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        format, block: as :class:`memkern.nn.SparseLinear` (``"block"`` with ``block``
            ``(rows, cols)`` in 16..128, or ``"2:4"``).
        weight_only: W8A16 (activations kept in their dtype) instead of W8A8 (activations
            quantised per token, as :class:`memkern.nn.Int8Linear`).
        device, bias_dtype: of the buffers and of the bias.

    Buffers: ``values`` int8 (block: ``(nnzb, BN, BK)``; 2:4: ``(out, in/2)``), ``scales``
    ``(out_features,)`` float32, the index (block: ``crow, col, ccol, csc_row, csc_block``;
    2:4: ``meta``) and the optional element ``mask``, all kept through module casts. A
    fresh layer keeps every weight (int8 zeros, scale 1); :meth:`from_sparse` builds one
    from a SparseLinear, and ``load_state_dict`` adopts the stored layout of any state of
    the same shape after checking it, as SparseLinear does (a meta-device layer takes a
    state with ``assign=True``). Inference only: the weights get no gradient; x and bias do.
    """

    _storage_buffers = ("values", "scales", *_BLOCK_INDEX, "meta", "mask")
    # The fraction of pruned weights, read from the layout exactly as SparseLinear reads its own.
    sparsity = SparseLinear.sparsity

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: str = "block",
        block: tuple[int, int] = (64, 64),
        weight_only: bool = False,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        op = "SparseInt8Linear"
        if format not in FORMATS:
            raise ValueError(f"{op}: format must be one of {', '.join(FORMATS)}; got {format!r}")
        if not isinstance(weight_only, bool):
            raise TypeError(f"{op}: weight_only must be a bool, got {type(weight_only).__name__}")
        self.format, self.block, self.weight_only = format, sparse_format.check_block(op, block), weight_only
        n, k = out_features, in_features
        scales = torch.ones(n, dtype=torch.float32, device=device)
        if format == "2:4":
            if k % 4:
                raise ValueError(f"{op}: 2:4 needs in_features divisible by 4, got {k}")
            values = torch.zeros(n, k // 2, dtype=torch.int8, device=device)
            self._adopt({"values": values, "scales": scales, "meta": _first_two_slots_meta(n, k, device)})
        else:
            bn, bk = self.block
            nbr, nbc = -(-n // bn), -(-k // bk)
            index = sparse_format.every_block_index(nbr, nbc, scales.device)
            values = torch.zeros(nbr * nbc, bn, bk, dtype=torch.int8, device=device)
            self._adopt({"values": values, "scales": scales, **dict(zip(_BLOCK_INDEX, index))})

    @property
    def scheme(self) -> str:  # noqa: D401 - the scheme of LowPrecisionLinear, per instance
        return _SCHEMES[self.weight_only]

    def _adopt(self, tensors: dict[str, torch.Tensor | None]) -> None:
        for name in ("values", "scales", *_BLOCK_INDEX, "meta", "mask"):
            self._buffers.pop(name, None)
        for name in ("values", "scales", *_LAYOUT[self.format]):
            self.register_buffer(name, tensors.get(name))
        self.__dict__.pop("_checked", None)

    @classmethod
    def from_sparse(cls, sparse: SparseLinear, weight_only: bool = False) -> SparseInt8Linear:
        """Quantise the kept weights of ``sparse`` (one scale per output channel over the
        row's kept values; pruned weights stay exactly zero), keep its index, element mask
        and bias. Works on the meta device (the layout of a fresh SparseLinear)."""
        if not isinstance(sparse, SparseLinear):
            raise TypeError(
                f"SparseInt8Linear.from_sparse: sparse must be a memkern.nn.SparseLinear, got {type(sparse).__name__}"
            )
        weight = sparse.weight  # its structure checked
        # device="meta": a layout to replace, nothing allocated for it
        layer = cls._fresh_like(sparse, "meta", format=sparse.format, block=sparse.block, weight_only=weight_only)
        if sparse.format == "2:4":
            values, scales = ops.quantize_sparse24(weight)
            layout = {"meta": weight.meta.clone()}
        else:
            values, scales = ops.quantize_block_sparse(weight)
            layout = {name: getattr(weight, name).clone() for name in _BLOCK_INDEX}
        mask = None if weight.mask is None else weight.mask.clone()
        layer._adopt({"values": values, "scales": scales, "mask": mask, **layout})
        layer.bias = None if sparse.bias is None else nn.Parameter(sparse.bias.detach().clone())
        return layer

    # -- use -------------------------------------------------------------------------------
    def _layout_tensors(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in ("values", "scales", *_LAYOUT[self.format])}

    def _check_structure(self) -> None:
        # Once, and again only after a tensor was replaced or an index changed in place
        # (sparse_format.check_once): the checks read the index, a synchronisation on CUDA.
        tensors = self._layout_tensors()
        index = tuple(tensors[n] for n in (_BLOCK_INDEX if self.format == "block" else ("meta",)))
        shape = (self.out_features, self.in_features)
        self.__dict__["_checked"] = sparse_format.check_once(
            self.__dict__.get("_checked"),
            index,
            (tensors["values"], tensors["scales"], tensors["mask"]),
            shape,
            lambda: _check_layout("SparseInt8Linear", tensors, self.format, self.block, shape, ""),
        )

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        op = "SparseInt8Linear"
        check_x(op, x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{op}: x's last dimension must be in_features={self.in_features}, got {tuple(x.shape)}")
        self._check_structure()
        if self.format == "2:4":
            return ops.run_sparse24(x, self.values, self.meta, self.scales, bias, self.weight_only)
        return ops.run_block_sparse(x, self.values, self.scales, self.crow, self.col, bias, self.weight_only)

    def int8_weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` int8 weight (pruned weights 0)."""
        if self.format == "2:4":
            return reference.sparse24_decompress(self.values, self.meta, self.in_features)
        return reference.block_sparse_to_dense(self.values, self.crow, self.col, self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales[:, None]

    def extra_repr(self) -> str:
        layout = "2:4" if self.format == "2:4" else f"block, block={self.block[0]}x{self.block[1]}"
        return super().extra_repr() + f", pattern={layout}, sparsity={self.sparsity:.3f}"

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {
            "format": self.format,
            "block": list(self.block),
            "shape": [self.out_features, self.in_features],
            "weight_only": self.weight_only,
        }

    def set_extra_state(self, state: dict) -> None:
        self.format, self.block = state["format"], tuple(state["block"])
        self.out_features, self.in_features = state["shape"]
        self.weight_only = state["weight_only"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # As SparseLinear: the state is checked (untrusted input) and its shape compared with
        # this layer's before anything changes; then this module takes the stored layout
        # (kept blocks, element mask or not, format, W8A8 or W8A16) and copies the tensors.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None or prefix + "values" in state_dict:
            try:
                fmt = self._check_state(state_dict, prefix, extra)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
            if extra is not None:
                self.set_extra_state(extra)
                dev = self.scales.device
                # Placeholders of the state's shapes and dtypes (checked above) for the copy.
                incoming = {name: state_dict.get(prefix + name) for name in ("values", "scales", *_LAYOUT[fmt])}
                self._adopt(
                    {name: None if t is None else torch.empty_like(t, device=dev) for name, t in incoming.items()}
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_state(self, state_dict, prefix: str, extra: object) -> str:
        """Raise a clear error unless ``state_dict`` holds a valid SparseInt8Linear state of
        this layer's shape (in the layout its ``_extra_state`` names, or else this layer's,
        taking this layer's tensors where the state has none); return its format."""
        op = "SparseInt8Linear.load_state_dict"
        shape = (self.out_features, self.in_features)
        fmt, block = self.format, self.block
        names = ("values", "scales", *_LAYOUT[fmt])
        tensors = {n: state_dict.get(prefix + n, getattr(self, n)) for n in names}
        if extra is not None:
            fmt = stored_format(op, prefix, extra, ("format", "block", "shape", "weight_only"))
            if not isinstance(extra["weight_only"], bool):
                raise ValueError(
                    f"{op}: {prefix}_extra_state's weight_only must be a bool, got {extra['weight_only']!r}"
                )
            names = ("values", "scales", *_LAYOUT[fmt])
            block, tensors = stored_layout(op, "SparseInt8Linear", prefix, extra, state_dict, shape, names)
        _check_layout(op, tensors, fmt, block, shape, prefix)
        return fmt


def _check_layout(op: str, tensors: dict, fmt: str, block: tuple[int, int], shape, prefix: str) -> None:
    """The structure checks of SparseLinear (memkern.ops.sparse_format) on int8 values,
    plus the scales: ``(out_features,)`` float32 on the values' device."""
    values, scales = tensors["values"], tensors["scales"]
    for name, t, dtype in (("values", values, torch.int8), ("scales", scales, torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            got = type(t).__name__ if not isinstance(t, torch.Tensor) else str(t.dtype).removeprefix("torch.")
            raise TypeError(f"{op}: {prefix}{name} must be a {str(dtype).removeprefix('torch.')} tensor, got {got}")
    if tuple(scales.shape) != (shape[0],) or scales.device != values.device:
        raise ValueError(
            f"{op}: {prefix}scales must have shape ({shape[0]},) (one per output channel) on {values.device}, "
            f"got {tuple(scales.shape)} on {scales.device}"
        )
    # The format checks read the values' shape and device only: a float32 view of one element,
    # expanded (no memory), stands in for the int8 values so they apply as they are.
    stand_in = torch.empty((), dtype=torch.float32, device=values.device).expand(values.shape)
    if fmt == "2:4":
        sparse_format.check_sparse24(op, stand_in, tensors["meta"], tensors["mask"], shape, prefix)
        return
    index = [tensors[n] for n in _BLOCK_INDEX]
    sparse_format.check_block_sparse(op, stand_in, *index, tensors["mask"], shape, prefix)
    if tuple(values.shape[1:]) != block:
        raise ValueError(
            f"{op}: {prefix}values must hold blocks of {block} ({prefix}_extra_state's block), "
            f"got shape {tuple(values.shape)}"
        )
