"""SparseLinear: an ``nn.Linear`` whose pruned weights take neither memory nor time."""

from __future__ import annotations

import math

import torch
from torch import nn

from memkern.ops import sparse_format
from memkern.ops.sparse import BlockSparseWeight, Sparse24Weight, masked_matmul
from memkern.ops.sparse_bitmask import BitmaskWeight, bitmask_matmul, check_bitmask

FORMATS = ("block", "2:4", "bitmask")
_BLOCK_INDEX = ("crow", "col", "ccol", "csc_row", "csc_block")
# The buffers each format stores next to ``values``; "mask" may be None.
_BUFFERS = {"block": (*_BLOCK_INDEX, "mask"), "2:4": ("meta", "mask"), "bitmask": ("bits",)}
_KINDS = {"block": BlockSparseWeight, "2:4": Sparse24Weight, "bitmask": BitmaskWeight}
_ANY_BUFFER = tuple(dict.fromkeys(name for names in _BUFFERS.values() for name in names))


class SparseLinear(nn.Module):
    """``y = x @ (W * M)^T + b`` with only the kept weights stored and visited.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        format: ``"block"`` (kept ``block``-sized blocks, optional element mask inside them),
            ``"2:4"`` (kept values + 2-bit positions; in_features a multiple of 4) or
            ``"bitmask"`` (any mask: kept values + 1 bit per weight,
            :mod:`memkern.ops.sparse_bitmask`).
        block: ``(rows, cols)`` block size for ``"block"``, powers of two in 16..128.
        device, dtype: of the parameters.

    A freshly built layer keeps every weight (initialised like ``nn.Linear``; for ``"2:4"``
    the first two of every four); ``from_dense`` builds one from a trained layer and a mask,
    and ``load_state_dict`` adopts the stored layout of any SparseLinear state of the same
    shape, after checking it (a checkpoint is untrusted input). A layer built on the meta
    device takes a state with ``load_state_dict(state, assign=True)``.
    Parameters: ``values`` (and ``bias``); the index and element mask are buffers, so an
    optimiser only ever sees kept weights, and masked ones get no gradient.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: str = "block",
        block: tuple[int, int] = (64, 64),
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        op = "SparseLinear"
        in_features = sparse_format.check_features(op, "in_features", in_features)
        out_features = sparse_format.check_features(op, "out_features", out_features)
        if format not in FORMATS:
            raise ValueError(f"{op}: format must be one of {', '.join(FORMATS)}; got {format!r}")
        self.in_features, self.out_features, self.format = in_features, out_features, format
        self.block = sparse_format.check_block(op, block)
        dense = torch.empty(out_features, in_features, device=device, dtype=dtype or torch.get_default_dtype())
        if dense.numel():
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        # Layouts that read no values, so that a layer can be built on the meta device.
        if format == "2:4":
            mask = torch.zeros_like(dense, dtype=torch.bool)
            mask[:, 0::4] = True
            mask[:, 1::4] = True
            self._adopt(Sparse24Weight.from_dense(dense, mask))
        elif format == "bitmask":
            self._adopt(BitmaskWeight.keeping_every_weight(dense))
        else:
            self._adopt(BlockSparseWeight.keeping_every_block(dense, self.block))
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(
                torch.empty(out_features, device=dense.device, dtype=dense.dtype).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("bias", None)

    # -- layout ----------------------------------------------------------------------------
    def _compress(self, weight: torch.Tensor, mask: torch.Tensor) -> BlockSparseWeight | Sparse24Weight:
        if self.format == "2:4":
            return Sparse24Weight.from_dense(weight, mask)
        if self.format == "bitmask":
            return BitmaskWeight.from_dense(weight, mask)
        return BlockSparseWeight.from_dense(weight, mask, self.block)

    def _adopt(self, w: BlockSparseWeight | Sparse24Weight | BitmaskWeight) -> None:
        for name in _ANY_BUFFER:
            self._buffers.pop(name, None)
        self.values = nn.Parameter(w.values)
        for name in _BUFFERS[next(f for f, kind in _KINDS.items() if isinstance(w, kind))]:
            self.register_buffer(name, getattr(w, name))

    @property
    def weight(self) -> BlockSparseWeight | Sparse24Weight:
        """The stored weight (sharing this module's tensors)."""
        shape = (self.out_features, self.in_features)
        names = ("values", *_BUFFERS[self.format])
        kind = _KINDS[self.format]
        if torch.compiler.is_compiling():
            return self._wrap(kind, shape)
        # The same object across calls while it wraps this module's tensors: its structure
        # check is not repeated (on CUDA it reads the index, a synchronisation), and the
        # semi-structured copy masked_matmul caches on a 2:4 weight (CUDA inference) is reused.
        w = self.__dict__.get("_stored_weight")
        if type(w) is not kind or w.shape != shape or any(getattr(w, n) is not getattr(self, n) for n in names):
            w = self._wrap(kind, shape)
            self.__dict__["_stored_weight"] = w
        return w

    def _wrap(self, kind: type, shape: tuple[int, int]) -> BlockSparseWeight | Sparse24Weight:
        if kind is Sparse24Weight:
            return Sparse24Weight(self.values, self.meta, shape, self.mask)
        if kind is BitmaskWeight:
            return BitmaskWeight(self.values, self.bits, shape)
        return BlockSparseWeight(self.values, *(getattr(self, n) for n in _BLOCK_INDEX), self.mask, shape)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, mask: torch.Tensor, *, format: str = "block", block: tuple[int, int] = (64, 64)
    ) -> SparseLinear:
        """A SparseLinear computing ``linear`` with weights where ``mask`` is False pruned."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        if format not in FORMATS:
            raise ValueError(f"SparseLinear.from_dense: format must be one of {', '.join(FORMATS)}; got {format!r}")
        layer.format, layer.block = format, sparse_format.check_block("SparseLinear.from_dense", block)
        layer._adopt(layer._compress(w, mask))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        else:
            layer.register_parameter("bias", None)
        return layer

    # -- use -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "bitmask":
            return bitmask_matmul(x, self.weight, self.bias)
        return masked_matmul(x, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight ``W * M``."""
        return self.weight.to_dense()

    @property
    def sparsity(self) -> float:
        """Fraction of the ``out x in`` weights that are pruned (not stored or masked)."""
        total = self.out_features * self.in_features
        if total == 0:
            return 0.0
        if self.values.is_meta:
            return math.nan  # which weights are kept is not known before a state is loaded
        if self.format == "bitmask":
            kept = self.values.numel()
        elif self.format == "2:4":
            kept = total // 2 if self.mask is None else int(self.mask.sum())
        elif self.mask is not None:
            kept = int(self.mask.sum())
        else:
            bn, bk = self.block
            rows = torch.repeat_interleave(
                torch.arange(self.crow.numel() - 1, device=self.crow.device), self.crow.diff()
            )
            h = (self.out_features - rows * bn).clamp(max=bn)
            w = (self.in_features - self.col * bk).clamp(max=bk)
            kept = int((h * w).sum())
        return 1 - kept / total

    def extra_repr(self) -> str:
        layout = self.format if self.format != "block" else f"block, block={self.block[0]}x{self.block[1]}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, pattern={layout}, sparsity={self.sparsity:.3f}"
        )

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"format": self.format, "block": list(self.block), "shape": [self.out_features, self.in_features]}

    def set_extra_state(self, state: dict) -> None:
        self.format, self.block = state["format"], tuple(state["block"])
        self.out_features, self.in_features = state["shape"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint is untrusted input: its layout is checked, and its shape compared with
        # this layer's (refused on mismatch, as nn.Linear does), before anything changes here.
        # The stored layout (number of kept blocks, element mask or not, format) belongs to
        # the state, so this module then takes the incoming tensors' shapes before copying.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None or prefix + "values" in state_dict:
            try:
                self._check_state(state_dict, prefix, extra)
            except (TypeError, ValueError) as exc:
                error_msgs.append(str(exc))
                return
        if extra is not None and not self._keeps_layout(state_dict, prefix, extra):
            if is_sharded(self.values):
                # fully_shard split ``values`` by its current shape; a layout with another
                # number of kept blocks cannot be copied into those shards.
                error_msgs.append(
                    f"SparseLinear.load_state_dict: {prefix}values is sharded (fully_shard) with shape "
                    f"{tuple(self.values.shape)} ({self.format!r}), the state holds a different layout "
                    f"(values {tuple(state_dict[prefix + 'values'].shape)}, {extra['format']!r}); "
                    "load it into the layer before sharding it"
                )
                return
            self.set_extra_state(extra)
            dev = self.values.device
            for name in _ANY_BUFFER:
                self._buffers.pop(name, None)
            for name in _BUFFERS[self.format]:
                src = state_dict.get(prefix + name)
                self.register_buffer(name, None if src is None else torch.empty_like(src, device=dev))
            src = state_dict[prefix + "values"]
            self.values = nn.Parameter(
                torch.empty_like(src, device=dev, dtype=self.values.dtype), requires_grad=self.values.requires_grad
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _keeps_layout(self, state_dict, prefix: str, extra: dict) -> bool:
        """Whether a (checked) state has this layer's layout: then its tensors are copied into
        this layer's, which keeps the parameter objects an optimiser or fully_shard holds."""
        if extra["format"] != self.format or tuple(extra["block"]) != self.block:
            return False
        for name in ("values", *_BUFFERS[self.format]):
            mine, theirs = getattr(self, name), state_dict.get(prefix + name)
            if (mine is None) != (theirs is None) or (mine is not None and mine.shape != theirs.shape):
                return False
        return True

    def _check_state(self, state_dict, prefix: str, extra: object) -> None:
        """Raise a clear error unless ``state_dict`` holds a valid SparseLinear state of this
        layer's shape: with ``_extra_state``, in the layout it names; without, in this layer's
        layout, taking this layer's tensors where the state has none."""
        op = "SparseLinear.load_state_dict"
        shape = (self.out_features, self.in_features)
        names = ("values", *_BUFFERS[self.format])
        tensors = {n: state_dict.get(prefix + n, getattr(self, n)) for n in names}
        fmt, block = self.format, self.block
        if extra is not None:
            fmt = stored_format(op, prefix, extra, ("format", "block", "shape"))
            names = ("values", *_BUFFERS[fmt])
            block, tensors = stored_layout(op, "SparseLinear", prefix, extra, state_dict, shape, names)
        if fmt == "bitmask":
            check_bitmask(op, tensors["values"], tensors["bits"], shape, prefix)
            return
        if fmt == "2:4":
            sparse_format.check_sparse24(op, tensors["values"], tensors["meta"], tensors["mask"], shape, prefix)
            return
        index = [tensors[n] for n in _BLOCK_INDEX]
        sparse_format.check_block_sparse(op, tensors["values"], *index, tensors["mask"], shape, prefix)
        if tuple(tensors["values"].shape[1:]) != block:
            raise ValueError(
                f"{op}: {prefix}values must hold blocks of {block} ({prefix}_extra_state's block), "
                f"got shape {tuple(tensors['values'].shape)}"
            )


def stored_format(op: str, prefix: str, extra: object, keys: tuple[str, ...]) -> str:
    """The format a state's ``_extra_state`` names, once it is checked to be a dict of
    ``keys`` (the first being "format") naming one of FORMATS."""
    if not (isinstance(extra, dict) and set(keys) <= extra.keys()):
        listed = f"{', '.join(keys[:-1])} and {keys[-1]}"
        raise ValueError(f"{op}: {prefix}_extra_state must be a dict of {listed}, got {extra!r}")
    fmt = extra["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{op}: {prefix}_extra_state's format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return fmt


def stored_layout(op: str, layer: str, prefix: str, extra: dict, state_dict, shape, names: tuple[str, ...]):
    """(block, tensors) of a ``layer`` state whose ``_extra_state`` ``extra`` names its
    format: the block it names and the state's tensors ``names``, once the state is
    checked to be of this layer's ``shape`` and to hold every tensor but the optional mask."""
    block = sparse_format.check_block(f"{op}: {prefix}_extra_state", extra["block"])
    stored = sparse_format.check_shape(f"{op}: {prefix}_extra_state", extra["shape"])
    if stored != shape:
        raise ValueError(
            f"size mismatch for {prefix}values: copying a {layer} of (out_features, "
            f"in_features) {stored} from checkpoint, the shape in current model is {shape}"
        )
    tensors = {n: state_dict.get(prefix + n) for n in names}
    for name in names:
        if name != "mask" and tensors[name] is None:  # the mask is optional
            raise ValueError(f"{op}: {prefix}{name} is missing from a {extra['format']!r} {layer} state")
    return block, tensors


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter of a module under ``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
