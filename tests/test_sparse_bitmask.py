"""The bitmask format of unstructured sparse weights: layout by hand, products and gradients
against float64 on every CPU backend, SparseLinear (memory, state, .to, pickling) and
checked checkpoints."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import memkern
from memkern import prune
from memkern.nn import SparseLinear
from memkern.ops.sparse_bitmask import BitmaskWeight, bitmask_matmul, pack_mask, unpack_bits
from conftest import CPU_BACKENDS, REL_TOL, rel_error


def test_layout_by_hand():
    # Row 0 keeps columns 0, 2, 3 and 8 of 9: byte 0 = 1 + 4 + 8 = 13, byte 1 = 1.
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [0, 2, 3, 8]] = True
    mask[1, 7] = True
    w = torch.arange(18.0).reshape(2, 9) + 1
    weight = BitmaskWeight.from_dense(w, mask)
    assert weight.bits.tolist() == [[13, 1], [128, 0]]
    assert weight.values.tolist() == [1.0, 3.0, 4.0, 9.0, 17.0]  # row-major kept values
    assert torch.equal(unpack_bits(weight.bits, 9), mask) and torch.equal(weight.mask, mask)
    assert torch.equal(weight.to_dense(), w * mask)
    assert weight.nbytes == 5 * 4 + 2 * 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", ((70, 45), (130, 200), (3, 8)))
def test_product_matches_float64(backend, dtype, shape):
    torch.manual_seed(0)
    rows, cols = shape
    w = torch.randn(rows, cols).to(dtype)
    mask = torch.rand(rows, cols) < 0.4
    mask[1] = False  # an empty row
    weight = BitmaskWeight.from_dense(w, mask)
    x = torch.randn(2, 5, cols).to(dtype)
    bias = torch.randn(rows).to(dtype)
    with memkern.use_backend(backend):
        y = bitmask_matmul(x, weight, bias)
        dense = weight.to_dense()
    ref = x.double() @ (w.double() * mask).t() + bias.double()
    assert y.shape == (2, 5, rows) and y.dtype == dtype
    assert rel_error(y, ref) <= REL_TOL[dtype]
    assert torch.equal(dense, w * mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_reach_only_kept_weights(backend):
    torch.manual_seed(1)
    w = torch.randn(20, 30, dtype=torch.float64)
    mask = torch.rand(20, 30) < 0.5
    weight = BitmaskWeight.from_dense(w, mask)
    values = weight.values.clone().float().requires_grad_()
    weight = BitmaskWeight(values, weight.bits, (20, 30))
    x = torch.randn(7, 30, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    grad = torch.randn(7, 20)
    with memkern.use_backend(backend):
        bitmask_matmul(x, weight, bias).backward(grad)
    g, x64, wm = grad.double(), x.detach().double(), (w * mask)
    torch.testing.assert_close(x.grad.double(), g @ wm.float().double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), (g.t() @ x64)[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), g.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_miscounted_weight_is_refused_before_any_read(backend):
    w = BitmaskWeight.from_dense(torch.randn(4, 16), torch.rand(4, 16) < 0.5)
    with pytest.raises(ValueError, match=r"bits keeps \d+ weights but values holds \d+"):
        BitmaskWeight(w.values[:-1], w.bits, (4, 16))
    # Even an op called directly on inconsistent tensors refuses them instead of reading past values.
    with memkern.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="values"):
        torch.ops.memkern.bitmask_matmul(torch.randn(2, 16), w.values[:-1], w.bits, None)


# -- the Triton product: the bits and kept values a tile at a time -----------------------------
def _refuse_expansion(monkeypatch):
    from memkern.kernels import sparse_bitmask as kernels

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton product expanded the whole weight")

    monkeypatch.setattr(kernels, "decompress_from_starts", refuse)
    monkeypatch.setattr(kernels, "_bitmask_decompress_kernel", refuse)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize(
    "shape, rows",
    # odd shapes: a K tail inside one 32-column step (5, 45, 93), fewer columns than a byte
    # (5), outputs past one 64-row tile (70, 131), a single row of x (1)
    [((70, 45), 7), ((131, 93), 1), ((9, 5), 3), ((64, 64), 33)],
)
def test_triton_product_reads_tiles_and_matches_float64(monkeypatch, dtype, shape, rows):
    torch.manual_seed(3)
    n, k = shape
    w = torch.randn(n, k).to(dtype)
    mask = torch.rand(n, k) < 0.3
    mask[1] = False  # an empty row: its outputs are the bias
    mask[2] = True  # a row keeping every weight
    mask[4, : min(k, 40)] = True  # kept columns across a step boundary
    weight = BitmaskWeight.from_dense(w, mask)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    _refuse_expansion(monkeypatch)
    with memkern.use_backend("triton"), torch.no_grad():
        y = bitmask_matmul(x, weight, bias)
        y_strided = bitmask_matmul(torch.randn(k, rows).to(dtype).t(), weight)  # column-major x
    ref = x.double() @ (w.double() * mask).t() + bias.double()
    assert y.shape == (rows, n) and y.dtype == dtype
    assert rel_error(y, ref) <= REL_TOL[dtype]
    assert torch.equal(y[:, 1], bias[1].expand(rows))
    assert rel_error(y[:, 2], x.double() @ w[2].double() + bias[2].double()) <= REL_TOL[dtype]
    assert y_strided.shape == (rows, n) and torch.equal(y_strided[:, 1], torch.zeros(rows, dtype=dtype))


def test_triton_product_of_a_weight_keeping_nothing_or_everything(monkeypatch):
    _refuse_expansion(monkeypatch)
    x = torch.randn(6, 40)
    bias = torch.randn(17)
    nothing = BitmaskWeight.from_dense(torch.randn(17, 40), torch.zeros(17, 40, dtype=torch.bool))
    everything_w = torch.randn(17, 40)
    everything = BitmaskWeight.from_dense(everything_w, torch.ones(17, 40, dtype=torch.bool))
    with memkern.use_backend("triton"), torch.no_grad():
        assert torch.equal(bitmask_matmul(x, nothing, bias), bias.expand(6, 17))
        y = bitmask_matmul(x, everything, bias)
    assert rel_error(y, x.double() @ everything_w.double().t() + bias.double()) <= REL_TOL[torch.float32]


# -- SparseLinear ------------------------------------------------------------------------------
def _layer(sparsity=0.5, out=96, inp=80, bias=True) -> tuple[SparseLinear, nn.Linear, torch.Tensor]:
    torch.manual_seed(2)
    linear = nn.Linear(inp, out, bias=bias)
    mask = prune.masks(linear.weight, sparsity, "unstructured")
    return SparseLinear.from_dense(linear, mask, format="bitmask"), linear, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_linear_bitmask_computes_the_masked_linear_and_stores_half(backend):
    layer, linear, mask = _layer()
    x = torch.randn(3, 4, 80)
    with memkern.use_backend(backend):
        y = layer(x)
    ref = x.double() @ (linear.weight.detach().double() * mask).t() + linear.bias.detach().double()
    assert rel_error(y, ref) <= REL_TOL[torch.float32]
    assert layer.sparsity == 0.5 and "pattern=bitmask" in repr(layer) and "sparsity=0.500" in repr(layer)
    # values (half the weights, float32) + 1 bit per weight + bias: 0.53x of the dense weight.
    fp = memkern.memory_footprint(layer)
    assert fp.total_bytes == 96 * 80 // 2 * 4 + 96 * 10 + 96 * 4
    assert (fp.total_bytes - 96 * 4) / (96 * 80 * 4) == pytest.approx(0.5 + 1 / 32)


def test_prune_model_stores_unstructured_masks_as_bitmasks():
    model = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384))
    before = memkern.memory_footprint(model).total_bytes
    report = prune.prune_model(model, 0.5, "unstructured", skip=())
    assert all(isinstance(m, SparseLinear) and m.format == "bitmask" for m in (model[0], model[2]))
    weights = 2 * 384 * 1536
    biases = (1536 + 384) * 4
    assert report.bytes_after == weights // 2 * 4 + weights // 8 + biases < 0.54 * before
    # n:m other than 2:4 is element-wise as well
    other = nn.Sequential(nn.Linear(64, 64))
    prune.prune_model(other, 0.75, "n:m", n=1, m=4, skip=())
    assert other[0].format == "bitmask" and other[0].sparsity == 0.75


def test_state_dict_round_trip_to_and_pickling():
    layer, linear, mask = _layer()
    fresh = SparseLinear(80, 96, block=(16, 16))  # another format
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 80)
    assert fresh.format == "bitmask" and torch.equal(fresh(x), layer(x)) and repr(fresh) == repr(layer)
    meta = SparseLinear(80, 96, format="bitmask", device="meta")
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(meta(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), layer(x))
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), layer(x))
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.bits.dtype == torch.uint8
    ref = x.double() @ (linear.weight.detach().double() * mask).t() + linear.bias.detach().double()
    assert rel_error(half(x.bfloat16()), ref) <= REL_TOL[torch.bfloat16]


def test_fresh_bitmask_layer_keeps_every_weight_and_trains_only_kept_values():
    layer = SparseLinear(20, 12, format="bitmask")
    assert layer.sparsity == 0.0 and layer.values.shape == (240,)
    pruned, _, mask = _layer()
    opt = torch.optim.AdamW(pruned.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        pruned(torch.randn(4, 80)).square().sum().backward()
        opt.step()
    assert (pruned.to_dense()[~mask] == 0).all() and pruned.sparsity == 0.5


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.update(values=s["values"][:-1]), ["bits keeps 3840 weights", "values holds 3839"]),
        (lambda s: s.update(bits=s["bits"][:, :-1]), ["bits must have shape (96, 10)", "(96, 9)"]),
        (lambda s: s.update(bits=s["bits"].to(torch.int32)), ["bits must have dtype uint8", "int32"]),
        (lambda s: s.update(values=s["values"].reshape(-1, 2)), ["values must be 1-D", "2-D"]),
    ],
    ids=["count", "shape", "dtype", "dim"],
)
def test_a_bad_checkpoint_is_refused_and_leaves_the_layer_as_it_was(edit, words):
    layer, _, _ = _layer()
    state = layer.state_dict()
    edit(state)
    target = SparseLinear(80, 96, format="bitmask")
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(state)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_padding_bits_are_refused():
    mask = torch.ones(2, 12, dtype=torch.bool)
    bits = pack_mask(mask)
    bits[0, 1] |= 0x80  # column 15 of a 12-column row
    with pytest.raises(ValueError, match="bits set past column 12"):
        BitmaskWeight(torch.zeros(25), bits, (2, 12))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_under_autocast_like_linear(backend):
    layer, linear, mask = _layer()
    x = torch.randn(5, 80, requires_grad=True)
    with memkern.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert layer.values.grad.dtype == torch.float32 and layer.values.grad.shape == layer.values.shape
    as_bf16 = lambda t: t.detach().bfloat16().double()  # noqa: E731
    ref = as_bf16(x) @ as_bf16(linear.weight * mask).t() + as_bf16(linear.bias)
    assert rel_error(out, ref) <= 2 * REL_TOL[torch.bfloat16]
