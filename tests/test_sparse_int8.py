"""Sparse int8 layers: block-sparse and 2:4 kept weights in int8 with per-channel scales.

The int8 weight and scales against a quantisation written out here; every CPU backend's
W8A8 product against the float64 computation of the same int8 math (exact integer sums),
W8A16 against float64; odd shapes, empty block rows, an all-pruned layer, bad input; the
C++ int8 product bit for bit; the module through state_dict, meta + assign, casts,
pickling, memory_footprint, convert and memkern.save/load."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from torch import nn

import memkern
from memkern import prune
from memkern.nn import Int8Linear, SparseInt8Linear, SparseLinear
from conftest import (
    CPU_BACKENDS,
    REL_TOL,
    assert_bit_equal,
    assert_compiles_like_eager,
    assert_rel_close,
    rel_error,
    require_backend,
)

OUT, IN = 47, 123  # multiples of no block size
BLOCK = (16, 32)


# -- first principles ---------------------------------------------------------------------------
def _quantise_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row, written out: scale = max|row| / 127 in float32 (1 for a
    zero row), q = round-half-even(w / scale) clamped to [-127, 127]."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale


def _w8a8_expected(x, w_q, w_scale, bias):
    """The int8 math in float64: per-row quantised x, an exact integer product, then the
    float32 epilogue acc * (x_scale * w_scale) + bias."""
    x_q, x_scale = _quantise_rows(x)
    acc = x_q.double() @ w_q.double().t()  # exact: every partial sum is an integer < 2^53
    out = acc.float() * (x_scale[:, None] * w_scale[None, :])
    return out if bias is None else out + bias.float()


def _w8a16_expected(x, w_q, w_scale, bias):
    out = x.double() @ (w_q.double() * w_scale.double()[:, None]).t()
    return out if bias is None else out + bias.double()


def _block_mask(out=OUT, inp=IN, block=BLOCK, sparsity=0.5, empty_block_row=True):
    mask = prune.masks(torch.randn(out, inp), sparsity, "block", block=block)
    if empty_block_row:
        mask[block[0] : 2 * block[0]] = False  # a block row with no kept block
    return mask


def _sparse_linear(mask, fmt="block", block=BLOCK, bias=True):
    linear = nn.Linear(mask.shape[1], mask.shape[0], bias=bias)
    return SparseLinear.from_dense(linear, mask, format=fmt, block=block), linear.weight.detach() * mask


def _check_layer_forward(layer, dense_masked, backend, dtype=torch.float32, m=5):
    x = torch.randn(m, layer.in_features).to(dtype)
    w_q, w_scale = _quantise_rows(dense_masked)
    table = "sparse24_int8_linear" if layer.format == "2:4" else "block_sparse_int8_linear"
    require_backend(table, backend, x)
    with memkern.use_backend(backend), torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (m, layer.out_features)
    bias = layer.bias
    if layer.weight_only:
        assert_rel_close(y, _w8a16_expected(x, w_q, w_scale, bias), dtype)
    else:
        # Exact integer sums: only the epilogue's float32 rounding (and an FMA) may differ.
        assert_rel_close(y, _w8a8_expected(x, w_q, w_scale, bias), dtype, factor=0.1 if dtype == torch.float32 else 1)
    return x, y


# -- quantisation of the kept weights ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["block", "2:4"])
def test_kept_weights_quantised_per_row_and_pruned_stay_zero(fmt):
    mask = _block_mask() if fmt == "block" else prune.masks(torch.randn(OUT, 128), 0.5, "n:m", n=2, m=4)
    sparse, dense = _sparse_linear(mask, fmt)
    layer = SparseInt8Linear.from_sparse(sparse)
    w_q, w_scale = _quantise_rows(dense)
    assert layer.values.dtype == torch.int8 and layer.scales.dtype == torch.float32
    assert torch.equal(layer.int8_weight(), w_q)
    assert torch.equal(layer.scales, w_scale)
    assert (layer.int8_weight()[~mask] == 0).all()
    if fmt == "block":
        assert torch.equal(layer.scales[BLOCK[0] : 2 * BLOCK[0]], torch.ones(BLOCK[0]))  # the empty block row
        assert layer.values.shape == sparse.values.shape and torch.equal(layer.col, sparse.col)


def test_every_block_kept_holds_the_bytes_of_int8linear():
    linear = nn.Linear(IN, OUT)
    sparse = SparseLinear.from_dense(linear, torch.ones(OUT, IN, dtype=torch.bool), block=BLOCK)
    layer, dense = SparseInt8Linear.from_sparse(sparse), Int8Linear.from_linear(linear)
    assert torch.equal(layer.int8_weight(), dense.int8_weight())
    assert torch.equal(layer.scales, dense.weight_scale)
    x = torch.randn(4, IN)
    with torch.no_grad(), memkern.use_backend("cpp"):
        assert_rel_close(layer(x), dense(x).double(), torch.float32, factor=0.1)


def test_element_mask_inside_kept_blocks_is_kept_and_counts_as_zero():
    mask = torch.rand(OUT, IN) < 0.3  # unstructured: kept blocks hold pruned elements
    sparse, dense = _sparse_linear(mask)
    assert sparse.mask is not None
    with torch.no_grad():
        sparse.values.add_(1.0)  # pruned slots holding garbage must not count
    layer = SparseInt8Linear.from_sparse(sparse)
    assert torch.equal(layer.mask, sparse.mask)
    w_q, w_scale = _quantise_rows(sparse.to_dense())
    assert torch.equal(layer.int8_weight(), w_q) and torch.equal(layer.scales, w_scale)
    assert layer.sparsity == pytest.approx(1 - mask.sum().item() / mask.numel())


# -- every backend against the int8 math -----------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_only", [False, True])
def test_block_sparse_int8_matches_float64(backend, dtype, weight_only, poisoned_outputs):
    mask = _block_mask()
    sparse, dense = _sparse_linear(mask)
    layer = SparseInt8Linear.from_sparse(sparse, weight_only=weight_only)
    _check_layer_forward(layer, dense, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block", [(32, 16), (64, 128)])
def test_block_sizes_and_leading_dims(backend, block):
    mask = _block_mask(block=block, empty_block_row=False)
    sparse, dense = _sparse_linear(mask, block=block)
    layer = SparseInt8Linear.from_sparse(sparse)
    x = torch.randn(2, 3, IN)
    require_backend("block_sparse_int8_linear", backend, x)
    with memkern.use_backend(backend), torch.no_grad():
        y = layer(x)
    w_q, w_scale = _quantise_rows(dense)
    assert y.shape == (2, 3, OUT)
    assert_rel_close(y.reshape(6, OUT), _w8a8_expected(x.reshape(6, IN), w_q, w_scale, layer.bias), torch.float32, 0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_only", [False, True])
def test_sparse24_int8_matches_float64(backend, weight_only, poisoned_outputs):
    mask = prune.masks(torch.randn(OUT, 124), 0.5, "n:m", n=2, m=4)
    sparse, dense = _sparse_linear(mask, "2:4")
    layer = SparseInt8Linear.from_sparse(sparse, weight_only=weight_only)
    _check_layer_forward(layer, dense, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_only", [False, True])
def test_all_pruned_layer_gives_the_bias(backend, weight_only, poisoned_outputs):
    sparse, _ = _sparse_linear(torch.zeros(OUT, IN, dtype=torch.bool))
    layer = SparseInt8Linear.from_sparse(sparse, weight_only=weight_only)
    assert layer.values.shape[0] == 0 and layer.sparsity == 1.0
    x = torch.randn(3, IN)
    require_backend("block_sparse_int8_linear", backend, x)
    with memkern.use_backend(backend), torch.no_grad():
        y = layer(x)
    assert torch.equal(y, layer.bias.detach().expand(3, OUT))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_w8a8_row_with_nan_gives_nan_row(backend):
    sparse, _ = _sparse_linear(_block_mask(empty_block_row=False))
    layer = SparseInt8Linear.from_sparse(sparse)
    x = torch.randn(3, IN)
    x[1, 7] = float("nan")
    require_backend("block_sparse_int8_linear", backend, x)
    with memkern.use_backend(backend), torch.no_grad():
        y = layer(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_public_op_and_input_gradient(backend):
    sparse, dense = _sparse_linear(_block_mask())
    layer = SparseInt8Linear.from_sparse(sparse, weight_only=True)
    x = torch.randn(4, IN, requires_grad=True)
    require_backend("block_sparse_int8_linear", backend, x)
    with memkern.use_backend(backend):
        y = memkern.ops.block_sparse_int8_linear(
            x, layer.values, layer.scales, layer.crow, layer.col, layer.bias, weight_only=True
        )
    grad = torch.randn_like(y)
    y.backward(grad)
    w_q, w_scale = _quantise_rows(dense)
    dx_expected = grad.double() @ (w_q.double() * w_scale.double()[:, None])
    assert_rel_close(x.grad, dx_expected, torch.float32)
    assert rel_error(layer.bias.grad, grad.double().sum(0)) < REL_TOL[torch.float32]


# -- the C++ kernel: exact int8 products, its run-time path ---------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


def test_cpp_int8_product_is_exact_on_every_path():
    require_backend("block_sparse_int8_linear", "cpp", torch.randn(1, IN))
    mask = _block_mask(block=(32, 16))
    sparse, _ = _sparse_linear(mask, block=(32, 16))
    layer = SparseInt8Linear.from_sparse(sparse)
    a = torch.randint(-127, 128, (9, IN), dtype=torch.int8)
    a[0] = 127  # extreme products: 127 * 127 summed over every kept column
    expected = (a.long() @ layer.int8_weight().long().t()).int()
    mm = torch.ops.memkern_internal.block_sparse_int8_mm_kernel
    path = torch.ops.memkern.sparse_int8_kernel_path()
    flags = _cpu_flags()
    vnni_cpu = {"avx512f", "avx512bw", "avx512_vnni"} <= flags
    assert path == "avx512_vnni" if vnni_cpu else path in ("avx2", "portable")
    for allow_vnni in (False, True):  # on a CPU without VNNI both take the build's own loop
        assert_bit_equal(mm(a, layer.values, layer.crow, layer.col, OUT, allow_vnni), expected)


@pytest.mark.parametrize("block", [(16, 32), (32, 16), (64, 64)])
@pytest.mark.parametrize("rows", [31, 32, 37])
def test_cpp_int8_product_exact_around_the_packed_tile_threshold(block, rows):
    # From 32 rows of x the AVX2 kernel packs each kept block (16-column panels) and sums
    # over a block row's kept blocks in registers, 4 rows at a time: 37 leaves a 1-row tile,
    # OUT = 47 a block row past the matrix edge, IN = 123 a partial block column.
    require_backend("block_sparse_int8_linear", "cpp", torch.randn(1, IN))
    sparse, dense = _sparse_linear(_block_mask(block=block), block=block)
    layer = SparseInt8Linear.from_sparse(sparse)
    a = torch.randint(-127, 128, (rows, IN), dtype=torch.int8)
    a[-1] = -127  # extreme products in the last (short) tile
    expected = (a.long() @ layer.int8_weight().long().t()).int()
    mm = torch.ops.memkern_internal.block_sparse_int8_mm_kernel
    assert_bit_equal(mm(a, layer.values, layer.crow, layer.col, OUT, False), expected)
    x = torch.randn(rows, IN)
    w_q, w_scale = _quantise_rows(dense)
    with memkern.use_backend("cpp"), torch.no_grad():
        y = layer(x)
    assert_rel_close(y, _w8a8_expected(x, w_q, w_scale, layer.bias), torch.float32, 0.1)


def test_cpp_long_rows_sum_in_int64():
    # K past 2^17: the W8A8 sums leave int32 (each block's int32 sum is added in int64).
    require_backend("block_sparse_int8_linear", "cpp", torch.randn(1, 8))
    k, n = (1 << 17) + 128, 16
    values = torch.full((k // 128, 16, 128), 127, dtype=torch.int8)
    crow = torch.tensor([0, k // 128])
    col = torch.arange(k // 128)
    scales = torch.full((n,), 1.0)
    x = torch.ones(1, k)  # quantises to 127 everywhere, x_scale = 1/127
    with memkern.use_backend("cpp"):
        y = memkern.ops.block_sparse_int8_linear(x, values, scales, crow, col)
    expected = torch.tensor(127.0 * 127 * k, dtype=torch.float32) * (torch.tensor(1.0) / 127)
    assert torch.equal(y, expected.expand(1, n))


# -- bad input ----------------------------------------------------------------------------------------
def _op_args():
    sparse, _ = _sparse_linear(_block_mask())
    layer = SparseInt8Linear.from_sparse(sparse)
    return dict(
        x=torch.randn(3, IN), values=layer.values, scales=layer.scales, crow=layer.crow, col=layer.col, bias=layer.bias
    )


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a.update(values=a["values"].float()), TypeError, "values must have dtype int8; got float32"),
        (lambda a: a.update(scales=a["scales"][:10]), ValueError, "crow must have shape (2,)"),
        (lambda a: a.update(scales=a["scales"].double()), TypeError, "scales must have dtype float32"),
        (lambda a: a.update(x=torch.randn(3, IN).long()), TypeError, "x must have dtype"),
        (lambda a: a.update(crow=a["crow"].int()), TypeError, "crow must have dtype int64"),
        (lambda a: a.update(col=a["col"][:-1]), ValueError, "col must have shape"),
        (lambda a: a.update(col=a["col"] + 100), ValueError, "col must hold block columns in [0, 4)"),
        (lambda a: a.update(crow=a["crow"].flip(0)), ValueError, "crow must run from 0"),
        (lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias must have shape (47,)"),
    ],
)
def test_bad_input_is_refused_before_any_kernel(change, error, words):
    args = _op_args()
    change(args)
    with pytest.raises(error, match=re.escape(words)):
        memkern.ops.block_sparse_int8_linear(**args)


def test_cpp_kernel_refuses_a_corrupt_index_on_a_direct_call():
    args = _op_args()
    require_backend("block_sparse_int8_linear", "cpp", args["x"])
    kernel = torch.ops.memkern.block_sparse_int8_linear_kernel
    bad_col = args["col"].clone()
    bad_col[-1] = 1000
    with pytest.raises(ValueError, match=r"col must lie in \[0, 4\), got 1000"):
        kernel(args["x"], args["values"], args["scales"], args["crow"], bad_col, args["bias"], False)
    with pytest.raises(ValueError, match="crow must run from 0"):
        kernel(args["x"], args["values"], args["scales"], args["crow"] + 1, args["col"], args["bias"], False)


# -- operators: opcheck and torch.compile ---------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weight_only", [False, True])
def test_opcheck(backend, weight_only):
    a = _op_args()
    x, bias = a["x"].requires_grad_(True), a["bias"].detach().requires_grad_(True)
    args = (x, a["values"], a["scales"], a["crow"], a["col"], bias, weight_only)
    require_backend("block_sparse_int8_linear", backend, x)
    with memkern.use_backend(backend):
        torch.library.opcheck(torch.ops.memkern.block_sparse_int8_linear.default, args)


def test_opcheck_sparse24():
    layer = _layer("2:4")
    x = torch.randn(3, layer.in_features, requires_grad=True)
    args = (x, layer.values, layer.meta, layer.scales, layer.bias, True)
    torch.library.opcheck(torch.ops.memkern.sparse24_int8_linear.default, args)


def test_compiles_without_graph_breaks():
    layer = _layer(weight_only=True)

    def f(x):
        return layer(x * 2).relu().sum()

    assert_compiles_like_eager(f, torch.randn(2, 3, IN, requires_grad=True))


@pytest.mark.parametrize("weight_only", [False, True])
def test_sparse24_compiles_without_graph_breaks(weight_only):
    # The CUDA semi-structured path's checks and cache stay out of the traced graph.
    layer = _layer("2:4", weight_only=weight_only)

    def f(x):
        return layer(x * 2).relu().sum()

    assert_compiles_like_eager(f, torch.randn(2, 3, layer.in_features, requires_grad=True))


def test_module_refuses_bad_arguments():
    with pytest.raises(TypeError, match="SparseInt8Linear.from_sparse: sparse must be a memkern.nn.SparseLinear"):
        SparseInt8Linear.from_sparse(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="format must be one of"):
        SparseInt8Linear(8, 8, format="csr")
    with pytest.raises(ValueError, match="2:4 needs in_features divisible by 4"):
        SparseInt8Linear(6, 8, format="2:4")
    layer = SparseInt8Linear(IN, OUT, block=BLOCK)
    with pytest.raises(ValueError, match="x's last dimension must be in_features=123"):
        layer(torch.randn(2, IN + 1))


# -- the module as a model part ------------------------------------------------------------------------
def _layer(fmt="block", weight_only=False):
    mask = _block_mask() if fmt == "block" else prune.masks(torch.randn(OUT, 124), 0.5, "n:m", n=2, m=4)
    return SparseInt8Linear.from_sparse(_sparse_linear(mask, fmt)[0], weight_only=weight_only)


@pytest.mark.parametrize("fmt", ["block", "2:4"])
def test_state_dict_round_trip_into_a_fresh_layer(fmt):
    layer = _layer(fmt, weight_only=True)
    sd = layer.state_dict()
    fresh = SparseInt8Linear(layer.in_features, OUT, format=fmt, block=BLOCK)  # every block, W8A8
    fresh.load_state_dict(sd)
    assert fresh.weight_only and fresh.values.shape == layer.values.shape
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert_bit_equal(fresh(x), layer(x))


def test_meta_device_and_assign():
    layer = _layer()
    with torch.device("meta"):
        target = SparseInt8Linear(IN, OUT, block=BLOCK)
    assert target.values.is_meta and target.values.dtype == torch.int8
    target.load_state_dict(layer.state_dict(), assign=True)
    assert not any(t.is_meta for t in target.state_dict().values() if isinstance(t, torch.Tensor))
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert_bit_equal(target(x), layer(x))


@pytest.mark.parametrize("fmt", ["block", "2:4"])
def test_to_meta_and_back_and_float64(fmt):
    layer = _layer(fmt)
    sd = layer.state_dict()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
    layer.to("meta")
    assert layer.values.is_meta and layer.values.dtype == torch.int8
    layer.to_empty(device="cpu")
    layer.load_state_dict(sd)
    with torch.no_grad():
        assert_bit_equal(layer(x), before)
        # float64 runs in float32 (as the dense int8 layers do) and comes back as float64
        assert_bit_equal(layer.double()(x.double()), before.double())


def test_load_refuses_a_corrupt_index_and_a_wrong_shape():
    sd = _layer().state_dict()
    bad = dict(sd, col=sd["col"] + 50)
    with pytest.raises(RuntimeError, match=r"col must hold block columns in \[0, 4\)"):
        SparseInt8Linear(IN, OUT, block=BLOCK).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="size mismatch for values"):
        SparseInt8Linear(IN, OUT + 1, block=BLOCK).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="scales must be a float32 tensor"):
        SparseInt8Linear(IN, OUT, block=BLOCK).load_state_dict(dict(sd, scales=sd["scales"].half()))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "type"])
def test_casts_keep_the_int8_storage(cast):
    layer = _layer()
    before = {n: b.clone() for n, b in layer.named_buffers()}
    {"half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(), "double": lambda m: m.double()}.get(
        cast, lambda m: m.type(torch.float64)
    )(layer)
    for name, buf in layer.named_buffers():
        assert buf.dtype == before[name].dtype and torch.equal(buf, before[name]), name
    x = torch.randn(2, IN).to(layer.bias.dtype)
    with torch.no_grad():
        assert layer(x).dtype == x.dtype


def test_pickle_deepcopy_and_memory_footprint():
    layer = _layer()
    loaded = pickle.loads(pickle.dumps(layer))
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert_bit_equal(loaded(x), layer(x))
    nnzb = layer.values.shape[0]
    index_bytes = 8 * ((-(-OUT // BLOCK[0]) + 1) + (-(-IN // BLOCK[1]) + 1) + 3 * nnzb)  # crow, ccol, 3 x nnzb
    expected = nnzb * BLOCK[0] * BLOCK[1] + 4 * OUT + index_bytes + 4 * OUT  # values, scales, index, bias
    assert memkern.memory_footprint(layer).total_bytes == expected
    assert memkern.memory_footprint(layer).by_dtype["int8"] == nnzb * BLOCK[0] * BLOCK[1]


# -- convert and checkpoints ---------------------------------------------------------------------------
class _Pruned(nn.Module):
    def __init__(self, pruned: bool = True):
        super().__init__()
        self.up, self.mid, self.lm_head = nn.Linear(IN, 64), nn.Linear(64, 64), nn.Linear(64, 32)
        if pruned:
            self.up = SparseLinear.from_dense(self.up, _block_mask(64, IN), block=BLOCK)
            mask = prune.masks(torch.randn(32, 64), 0.5, "n:m", n=2, m=4)
            self.lm_head = SparseLinear.from_dense(self.lm_head, mask, format="2:4")

    def forward(self, x):
        return self.lm_head(torch.relu(self.mid(torch.relu(self.up(x)))))


@pytest.mark.parametrize("scheme", ["int8", "int8_weight_only"])
def test_convert_turns_sparse_layers_into_sparse_int8(scheme):
    model = _Pruned()
    up_dense = model.up.to_dense()
    memkern.convert(model, scheme=scheme, skip=())
    assert isinstance(model.up, SparseInt8Linear) and isinstance(model.lm_head, SparseInt8Linear)
    assert model.up.weight_only == (scheme == "int8_weight_only") and model.lm_head.format == "2:4"
    assert type(model.mid).__name__ == ("Int8Linear" if scheme == "int8" else "Int8WeightOnlyLinear")
    w_q, _ = _quantise_rows(up_dense)
    assert torch.equal(model.up.int8_weight(), w_q)
    with pytest.raises(ValueError, match="already converted"):
        memkern.convert(model, scheme=scheme, skip=())


def test_convert_skip_and_the_other_schemes_leave_sparse_layers():
    model = memkern.convert(_Pruned(), "int8")  # skips lm_head by default
    assert isinstance(model.up, SparseInt8Linear) and isinstance(model.lm_head, SparseLinear)
    other = memkern.convert(_Pruned(), "fp16", skip=())
    assert isinstance(other.up, SparseLinear)


def test_memkern_save_and_load(tmp_path):
    model = memkern.convert(_Pruned(), "int8", skip=())
    memkern.save(model, tmp_path)
    fresh = _Pruned(pruned=False)  # the architecture as first built
    memkern.load(tmp_path, fresh)
    assert isinstance(fresh.up, SparseInt8Linear) and fresh.lm_head.format == "2:4"
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert_bit_equal(fresh(x), model(x))


def test_demo_quantised_stage_keeps_the_sparsity():
    from memkern.demo.pipeline import quantised_stage

    pruned = _Pruned()
    int8, note = quantised_stage(pruned, "int8")
    assert isinstance(int8.up, SparseInt8Linear) and isinstance(pruned.up, SparseLinear)  # a converted copy
    assert "1 pruned layers kept sparse" in note
    dense_int8 = memkern.memory_footprint(Int8Linear.from_linear(nn.Linear(IN, 64))).total_bytes
    assert memkern.memory_footprint(int8.up).total_bytes < dense_int8
    fp16, note = quantised_stage(pruned, "fp16")
    assert type(fp16.up).__name__ == "Fp16Linear" and "densified" in note
