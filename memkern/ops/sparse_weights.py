"""The two storages of a pruned weight that masked_matmul takes: BlockSparseWeight (kept
blocks) and Sparse24Weight (2:4). Their structure is checked where it enters
(memkern.ops.sparse_format): built from raw tensors, an index, or a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memkern import _validate, reference
from memkern.ops import sparse_format
from memkern.ops.sparse_ops import sparse24_compress_op, sparse24_decompress_op


# -- weight containers ---------------------------------------------------------------------
class StoredValues:
    """A pruned weight kept as ``values`` plus index tensors (also memkern.ops.sparse_bitmask's
    BitmaskWeight): its dtype and device are those of the values."""

    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device


class _PrunedWeight(StoredValues):
    """What both storages share: stored ``values`` with an optional element ``mask``."""

    mask: torch.Tensor | None

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
    _checked: sparse_format.Checked | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self, op: str = "BlockSparseWeight", prefix: str = "") -> None:
        """Raise a clear error unless the tensors form a valid structure of ``shape``
        (:func:`memkern.ops.sparse_format.check_block_sparse`). Free after a passed check
        until a tensor is replaced or an index tensor is changed in place."""
        index = (self.crow, self.col, self.ccol, self.csc_row, self.csc_block)
        self._checked = sparse_format.check_once(
            self._checked,
            index,
            (self.values, self.mask),
            self.shape,
            lambda: sparse_format.check_block_sparse(op, self.values, *index, self.mask, self.shape, prefix),
        )

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
    def index(
        block_rows: torch.Tensor, block_cols: torch.Tensor, n_block_rows: int, n_block_cols: int
    ) -> tuple[torch.Tensor, ...]:
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
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor | None = None, block: tuple[int, int] = (64, 64)
    ) -> BlockSparseWeight:
        """Keep every block of ``weight`` (out, in) where ``mask`` (bool, same shape) has a
        True; elements inside kept blocks with mask False are zeroed and masked. Without a
        mask, blocks holding any nonzero are kept."""
        op = "BlockSparseWeight.from_dense"
        _validate.check_tensor(op, "weight", weight)
        _validate.check_dim(op, "weight", weight, 2)
        _validate.check_dtype(op, "weight", weight, _validate.FLOAT_DTYPES)
        bn, bk = sparse_format.check_block(op, block)
        if mask is None:
            mask = weight != 0
        sparse_format.check_mask(op, weight, mask)
        if mask.is_meta:
            raise ValueError(
                f"{op}: which blocks a mask keeps depends on its values, and a meta tensor has none; "
                "keeping_every_block builds a meta weight (to load with assign=True)"
            )
        n, k = weight.shape
        nbr, nbc = -(-n // bn), -(-k // bk)
        padded_mask = torch.zeros(nbr * bn, nbc * bk, dtype=torch.bool, device=weight.device)
        padded_mask[:n, :k] = mask
        padded_w = torch.zeros(nbr * bn, nbc * bk, dtype=weight.dtype, device=weight.device)
        padded_w[:n, :k] = weight.detach() * mask
        grid_mask = padded_mask.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)
        keep = grid_mask.any(dim=3).any(dim=2)
        rows, cols = keep.nonzero(as_tuple=True)
        values = sparse_format.row_panel_layout(padded_w.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)[rows, cols])
        block_mask = grid_mask[rows, cols].contiguous()
        # The element mask is needed only if a kept block has a pruned in-bounds element.
        inside = torch.zeros(nbr * bn, nbc * bk, dtype=torch.bool, device=weight.device)
        inside[:n, :k] = True
        inside_blocks = inside.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3)[rows, cols]
        need_mask = bool((inside_blocks & ~block_mask).any())
        return cls(values, *cls.index(rows, cols, nbr, nbc), block_mask if need_mask else None, (n, k))

    @classmethod
    def keeping_every_block(cls, weight: torch.Tensor, block: tuple[int, int] = (64, 64)) -> BlockSparseWeight:
        """``weight`` (out, in) with every block kept and no element mask. It reads no
        values, so it also builds a weight on the meta device."""
        op = "BlockSparseWeight.keeping_every_block"
        _validate.check_tensor(op, "weight", weight)
        _validate.check_dim(op, "weight", weight, 2)
        _validate.check_dtype(op, "weight", weight, _validate.FLOAT_DTYPES)
        bn, bk = sparse_format.check_block(op, block)
        n, k = weight.shape
        nbr, nbc = -(-n // bn), -(-k // bk)
        padded = weight.detach().new_zeros(nbr * bn, nbc * bk)
        padded[:n, :k] = weight.detach()
        values = sparse_format.row_panel_layout(
            padded.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3).reshape(nbr * nbc, bn, bk)
        )
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
    # PyTorch's semi-structured copy of this weight for the CUDA inference path, built on
    # first use (memkern.ops.semi_structured.SemiStructuredCache: kept here, built and read
    # there, so this module need not import it).
    semi_structured_cache: object | None = field(default=None, init=False, repr=False, compare=False)
    _checked: sparse_format.Checked | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check()

    def check(self, op: str = "Sparse24Weight", prefix: str = "") -> None:
        """Raise a clear error unless the tensors form a valid 2:4 weight of ``shape``
        (:func:`memkern.ops.sparse_format.check_sparse24`). Free after a passed check until
        a tensor is replaced or ``meta`` is changed in place."""
        self._checked = sparse_format.check_once(
            self._checked,
            (self.meta,),
            (self.values, self.mask),
            self.shape,
            lambda: sparse_format.check_sparse24(op, self.values, self.meta, self.mask, self.shape, prefix),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of values, meta and the slot mask if any (a cached semi-structured copy, on
        CUDA, is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.mask) if t is not None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> Sparse24Weight:
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
        sparse_format.check_mask(op, weight, mask)
        per_group = mask.reshape(n, k // 4, 4).sum(-1)
        if n and k and not weight.is_meta and int(per_group.max()) > 2:
            r, g = (per_group > 2).nonzero()[0].tolist()
            raise ValueError(
                f"{op}: 2:4 keeps at most 2 of every 4 input columns; row {r}, columns "
                f"{4 * g}..{4 * g + 3} keep {int(per_group[r, g])}"
            )
        values, meta = sparse24_compress_op(weight.detach().contiguous(), mask.contiguous())
        if weight.is_meta:  # no values, so no free slots to find
            return cls(values, meta, (n, k))
        slots = torch.gather(mask.reshape(n, k // 4, 4), 2, sparse_format.kept_positions(meta, k)).reshape(n, k // 2)
        return cls(values, meta, (n, k), None if bool(slots.all()) else slots)

    def to_dense(self) -> torch.Tensor:
        return sparse24_decompress_op(self.effective_values(), self.meta, self.shape[1])
