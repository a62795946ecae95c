"""Sparse-masked matrix products for pruned weights: ``masked_matmul(x, weight, bias)``.

Two storages of a pruned weight W (out_features x in_features) with mask M:

* :class:`BlockSparseWeight`: only the kept (BN x BK) blocks (values + block indices, in
  row order for the forward and column order for ``dx``), plus an optional element mask
  inside kept blocks so unstructured masks also work. At 50% block sparsity it holds about
  half the dense weight.
* :class:`Sparse24Weight`: a 2:4 weight (at most 2 kept values in every 4 consecutive
  input columns) as kept values (half the columns) + 2-bit positions: 9/16 of dense fp16.
  On CUDA, when :func:`semi_structured_reason` allows it, the product runs on PyTorch's
  semi-structured sparse kernels (cuSPARSELt or CUTLASS) instead of memkern's op.

Reads top to bottom: implementations -> backend tables -> operators (schema, fake,
autograd) -> weight containers -> PyTorch's semi-structured path for 2:4 -> public function.
The containers' structure checks (untrusted tensors) are in :mod:`memkern.ops.sparse_format`.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch

from memkern import _autocast, _validate, backends, reference
from memkern.ops import sparse_format
from memkern.ops.sparse_format import BLOCK_SIZES
from memkern.ops.sparse_format import check_block as _check_block
from memkern.ops.sparse_format import check_mask as _check_mask
from memkern.ops.sparse_format import kept_positions as _kept_positions

# The C++ block-sparse kernels also take float64 (gradcheck on the CPU path); the public
# function accepts the float dtypes only.
_CPP_DTYPES = (*_validate.FLOAT_DTYPES, torch.float64)

def row_panel_layout(values: torch.Tensor) -> torch.Tensor:
    """``values`` (nnzb, BN, BK) laid out in memory as (BN, nnzb, BK): the kept blocks of a
    block row, being consecutive, then form one (BN, kept * BK) matrix with unit column
    stride, which the C++ kernel hands to BLAS as is (no packing per call)."""
    return values.permute(1, 0, 2).contiguous().permute(1, 0, 2)


# -- implementations: block-sparse product -----------------------------------------------
_fwd = backends.op_table("block_sparse_matmul")
_bwd = backends.op_table("block_sparse_matmul_backward")


@_fwd.register("torch")
def _bsmm_torch(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    return reference.block_sparse_matmul(x, values, crow, col, n_out, bias)


@_fwd.register("cpp", dtypes=_CPP_DTYPES)
def _bsmm_cpp(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    return torch.ops.memkern.block_sparse_matmul_kernel(x, values, crow, col, n_out, bias)


@_fwd.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _bsmm_triton(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    from memkern.kernels.sparse import block_sparse_matmul as launch

    return launch(x, values, crow, col, n_out, bias)


@_bwd.register("torch")
def _bsmm_bwd_torch(grad, x, values, crow, col, ccol, csc_row, csc_block):
    # Dense reference of both gradients; dW is read back only at the kept blocks.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_out, k = grad.shape[1], x.shape[1]
    nnzb, bn, bk = values.shape
    w = reference.block_sparse_to_dense(values.to(acc), crow, col, n_out, k)
    dx = (grad.to(acc) @ w).to(x.dtype)
    dw = grad.to(acc).t() @ x.to(acc)
    n_br, n_bc = -(-n_out // bn), -(-k // bk)
    padded = dw.new_zeros(n_br * bn, n_bc * bk)
    padded[:n_out, :k] = dw
    grid = padded.reshape(n_br, bn, n_bc, bk).permute(0, 2, 1, 3)
    rows = torch.repeat_interleave(torch.arange(n_br, device=crow.device), crow.diff())
    return dx, row_panel_layout(grid[rows, col].to(values.dtype))


@_bwd.register("cpp", dtypes=_CPP_DTYPES)
def _bsmm_bwd_cpp(grad, x, values, crow, col, ccol, csc_row, csc_block):
    return torch.ops.memkern.block_sparse_matmul_backward_kernel(grad, x, values, crow, col, ccol, csc_row, csc_block)


@_bwd.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _bsmm_bwd_triton(grad, x, values, crow, col, ccol, csc_row, csc_block):
    from memkern.kernels.sparse import block_sparse_matmul_backward as launch

    return launch(grad, x, values, crow, col, ccol, csc_row, csc_block)


# -- implementations: 2:4 compress / decompress / product -------------------------------
_compress = backends.op_table("sparse24_compress")
_decompress = backends.op_table("sparse24_decompress")
_s24 = backends.op_table("sparse24_matmul")


@_compress.register("torch")
def _compress_torch(weight, mask):
    return reference.sparse24_compress(weight, mask)


@_compress.register("cpp", dtypes=_validate.FLOAT_DTYPES)
@_compress.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _compress_compiled(weight, mask):
    return torch.ops.memkern.sparse24_compress_kernel(weight, mask)


@_decompress.register("torch")
def _decompress_torch(values, meta, cols):
    return reference.sparse24_decompress(values, meta, cols)


@_decompress.register("cpp", dtypes=_validate.FLOAT_DTYPES)
@_decompress.register("cuda", dtypes=_validate.FLOAT_DTYPES)
def _decompress_compiled(values, meta, cols):
    return torch.ops.memkern.sparse24_decompress_kernel(values, meta, cols)


@_decompress.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _decompress_triton(values, meta, cols):
    from memkern.kernels.sparse import sparse24_decompress as launch

    return launch(values, meta, cols)


@_s24.register("torch")
def _s24_torch(x, values, meta, bias):
    return reference.sparse24_matmul(x, values, meta, bias)


def _s24_dense(x, values, meta, bias):
    # Expand once with the compiled kernel, then one dense product: on the CPU this saves
    # memory (the weight lives compressed) but not time; fp16/bf16 accumulate in fp32.
    w = torch.ops.memkern.sparse24_decompress_kernel(values, meta, x.shape[1])
    if x.device.type == "cpu":
        y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        return y.to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


_s24.register("cpp", dtypes=_validate.FLOAT_DTYPES)(_s24_dense)
_s24.register("cuda", dtypes=_validate.FLOAT_DTYPES)(_s24_dense)


@_s24.register("triton", dtypes=_validate.FLOAT_DTYPES)
def _s24_triton(x, values, meta, bias):
    from memkern.kernels.sparse import sparse24_matmul as launch

    return launch(x, values.contiguous(), meta.contiguous(), bias)


# -- operators -----------------------------------------------------------------------------
@torch.library.custom_op("memkern::block_sparse_matmul", mutates_args=())
def _bsmm_op(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, ccol: torch.Tensor,
             csc_row: torch.Tensor, csc_block: torch.Tensor, n_out: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _fwd(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias)


@_bsmm_op.register_fake
def _bsmm_fake(x, values, crow, col, ccol, csc_row, csc_block, n_out, bias):
    return x.new_empty((x.shape[0], n_out))


@torch.library.custom_op("memkern::block_sparse_matmul_backward", mutates_args=())
def _bsmm_bwd_op(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                 ccol: torch.Tensor, csc_row: torch.Tensor, csc_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(grad, x, values, crow, col, ccol, csc_row, csc_block)


@_bsmm_bwd_op.register_fake
def _bsmm_bwd_fake(grad, x, values, crow, col, ccol, csc_row, csc_block):
    return x.new_empty(x.shape), row_panel_layout(values.new_empty(values.shape))


def _bsmm_setup(ctx, inputs, output):
    x, values, crow, col, ccol, csc_row, csc_block, _n_out, bias = inputs
    ctx.save_for_backward(x, values, crow, col, ccol, csc_row, csc_block)
    ctx.has_bias = bias is not None


def _bsmm_backward(ctx, grad):
    x, values, crow, col, ccol, csc_row, csc_block = ctx.saved_tensors
    dx, dv = _bsmm_bwd_op(grad.contiguous(), x, values, crow, col, ccol, csc_row, csc_block)
    db = grad.float().sum(0).to(grad.dtype) if ctx.has_bias else None
    return dx, dv, None, None, None, None, None, None, db


backends.register_autograd(_bsmm_op, _bsmm_backward, setup_context=_bsmm_setup)


@torch.library.custom_op("memkern::sparse24_compress", mutates_args=())
def _compress_op(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _compress(weight, mask)


@_compress_op.register_fake
def _compress_fake(weight, mask):
    rows, cols = weight.shape
    return weight.new_empty((rows, cols // 2)), weight.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("memkern::sparse24_decompress", mutates_args=())
def _decompress_op(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    return _decompress(values, meta, cols)


@_decompress_op.register_fake
def _decompress_fake(values, meta, cols):
    return values.new_empty((values.shape[0], cols))


@torch.library.custom_op("memkern::sparse24_matmul", mutates_args=())
def _s24_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _s24(x, values, meta, bias)


@_s24_op.register_fake
def _s24_fake(x, values, meta, bias):
    return x.new_empty((x.shape[0], values.shape[0]))


def _s24_setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _s24_backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    cols = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = _decompress_op(values, meta, cols)
    dx = (grad.to(acc) @ w.to(acc)).to(x.dtype)
    # dW only at the two slots of each group: positions outside the 2:4 pattern have no
    # storage, so they cannot be revived by any optimiser.
    dw = (grad.to(acc).t() @ x.to(acc)).reshape(values.shape[0], cols // 4, 4)
    dv = torch.gather(dw, 2, _kept_positions(meta, cols)).reshape(values.shape).to(values.dtype)
    db = grad.to(acc).sum(0).to(grad.dtype) if ctx.has_bias else None
    return dx, dv, None, db


backends.register_autograd(_s24_op, _s24_backward, setup_context=_s24_setup)
# Autocast: the products take x, the kept values and bias in the autocast dtype, as
# torch.nn.functional.linear would; the rest runs as called.
for _name in ("block_sparse_matmul", "sparse24_matmul"):
    _autocast.register(_name, cast=("x", "values", "bias"))
for _name in ("block_sparse_matmul_backward", "sparse24_compress", "sparse24_decompress"):
    _autocast.register(_name)


# -- weight containers ---------------------------------------------------------------------
class _PrunedWeight:
    """What both storages share: stored ``values`` with an optional element ``mask``."""

    values: torch.Tensor
    mask: torch.Tensor | None

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def effective_values(self) -> torch.Tensor:
        """``values`` with the element mask applied (differentiable in ``values``): a pruned
        position gets no gradient and counts as zero whatever ``values`` holds there."""
        return self.values if self.mask is None else self.values * self.mask


@dataclass
class BlockSparseWeight(_PrunedWeight):
    """A pruned weight stored as its kept (BN x BK) blocks.

    Attributes:
        values: ``(nnzb, BN, BK)`` kept blocks in block-row order, zero-padded where a
            block hangs over the matrix edge; float32, float16 or bfloat16. Stored in
            :func:`row_panel_layout` (any layout is accepted; others cost a copy per call).
        crow: ``(ceil(out/BN) + 1,)`` int64: block row ``r`` holds blocks ``crow[r]:crow[r+1]``.
        col: ``(nnzb,)`` int64 block column of each block.
        ccol, csc_row, csc_block: ``(ceil(in/BK) + 1,)``, ``(nnzb,)``, ``(nnzb,)`` int64: the
            same blocks by block column (pointer, block row, index into ``values``).
        mask: ``(nnzb, BN, BK)`` bool element mask inside kept blocks, or None when every
            element of a kept block is kept.
        shape: ``(out_features, in_features)``.

    The structure is checked at construction (a clear error instead of kernels reading out
    of bounds) and again by :func:`masked_matmul` once a tensor was replaced or an index
    tensor changed in place; see :meth:`check`.
    """

    values: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    ccol: torch.Tensor
    csc_row: torch.Tensor
    csc_block: torch.Tensor
    mask: torch.Tensor | None
    shape: tuple[int, int]
    _checked: "sparse_format.Checked | None" = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self, op: str = "BlockSparseWeight", prefix: str = "") -> None:
        """Raise a clear error unless the tensors form a valid structure of ``shape``
        (:func:`memkern.ops.sparse_format.check_block_sparse`). Free after a passed check
        until a tensor is replaced or an index tensor is changed in place."""
        index = (self.crow, self.col, self.ccol, self.csc_row, self.csc_block)
        self._checked = sparse_format.check_once(
            self._checked, index, (self.values, self.mask), self.shape,
            lambda: sparse_format.check_block_sparse(op, self.values, *index, self.mask, self.shape, prefix))

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def block_density(self) -> float:
        """Kept blocks / all blocks."""
        bn, bk = self.block
        total = -(-self.shape[0] // bn) * -(-self.shape[1] // bk)
        return self.values.shape[0] / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes held: values, indices and the element mask if any."""
        ts = [self.values, self.crow, self.col, self.ccol, self.csc_row, self.csc_block]
        if self.mask is not None:
            ts.append(self.mask)
        return sum(t.numel() * t.element_size() for t in ts)

    @staticmethod
    def index(block_rows: torch.Tensor, block_cols: torch.Tensor, n_block_rows: int,
              n_block_cols: int) -> tuple[torch.Tensor, ...]:
        """(crow, col, ccol, csc_row, csc_block) of blocks listed in block-row order."""
        sparse_format.check_block_list("BlockSparseWeight.index", block_rows, block_cols, n_block_rows, n_block_cols)
        dev = block_rows.device
        crow = torch.zeros(n_block_rows + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.bincount(block_rows, minlength=n_block_rows).cumsum(0)
        csc_block = torch.argsort(block_cols * n_block_rows + block_rows)
        ccol = torch.zeros(n_block_cols + 1, dtype=torch.int64, device=dev)
        ccol[1:] = torch.bincount(block_cols, minlength=n_block_cols).cumsum(0)
        return crow, block_cols.clone(), ccol, block_rows[csc_block].contiguous(), csc_block

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   block: tuple[int, int] = (64, 64)) -> "BlockSparseWeight":
        """Keep every block of ``weight`` (out, in) where ``mask`` (bool, same shape) has a
        True; elements inside kept blocks with mask False are zeroed and masked. Without a
        mask, blocks holding any nonzero are kept."""
        op = "BlockSparseWeight.from_dense"
        _validate.check_tensor(op, "weight", weight)
        _validate.check_dim(op, "weight", weight, 2)
        _validate.check_dtype(op, "weight", weight, _validate.FLOAT_DTYPES)
        bn, bk = _check_block(op, block)
        if mask is None:
            mask = weight != 0
        _check_mask(op, weight, mask)
        if mask.is_meta:
            raise ValueError(f"{op}: which blocks a mask keeps depends on its values, and a meta tensor has none; "
                             "keeping_every_block builds a meta weight (to load with assign=True)")
        n, k = weight.shape
        nbr, nbc = -(-n // bn), -(-k // bk)
        padded_mask = torch.zeros(nbr * bn, nbc * bk, dtype=torch.bool, device=weight.device)
        padded_mask[:n, :k] = mask
        padded_w = torch.zeros(nbr * bn, nbc * bk, dtype=weight.dtype, device=weight.device)
        padded_w[:n, :k] = weight.detach() * mask
        grid_mask = padded_mask.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)
        keep = grid_mask.any(dim=3).any(dim=2)
        rows, cols = keep.nonzero(as_tuple=True)
        values = row_panel_layout(padded_w.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)[rows, cols])
        block_mask = grid_mask[rows, cols].contiguous()
        # The element mask is needed only if a kept block has a pruned in-bounds element.
        inside = torch.zeros(nbr * bn, nbc * bk, dtype=torch.bool, device=weight.device)
        inside[:n, :k] = True
        inside_blocks = inside.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)[rows, cols]
        need_mask = bool((inside_blocks & ~block_mask).any())
        return cls(values, *cls.index(rows, cols, nbr, nbc), block_mask if need_mask else None, (n, k))

    @classmethod
    def keeping_every_block(cls, weight: torch.Tensor, block: tuple[int, int] = (64, 64)) -> "BlockSparseWeight":
        """``weight`` (out, in) with every block kept and no element mask. It reads no
        values, so it also builds a weight on the meta device."""
        op = "BlockSparseWeight.keeping_every_block"
        _validate.check_tensor(op, "weight", weight)
        _validate.check_dim(op, "weight", weight, 2)
        _validate.check_dtype(op, "weight", weight, _validate.FLOAT_DTYPES)
        bn, bk = _check_block(op, block)
        n, k = weight.shape
        nbr, nbc = -(-n // bn), -(-k // bk)
        padded = weight.detach().new_zeros(nbr * bn, nbc * bk)
        padded[:n, :k] = weight.detach()
        values = row_panel_layout(padded.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3).reshape(nbr * nbc, bn, bk))
        return cls(values, *sparse_format.every_block_index(nbr, nbc, weight.device), None, (n, k))

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight ``W * M``."""
        return reference.block_sparse_to_dense(self.effective_values(), self.crow, self.col, *self.shape)


@dataclass
class Sparse24Weight(_PrunedWeight):
    """A 2:4 pruned weight: kept values + 2-bit positions.

    Attributes:
        values: ``(out, in/2)`` kept values of each group of 4 input columns (columns 2g,
            2g+1 belong to group g, in column order); float32, float16 or bfloat16.
        meta: ``(out, ceil(in/8))`` uint8: group g's positions ``i0 | (i1 << 2)`` (i0 < i1)
            in byte ``g // 2`` at bit ``4 * (g % 2)``.
        shape: ``(out_features, in_features)``, in_features a multiple of 4.
        mask: ``(out, in/2)`` bool: which slots hold kept weights, or None when every slot
            does (every group keeps 2, as n:m masks do).

    The two slots of every group are the trainable positions: a group whose mask keeps
    fewer than 2 values gets its free slot(s) at the lowest unused position(s), holding 0,
    and masked, so they get no gradient and stay zero under any optimiser. The structure
    is checked at construction and by :func:`masked_matmul` after a change (:meth:`check`).

    On CUDA, :func:`masked_matmul` may keep a PyTorch semi-structured copy of the weight
    (:func:`semi_structured_reason` says when) on this object. It is rebuilt when ``values``
    or ``meta`` is replaced or changed in place (an optimiser step), and it is not copied
    by ``copy.deepcopy`` or pickling.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]
    mask: torch.Tensor | None = None
    # PyTorch semi-structured copy of this weight for the CUDA inference path, built on
    # first use; see _semi_structured_weight.
    _semi_structured: "_SemiStructuredCache | None" = field(default=None, init=False, repr=False, compare=False)
    _checked: "sparse_format.Checked | None" = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self, op: str = "Sparse24Weight", prefix: str = "") -> None:
        """Raise a clear error unless the tensors form a valid 2:4 weight of ``shape``
        (:func:`memkern.ops.sparse_format.check_sparse24`). Free after a passed check until
        a tensor is replaced or ``meta`` is changed in place."""
        self._checked = sparse_format.check_once(
            self._checked, (self.meta,), (self.values, self.mask), self.shape,
            lambda: sparse_format.check_sparse24(op, self.values, self.meta, self.mask, self.shape, prefix))

    @property
    def nbytes(self) -> int:
        """Bytes of values, meta and the slot mask if any (a cached semi-structured copy, on
        CUDA, is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.mask) if t is not None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "Sparse24Weight":
        """Compress ``weight * mask`` (out, in); ``mask`` (bool) keeps at most 2 of every 4
        consecutive input columns. Without a mask the nonzeros of ``weight`` are kept."""
        op = "Sparse24Weight.from_dense"
        _validate.check_tensor(op, "weight", weight)
        _validate.check_dim(op, "weight", weight, 2)
        _validate.check_dtype(op, "weight", weight, _validate.FLOAT_DTYPES)
        n, k = weight.shape
        if k % 4:
            raise ValueError(f"{op}: 2:4 needs in_features divisible by 4, got weight shape {tuple(weight.shape)}")
        if mask is None:
            mask = weight != 0
        _check_mask(op, weight, mask)
        per_group = mask.reshape(n, k // 4, 4).sum(-1)
        if n and k and not weight.is_meta and int(per_group.max()) > 2:
            r, g = (per_group > 2).nonzero()[0].tolist()
            raise ValueError(f"{op}: 2:4 keeps at most 2 of every 4 input columns; row {r}, columns "
                             f"{4 * g}..{4 * g + 3} keep {int(per_group[r, g])}")
        values, meta = _compress_op(weight.detach().contiguous(), mask.contiguous())
        if weight.is_meta:  # no values, so no free slots to find
            return cls(values, meta, (n, k))
        slots = torch.gather(mask.reshape(n, k // 4, 4), 2, _kept_positions(meta, k)).reshape(n, k // 2)
        return cls(values, meta, (n, k), None if bool(slots.all()) else slots)

    def to_dense(self) -> torch.Tensor:
        return _decompress_op(self.effective_values(), self.meta, self.shape[1])


# -- 2:4 on CUDA: PyTorch's semi-structured sparse kernels ---------------------------------
# Sparse tensor cores run 2:4 products natively; PyTorch reaches them through
# torch.sparse.SparseSemiStructuredTensor (cuSPARSELt, or CUTLASS). memkern's own CUDA path
# expands the weight and runs a dense product, which saves memory but not time.
#
# The semi-structured product serves the forward output and dx only, never the gradient of
# weight.values: PyTorch's tensor built from a dense weight has no gradient of its own, and
# the memkern op's backward already gives the kept values' gradient. So a call that needs
# that gradient (values requires grad with grad mode on: training) keeps the memkern op,
# and frozen or inference use takes the semi-structured path. It sits outside the _s24
# backend table on purpose: the custom op sees neither the Sparse24Weight (where the copy
# is cached) nor whether grad mode is on, and its fake/opcheck/compile behaviour stays as is.
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
_SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)  # sparse tensor cores arrived with Ampere


class _SemiStructuredCache:
    """One weight's semi-structured copy (or why building it failed) and the state of
    ``values`` / ``meta`` it was built from."""

    __slots__ = ("values_ref", "meta_ref", "key", "tensor", "failure")

    def __init__(self, weight: "Sparse24Weight | None" = None, tensor=None, failure: str | None = None) -> None:
        self.values_ref = None if weight is None else weakref.ref(weight.values)
        self.meta_ref = None if weight is None else weakref.ref(weight.meta)
        self.key = None if weight is None else _semi_structured_key(weight)
        self.tensor = tensor
        self.failure = failure

    def matches(self, weight: "Sparse24Weight") -> bool:
        # Weak references pin identity: a tensor allocated later at the same address, with
        # the same id and version, would otherwise pass for the one the copy was built from.
        return (self.values_ref is not None and self.values_ref() is weight.values
                and self.meta_ref() is weight.meta and self.key == _semi_structured_key(weight))

    # A copy of the weight (deepcopy, pickle) starts without the device-side copy: it is
    # cheap to rebuild, and a SparseSemiStructuredTensor need not survive either.
    def __deepcopy__(self, memo) -> "_SemiStructuredCache":
        return _SemiStructuredCache()

    def __reduce__(self):
        return (_SemiStructuredCache, ())


def _semi_structured_key(weight: "Sparse24Weight") -> tuple:
    """What must stay equal for a built copy to still be this weight: in-place changes
    (optimiser steps, ``copy_``) bump ``_version``; ``.data`` swaps and ``.to()`` change the
    storage, dtype or device."""
    v, m, s = weight.values, weight.meta, weight.mask
    return (v._version, v.data_ptr(), v.dtype, v.device, m._version, m.data_ptr(), tuple(weight.shape),
            None if s is None else (s._version, s.data_ptr()))


def _semi_structured_class():
    """The SparseSemiStructuredTensor subclass to build, or None if this torch has none.

    Like ``to_sparse_semi_structured``, cuSPARSELt unless
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set; unlike it, CUTLASS when this
    torch was built without cuSPARSELt (where ``to_sparse_semi_structured`` would fail)."""
    sparse = torch.sparse
    base = getattr(sparse, "SparseSemiStructuredTensor", None)
    cutlass = getattr(sparse, "SparseSemiStructuredTensorCUTLASS", None)
    cusparselt = getattr(sparse, "SparseSemiStructuredTensorCUSPARSELT", None)
    if base is None or not hasattr(sparse, "to_sparse_semi_structured"):
        return None
    cusparselt_backend = getattr(torch.backends, "cusparselt", None)
    cusparselt_ok = cusparselt is not None and cusparselt_backend is not None and cusparselt_backend.is_available()
    if cusparselt_ok and not getattr(base, "_FORCE_CUTLASS", False):
        return cusparselt
    return cutlass


def _semi_structured_constraints(cls, dtype: torch.dtype):
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    return table.get(dtype)


def semi_structured_reason(x: torch.Tensor, weight: "BlockSparseWeight | Sparse24Weight") -> str | None:
    """Why ``masked_matmul(x, weight)`` does not run on PyTorch's semi-structured sparse
    kernels; None when it does. The one place that decides.

    It does when: ``weight`` is a :class:`Sparse24Weight`; x is a non-empty CUDA
    float16/bfloat16 tensor on a device of compute capability 8.0 or newer; no gradient
    of ``weight.values`` is needed (``values.requires_grad`` is False or grad mode is off;
    gradients of x and bias are fine); no memkern backend is forced; the call is not being
    traced by ``torch.compile``; this torch has ``torch.sparse.to_sparse_semi_structured``;
    the weight's shape is a multiple of (and at least) the kernel's minimum tile
    (in torch 2.13, fp16/bf16: cuSPARSELt 16 x 16, CUTLASS 32 x 64); and building the copy has not
    already failed for this weight.
    """
    if not isinstance(weight, Sparse24Weight):
        return "only 2:4 (Sparse24Weight) weights have a semi-structured form"
    # Checked before anything else: tracing would build a copy from fake tensors, and the
    # checks below read process state that torch.compile does not trace.
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return "traced by torch.compile: the memkern op is what gets compiled"
    if x.dtype not in _SEMI_STRUCTURED_DTYPES:
        return f"dtype {_validate.dtype_name(x.dtype)} not supported (supports bfloat16, float16)"
    # Before anything that calls torch.cuda, which would initialise CUDA for CPU tensors.
    if x.device.type != "cuda":
        return f"runs on CUDA tensors only, got {x.device.type}"
    if weight.values.requires_grad and torch.is_grad_enabled():
        return "weight.values needs a gradient: the memkern op computes it"
    forced = backends.forced_backend()
    if forced is not None:
        return f"backend {forced!r} is forced"
    cls = _semi_structured_class()
    if cls is None:
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    constraints = _semi_structured_constraints(cls, x.dtype)
    if constraints is None:
        return f"{cls.__name__} does not take {_validate.dtype_name(x.dtype)}"
    n, k = weight.shape
    rows, cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if n < rows or n % rows or k < cols or k % cols:
        return f"weight shape ({n}, {k}) is not a positive multiple of ({rows}, {cols}) ({cls.__name__})"
    if x.numel() == 0:
        return "empty batch"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < _SEMI_STRUCTURED_MIN_CAPABILITY:
        return f"needs compute capability >= 8.0, device has {capability[0]}.{capability[1]}"
    cache = weight._semi_structured
    if cache is not None and cache.failure is not None and cache.matches(weight):
        return cache.failure
    return None


def _build_semi_structured(dense: torch.Tensor):
    return _semi_structured_class().from_dense(dense)


def _semi_structured_weight(weight: Sparse24Weight):
    """The weight's semi-structured copy, built once per state of values/meta; None if
    building failed (the reason is kept, so it is not retried until the weight changes)."""
    cache = weight._semi_structured
    if cache is not None and cache.matches(weight):
        return cache.tensor
    weight._semi_structured = None  # release the stale copy before building the new one
    with torch.no_grad():
        dense = weight.to_dense().contiguous()
        try:
            tensor, failure = _build_semi_structured(dense), None
        except RuntimeError as exc:  # unimplemented-kernel errors are RuntimeErrors too
            # The predicate cannot see every build limit (a torch built without the
            # kernels for this architecture, say); the memkern op still gives the answer.
            tensor, failure = None, f"building the semi-structured weight failed: {exc}"
            warnings.warn(f"masked_matmul: {failure}; using the memkern 2:4 op", RuntimeWarning, stacklevel=3)
    weight._semi_structured = _SemiStructuredCache(weight, tensor, failure)
    return tensor


def _semi_structured_linear(x: torch.Tensor, w_semi, bias: torch.Tensor | None) -> torch.Tensor:
    # Some torch releases require the dense operand's rows to be a multiple of the kernel
    # tile and do not pad it themselves; padding here costs a copy only for ragged batches.
    constraints = _semi_structured_constraints(type(w_semi), x.dtype)
    tile = constraints.dense_min_rows if constraints is not None else 1
    rows = x.shape[0]
    pad = -rows % tile
    x = x.contiguous()
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    y = torch.nn.functional.linear(x, w_semi, bias)
    return y[:rows] if pad else y


class _SemiStructuredProduct(torch.autograd.Function):
    """Forward on the semi-structured kernels; dx and dbias as the memkern op computes
    them. Never asked for the gradient of values (semi_structured_reason sees to that)."""

    @staticmethod
    def forward(ctx, x, bias, values, meta, boxed_w_semi):
        # The semi-structured tensor comes boxed in a tuple so autograd does not treat it
        # as an input tensor (it is a constant of this call, with no gradient).
        ctx.save_for_backward(values, meta)
        ctx.cols = x.shape[1]
        return _semi_structured_linear(x, boxed_w_semi[0], bias)

    @staticmethod
    def backward(ctx, grad):
        values, meta = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            # The semi-structured tensor has no transposed copy for grad @ W; the weight is
            # expanded once, as in the memkern op's backward, and accumulated in float32.
            w = _decompress_op(values.detach(), meta, ctx.cols)
            dx = (grad.float() @ w.float()).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            db = grad.float().sum(0).to(grad.dtype)
        return dx, db, None, None, None


# -- public function -------------------------------------------------------------------------
def masked_matmul(x: torch.Tensor, weight: BlockSparseWeight | Sparse24Weight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (W * M)^T + bias`` for a pruned weight, visiting only kept blocks / values.

    Args:
        x: ``(..., in_features)`` float32, float16 or bfloat16, the weight's dtype and
            device, any strides (e.g. ``(N, K)`` or ``(B, T, K)``).
        weight: a :class:`BlockSparseWeight` or :class:`Sparse24Weight` of shape
            ``(out_features, in_features)``.
        bias: optional ``(out_features,)`` tensor of x's dtype.

    Returns:
        ``(..., out_features)`` tensor of x's dtype; products accumulate in float32.

    Differentiable in ``x``, ``weight.values`` and ``bias``. The weight gradient exists only
    for stored (kept) values, so pruned weights stay exactly zero under any optimiser.
    ``in_features`` may be 0: the output is then the bias (or zeros).

    NaN or inf in ``x`` propagates through every kept weight (including zeros inside kept
    blocks and 2:4 groups). Pruned blocks are skipped, so a non-finite x meeting only pruned
    blocks leaves the output finite on the block-skipping backends (cpp, triton), whereas the
    ``torch`` reference, a dense product with zeros, gives NaN there (NaN * 0).

    What runs for a :class:`Sparse24Weight`:

    * CPU: the memkern 2:4 op (C++: expand the weight, one dense product).
    * CUDA, when :func:`semi_structured_reason` returns None (fp16/bf16, compute
      capability >= 8.0, no gradient of ``weight.values`` wanted, no forced backend,
      supported shape, not under ``torch.compile``): PyTorch's semi-structured sparse
      kernels (cuSPARSELt, or CUTLASS) through ``F.linear`` on a
      ``SparseSemiStructuredTensor`` built once per weight state and cached on the weight.
      Gradients of x and bias are computed as by the memkern op. Accumulation follows
      PyTorch's kernels.
    * CUDA otherwise: the memkern 2:4 op (expand the weight with memkern's kernel, then one
      dense product); training always takes this path, since it gives the kept values'
      gradient. ``semi_structured_reason(x, weight)`` says why a call took it.
    """
    op = "masked_matmul"
    _validate.check_tensor(op, "x", x)
    if not isinstance(weight, (BlockSparseWeight, Sparse24Weight)):
        raise TypeError(f"{op}: weight must be a BlockSparseWeight or Sparse24Weight, got {type(weight).__name__}")
    weight.check(op, "weight.")  # again only if its tensors were replaced or its index changed in place
    _validate.check_dtype(op, "x", x, _validate.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be at least 1-D, got 0-D")
    n_out, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x's last dimension must be in_features={k}, got shape {tuple(x.shape)}")
    if _autocast.dtype_seen(x) != _autocast.dtype_seen(weight.values):  # autocast casts both
        raise TypeError(f"{op}: x must have the weight's dtype {weight.dtype}; got {x.dtype}")
    if bias is not None:
        _validate.check_tensor(op, "bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"{op}: bias must have shape ({n_out},), got {tuple(bias.shape)}")
        if _autocast.dtype_seen(bias) != _autocast.dtype_seen(x):
            raise TypeError(f"{op}: bias must have x's dtype {x.dtype}; got {bias.dtype}")
    _validate.check_same_device(op, x=x, weight=weight.values, bias=bias)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k)  # not -1: in_features may be 0
    if isinstance(weight, BlockSparseWeight):
        y = _bsmm_op(x2, weight.effective_values(), weight.crow, weight.col, weight.ccol, weight.csc_row,
                     weight.csc_block, n_out, bias)
    else:
        values = weight.effective_values()
        w_semi = _semi_structured_weight(weight) if semi_structured_reason(x2, weight) is None else None
        if w_semi is not None:
            y = _SemiStructuredProduct.apply(x2, bias, values, weight.meta, (w_semi,))
        else:
            cache = weight._semi_structured
            if cache is not None and cache.failure is None:
                # Not used on this call (training, a CPU copy, ...): free the device copy; a
                # remembered build failure stays, so the build is not retried every call.
                weight._semi_structured = None
            y = _s24_op(x2, values, weight.meta, bias)
    return y.reshape(*lead, n_out)
