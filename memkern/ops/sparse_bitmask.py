"""Unstructured sparse weights stored compressed: the kept values plus one bit per weight.

A ``(rows, cols)`` weight W with keep-mask M is stored as

* ``values``: 1-D, the kept values in row-major order (``M.sum()`` of them);
* ``bits``: ``(rows, ceil(cols / 8))`` uint8, bit ``b`` of byte ``k`` of row ``r`` is
  ``M[r, 8k + b]``; the padding bits past ``cols`` are 0.

At 50% sparsity that is 0.5 + 1/32 = 0.53 of a dense float32 weight (0.56 of float16),
whatever the mask looks like, where kept blocks with an element mask inside hold nearly the
whole weight. The product ``x @ W^T`` expands a tile of rows at a time into a small buffer
and multiplies it (C++), or expands a (64 x 32) tile of W in registers per step (Triton),
so the dense weight never exists in the forward pass; the backward
pass expands W once for ``dx`` and gathers ``dW`` at the kept positions, so pruned weights
get no gradient and stay pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memkern import _autocast, _validate, backends
from memkern.ops.sparse_weights import StoredValues
from memkern.ops._autograd import dense_matmul_grads, save_matmul_inputs

__all__ = ["BitmaskWeight", "bitmask_matmul", "pack_mask", "unpack_bits", "check_bitmask"]

_DTYPES = (*_validate.FLOAT_DTYPES, torch.float64)


# -- format ----------------------------------------------------------------------------------
def _bit_weights(device) -> torch.Tensor:
    return (2 ** torch.arange(8, device=device)).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``bits`` of a 2-D bool mask."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    return (padded.reshape(rows, -1, 8) * _bit_weights(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """The bool mask ``(rows, cols)`` that ``bits`` holds."""
    unpacked = (bits[..., None] & _bit_weights(bits.device)) != 0
    return unpacked.reshape(bits.shape[0], -1)[:, :cols]


def _popcount(bits: torch.Tensor) -> int:
    return int(unpack_bits(bits, bits.shape[1] * 8).sum())


def check_bitmask(op: str, values: object, bits: object, shape: tuple[int, int], prefix: str = "") -> None:
    """Raise a clear error unless ``values`` and ``bits`` form a bitmask weight of ``shape``:
    dtypes, sizes, one device, no padding bit set, and as many values as set bits."""
    rows, cols = shape
    _validate.check_tensor(op, f"{prefix}values", values)
    _validate.check_tensor(op, f"{prefix}bits", bits)
    _validate.check_dtype(op, f"{prefix}values", values, _DTYPES)
    _validate.check_dim(op, f"{prefix}values", values, 1)
    if bits.dtype != torch.uint8:
        raise TypeError(f"{op}: {prefix}bits must have dtype uint8; got {_validate.dtype_name(bits.dtype)}")
    expected = (rows, -(-cols // 8))
    if tuple(bits.shape) != expected:
        raise ValueError(f"{op}: {prefix}bits must have shape {expected} for {shape}, got {tuple(bits.shape)}")
    _validate.check_same_device(op, **{f"{prefix}values": values, f"{prefix}bits": bits})
    if values.is_meta or bits.is_meta:
        return
    if cols % 8 and rows and bool((bits[:, -1] >> (cols % 8)).any()):
        raise ValueError(f"{op}: {prefix}bits has bits set past column {cols} (padding must be 0)")
    kept = _popcount(bits)
    if kept != values.numel():
        raise ValueError(
            f"{op}: {prefix}bits keeps {kept} weights but {prefix}values holds {values.numel()}; they must be equal"
        )


@dataclass
class BitmaskWeight(StoredValues):
    """An unstructured pruned weight as kept ``values`` + ``bits`` (see the module doc).

    Attributes:
        values: ``(kept,)`` float32, float16, bfloat16 (or float64) kept values, row-major.
        bits: ``(out_features, ceil(in_features / 8))`` uint8 keep bits.
        shape: ``(out_features, in_features)``.

    Checked at construction (:func:`check_bitmask`); the C++ kernel checks the count again,
    so no call reads past ``values``.
    """

    values: torch.Tensor
    bits: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        check_bitmask("BitmaskWeight", self.values, self.bits, self.shape)

    @property
    def mask(self) -> torch.Tensor:
        """The bool keep-mask ``(out_features, in_features)``."""
        return unpack_bits(self.bits, self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.bits.numel()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor) -> BitmaskWeight:
        """The weight ``weight * mask``, storing only the kept values."""
        from memkern.ops.sparse_format import check_mask

        op = "BitmaskWeight.from_dense"
        _validate.check_tensor(op, "weight", weight)
        _validate.check_dim(op, "weight", weight, 2)
        check_mask(op, weight, mask)
        w = weight.detach()
        return cls(w[mask].contiguous(), pack_mask(mask), tuple(w.shape))

    @classmethod
    def keeping_every_weight(cls, weight: torch.Tensor) -> BitmaskWeight:
        """Every weight kept, built without reading ``weight``'s values (works on the meta device)."""
        rows, cols = weight.shape
        bits = pack_mask(torch.ones(rows, cols, dtype=torch.bool, device=weight.device))
        return cls(weight.detach().reshape(-1).clone(), bits, (rows, cols))

    def to_dense(self) -> torch.Tensor:
        """The dense ``W * M`` (differentiable in ``values``)."""
        return backends.call(bitmask_decompress_op, _decompress, self.values, self.bits, self.shape[1])


# -- implementations -------------------------------------------------------------------------
_decompress = backends.op_table("bitmask_decompress")
_matmul = backends.op_table("bitmask_matmul")


@_decompress.register("torch")
def _decompress_torch(values, bits, cols):
    mask = unpack_bits(bits, cols)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask_decompress: bits keep {int(mask.sum())} weights, values holds {values.numel()}")
    return values.new_zeros(mask.shape).masked_scatter_(mask, values)


@_decompress.register("cpp", dtypes=_DTYPES)
def _decompress_cpp(values, bits, cols):
    return torch.ops.memkern.bitmask_decompress_kernel(values, bits, cols)


@_decompress.register("triton", dtypes=_DTYPES)
def _decompress_triton(values, bits, cols):
    from memkern.kernels.sparse_bitmask import bitmask_decompress as launch

    return launch(values, bits, cols)


@_matmul.register("torch")
def _matmul_torch(x, values, bits, bias):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _decompress_torch(values, bits, x.shape[1])
    y = x.to(acc) @ w.to(acc).t()
    return (y if bias is None else y + bias.to(acc)).to(x.dtype)


@_matmul.register("cpp", dtypes=_DTYPES)
def _matmul_cpp(x, values, bits, bias):
    return torch.ops.memkern.bitmask_matmul_kernel(x, values, bits, bias)


@_matmul.register("triton", dtypes=_DTYPES)
def _matmul_triton(x, values, bits, bias):
    if x.dtype == torch.float64:
        # tl.dot has no float64 product on every target: expand with the Triton kernel,
        # then one float64 product (the dense weight exists for the call).
        w = _decompress_triton(values, bits, x.shape[1])
        return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    # The bits and kept values read a (64 x 32) tile at a time: no dense weight.
    from memkern.kernels.sparse_bitmask import bitmask_matmul as launch

    return launch(x, values, bits, bias)


# -- operators -------------------------------------------------------------------------------
@torch.library.custom_op("memkern::bitmask_decompress", mutates_args=())
def bitmask_decompress_op(values: torch.Tensor, bits: torch.Tensor, cols: int) -> torch.Tensor:
    return _decompress(values, bits, cols)


@bitmask_decompress_op.register_fake
def _decompress_fake(values, bits, cols):
    return values.new_empty((bits.shape[0], cols))


def _decompress_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.cols = inputs[2]


def _decompress_backward(ctx, grad):
    (bits,) = ctx.saved_tensors
    return grad[unpack_bits(bits, ctx.cols)], None, None


backends.register_autograd(bitmask_decompress_op, _decompress_backward, setup_context=_decompress_setup)


@torch.library.custom_op("memkern::bitmask_matmul", mutates_args=())
def bitmask_matmul_op(
    x: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _matmul(x, values, bits, bias)


@bitmask_matmul_op.register_fake
def _matmul_fake(x, values, bits, bias):
    return x.new_empty((x.shape[0], bits.shape[0]))


def _matmul_backward(ctx, grad):
    x, values, bits = ctx.saved_tensors
    w = bitmask_decompress_op(values, bits, x.shape[1])
    dx, dw, db = dense_matmul_grads(grad, x, w, ctx.has_bias)
    # dW only at kept positions: pruned weights have no storage, so nothing revives them.
    dv = dw[unpack_bits(bits, x.shape[1])].to(values.dtype)
    return dx, dv, None, db


backends.register_autograd(bitmask_matmul_op, _matmul_backward, setup_context=save_matmul_inputs)
_autocast.register("bitmask_matmul", cast=("x", "values", "bias"))
_autocast.register("bitmask_decompress")


# -- public function -------------------------------------------------------------------------
def bitmask_matmul(x: torch.Tensor, weight: BitmaskWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (W * M)^T + bias`` for a :class:`BitmaskWeight`; ``x`` is ``(..., in_features)``
    of the weight's dtype and device. Differentiable in ``x``, ``weight.values`` and ``bias``."""
    op = "bitmask_matmul"
    _validate.check_tensor(op, "x", x)
    if not isinstance(weight, BitmaskWeight):
        raise TypeError(f"{op}: weight must be a BitmaskWeight, got {type(weight).__name__}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"{op}: x must have in_features={in_f} as its last dimension, got shape {tuple(x.shape)}")
    _validate.check_dtype(op, "x", x, _DTYPES)
    if _autocast.dtype_seen(x) != _autocast.dtype_seen(weight.values):  # autocast casts both
        raise TypeError(
            f"{op}: x must have the weight's dtype {_validate.dtype_name(weight.dtype)}; "
            f"got {_validate.dtype_name(x.dtype)}"
        )
    _validate.check_same_device(op, x=x, values=weight.values, bias=bias)
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{op}: bias must have shape ({out_f},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), in_f)  # not -1: in_features may be 0
    y = backends.call(bitmask_matmul_op, _matmul, x2, weight.values, weight.bits, bias)
    return y.reshape(*lead, out_f)
