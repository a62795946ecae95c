"""The C++ block-sparse forward (csrc/cpu/block_sparse_matmul.cpp) against a float64
dense-masked reference, at the shapes where its micro-kernel changes behaviour: every block
size (square and rectangular), rows around the micro-tile height and the row tile, K and
out_features cut inside a block, empty block rows, low-precision and strided inputs.

The micro-kernel takes every float32 call on AVX-512 builds (float64 goes to the BLAS
path). Most cases here use LEAD_ROWS + a few rows, which puts the interesting row counts in
the last, partial row tile after whole ones."""

from __future__ import annotations

import pytest
import torch

import memkern
from memkern import prune
from memkern.ops import BlockSparseWeight, masked_matmul
from conftest import assert_rel_close, require_backend

BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (16, 128), (128, 16), (32, 64), (64, 32))
# Shapes (out_features, in_features): cut inside a block on both sides, and smaller than
# one block of every size.
SHAPES = ((150, 200), (5, 7))
ROW_TILE = 256  # rows of x per task in the C++ kernel
LEAD_ROWS = 2 * ROW_TILE  # whole row tiles ahead of the rows a case is about
M = LEAD_ROWS + 47


def micro_tile_rows(block_rows: int) -> int:
    """Rows of the kernel's output micro-tile: 24 accumulators of 16 floats, spread over
    min(block_rows, 64) output columns."""
    return 24 // (min(block_rows, 64) // 16)


def _weight(shape, block, sparsity, dtype=torch.float32):
    w = torch.randn(*shape).to(dtype)
    mask = prune.masks(torch.randn(*shape), sparsity, "block", block=block)
    return w, mask, BlockSparseWeight.from_dense(w, mask, block)


def _reference(x, w, mask, bias):
    y = x.double() @ (w.double() * mask).t()
    return y if bias is None else y + bias.double()


def _cpp(x, weight, bias=None):
    require_backend("block_sparse_matmul", "cpp", x.reshape(-1, x.shape[-1]))
    with memkern.use_backend("cpp"):
        return masked_matmul(x, weight, bias)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("with_bias", (False, True), ids=("no_bias", "bias"))
def test_matches_reference(block, shape, sparsity, with_bias, poisoned_outputs):
    w, mask, weight = _weight(shape, block, sparsity)
    x = torch.randn(M, shape[1])
    bias = torch.randn(shape[0]) if with_bias else None
    y = _cpp(x, weight, bias)
    ref = _reference(x, w, mask, bias)
    if ref.norm() == 0:  # everything pruned and no bias
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert_rel_close(y, ref, torch.float32)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("rows", ("1", "MR-1", "MR", "MR+1", "TILE-1", "TILE", "TILE+1", "TILE+MR+1"))
def test_rows_around_micro_tile_and_row_tile(block, rows, poisoned_outputs):
    # 1 .. MR+1 rows alone, and the same counts in the last row tile after whole ones.
    mr = micro_tile_rows(block[0])
    m = {
        "1": 1,
        "MR-1": mr - 1,
        "MR": mr,
        "MR+1": mr + 1,
        "TILE-1": ROW_TILE - 1,
        "TILE": ROW_TILE,
        "TILE+1": ROW_TILE + 1,
        "TILE+MR+1": ROW_TILE + mr + 1,
    }[rows]
    w, mask, weight = _weight((150, 200), block, 0.5)
    bias = torch.randn(150)
    for rows_of_x in {m, LEAD_ROWS + m}:
        x = torch.randn(rows_of_x, 200)
        y = _cpp(x, weight, bias)
        assert_rel_close(y, _reference(x, w, mask, bias), torch.float32)
        # The last row alone too: a wrong last row hides in the norm of a large output.
        assert_rel_close(y[-1], _reference(x[-1:], w, mask, bias)[0], torch.float32)


@pytest.mark.parametrize("block", ((64, 64), (128, 128), (16, 32)), ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_low_precision_inputs_accumulate_in_float32(block, dtype, poisoned_outputs):
    w, mask, weight = _weight((150, 200), block, 0.5, dtype)
    x = torch.randn(2, 300, 200).to(dtype)
    bias = torch.randn(150).to(dtype)
    y = _cpp(x, weight, bias)
    assert y.dtype == dtype and y.shape == (2, 300, 150)
    assert_rel_close(y, _reference(x, w, mask, bias), dtype)


def test_empty_block_rows_get_exactly_the_bias(poisoned_outputs):
    w = torch.randn(150, 200)
    mask = torch.ones(150, 200, dtype=torch.bool)
    mask[64:128] = False  # block row 1 of 64x64 blocks has no kept block
    mask[:64, :64] = False  # and block row 0 lost one block
    weight = BlockSparseWeight.from_dense(w, mask, (64, 64))
    assert weight.crow.diff().tolist() == [3, 0, 4]
    x = torch.randn(M, 200)
    bias = torch.randn(150)
    y = _cpp(x, weight, bias)
    assert torch.equal(y[:, 64:128], bias[64:128].expand(M, 64))
    assert torch.equal(_cpp(x, weight)[:, 64:128], torch.zeros(M, 64))
    assert_rel_close(y, _reference(x, w, mask, bias), torch.float32)


def test_zero_rows():
    _, _, weight = _weight((150, 200), (64, 64), 0.5)
    y = _cpp(torch.randn(0, 200), weight, torch.randn(150))
    assert y.shape == (0, 150)


@pytest.mark.parametrize("layout", ("transposed", "column_slice", "row_stride"))
def test_non_contiguous_x(layout, poisoned_outputs):
    w, mask, weight = _weight((150, 200), (32, 32), 0.5)
    if layout == "transposed":
        x = torch.randn(200, M).t()
    elif layout == "column_slice":
        x = torch.randn(M, 400)[:, ::2]
    else:
        x = torch.randn(M, 300)[:, 50:250]
    assert not x.is_contiguous()
    assert_rel_close(_cpp(x, weight), _reference(x, w, mask, None), torch.float32)


def test_values_in_any_layout(poisoned_outputs):
    # The kernel packs the kept blocks from their strides: a contiguous (nnzb, BN, BK)
    # tensor (not memkern.ops.sparse_format.row_panel_layout) must give the same product.
    w, mask, weight = _weight((150, 200), (64, 32), 0.5)
    y_panels = _cpp(torch.ones(LEAD_ROWS, 200), weight)
    weight.values = weight.values.contiguous()
    x = torch.randn(M, 200)
    assert_rel_close(_cpp(x, weight), _reference(x, w, mask, None), torch.float32)
    assert torch.equal(_cpp(torch.ones(LEAD_ROWS, 200), weight), y_panels)


@pytest.mark.parametrize("block", ((16, 16), (64, 64), (128, 128)), ids=lambda b: f"{b[0]}x{b[1]}")
def test_nan_in_one_row_stays_in_that_row(block):
    # Row 17 sits inside a micro-tile of every height (24, 12, 6) with rows on both sides.
    w, mask, weight = _weight((150, 200), block, 0.0)
    x = torch.randn(M, 200)
    x[17, 3] = float("nan")
    bias = torch.randn(150)
    y = _cpp(x, weight, bias)
    assert y[17].isnan().all()
    keep = torch.arange(M) != 17
    assert y[keep].isfinite().all()
    assert_rel_close(y[keep], _reference(x[keep], w, mask, bias), torch.float32)


@pytest.mark.parametrize("block_rows", (48, 96))
def test_other_block_heights_take_the_general_path(block_rows, poisoned_outputs):
    # BlockSparseWeight only makes powers of two, but the C++ op takes any block height;
    # the micro-kernel is built for 16..128 and must hand the rest on, not misread them.
    from memkern import reference

    n_out, k, bk = 2 * block_rows - 5, 40, 16
    rows = torch.tensor([0, 0, 1, 1])
    cols = torch.tensor([0, 2, 1, 2])
    crow, col, *_ = BlockSparseWeight.index(rows, cols, 2, 3)
    values = torch.randn(4, block_rows, bk)
    w = reference.block_sparse_to_dense(values, crow, col, n_out, k)
    x = torch.randn(M, k)
    require_backend("block_sparse_matmul", "cpp", x)
    y = torch.ops.memkern.block_sparse_matmul_kernel(x, values, crow, col, n_out, None)
    assert_rel_close(y, x.double() @ w.double().t(), torch.float32)


@pytest.mark.parametrize("block", ((16, 16), (64, 32), (32, 128)), ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradients_match_reference(block, shape, poisoned_outputs):
    from memkern import reference

    w, mask, weight = _weight(shape, block, 0.5)
    values = weight.values.detach().clone().requires_grad_(True)
    weight.values = values
    x = torch.randn(ROW_TILE + 5, shape[1], requires_grad=True)  # one whole row tile and a part
    grad = torch.randn(ROW_TILE + 5, shape[0])
    _cpp(x, weight).backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    w64 = (w.double() * mask).requires_grad_(True)
    (x64 @ w64.t()).backward(grad.double())
    assert_rel_close(x.grad, x64.grad, torch.float32)
    dw = reference.block_sparse_to_dense(values.grad, weight.crow, weight.col, *shape)
    assert_rel_close(dw, w64.grad * mask, torch.float32)
    # Pruned weights and the padding of edge blocks get exactly nothing.
    assert (dw[~mask] == 0).all()
    assert torch.count_nonzero(values.grad) == torch.count_nonzero(dw)


def _bad_index(kind: str, weight: BlockSparseWeight) -> tuple[dict, str]:
    index = {n: getattr(weight, n).clone() for n in ("crow", "col", "ccol", "csc_row", "csc_block")}
    if kind == "col":
        index["col"][1] = 10**6
        return index, r"col must lie in \[0, 4\), got 1000000 at position 1"
    if kind == "crow":
        index["crow"][1] = 9  # [0, 4, 8, 12] -> [0, 9, 8, 12]
        return index, "crow must not decrease"
    assert kind == "csc_block"
    index["csc_block"][0] = -7
    return index, r"csc_block must lie in \[0, 12\), got -7 at position 0"


@pytest.mark.parametrize("kind", ("col", "crow", "csc_block"))
def test_direct_calls_with_a_bad_index_are_refused(kind):
    # The op itself takes raw tensors: the kernel checks the index before reading with it.
    _, _, weight = _weight((150, 200), (64, 64), 0.0)  # 3 x 4 blocks, all kept
    index, message = _bad_index(kind, weight)
    x, grad = torch.randn(8, 200), torch.randn(8, 150)
    require_backend("block_sparse_matmul", "cpp", x)
    with pytest.raises(ValueError, match=message):
        torch.ops.memkern.block_sparse_matmul_backward_kernel(grad, x, weight.values, *index.values())
    if kind != "csc_block":  # the forward reads crow and col only
        with pytest.raises(ValueError, match=message):
            torch.ops.memkern.block_sparse_matmul_kernel(x, weight.values, index["crow"], index["col"], 150, None)
