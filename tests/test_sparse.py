"""masked_matmul on block-sparse and 2:4 weights: every backend against the float64
dense-masked reference (forward and both gradients), 2:4 round trips, training keeps pruned
weights at zero, edge cases, bad input, opcheck and compile."""

from __future__ import annotations

import pytest
import torch

import memkern
from memkern import prune, reference
from memkern.nn import SparseLinear
from memkern.ops import BlockSparseWeight, Sparse24Weight, masked_matmul
from conftest import CPU_BACKENDS, assert_rel_close, raises_naming, require_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT, IN = 47, 123  # multiples of no block size


def _block_mask(sparsity: float, block: int, out: int = OUT, inp: int = IN) -> torch.Tensor:
    # Random scores, so the kept blocks are scattered; the mask comes from prune.masks.
    return prune.masks(torch.randn(out, inp), sparsity, "block", block=(block, block))


def _reference(x, w_masked, bias, grad):
    """float64 forward and gradients of x @ Wm^T + b with Wm = W * M."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = w_masked.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    y = x64 @ w64.t()
    if b64 is not None:
        y = y + b64
    y.backward(grad.double())
    return y, x64.grad, w64.grad, None if b64 is None else b64.grad


def _run(backend, x, weight, bias, grad):
    """Forward + backward through masked_matmul with ``backend`` forced."""
    x = x.detach().clone().requires_grad_(True)
    weight.values = weight.values.detach().clone().requires_grad_(True)
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    with memkern.use_backend(backend):
        y = masked_matmul(x, weight, bias)
        y.backward(grad)
    return y, x.grad, weight.values.grad, None if bias is None else bias.grad


def _grad_as_dense(weight, dvalues) -> torch.Tensor:
    if isinstance(weight, Sparse24Weight):
        return reference.sparse24_decompress(dvalues, weight.meta, weight.shape[1])
    return reference.block_sparse_to_dense(dvalues, weight.crow, weight.col, *weight.shape)


def _check_against_reference(backend, x, weight, mask, bias, dtype, dense_w):
    n_out = weight.shape[0]
    grad = torch.randn(*x.shape[:-1], n_out).to(dtype)
    require_backend(
        "block_sparse_matmul" if isinstance(weight, BlockSparseWeight) else "sparse24_matmul",
        backend,
        x.reshape(-1, x.shape[-1]),
    )
    y, dx, dv, db = _run(backend, x, weight, bias, grad)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, dense_w * mask, bias, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, dtype)
    assert_rel_close(dx, dx_ref, dtype)
    dw = _grad_as_dense(weight, dv)
    assert_rel_close(dw, dw_ref * mask, dtype)
    assert (dw[~mask] == 0).all(), "pruned weights got a gradient"
    if bias is not None:
        assert_rel_close(db, db_ref, dtype)
    return dv


# -- block-sparse: forward and gradients --------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", (16, 32, 64))
@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.9, 1.0))
def test_block_sparse_matches_reference(backend, dtype, block, sparsity, poisoned_outputs):
    w = torch.randn(OUT, IN).to(dtype)
    mask = _block_mask(sparsity, block)
    weight = BlockSparseWeight.from_dense(w, mask, (block, block))
    assert weight.mask is None  # a block mask needs no element mask
    nbr, nbc = -(-OUT // block), -(-IN // block)
    padded = torch.zeros(nbr * block, nbc * block, dtype=torch.bool)
    padded[:OUT, :IN] = mask
    assert weight.values.shape[0] == int(padded.reshape(nbr, block, nbc, block).any(3).any(1).sum())
    x = torch.randn(2, 7, IN).to(dtype)  # (B, T, K)
    bias = torch.randn(OUT).to(dtype)
    dv = _check_against_reference(backend, x, weight, mask, bias, dtype, w)
    # Padding of edge blocks (past OUT rows / IN columns) gets no gradient either.
    nnzb = dv.shape[0]
    if nnzb:
        padded = torch.ones(nnzb, block, block, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(weight.crow.numel() - 1), weight.crow.diff())
        for j in range(nnzb):
            h = min(block, OUT - rows[j].item() * block)
            c = min(block, IN - weight.col[j].item() * block)
            padded[j, :h, :c] = False
        assert (dv[padded] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_sparse_2d_input_without_bias(backend, dtype):
    w = torch.randn(OUT, IN).to(dtype)
    mask = _block_mask(0.5, 32)
    weight = BlockSparseWeight.from_dense(w, mask, (32, 32))
    x = torch.randn(31, IN).to(dtype)  # (N, K)
    _check_against_reference(backend, x, weight, mask, None, dtype, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unstructured_mask_inside_kept_blocks(backend, dtype):
    w = torch.randn(OUT, IN).to(dtype)
    mask = prune.masks(w, 0.7, "unstructured") & _block_mask(0.5, 16)
    weight = BlockSparseWeight.from_dense(w, mask, (16, 16))
    assert weight.mask is not None
    x = torch.randn(13, IN).to(dtype)
    _check_against_reference(backend, x, weight, mask, torch.randn(OUT).to(dtype), dtype, w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rectangular_blocks_and_large_m(backend):
    w = torch.randn(70, 96)
    mask = prune.masks(w, 0.5, "block", block=(16, 32))
    weight = BlockSparseWeight.from_dense(w, mask, (16, 32))
    m = 1100 if backend == "cpp" else 130  # cpp tiles rows by 256: cross tile edges
    x = torch.randn(m, 96)
    _check_against_reference(backend, x, weight, mask, torch.randn(70), torch.float32, w)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
def test_float64_gradcheck_of_the_op(backend):
    w = torch.randn(20, 40)
    weight = BlockSparseWeight.from_dense(w, prune.masks(w, 0.5, "block", block=(16, 16)), (16, 16))
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    values = weight.values.double().requires_grad_(True)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    require_backend("block_sparse_matmul", backend, x)

    def f(x, values, bias):
        return torch.ops.memkern.block_sparse_matmul(
            x, values, weight.crow, weight.col, weight.ccol, weight.csc_row, weight.csc_block, 20, bias
        )

    with memkern.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, values, bias))


# -- 2:4 -------------------------------------------------------------------------------------
def _mask24(rows: int, cols: int, kept_per_group=(2,)) -> torch.Tensor:
    """Random 2:4-valid mask, each group keeping a count drawn from ``kept_per_group``."""
    groups = cols // 4
    counts = torch.tensor(kept_per_group)[torch.randint(len(kept_per_group), (rows, groups))]
    order = torch.rand(rows, groups, 4).argsort(-1)
    mask = order < counts[..., None]
    return mask.reshape(rows, cols)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", (4, 12, 128))  # 12: the last meta byte is half used
def test_sparse24_round_trip_is_exact(backend, dtype, cols):
    w = torch.randn(9, cols).to(dtype)
    mask = _mask24(9, cols, (0, 1, 2))
    compress_backend = "torch" if backend == "triton" else backend  # no Triton compressor
    require_backend("sparse24_compress", compress_backend, w)
    require_backend("sparse24_decompress", backend, w)
    with memkern.use_backend(compress_backend):
        sw = Sparse24Weight.from_dense(w, mask)
    with memkern.use_backend(backend):
        dense = sw.to_dense()
    assert sw.values.shape == (9, cols // 2) and sw.meta.shape == (9, (cols + 7) // 8)
    assert sw.meta.dtype == torch.uint8
    assert torch.equal(dense, w * mask)
    v_ref, m_ref = reference.sparse24_compress(w, mask)
    assert torch.equal(sw.values, v_ref) and torch.equal(sw.meta, m_ref)


def test_sparse24_format_by_hand():
    # Group 0 keeps positions 1 and 3 (code 1 | 3 << 2 = 13), group 1 keeps position 2 and
    # fills the free slot with position 0 (code 0 | 2 << 2 = 8): byte = 13 | 8 << 4 = 141.
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 0.0, 0.0, 9.0, 0.0]])
    sw = Sparse24Weight.from_dense(w)
    assert sw.values.tolist() == [[5.0, 7.0, 0.0, 9.0]]
    assert sw.meta.tolist() == [[141]]


def test_sparse24_storage_is_nine_sixteenths_of_fp16():
    w = torch.randn(64, 256, dtype=torch.float16)
    sw = Sparse24Weight.from_dense(w, prune.masks(w, 0.5, "n:m"))
    assert sw.nbytes * 16 == w.numel() * w.element_size() * 9


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", ((29,), (2, 5)), ids=["NK", "BTK"])
def test_sparse24_matches_reference(backend, dtype, batch):
    w = torch.randn(OUT, 124).to(dtype)
    mask = _mask24(OUT, 124)
    sw = Sparse24Weight.from_dense(w, mask)
    x = torch.randn(*batch, 124).to(dtype)
    _check_against_reference(backend, x, sw, mask, torch.randn(OUT).to(dtype), dtype, w)


# -- training: pruned weights stay zero --------------------------------------------------------
@pytest.mark.parametrize("fmt, pattern", [("block", "block"), ("block", "unstructured"), ("2:4", "n:m")])
def test_pruned_weights_stay_zero_through_adam(fmt, pattern):
    linear = torch.nn.Linear(96, 40)
    mask = prune.masks(linear.weight, 0.5, pattern, block=(16, 16))
    layer = SparseLinear.from_dense(linear, mask, format=fmt, block=(16, 16))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=0.1)
    before = layer.to_dense().clone()
    for _ in range(20):
        opt.zero_grad()
        layer(torch.randn(8, 96)).square().mean().backward()
        opt.step()
    after = layer.to_dense()
    assert (after[~mask] == 0).all()
    assert (after[mask] != before[mask]).float().mean() > 0.9  # the kept weights did train


# -- edge cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ("block", "2:4"))
def test_empty_batch(backend, kind):
    w = torch.randn(OUT, 124)
    weight = (
        BlockSparseWeight.from_dense(w, _block_mask(0.5, 16, OUT, 124), (16, 16))
        if kind == "block"
        else Sparse24Weight.from_dense(w, _mask24(OUT, 124))
    )
    x = torch.randn(0, 124, requires_grad=True)
    weight.values.requires_grad_(True)
    require_backend("block_sparse_matmul" if kind == "block" else "sparse24_matmul", backend, x)
    with memkern.use_backend(backend):
        y = masked_matmul(x, weight)
        y.sum().backward()
    assert y.shape == (0, OUT)
    assert x.grad.shape == (0, 124)
    assert (weight.values.grad == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_input_stays_in_its_row(backend):
    w = torch.randn(OUT, IN)
    weight = BlockSparseWeight.from_dense(w, torch.ones(OUT, IN, dtype=torch.bool), (16, 16))
    x = torch.randn(6, IN)
    x[2, 5] = float("nan")
    require_backend("block_sparse_matmul", backend, x)
    with memkern.use_backend(backend):
        y = masked_matmul(x, weight)
    assert torch.isnan(y[2]).all()
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.isfinite(y[keep]).all()
    assert_rel_close(y[keep], x[keep].double() @ w.double().t(), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_huge_values_accumulate_in_fp32(backend, dtype):
    # Partial sums pass the fp16 maximum (65504) before cancelling: fp32 accumulation
    # returns the small exact result, fp16 accumulation would give inf or NaN.
    big = 4.0e4 if dtype == torch.float16 else 1.0e38
    x = torch.zeros(3, 64)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = big, big, -big, 1.0
    w = torch.ones(32, 64)
    weight = BlockSparseWeight.from_dense(w.to(dtype), None, (32, 32))
    require_backend("block_sparse_matmul", backend, x.to(dtype))
    with memkern.use_backend(backend):
        y = masked_matmul(x.to(dtype), weight)
    ref = x.to(dtype).double() @ w.double().t()
    assert torch.isfinite(y).all()
    assert_rel_close(y, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(IN, 9).t(),
        lambda: torch.randn(9, 2 * IN)[:, ::2],
        lambda: torch.randn(4, 5, IN).transpose(0, 1),
    ],
    ids=["transposed", "column-stride", "3-D-transposed"],
)
def test_non_contiguous_input(backend, make):
    x = make()
    assert not x.is_contiguous()
    w = torch.randn(OUT, IN)
    mask = _block_mask(0.5, 16)
    weight = BlockSparseWeight.from_dense(w, mask, (16, 16))
    _check_against_reference(backend, x, weight, mask, None, torch.float32, w)


def test_block_sparse_memory_is_the_kept_fraction():
    w = torch.randn(512, 512)
    weight = BlockSparseWeight.from_dense(w, prune.masks(w, 0.5, "block"), (64, 64))
    ratio = weight.nbytes / (w.numel() * w.element_size())
    assert 0.5 <= ratio <= 0.5 * 1.05
    assert weight.block_density == 0.5


def test_default_backend_on_cpu_is_cpp_when_built():
    from memkern import _library, backends

    expected = "cpp" if _library.has_cpp() else "torch"
    x = torch.randn(2, 16)
    assert backends.OPS["block_sparse_matmul"].select(x).backend == expected
    assert backends.OPS["sparse24_compress"].select(x).backend == expected


# -- bad input ---------------------------------------------------------------------------------
def _bsw():
    return BlockSparseWeight.from_dense(torch.randn(32, 48), None, (16, 16))


BAD_CALLS = {
    "mask-shape": (
        lambda: BlockSparseWeight.from_dense(torch.randn(8, 8), torch.ones(8, 9, dtype=torch.bool)),
        ValueError,
        ["mask", "(8, 8)", "(8, 9)"],
    ),
    "mask-dtype": (
        lambda: BlockSparseWeight.from_dense(torch.randn(8, 8), torch.ones(8, 8)),
        TypeError,
        ["mask", "bool", "float32"],
    ),
    "block-not-pow2": (
        lambda: BlockSparseWeight.from_dense(torch.randn(8, 8), None, (24, 16)),
        ValueError,
        ["block rows", "power of two", "24"],
    ),
    "block-too-big": (
        lambda: BlockSparseWeight.from_dense(torch.randn(8, 8), None, (16, 256)),
        ValueError,
        ["block cols", "256"],
    ),
    "24-cols": (lambda: Sparse24Weight.from_dense(torch.randn(4, 6)), ValueError, ["divisible by 4", "(4, 6)"]),
    "24-too-many": (lambda: Sparse24Weight.from_dense(torch.ones(2, 8)), ValueError, ["at most 2", "row 0", "keep 4"]),
    "x-width": (lambda: masked_matmul(torch.randn(3, 47), _bsw()), ValueError, ["x", "in_features=48", "(3, 47)"]),
    "x-dtype": (
        lambda: masked_matmul(torch.randn(3, 48, dtype=torch.float16), _bsw()),
        TypeError,
        ["x", "float32", "float16"],
    ),
    "bias-shape": (
        lambda: masked_matmul(torch.randn(3, 48), _bsw(), torch.randn(31)),
        ValueError,
        ["bias", "(32,)", "(31,)"],
    ),
    "dense-weight": (
        lambda: masked_matmul(torch.randn(3, 48), torch.randn(32, 48)),
        TypeError,
        ["weight", "BlockSparseWeight", "Tensor"],
    ),
    "int-x": (lambda: masked_matmul(torch.arange(48).reshape(1, 48), _bsw()), TypeError, ["x", "int64"]),
    "in-negative": (lambda: SparseLinear(-3, 4), ValueError, ["SparseLinear", "in_features", "non-negative", "-3"]),
    "out-negative": (lambda: SparseLinear(4, -1, format="2:4"), ValueError, ["out_features", "-1"]),
    "in-float": (lambda: SparseLinear(4.0, 4), ValueError, ["in_features", "4.0"]),
    "meta-from-dense": (
        lambda: BlockSparseWeight.from_dense(torch.empty(8, 8, device="meta")),
        ValueError,
        ["from_dense", "meta", "keeping_every_block"],
    ),
}


@pytest.mark.parametrize("call, error, words", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_input_is_a_clear_error(call, error, words):
    with raises_naming(error, words):
        call()


# -- opcheck and compile -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_block_sparse(backend):
    w = torch.randn(40, 48)
    weight = BlockSparseWeight.from_dense(w, prune.masks(w, 0.5, "block", block=(16, 16)), (16, 16))
    x = torch.randn(9, 48, requires_grad=True)
    values = weight.values.clone().requires_grad_(True)
    require_backend("block_sparse_matmul", backend, x)
    args = (
        x,
        values,
        weight.crow,
        weight.col,
        weight.ccol,
        weight.csc_row,
        weight.csc_block,
        40,
        torch.randn(40, requires_grad=True),
    )
    with memkern.use_backend(backend):
        torch.library.opcheck(torch.ops.memkern.block_sparse_matmul.default, args)
        grad = torch.randn(9, 40)
        torch.library.opcheck(
            torch.ops.memkern.block_sparse_matmul_backward.default, (grad, x.detach(), values.detach(), *args[2:7])
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_sparse24(backend):
    w = torch.randn(20, 32)
    mask = _mask24(20, 32)
    sw = Sparse24Weight.from_dense(w, mask)
    x = torch.randn(7, 32, requires_grad=True)
    require_backend("sparse24_matmul", backend, x)
    with memkern.use_backend(backend):
        torch.library.opcheck(
            torch.ops.memkern.sparse24_matmul.default, (x, sw.values.clone().requires_grad_(True), sw.meta, None)
        )
        torch.library.opcheck(torch.ops.memkern.sparse24_decompress.default, (sw.values, sw.meta, 32))
        if backend != "triton":  # compression is a one-off conversion: no Triton kernel
            torch.library.opcheck(torch.ops.memkern.sparse24_compress.default, (w, mask))


@pytest.mark.parametrize("fmt", ("block", "2:4"))
def test_compiles_without_graph_breaks(fmt):
    linear = torch.nn.Linear(48, 32)
    mask = prune.masks(linear.weight, 0.5, "n:m" if fmt == "2:4" else "block", block=(16, 16))
    layer = SparseLinear.from_dense(linear, mask, format=fmt, block=(16, 16))

    def f(x):
        return layer(x * 2).relu().sum()

    x = torch.randn(5, 48, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    g_compiled, gv_compiled = x.grad.clone(), layer.values.grad.clone()
    x.grad = None
    layer.values.grad = None
    eager = f(x)
    eager.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, x.grad)
    torch.testing.assert_close(gv_compiled, layer.values.grad)


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", (0.5, 0.9))
def test_gpu_block_sparse_matches_reference(backend, dtype, sparsity):
    w = torch.randn(300, 513)
    mask = prune.masks(w, sparsity, "block")
    weight = BlockSparseWeight.from_dense(w.to(dtype).cuda(), mask.cuda(), (64, 64))
    x = torch.randn(4, 77, 513).to(dtype).cuda()
    bias = torch.randn(300).to(dtype).cuda()
    _check_gpu(backend, x, weight, bias, w * mask, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton", "torch"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sparse24_matches_reference(backend, dtype):
    w = torch.randn(300, 516)
    mask = prune.masks(w, 0.5, "n:m")
    with memkern.use_backend("cpp" if memkern._library.has_cpp() else "torch"):
        cpu = Sparse24Weight.from_dense(w.to(dtype), mask)
    gpu = Sparse24Weight.from_dense(w.to(dtype).cuda(), mask.cuda())
    assert torch.equal(gpu.values.cpu(), cpu.values) and torch.equal(gpu.meta.cpu(), cpu.meta)
    assert torch.equal(gpu.to_dense().cpu(), (w * mask).to(dtype))
    x = torch.randn(3, 50, 516).to(dtype).cuda()
    _check_gpu(backend, x, gpu, torch.randn(300).to(dtype).cuda(), w * mask, dtype)


def _check_gpu(backend, x, weight, bias, dense_masked, dtype):
    require_backend(
        "block_sparse_matmul" if isinstance(weight, BlockSparseWeight) else "sparse24_matmul",
        backend,
        x.reshape(-1, x.shape[-1]),
    )
    grad = torch.randn(*x.shape[:-1], weight.shape[0]).to(dtype).cuda()
    y, dx, dv, db = _run(backend, x, weight, bias, grad)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x.cpu(), dense_masked.to(dtype), bias.cpu(), grad.cpu())
    assert_rel_close(y.cpu(), y_ref, dtype)
    assert_rel_close(dx.cpu(), dx_ref, dtype)
    mask = dense_masked != 0
    assert_rel_close(
        _grad_as_dense(weight, dv).cpu()
        if isinstance(weight, BlockSparseWeight)
        else reference.sparse24_decompress(dv.cpu(), weight.meta.cpu(), weight.shape[1]),
        dw_ref * mask,
        dtype,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_in_any_layout_give_the_same_product(backend):
    w = torch.randn(OUT, IN)
    weight = BlockSparseWeight.from_dense(w, _block_mask(0.5, 16), (16, 16))
    panel = weight.values
    assert panel.permute(1, 0, 2).is_contiguous()  # row_panel_layout, what the C++ kernel reads as is
    x = torch.randn(5, IN)
    require_backend("block_sparse_matmul", backend, x)
    with memkern.use_backend(backend):
        y_panel = masked_matmul(x, weight)
        weight.values = panel.contiguous()
        y_plain = masked_matmul(x, weight)
    torch.testing.assert_close(y_plain, y_panel, rtol=1e-6, atol=1e-6)
    assert_rel_close(y_panel, x.double() @ weight.to_dense().double().t(), torch.float32)


# -- untrusted structure: a clear error, never a crash ------------------------------------------
def _corrupt(weight: BlockSparseWeight, kind: str) -> list[str]:
    """Change ``weight``'s index in place as a bad checkpoint or a stray write would; the
    words the error must hold."""
    if kind == "col-far":
        weight.col[1] = 10**6
        return ["weight.col", "[0, 8)", "1000000", "position 1"]
    if kind == "col-negative":
        weight.col[0] = -1
        return ["weight.col", "-1"]
    if kind == "crow-backwards":
        weight.crow[1] = weight.crow[2] + 1
        return ["weight.crow", "without decreasing"]
    if kind == "csc-block-far":
        weight.csc_block[-1] = weight.col.numel()
        return ["weight.csc_block", f"[0, {weight.col.numel()})"]
    if kind == "csc-row-wrong":
        weight.csc_row[0] = (weight.csc_row[0] + 1) % 3
        return ["weight.csc_row", "block row"]
    assert kind == "duplicate-block"
    weight.col[1] = weight.col[0]
    return ["weight.col", "once"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "kind", ("col-far", "col-negative", "crow-backwards", "csc-block-far", "csc-row-wrong", "duplicate-block")
)
def test_index_changed_in_place_is_a_clear_error(backend, kind):
    # Every block of a 48 x 123 weight in 16 x 16 blocks: 3 x 8 blocks, 8 in each block row.
    weight = BlockSparseWeight.from_dense(torch.randn(48, IN), None, (16, 16))
    x = torch.randn(5, IN)
    require_backend("block_sparse_matmul", backend, x)
    with memkern.use_backend(backend):
        y = masked_matmul(x, weight)  # checked at construction, trusted until changed
        assert_rel_close(y, x.double() @ weight.to_dense().double().t(), torch.float32)
        with raises_naming(ValueError, _corrupt(weight, kind)):
            masked_matmul(x, weight)


def _raw(weight: BlockSparseWeight) -> dict:
    return {n: getattr(weight, n) for n in ("values", "crow", "col", "ccol", "csc_row", "csc_block", "mask", "shape")}


BAD_RAW_TENSORS = {
    "col-range": ({"col": torch.tensor([0, 10**6])}, ValueError, ["col", "[0, 2)", "1000000"]),
    "col-dtype": ({"col": torch.tensor([0, 1], dtype=torch.int32)}, TypeError, ["col", "int64", "int32"]),
    "col-length": ({"col": torch.tensor([0, 1, 1])}, ValueError, ["col", "(2,)", "(3,)"]),
    "col-strided": ({"col": torch.tensor([0, 0, 1, 1])[::2]}, ValueError, ["col", "contiguous"]),
    "crow-start": ({"crow": torch.tensor([1, 2])}, ValueError, ["crow", "from 0 to 2", "[1, 2]"]),
    "crow-length": ({"crow": torch.tensor([0, 2, 2])}, ValueError, ["crow", "(2,)", "(3,)"]),
    "ccol-order": ({"ccol": torch.tensor([0, 2, 1])}, ValueError, ["ccol", "without decreasing"]),
    "csc-twice": ({"csc_block": torch.tensor([0, 0])}, ValueError, ["csc_block", "each of the 2 blocks once"]),
    "block-size": ({"values": torch.randn(2, 24, 64)}, ValueError, ["values", "BN and BK", "(2, 24, 64)"]),
    "values-count": ({"values": torch.randn(3, 64, 64)}, ValueError, ["col", "(3,)", "(2,)"]),
    "mask-dtype": ({"mask": torch.ones(2, 64, 64)}, TypeError, ["mask", "bool", "float32"]),
    "shape": ({"shape": (64, -128)}, ValueError, ["in_features", "-128"]),
    "device": (
        {"crow": torch.tensor([0, 2], device="meta")},
        ValueError,
        ["one device", "crow on meta", "values on cpu"],
    ),
}


@pytest.mark.parametrize("change, error, words", list(BAD_RAW_TENSORS.values()), ids=list(BAD_RAW_TENSORS))
def test_block_sparse_constructor_checks_raw_tensors(change, error, words):
    raw = _raw(BlockSparseWeight.from_dense(torch.randn(64, 128), None, (64, 64)))
    with raises_naming(error, words):
        BlockSparseWeight(**{**raw, **change})


def test_sparse24_constructor_checks_raw_tensors():
    sw = Sparse24Weight.from_dense(torch.randn(4, 16), _mask24(4, 16))
    meta = sw.meta.clone()
    meta[2, 1] = (meta[2, 1] & 0x0F) | 0x30  # group 3 of row 2 (high half of byte 1): i0 = 3, i1 = 0
    cases = [
        ({"meta": meta}, ValueError, ["meta", "i0 < i1", "row 2, group 3", "i0=3, i1=0"]),
        ({"meta": sw.meta[:, :1]}, ValueError, ["meta", "(4, 2)", "(4, 1)"]),
        ({"meta": sw.meta.to(torch.int16)}, TypeError, ["meta", "uint8", "int16"]),
        ({"values": sw.values[:, :6]}, ValueError, ["values", "(4, 8)", "(4, 6)"]),
        ({"mask": torch.ones(4, 8)}, TypeError, ["mask", "bool"]),
        ({"shape": (4, 18)}, ValueError, ["divisible by 4", "(4, 18)"]),
    ]
    for change, error, words in cases:
        with raises_naming(error, words):
            Sparse24Weight(**{"values": sw.values, "meta": sw.meta, "shape": sw.shape, **change})


def _trained_layer(fmt: str, inp: int = 48, out: int = 40) -> tuple[SparseLinear, torch.Tensor]:
    linear = torch.nn.Linear(inp, out)
    mask = (
        _mask24(out, inp, (0, 1, 2))
        if fmt == "2:4"
        else prune.masks(linear.weight, 0.5, "unstructured")
        & prune.masks(torch.randn(out, inp), 0.5, "block", block=(16, 16))
    )
    return SparseLinear.from_dense(linear, mask, format=fmt, block=(16, 16)), mask


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("col", lambda sd: sd["col"].index_fill(0, torch.tensor([1]), 10**6), ["col", "1000000", "position 1"]),
        ("crow", lambda sd: sd["crow"].flip(0), ["crow", "without decreasing"]),
        ("crow", lambda sd: None, ["crow", "missing"]),
        ("mask", lambda sd: sd["mask"].float(), ["mask", "bool"]),
        (
            "_extra_state",
            lambda sd: {**sd["_extra_state"], "shape": [40, 64]},
            ["size mismatch", "(40, 64)", "(40, 48)"],
        ),
        ("_extra_state", lambda sd: {**sd["_extra_state"], "block": [16, 32]}, ["values", "(16, 32)"]),
        ("_extra_state", lambda sd: "block", ["_extra_state", "dict"]),
    ],
    ids=["col-range", "crow-order", "crow-missing", "mask-dtype", "shape", "block", "extra-type"],
)
def test_corrupted_checkpoint_is_refused_and_leaves_the_layer(key, value, words):
    source, _ = _trained_layer("block")
    state = source.state_dict()
    state[key] = value(state)
    if state[key] is None:
        del state[key]
    layer, _ = _trained_layer("block")
    x = torch.randn(3, 48)
    before = layer(x)
    with raises_naming(RuntimeError, words):
        layer.load_state_dict(state)
    assert torch.equal(layer(x), before)  # nothing was half loaded


def test_corrupted_sparse24_checkpoint_is_refused():
    source, _ = _trained_layer("2:4")
    state = source.state_dict()
    state["meta"] = torch.full_like(state["meta"], 0xFF)
    layer = SparseLinear(48, 40, format="2:4")
    with pytest.raises(RuntimeError, match=r"meta must give each group two positions i0 < i1; row 0, group 0"):
        layer.load_state_dict(state)


def test_layer_buffer_changed_in_place_is_a_clear_error():
    layer, _ = _trained_layer("block")
    x = torch.randn(3, 48)
    layer(x)
    layer.col[0] = 10**6
    with pytest.raises(ValueError, match=r"weight\.col must hold block columns in \[0, 3\).*1000000"):
        layer(x)


# -- meta device and shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ("block", "2:4"))
def test_layer_built_on_meta_loads_with_assign(fmt):
    trained, mask = _trained_layer(fmt)
    layer = SparseLinear(48, 40, format=fmt, block=(16, 16), device="meta")
    assert layer.values.is_meta and layer.bias.is_meta
    layer.load_state_dict(trained.state_dict(), assign=True)
    assert not layer.values.is_meta and layer.values.requires_grad
    x = torch.randn(3, 48)
    dense = trained.to_dense().detach()
    assert torch.equal(dense, (dense * mask))
    ref = x.double() @ dense.double().t() + trained.bias.detach().double()
    assert_rel_close(layer(x), ref, torch.float32)
    assert layer.sparsity == pytest.approx(1 - mask.float().mean().item())


@pytest.mark.parametrize("fmt", ("block", "2:4"))
def test_loading_another_shape_is_refused(fmt):
    small = SparseLinear(64, 32, format=fmt)
    big = SparseLinear(128, 32, format=fmt)
    x = torch.randn(2, 128)
    before = big(x)
    with raises_naming(RuntimeError, ["size mismatch for values", "(32, 64)", "(32, 128)"]):
        big.load_state_dict(small.state_dict())
    assert big.in_features == 128 and torch.equal(big(x), before)


# -- pruned weights stay pruned ------------------------------------------------------------------
_OPTIMISERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, weight_decay=0.1),
}


def _masks_for_training(case: str, out: int, inp: int) -> tuple[str, torch.Tensor]:
    if case == "2:4-by-hand":  # groups keeping 1 and 2: positions 1, 2 and 3 of group 0 are pruned
        return "2:4", torch.tensor([[1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool).repeat(out, inp // 8)
    if case == "2:4-0-1-2":
        return "2:4", _mask24(out, inp, (0, 1, 2))
    if case == "block":
        return "block", prune.masks(torch.randn(out, inp), 0.5, "block", block=(16, 16))
    assert case == "unstructured-in-blocks"
    return "block", prune.masks(torch.randn(out, inp), 0.6, "unstructured")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimiser", _OPTIMISERS)
@pytest.mark.parametrize("case", ("2:4-by-hand", "2:4-0-1-2", "block", "unstructured-in-blocks"))
def test_pruned_weights_stay_zero_through_any_optimiser(backend, optimiser, case):
    out, inp = 20, 40  # 40: cut inside a 16-wide block
    fmt, mask = _masks_for_training(case, out, inp)
    linear = torch.nn.Linear(inp, out)
    layer = SparseLinear.from_dense(linear, mask, format=fmt, block=(16, 16))
    opt = _OPTIMISERS[optimiser](layer.parameters())
    before = layer.to_dense().detach().clone()
    x = torch.randn(6, inp)
    require_backend("block_sparse_matmul" if fmt == "block" else "sparse24_matmul", backend, x)
    with memkern.use_backend(backend):
        for _ in range(4):
            opt.zero_grad()
            layer(torch.randn(6, inp)).square().mean().backward()
            opt.step()
    after = layer.to_dense()
    assert (after[~mask] == 0).all(), "a pruned weight was revived"
    assert (after[mask] != before[mask]).all()  # every kept weight trained
    # Nor does the storage hold anything at pruned places (free 2:4 slots, masked elements).
    if layer.mask is not None:
        assert (layer.values.detach()[~layer.mask] == 0).all()


def test_sparse24_free_slots_count_as_zero_whatever_they_hold():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # groups keeping 1 and 0
    w = torch.tensor([[3.0, 5.0, 7.0, 9.0, 2.0, 4.0, 6.0, 8.0]])
    sw = Sparse24Weight.from_dense(w, mask)
    assert sw.mask.tolist() == [[True, False, False, False]]
    with torch.no_grad():
        sw.values.fill_(11.0)  # a stray write into the free slots too
    assert sw.to_dense().tolist() == [[11.0, 0, 0, 0, 0, 0, 0, 0]]
    assert masked_matmul(torch.ones(1, 8), sw).tolist() == [[11.0]]
    assert SparseLinear.from_dense(torch.nn.Linear(8, 1), mask, format="2:4").sparsity == 7 / 8


# -- in_features = 0 ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ("block", "2:4"))
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no-bias"))
def test_zero_in_features_gives_the_bias(backend, kind, with_bias):
    layer = SparseLinear(0, 5, bias=with_bias, format=kind, block=(16, 16))
    x = torch.randn(2, 3, 0, requires_grad=True)
    grad = torch.randn(2, 3, 5)
    require_backend("block_sparse_matmul" if kind == "block" else "sparse24_matmul", backend, x.reshape(6, 0))
    with memkern.use_backend(backend):
        y = layer(x)
        y.backward(grad)
    expected = layer.bias.detach().expand(2, 3, 5) if with_bias else torch.zeros(2, 3, 5)
    assert torch.equal(y, expected)
    assert x.grad.shape == (2, 3, 0) and layer.values.grad.numel() == 0
    if with_bias:
        assert_rel_close(layer.bias.grad, grad.double().sum((0, 1)), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "no-bias"))
def test_block_rows_without_kept_blocks_give_exactly_the_bias(backend, with_bias, poisoned_outputs):
    w = torch.randn(OUT, IN)
    mask = torch.ones(OUT, IN, dtype=torch.bool)
    mask[16:32] = False  # block row 1 of 16 x 16 blocks keeps nothing
    weight = BlockSparseWeight.from_dense(w, mask, (16, 16))
    assert weight.crow.diff()[1] == 0
    bias = torch.randn(OUT) if with_bias else None
    x = torch.randn(9, IN)
    expected = bias[16:32].expand(9, 16) if with_bias else torch.zeros(9, 16)
    dv = _check_against_reference(backend, x, weight, mask, bias, torch.float32, w)
    with memkern.use_backend(backend):
        y = masked_matmul(x, weight, bias)
    assert torch.equal(y[:, 16:32], expected)
    assert dv.shape[0] == weight.col.numel()
