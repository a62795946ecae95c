"""Structure checks of the pruned-weight formats in :mod:`memkern.ops.sparse`.

A block-sparse weight's index tensors steer every kernel's memory accesses: a block column
past the matrix, or a row pointer that runs backwards, makes the C++ and Triton kernels
read and write out of bounds. A structure built from raw tensors or read from a checkpoint
is untrusted input, so it is checked where it enters (the weight's constructor,
``SparseLinear.load_state_dict``) and checked again only once one of its tensors has been
replaced or an index tensor changed in place: the range checks read the index tensors,
which on CUDA is a device synchronisation that a forward call should not pay.

The 2:4 ``meta`` codes are 2-bit positions inside a group of four, so they can never
address memory outside the weight; they are checked for the format's ``i0 < i1`` so that
a corrupted checkpoint is refused instead of computing with a different weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch

from memkern import _validate

BLOCK_SIZES = (16, 32, 64, 128)
_INDEX_NAMES = ("crow", "col", "ccol", "csc_row", "csc_block")


def check_block(op: str, block: object) -> tuple[int, int]:
    """``block`` as a pair (rows, cols) of BLOCK_SIZES."""
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise ValueError(f"{op}: block must be a pair (rows, cols), got {block!r}")
    for name, b in zip(("block rows", "block cols"), block):
        if not isinstance(b, int) or b not in BLOCK_SIZES:
            raise ValueError(f"{op}: {name} must be a power of two in {list(BLOCK_SIZES)}, got {b!r}")
    return int(block[0]), int(block[1])


def check_mask(op: str, weight: torch.Tensor, mask: object) -> None:
    """A bool mask of ``weight``'s shape and device."""
    _validate.check_tensor(op, "mask", mask)
    if mask.shape != weight.shape:
        raise ValueError(f"{op}: mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must have dtype bool; got {_validate.dtype_name(mask.dtype)}")
    _validate.check_same_device(op, weight=weight, mask=mask)


def check_features(op: str, name: str, value: object) -> int:
    """A layer or weight dimension: a non-negative int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{op}: {name} must be a non-negative integer, got {value!r}")
    return value


def check_shape(op: str, shape: object) -> tuple[int, int]:
    """A weight's ``(out_features, in_features)``."""
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2):
        raise ValueError(f"{op}: shape must be a pair (out_features, in_features), got {shape!r}")
    return check_features(op, "shape[0] (out_features)", shape[0]), check_features(
        op, "shape[1] (in_features)", shape[1]
    )


def _check_layout(
    op: str, name: str, t: object, shape: tuple[int, ...], dtypes: Sequence[torch.dtype], why: str
) -> torch.Tensor:
    _validate.check_tensor(op, name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape} ({why}), got {tuple(t.shape)}")
    _validate.check_dtype(op, name, t, dtypes)
    return t


def check_block_list(op: str, block_rows: object, block_cols: object, n_block_rows: int, n_block_cols: int) -> None:
    """Blocks listed by (block row, block column), in block-row order, inside the grid."""
    for name, t, bound in (("block_rows", block_rows, n_block_rows), ("block_cols", block_cols, n_block_cols)):
        _validate.check_tensor(op, name, t)
        _validate.check_dim(op, name, t, 1)
        _validate.check_dtype(op, name, t, (torch.int64,))
        if t.numel() and not bool(((t >= 0) & (t < bound)).all()):
            raise ValueError(f"{op}: {name} must lie in [0, {bound}), got values from {int(t.min())} to {int(t.max())}")
    if block_rows.shape != block_cols.shape or not bool((block_rows.diff() >= 0).all()):
        raise ValueError(
            f"{op}: block_rows and block_cols must list the same blocks in block-row order, got "
            f"block_rows {_preview(block_rows)} and block_cols {_preview(block_cols)}"
        )


def every_block_index(n_block_rows: int, n_block_cols: int, device) -> tuple[torch.Tensor, ...]:
    """(crow, col, ccol, csc_row, csc_block) of a grid with every block kept, from
    arithmetic alone (no look at any values: it works on the meta device)."""
    rows, cols = torch.arange(n_block_rows, device=device), torch.arange(n_block_cols, device=device)
    crow = torch.arange(n_block_rows + 1, device=device) * n_block_cols
    ccol = torch.arange(n_block_cols + 1, device=device) * n_block_rows
    # Block (r, c) is number r * n_block_cols + c in row order; in column order rows run fastest.
    csc_block = (rows[None, :] * n_block_cols + cols[:, None]).reshape(-1)
    return crow, cols.repeat(n_block_rows), ccol, rows.repeat(n_block_cols), csc_block


def kept_positions(meta: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols/4, 2) int64 dense positions (0..3) of each 2:4 group's two slots."""
    groups = cols // 4
    byte = meta.to(torch.int32).repeat_interleave(2, dim=1)[:, :groups]
    code = (byte >> (4 * (torch.arange(groups, device=meta.device, dtype=torch.int32) % 2))) & 15
    return torch.stack([code & 3, code >> 2], dim=-1).to(torch.int64)


def _raise_first_failure(op: str, checks: list[tuple[torch.Tensor, Callable[[], str]]]) -> None:
    """Raise ValueError with the message of the first check whose bool tensor is False;
    one synchronisation for all, messages (which read more entries) only on failure."""
    if not checks:
        return
    passed = torch.stack([ok for ok, _ in checks]).tolist()
    for ok, (_, message) in zip(passed, checks):
        if not ok:
            raise ValueError(f"{op}: {message()}")


def _preview(t: torch.Tensor) -> str:
    return str(t.tolist()) if t.numel() <= 16 else f"[{t.numel()} entries]"


def _first_bad(ok: torch.Tensor) -> int:
    return int((~ok).nonzero()[0, 0])


def check_block_sparse(op: str, values, crow, col, ccol, csc_row, csc_block, mask, shape, prefix: str = "") -> None:
    """Raise a clear error unless the tensors form a BlockSparseWeight of ``shape``: sizes,
    dtypes and one device; row and column pointers that run from 0 to the number of blocks
    without decreasing; block indices inside the matrix; no block listed twice; and a
    column-order index listing exactly the blocks of the row-order one."""
    n, k = check_shape(op, shape)
    _validate.check_tensor(op, prefix + "values", values)
    if values.dim() != 3 or values.shape[1] not in BLOCK_SIZES or values.shape[2] not in BLOCK_SIZES:
        raise ValueError(
            f"{op}: {prefix}values must be (blocks, BN, BK) with BN and BK in {list(BLOCK_SIZES)}, "
            f"got shape {tuple(values.shape)}"
        )
    _validate.check_dtype(op, prefix + "values", values, _validate.FLOAT_DTYPES)
    nnzb, bn, bk = values.shape
    nbr, nbc = -(-n // bn), -(-k // bk)
    grid = f"{nbr} x {nbc} blocks of {bn} x {bk} for shape {(n, k)}"
    index = dict(zip(_INDEX_NAMES, (crow, col, ccol, csc_row, csc_block)))
    lengths = {"crow": (nbr + 1, f"block rows + 1: {grid}"), "ccol": (nbc + 1, f"block columns + 1: {grid}")}
    for name, t in index.items():
        length, why = lengths.get(name, (nnzb, f"one per block of {prefix}values"))
        _check_layout(op, prefix + name, t, (length,), (torch.int64,), why)
        if not t.is_contiguous():  # the kernels read the index by offset
            raise ValueError(f"{op}: {prefix}{name} must be contiguous, got stride {t.stride()}")
    if mask is not None:
        _check_layout(op, prefix + "mask", mask, tuple(values.shape), (torch.bool,), f"{prefix}values' shape")
    _validate.check_same_device(
        op, **{prefix + name: t for name, t in (("values", values), *index.items(), ("mask", mask))}
    )
    if values.device.type == "meta":
        return  # a meta tensor has no entries to check

    # Bounds first: the consistency checks below index with these tensors.
    def pointer(name: str, ptr: torch.Tensor):
        ok = (ptr[0] == 0) & (ptr[-1] == nnzb) & (ptr.diff() >= 0).all()
        return (
            ok,
            lambda: (
                f"{prefix}{name} must run from 0 to {nnzb} (the number of blocks) without decreasing "
                f"({grid}); got {_preview(ptr)}"
            ),
        )

    def bounded(name: str, bound: int, what: str):
        t = index[name]
        ok = (t >= 0) & (t < bound)
        return (
            ok.all(),
            lambda: (
                f"{prefix}{name} must hold {what} in [0, {bound}) ({grid}); got "
                f"{int(t[_first_bad(ok)])} at position {_first_bad(ok)}"
            ),
        )

    _raise_first_failure(
        op,
        [
            pointer("crow", crow),
            pointer("ccol", ccol),
            bounded("col", nbc, "block columns"),
            bounded("csc_row", nbr, "block rows"),
            bounded("csc_block", nnzb, "block numbers"),
        ],
    )

    rows = torch.repeat_interleave(torch.arange(nbr, device=crow.device), crow.diff())
    cols_by_ccol = torch.repeat_interleave(torch.arange(nbc, device=ccol.device), ccol.diff())
    key = rows * nbc + col
    listed = torch.zeros(nnzb, dtype=torch.int64, device=col.device).index_add_(
        0, csc_block, torch.ones_like(csc_block)
    )
    row_ok, col_ok = csc_row == rows[csc_block], col[csc_block] == cols_by_ccol

    sorted_key = key.sort().values
    distinct = sorted_key.diff() > 0

    def twice() -> str:
        r, c = divmod(int(sorted_key[_first_bad(distinct)]), nbc)
        return f"{prefix}col must list each block once; block (row {r}, column {c}) is listed more than once"

    _raise_first_failure(
        op,
        [
            (distinct.all(), twice),
            (
                (listed == 1).all(),
                lambda: f"{prefix}csc_block must list each of the {nnzb} blocks once; got {_preview(csc_block)}",
            ),
            (
                row_ok.all(),
                lambda: (
                    f"{prefix}csc_row must be the block row of each block in csc_block; position "
                    f"{_first_bad(row_ok)} has {int(csc_row[_first_bad(row_ok)])}, block "
                    f"{int(csc_block[_first_bad(row_ok)])} is in block row "
                    f"{int(rows[csc_block[_first_bad(row_ok)]])}"
                ),
            ),
            (
                col_ok.all(),
                lambda: (
                    f"{prefix}ccol and {prefix}csc_block must list the blocks of each block column; "
                    f"position {_first_bad(col_ok)} belongs to block column "
                    f"{int(cols_by_ccol[_first_bad(col_ok)])} by ccol, but block "
                    f"{int(csc_block[_first_bad(col_ok)])} is in block column "
                    f"{int(col[csc_block[_first_bad(col_ok)]])}"
                ),
            ),
        ],
    )


def check_sparse24(op: str, values, meta, mask, shape, prefix: str = "") -> None:
    """Raise a clear error unless the tensors form a Sparse24Weight of ``shape``: sizes,
    dtypes, one device, and every group's code naming two positions ``i0 < i1``."""
    n, k = check_shape(op, shape)
    if k % 4:
        raise ValueError(f"{op}: 2:4 needs in_features divisible by 4, got shape {(n, k)}")
    _check_layout(
        op, prefix + "values", values, (n, k // 2), _validate.FLOAT_DTYPES, f"two slots per group of 4 of {(n, k)}"
    )
    _check_layout(
        op, prefix + "meta", meta, (n, (k + 7) // 8), (torch.uint8,), f"one 4-bit code per group of 4 of {(n, k)}"
    )
    if mask is not None:
        _check_layout(op, prefix + "mask", mask, (n, k // 2), (torch.bool,), "values' shape")
    _validate.check_same_device(op, **{prefix + "values": values, prefix + "meta": meta, prefix + "mask": mask})
    if values.device.type == "meta" or n * k == 0:
        return
    pos = kept_positions(meta, k)
    ordered = pos[..., 0] < pos[..., 1]
    if not bool(ordered.all()):
        r, g = (~ordered).nonzero()[0].tolist()
        raise ValueError(
            f"{op}: {prefix}meta must give each group two positions i0 < i1; row {r}, group {g} "
            f"(columns {4 * g}..{4 * g + 3}) has i0={int(pos[r, g, 0])}, i1={int(pos[r, g, 1])}"
        )


# -- checked once, again only after a change ---------------------------------------------------
def _version(t: torch.Tensor) -> int | None:
    # Inference tensors have no version counter; they cannot be changed in place outside
    # inference mode, and inside it they are trusted as checked when they entered.
    return None if t.is_inference() else t._version


@dataclass(frozen=True, eq=False)
class Checked:
    """What a passed structure check depended on: the index tensors themselves (held, so
    their identity compares safely; they are small), their versions and storage, and the
    shape, dtype and device of the other tensors."""

    index: tuple[torch.Tensor, ...]
    stamp: tuple

    def still_holds(self, index: tuple[torch.Tensor, ...], stamp: tuple) -> bool:
        return self.stamp == stamp and all(a is b for a, b in zip(self.index, index))


def _stamp(index: tuple, others: tuple, shape) -> tuple | None:
    if not (
        isinstance(shape, (tuple, list))
        and all(isinstance(t, torch.Tensor) for t in index)
        and all(t is None or isinstance(t, torch.Tensor) for t in others)
    ):
        return None  # the check names what is wrong
    # An index tensor moved to another device or swapped through ``.data`` has another data_ptr.
    return (
        tuple((_version(t), t.data_ptr(), t.shape, t.stride(), t.dtype) for t in index),
        tuple(None if t is None else (t.shape, t.dtype, t.device) for t in others),
        tuple(shape),
    )


def check_once(
    previous: Checked | None, index: tuple, others: tuple, shape, check: Callable[[], None]
) -> Checked | None:
    """Run ``check`` unless ``previous`` shows that it passed for these very tensors;
    return what to remember. Under torch.compile nothing is checked: the traced weight
    wraps tensors that were checked when they entered."""
    if torch.compiler.is_compiling():
        return previous
    stamp = _stamp(index, others, shape)
    if previous is not None and stamp is not None and previous.still_holds(index, stamp):
        return previous
    check()
    return Checked(tuple(index), stamp)


def row_panel_layout(values: torch.Tensor) -> torch.Tensor:
    """``values`` (nnzb, BN, BK) laid out in memory as (BN, nnzb, BK): the kept blocks of a
    block row, being consecutive, then form one (BN, kept * BK) matrix with unit column
    stride, which the C++ kernel hands to BLAS as is (no packing per call)."""
    return values.permute(1, 0, 2).contiguous().permute(1, 0, 2)
