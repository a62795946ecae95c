"""The packed int8 weight layout: pack_int8_weight / unpack_int8_weight against an
independent loop, int8_linear_packed bit for bit against int8_linear (every backend),
integer exactness, NaN rows, autograd, bad input, opcheck and torch.compile, and
memkern.nn.Int8Linear keeping its weight packed (state_dict, meta device, .to(), repr)."""
from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
from torch import nn

import memkern
from memkern import reference
from memkern.nn import Int8Linear
from conftest import CPU_BACKENDS, assert_rel_close, require_backend

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OP = "int8_linear_packed"
NATIVE = memkern.ops.int8_packed_kernel_native("cpu")


def _weights(n: int, k: int):
    w_q, w_scale = memkern.ops.quantize_rowwise(torch.randn(n, k))
    return w_q, w_scale


def _expected_packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return (math.ceil(n / 16), math.ceil(k / 4), 16, 4)


def _pack_loop(w: torch.Tensor) -> torch.Tensor:
    """The packed layout written element by element: packed[j, g, c, t] = w[16j + c, 4g + t]."""
    n, k = w.shape
    bn, groups, _, _ = _expected_packed_shape(n, k)
    out = [[[[0] * 4 for _ in range(16)] for _ in range(groups)] for _ in range(bn)]
    rows = w.tolist()
    for r in range(n):
        for c in range(k):
            out[r // 16][c // 4][r % 16][c % 4] = rows[r][c]
    return torch.tensor(out, dtype=torch.int8).reshape(bn, groups, 16, 4)


def _plain_and_packed(x, w_q, w_scale, bias=None, **kwargs):
    """(int8_linear, int8_linear_packed) on the same inputs, whatever backend is forced."""
    plain = memkern.ops.int8_linear(x, w_q, w_scale, bias, **kwargs)
    packed = memkern.ops.int8_linear_packed(x, memkern.ops.pack_int8_weight(w_q), w_scale, bias, **kwargs)
    return plain, packed


def _assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """torch.equal, with NaN equal to NaN (in the same places only)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN in different places"
    got, want = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{int((diff != 0).sum())} of {got.numel()} elements differ; worst at {idx}: "
                             f"got {got[idx].item()!r}, want {want[idx].item()!r}")


def _require_cpp():
    require_backend(OP, "cpp", torch.randn(1, 4), torch.zeros(1, 1, 16, 4, dtype=torch.int8))


# -- pack / unpack ----------------------------------------------------------------------------
ROUND_TRIP_SHAPES = [(1, 1), (17, 31), (16, 4), (33, 4095), (15, 3), (64, 64), (70, 1), (1, 65), (0, 5), (5, 0)]


@pytest.mark.parametrize("n, k", ROUND_TRIP_SHAPES, ids=[f"{n}x{k}" for n, k in ROUND_TRIP_SHAPES])
def test_pack_unpack_round_trip(n, k):
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    packed = memkern.ops.pack_int8_weight(w)
    assert packed.dtype == torch.int8 and packed.is_contiguous()
    assert tuple(packed.shape) == _expected_packed_shape(n, k)
    assert memkern.ops.int8_packing.packed_shape(n, k) == _expected_packed_shape(n, k)
    back = memkern.ops.unpack_int8_weight(packed, n, k)
    assert back.dtype == torch.int8 and back.shape == (n, k)
    assert torch.equal(back, w)
    # Every byte is kept once and the rest is padding: the multiset of values is w's plus zeros.
    assert packed.numel() - n * k == int((packed == 0).sum()) - int((w == 0).sum())


@pytest.mark.parametrize("n, k", [(17, 31), (16, 4), (5, 9), (33, 8)])
def test_pack_matches_the_element_formula_and_pads_with_zeros(n, k):
    w = torch.randint(1, 128, (n, k), dtype=torch.int8) * torch.where(torch.rand(n, k) < 0.5, -1, 1).to(torch.int8)
    packed = memkern.ops.pack_int8_weight(w)
    assert torch.equal(packed, _pack_loop(w))
    # Spelled out once more by indexing: in range it is w, out of range zero (w has no zeros).
    j, g, c, t = torch.meshgrid(*(torch.arange(s) for s in packed.shape), indexing="ij")
    rows, cols = 16 * j + c, 4 * g + t
    inside = (rows < n) & (cols < k)
    assert torch.equal(packed[inside], w[rows[inside], cols[inside]])
    assert (packed[~inside] == 0).all()
    assert int((packed != 0).sum()) == n * k


def test_pack_of_a_non_contiguous_weight():
    w = torch.randint(-128, 128, (31, 17), dtype=torch.int8).t()  # (17, 31) transposed view
    assert not w.is_contiguous()
    packed = memkern.ops.pack_int8_weight(w)
    assert torch.equal(packed, _pack_loop(w.contiguous()))
    assert torch.equal(memkern.ops.unpack_int8_weight(packed, 17, 31), w)
    # unpack of a non-contiguous packed tensor (same values) gives the same weight
    nc = torch.empty(packed.shape[0], packed.shape[1], 4, 16, dtype=torch.int8).transpose(2, 3)
    nc.copy_(packed)
    assert not nc.is_contiguous()
    assert torch.equal(memkern.ops.unpack_int8_weight(nc, 17, 31), w)


def test_pack_and_unpack_on_the_meta_device():
    w = torch.empty(33, 4095, dtype=torch.int8, device="meta")
    packed = memkern.ops.pack_int8_weight(w)
    assert packed.is_meta and packed.dtype == torch.int8
    assert tuple(packed.shape) == _expected_packed_shape(33, 4095)
    back = memkern.ops.unpack_int8_weight(packed, 33, 4095)
    assert back.is_meta and back.shape == (33, 4095) and back.dtype == torch.int8


@pytest.mark.parametrize("fn, args, error, message", [
    ("pack_int8_weight", (torch.randn(4, 8),), TypeError,
     "pack_int8_weight: w_q must have dtype int8; got float32"),
    ("pack_int8_weight", (torch.zeros(8, dtype=torch.int8),), ValueError,
     "pack_int8_weight: w_q must be 2-D, got 1-D"),
    ("pack_int8_weight", (torch.zeros(2, 4, 8, dtype=torch.int8),), ValueError,
     "pack_int8_weight: w_q must be 2-D, got 3-D"),
    ("pack_int8_weight", ([[1, 2]],), TypeError, "pack_int8_weight: w_q must be a torch.Tensor, got list"),
    ("unpack_int8_weight", (torch.zeros(1, 2, 16, 4, dtype=torch.int8), 6, 9), ValueError,
     "unpack_int8_weight: w_packed must have shape (1, 3, 16, 4)"),
    ("unpack_int8_weight", (torch.zeros(1, 2, 16, 4, dtype=torch.int8), 17, 8), ValueError,
     "unpack_int8_weight: w_packed must have shape (2, 2, 16, 4)"),
    ("unpack_int8_weight", (torch.zeros(6, 8, dtype=torch.int8), 6, 8), ValueError,
     "got (6, 8)"),
    ("unpack_int8_weight", (torch.zeros(1, 2, 16, 4), 6, 8), TypeError,
     "unpack_int8_weight: w_packed must have dtype int8; got float32"),
], ids=["pack-float", "pack-1d", "pack-3d", "pack-list", "unpack-other-k", "unpack-other-n",
        "unpack-plain", "unpack-float"])
def test_pack_unpack_bad_input(fn, args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        getattr(memkern.ops, fn)(*args)


# -- int8_linear_packed == int8_linear on the cpp backend --------------------------------------
# (M, K, N, x dtype, out_dtype, bias dtype or None). Every M in {0, 1, 7, 16, 17, 33, 128},
# K in {1, 3, 31, 64, 4095}, N in {1, 15, 16, 17, 70} and dtype appears; plus M past the
# int8_linear VNNI row limit (129, 260), and M, K that span several of the packed kernel's
# row blocks (100 x 4095) and column units (N = 70, 130).
CPP_CASES = [
    (0, 31, 17, F32, None, F32),
    (1, 4095, 70, BF16, None, BF16),
    (7, 3, 15, F16, None, None),
    (16, 64, 16, F32, None, F32),
    (17, 31, 1, F32, F16, F32),
    (33, 1, 17, BF16, F32, None),
    (128, 64, 70, F32, BF16, F16),
    (16, 4095, 17, F16, BF16, F16),
    (7, 64, 1, BF16, F16, BF16),
    (33, 3, 70, F32, None, BF16),
    (128, 31, 15, F16, F32, None),
    (1, 1, 16, F32, None, None),
    (17, 4095, 15, F32, None, F32),
    (100, 4095, 33, BF16, None, F32),
    (129, 64, 17, F32, None, F32),
    (260, 31, 130, F16, F32, F16),
]


def _cpp_id(c):
    name = lambda d: "none" if d is None else str(d).removeprefix("torch.")  # noqa: E731
    return f"{c[0]}x{c[1]}x{c[2]}-x_{name(c[3])}-out_{name(c[4])}-bias_{name(c[5])}"


@pytest.mark.parametrize("case", CPP_CASES, ids=_cpp_id)
def test_cpp_packed_equals_int8_linear_bit_for_bit(case, poisoned_outputs):
    _require_cpp()
    m, k, n, dtype, out_dtype, bias_dtype = case
    x = torch.randn(m, k).to(dtype)
    if m > 3:
        x[3] = 0  # an all-zero row: scale 0, output is the bias
    w_q, w_scale = _weights(n, k)
    bias = torch.randn(n).to(bias_dtype) if bias_dtype is not None else None
    with memkern.use_backend("cpp"):
        plain, packed = _plain_and_packed(x, w_q, w_scale, bias, out_dtype=out_dtype)
    assert packed.dtype == (out_dtype or dtype) and packed.shape == (m, n)
    _assert_bit_equal(packed, plain)
    ref = reference.int8_linear(x, w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert torch.isfinite(packed).all()
    assert_rel_close(packed, ref, out_dtype or dtype)


def _edge_case(name):
    """(x, w_q, w_scale, bias) of a corner the kernels must agree on."""
    if name == "n0":
        return torch.randn(3, 5), torch.zeros(0, 5, dtype=torch.int8), torch.ones(0), None
    if name == "k0":
        return torch.randn(3, 0), torch.zeros(4, 0, dtype=torch.int8), torch.ones(4), torch.randn(4)
    if name in ("f16-overflow", "bf16-overflow"):
        dtype = F16 if name == "f16-overflow" else BF16
        big = torch.finfo(dtype).max
        x = torch.randn(3, 31)
        x[0, :4] = torch.tensor([big, -big, big / 3, 1.0])
        return (x.to(dtype), *_weights(7, 31), None)  # row 0 overflows the output dtype
    if name == "odd-scales":
        w_q, w_scale = _weights(20, 33)
        w_scale[3], w_scale[4], w_scale[5], w_scale[6] = 0.0, -1.0, float("nan"), float("inf")
        return torch.randn(5, 33), w_q, w_scale, torch.randn(20)
    if name == "tiny-x":
        return (torch.randn(5, 33) * 1e-40, *_weights(9, 33), None)  # subnormal activations
    if name == "many-rows":  # several threads' worth of row tiles and column units
        return (torch.randn(600, 257), *_weights(131, 257), torch.randn(131))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["n0", "k0", "f16-overflow", "bf16-overflow", "odd-scales", "tiny-x", "many-rows"])
def test_cpp_edge_cases_equal_int8_linear(name, poisoned_outputs):
    _require_cpp()
    x, w_q, w_scale, bias = _edge_case(name)
    with memkern.use_backend("cpp"):
        plain, packed = _plain_and_packed(x, w_q, w_scale, bias)
    assert packed.shape == (x.shape[0], w_q.shape[0])
    _assert_bit_equal(packed, plain)
    if name.endswith("overflow"):
        assert torch.isinf(packed[0]).any() and torch.isfinite(packed[1:]).all()
    if name == "odd-scales":
        assert torch.isnan(packed[:, 5]).all() and torch.equal(packed[:, 3], bias[3].expand(5))


def test_meta_x_gives_the_output_shape():
    w = torch.empty(6, 8, dtype=torch.int8, device="meta")
    out = memkern.ops.int8_linear_packed(torch.empty(2, 4, 8, device="meta"), memkern.ops.pack_int8_weight(w),
                                         torch.empty(6, device="meta"), out_dtype=BF16)
    assert out.is_meta and out.shape == (2, 4, 6) and out.dtype == BF16


def test_cpp_kernel_called_directly_equals_the_plain_kernel():
    _require_cpp()
    x = torch.randn(21, 45)
    w_q, w_scale = _weights(19, 45)
    bias = torch.randn(19)
    got = torch.ops.memkern.int8_linear_packed_kernel(x, memkern.ops.pack_int8_weight(w_q), w_scale, bias, F16)
    want = torch.ops.memkern.int8_linear_kernel(x, w_q, w_scale, bias, F16)
    _assert_bit_equal(got, want)


def _strided_inputs(k: int):
    """Non-contiguous and N-D views of x (all (..., k))."""
    return {
        "transposed": torch.randn(k, 19).t(),
        "every-other-column": torch.randn(23, 2 * k)[:, ::2],
        "row-stride": torch.randn(40, k)[::3],
        "3d": torch.randn(2, 5, k),
        "3d-permuted": torch.randn(5, 2, k).transpose(0, 1),
        "4d-expanded": torch.randn(1, 3, 1, k).expand(2, 3, 4, k),
        "1d": torch.randn(k),
    }


@pytest.mark.parametrize("view", list(_strided_inputs(1)))
@pytest.mark.parametrize("dtype", (F32, BF16))
def test_cpp_non_contiguous_and_nd_x(view, dtype):
    _require_cpp()
    k, n = 37, 21
    x = _strided_inputs(k)[view].to(dtype)
    w_q, w_scale = _weights(n, k)
    bias = torch.randn(n)
    with memkern.use_backend("cpp"):
        plain, packed = _plain_and_packed(x, w_q, w_scale, bias)
        # the same x made contiguous gives the same values
        contiguous = memkern.ops.int8_linear_packed(x.contiguous(), memkern.ops.pack_int8_weight(w_q), w_scale, bias)
    assert packed.shape == (*x.shape[:-1], n)
    _assert_bit_equal(packed, plain)
    _assert_bit_equal(packed, contiguous)


def test_cpp_non_contiguous_weight_scale_bias_and_packed_weight():
    _require_cpp()
    m, k, n = 9, 41, 26
    x = torch.randn(m, k)
    w_q, w_scale = _weights(n, k)
    packed = memkern.ops.pack_int8_weight(w_q)
    packed_nc = torch.empty(packed.shape[0], packed.shape[1], 4, 16, dtype=torch.int8).transpose(2, 3)
    packed_nc.copy_(packed)
    scale_nc = torch.zeros(2 * n)[::2]
    scale_nc.copy_(w_scale)
    bias = torch.randn(n)
    bias_nc = torch.zeros(2 * n)[1::2]
    bias_nc.copy_(bias)
    assert not (packed_nc.is_contiguous() or scale_nc.is_contiguous() or bias_nc.is_contiguous())
    with memkern.use_backend("cpp"):
        got = memkern.ops.int8_linear_packed(x, packed_nc, scale_nc, bias_nc)
        want = memkern.ops.int8_linear(x, w_q, w_scale, bias)
    _assert_bit_equal(got, want)


# -- integer exactness --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m, k, n", [(16, 4095, 33), (37, 4093, 70), (5, 31, 17)])
def test_integer_products_are_exact(backend, m, k, n):
    # Integer x with a +-127 in every row quantises with scale exactly 1; with unit weight
    # scales the output is the int32 sum, rounded once to float32 (full int8 weight range,
    # -128 included, so sums exceed 2^24 and the rounding is the int64 product's own).
    if backend == "triton":
        m, k = min(m, 5), min(k, 131)  # the interpreter is slow
    x = torch.randint(-127, 128, (m, k)).float()
    x[:, k // 3] = torch.where(torch.rand(m) < 0.5, 127.0, -127.0)
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w_q[0] = -128
    packed = memkern.ops.pack_int8_weight(w_q)
    w_scale = torch.ones(n)
    require_backend(OP, backend, x, packed, w_scale, None)
    with memkern.use_backend(backend):
        out = memkern.ops.int8_linear_packed(x, packed, w_scale, out_dtype=F32)
    exact = x.long() @ w_q.long().t()
    assert torch.equal(out, exact.float())


@pytest.mark.parametrize("pattern", ["all-plus", "x-plus-w-minus128", "random-signs"])
def test_extreme_values_at_k_4096(pattern):
    # Every value at the edge of the int8 range: sums reach 127 * 128 * 4096 = 2^19 * 127.
    _require_cpp()
    m, k, n = 19, 4096, 18
    if pattern == "all-plus":
        x = torch.full((m, k), 127.0)
        w_q = torch.full((n, k), 127, dtype=torch.int8)
    elif pattern == "x-plus-w-minus128":
        x = torch.full((m, k), 127.0)
        w_q = torch.full((n, k), -128, dtype=torch.int8)
    else:
        x = torch.where(torch.rand(m, k) < 0.5, 127.0, -127.0)
        w_q = torch.where(torch.rand(n, k) < 0.5, 127, -128).to(torch.int8)
        x[1] = -127.0
        w_q[2] = -128
    w_scale = torch.ones(n)
    with memkern.use_backend("cpp"):
        plain, packed = _plain_and_packed(x, w_q, w_scale, out_dtype=F32)
    exact = x.long() @ w_q.long().t()
    assert exact.abs().max() >= 127 * 127 * k or pattern == "random-signs"
    assert torch.equal(packed, exact.float())
    _assert_bit_equal(packed, plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_products_past_the_int32_range_are_exact(backend):
    # K = 140,000 > 2^17, the longest stretch of int8 products that always sums inside
    # int32: weights of 127 and -128 against activations of 127 (scale 1) sum to about
    # +-2.26e9, past int32; the packed kernel must add its partial sums in int64.
    k = 140_000
    x = torch.full((1, k), 127.0)
    w_q = torch.stack([torch.full((k,), 127), torch.full((k,), -128)]).to(torch.int8)
    packed = memkern.ops.pack_int8_weight(w_q)
    w_scale = torch.ones(2)
    require_backend(OP, backend, x, packed, w_scale, None)
    with memkern.use_backend(backend):
        out = memkern.ops.int8_linear_packed(x, packed, w_scale, out_dtype=F32)
    exact = torch.tensor([[127 * 127 * k, -127 * 128 * k]])
    assert exact.abs().min() > 2**31
    assert torch.equal(out, exact.float())


# -- NaN and inf ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_row_gives_a_nan_row(backend, bad):
    m, k, n = 20, 40, 19
    x = torch.randn(m, k)
    x[2, 7] = bad
    x[17, 39] = bad  # a row in the second tile of 16
    w_q, w_scale = _weights(n, k)
    packed = memkern.ops.pack_int8_weight(w_q)
    bias = torch.randn(n)
    require_backend(OP, backend, x, packed, w_scale, bias)
    with memkern.use_backend(backend):
        out = memkern.ops.int8_linear_packed(x, packed, w_scale, bias)
        plain = memkern.ops.int8_linear(x, w_q, w_scale, bias)
    assert torch.isnan(out[[2, 17]]).all()
    keep = [i for i in range(m) if i not in (2, 17)]
    assert torch.isfinite(out[keep]).all()
    _assert_bit_equal(out[keep], plain[keep])
    ref = reference.int8_linear(x[keep], w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert_rel_close(out[keep], ref, F32)


# -- every backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("m, k, n, dtype, out_dtype", [
    (7, 31, 17, F32, None), (3, 5, 20, BF16, F32), (17, 9, 33, F16, BF16), (0, 8, 5, F32, None),
], ids=["7x31x17-f32", "3x5x20-bf16-out_f32", "17x9x33-f16-out_bf16", "0x8x5"])
def test_backends_agree_with_int8_linear(backend, m, k, n, dtype, out_dtype):
    x = torch.randn(m, k).to(dtype)
    w_q, w_scale = _weights(n, k)
    packed = memkern.ops.pack_int8_weight(w_q)
    bias = torch.randn(n).to(dtype)
    require_backend(OP, backend, x, packed, w_scale, bias)
    with memkern.use_backend(backend):
        plain, got = _plain_and_packed(x, w_q, w_scale, bias, out_dtype=out_dtype)
        got3d = memkern.ops.int8_linear_packed(x.reshape(1, m, k), packed, w_scale, bias, out_dtype=out_dtype)
    _assert_bit_equal(got, plain)
    _assert_bit_equal(got3d, plain.reshape(1, m, n))
    ref = reference.int8_linear(x, w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert_rel_close(got, ref, out_dtype or dtype)


def test_default_cpu_backend_is_cpp_when_built():
    from memkern import _library, backends

    x = torch.randn(2, 4)
    w_q, w_scale = _weights(3, 4)
    expected = "cpp" if _library.has_cpp() else "torch"
    assert backends.OPS[OP].select(x, memkern.ops.pack_int8_weight(w_q), w_scale, None, None).backend == expected


# -- autograd -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (F32, BF16))
def test_gradients_equal_int8_linear(backend, dtype):
    m, k, n = 9, 37, 21
    w_q, w_scale = _weights(n, k)
    packed = memkern.ops.pack_int8_weight(w_q)
    grad = torch.randn(3, m, n).to(dtype)
    x0 = torch.randn(3, m, k).to(dtype)
    b0 = torch.randn(n, dtype=dtype)
    require_backend(OP, backend, x0, packed, w_scale, b0)
    grads = {}
    for name, fn, weight in (("plain", memkern.ops.int8_linear, w_q), ("packed", memkern.ops.int8_linear_packed, packed)):
        x = x0.clone().requires_grad_()
        bias = b0.clone().requires_grad_()
        with memkern.use_backend(backend):
            out = fn(x, weight, w_scale, bias)
            out.backward(grad)
        assert out.requires_grad and weight.grad is None and w_scale.grad is None
        grads[name] = (out.detach(), x.grad, bias.grad)
    for got, want in zip(grads["packed"], grads["plain"]):
        _assert_bit_equal(got, want)
    w_deq = w_q.double() * w_scale.double()[:, None]
    assert_rel_close(grads["packed"][1], grad.double() @ w_deq, dtype)
    assert_rel_close(grads["packed"][2], grad.double().sum((0, 1)), dtype)


def test_gradient_of_x_alone_and_of_bias_alone():
    w_q, w_scale = _weights(6, 10)
    packed = memkern.ops.pack_int8_weight(w_q)
    grad = torch.randn(4, 6)
    x = torch.randn(4, 10, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    memkern.ops.int8_linear_packed(x, packed, w_scale, torch.randn(6)).backward(grad)
    memkern.ops.int8_linear(x_plain, w_q, w_scale, torch.randn(6)).backward(grad)
    _assert_bit_equal(x.grad, x_plain.grad)
    assert_rel_close(x.grad, grad.double() @ (w_q.double() * w_scale.double()[:, None]), F32)
    bias = torch.randn(6, requires_grad=True)
    x_const = torch.randn(4, 10)
    out = memkern.ops.int8_linear_packed(x_const, packed, w_scale, bias)
    assert out.requires_grad and not x_const.requires_grad
    out.backward(grad)
    torch.testing.assert_close(bias.grad, grad.sum(0), rtol=1e-6, atol=1e-6)


# -- bad input ------------------------------------------------------------------------------------
def _bad_inputs():
    x = torch.randn(4, 8)
    w_q = torch.randint(-127, 128, (6, 8), dtype=torch.int8)
    p = memkern.ops.pack_int8_weight(w_q)  # (1, 2, 16, 4)
    s = torch.ones(6)
    p_k9 = memkern.ops.pack_int8_weight(torch.zeros(6, 9, dtype=torch.int8))  # (1, 3, 16, 4)
    p_n17 = memkern.ops.pack_int8_weight(torch.zeros(17, 8, dtype=torch.int8))  # (2, 2, 16, 4)
    return [
        ("packed-for-other-k", (x, p_k9, s), {}, ValueError, ["w_packed", "(1, 2, 16, 4)", "(1, 3, 16, 4)"]),
        ("packed-for-other-n", (x, p_n17, s), {}, ValueError, ["w_packed", "(1, 2, 16, 4)", "(2, 2, 16, 4)"]),
        ("x-other-k", (torch.randn(4, 13), p, s), {}, ValueError, ["w_packed", "(1, 4, 16, 4)", "(1, 2, 16, 4)"]),
        ("plain-weight", (x, w_q, s), {}, ValueError, ["w_packed", "(1, 2, 16, 4)", "(6, 8)"]),
        ("packed-float", (x, p.float(), s), {}, TypeError, ["w_packed", "int8", "float32"]),
        ("packed-not-tensor", (x, None, s), {}, TypeError, ["w_packed", "Tensor", "NoneType"]),
        ("scale-float64", (x, p, s.double()), {}, TypeError, ["w_scale", "float32", "float64"]),
        ("scale-2d", (x, p, s[:, None]), {}, ValueError, ["w_scale", "1-D", "2-D"]),
        ("scale-0d", (x, p, s[0]), {}, ValueError, ["w_scale", "1-D", "0-D"]),
        ("bias-shape", (x, p, s, torch.ones(7)), {}, ValueError, ["bias", "(6,)", "(7,)"]),
        ("bias-int", (x, p, s, torch.ones(6, dtype=torch.int64)), {}, TypeError, ["bias", "int64"]),
        ("out-dtype-int", (x, p, s), {"out_dtype": torch.int32}, TypeError, ["out_dtype", "int32"]),
        ("x-int", (x.long(), p, s), {}, TypeError, ["x", "float32", "int64"]),
        ("x-0d", (torch.tensor(1.0), p, s), {}, ValueError, ["x", "0-D"]),
        ("x-list", ([[1.0] * 8], p, s), {}, TypeError, ["x", "Tensor", "list"]),
        ("scale-on-meta", (x, p, s.to("meta")), {}, ValueError, ["device", "w_scale on meta", "x on cpu"]),
        ("packed-on-meta", (x, p.to("meta"), s), {}, ValueError, ["device", "w_packed on meta", "x on cpu"]),
    ]


@pytest.mark.parametrize("args, kwargs, error, words", [c[1:] for c in _bad_inputs()],
                         ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_a_clear_error(args, kwargs, error, words):
    with pytest.raises(error, match=r"^int8_linear_packed: ") as info:
        memkern.ops.int8_linear_packed(*args, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_cpp_kernel_checks_the_packed_shape():
    _require_cpp()
    x = torch.randn(4, 8)
    p_k9 = memkern.ops.pack_int8_weight(torch.zeros(6, 9, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=re.escape("w_packed must have shape (1, 2, 16, 4) for N = 6 and K = 8")):
        torch.ops.memkern.int8_linear_packed_kernel(x, p_k9, torch.ones(6), None, F32)


# -- opcheck and torch.compile ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", (None, BF16))
def test_opcheck(backend, out_dtype):
    x = torch.randn(5, 19, requires_grad=True)
    w_q, w_scale = _weights(11, 19)
    args = (x, memkern.ops.pack_int8_weight(w_q), w_scale, torch.randn(11, requires_grad=True), out_dtype)
    require_backend(OP, backend, *args)
    with memkern.use_backend(backend):
        torch.library.opcheck(torch.ops.memkern.int8_linear_packed.default, args)


def test_compiles_without_graph_breaks():
    w_q, w_scale = _weights(12, 20)
    packed = memkern.ops.pack_int8_weight(w_q)
    bias = torch.randn(12)

    def f(x):
        return memkern.ops.int8_linear_packed(x * 2, packed, w_scale, bias).relu().sum()

    def f_plain(x):
        return memkern.ops.int8_linear(x * 2, w_q, w_scale, bias).relu().sum()

    x = torch.randn(3, 5, 20, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(f(x), x)
    (g_plain,) = torch.autograd.grad(f_plain(x), x)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), f_plain(x), rtol=0, atol=0)
    torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)
    torch.testing.assert_close(g_compiled, g_plain, rtol=0, atol=0)


def test_module_compiles_without_graph_breaks():
    layer = Int8Linear.from_linear(nn.Linear(20, 12))
    x = torch.randn(3, 5, 20)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        _assert_bit_equal(compiled(x), layer(x))


# -- Int8Linear -------------------------------------------------------------------------------------
def _linear(k: int = 37, n: int = 23, bias_dtype=F32) -> nn.Linear:
    linear = nn.Linear(k, n)
    linear.bias.data = linear.bias.data.to(bias_dtype)
    return linear


def _layout_ok(layer: Int8Linear, native: bool = NATIVE) -> None:
    n, k = layer.out_features, layer.in_features
    assert layer.weight.dtype == torch.int8
    assert layer.weight_packed is native
    assert tuple(layer.weight.shape) == (_expected_packed_shape(n, k) if native else (n, k))
    assert ("weight_layout=packed" in repr(layer)) is native


@pytest.mark.parametrize("bias_dtype", (F32, BF16))
def test_from_linear_layout_and_output(bias_dtype):
    linear = _linear(bias_dtype=bias_dtype)
    w_q, w_scale = memkern.ops.quantize_rowwise(linear.weight.detach())
    layer = Int8Linear.from_linear(linear)
    _layout_ok(layer)
    assert set(dict(layer.named_buffers())) == {"weight", "weight_scale"}
    assert torch.equal(layer.int8_weight(), w_q) and layer.int8_weight().shape == (23, 37)
    assert torch.equal(layer.weight_scale, w_scale)
    if NATIVE:
        assert torch.equal(layer.weight, _pack_loop(w_q))
    for x in (torch.randn(3, 5, 37), torch.randn(4, 37).to(BF16), torch.randn(37, 7).t()):
        with torch.no_grad():
            _assert_bit_equal(layer(x), memkern.ops.int8_linear(x, w_q, w_scale, linear.bias.detach()))


def test_module_gradients_equal_the_plain_op():
    linear = _linear()
    layer = Int8Linear.from_linear(linear)
    w_q, w_scale = memkern.ops.quantize_rowwise(linear.weight.detach())
    x = torch.randn(6, 37, requires_grad=True)
    grad = torch.randn(6, 23)
    layer(x).backward(grad)
    x2 = x.detach().clone().requires_grad_()
    bias2 = linear.bias.detach().clone().requires_grad_()
    memkern.ops.int8_linear(x2, w_q, w_scale, bias2).backward(grad)
    _assert_bit_equal(x.grad, x2.grad)
    _assert_bit_equal(layer.bias.grad, bias2.grad)


def test_state_dict_holds_the_plain_weight():
    linear = _linear()
    w_q, w_scale = memkern.ops.quantize_rowwise(linear.weight.detach())
    layer = Int8Linear.from_linear(linear)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (23, 37)
    assert torch.equal(sd["weight"], w_q) and torch.equal(sd["weight"], layer.int8_weight())
    assert torch.equal(sd["weight_scale"], w_scale)
    _layout_ok(layer)  # taking the state_dict leaves the module as it was
    nested = nn.Sequential(nn.Sequential(layer)).state_dict()
    assert nested["0.0.weight"].shape == (23, 37) and torch.equal(nested["0.0.weight"], w_q)


def test_save_and_load_into_a_fresh_module(tmp_path):
    layer = Int8Linear.from_linear(_linear())
    path = tmp_path / "int8.pt"
    torch.save(layer.state_dict(), path)
    fresh = Int8Linear(37, 23)
    _layout_ok(fresh)
    result = fresh.load_state_dict(torch.load(path))
    assert not result.missing_keys and not result.unexpected_keys
    _layout_ok(fresh)
    assert torch.equal(fresh.int8_weight(), layer.int8_weight())
    for (name, a), (_, b) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = torch.randn(5, 37)
    with torch.no_grad():
        _assert_bit_equal(fresh(x), layer(x))


def test_load_of_a_wrong_shape_is_an_error():
    sd = Int8Linear.from_linear(_linear()).state_dict()
    other = Int8Linear(37, 24)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        other.load_state_dict(sd)


def test_meta_device_round_trip_with_assign():
    k, n = 37, 23
    source = memkern.convert(nn.Sequential(nn.Linear(k, n)), "int8")
    sd = source.state_dict()
    assert sd["0.weight"].shape == (n, k)
    with torch.device("meta"):
        target = nn.Sequential(nn.Linear(k, n))
    memkern.convert(target, "int8")
    assert isinstance(target[0], Int8Linear) and target[0].weight.is_meta
    _layout_ok(target[0], native=False)  # meta: the plain layout
    target.load_state_dict(sd, assign=True)
    assert not any(t.is_meta for t in target.state_dict().values())
    _layout_ok(target[0])
    for name, value in sd.items():
        got = target.state_dict()[name]
        assert got.dtype == value.dtype and torch.equal(got, value), name
    x = torch.randn(3, 4, k)
    with torch.no_grad():
        _assert_bit_equal(target(x), source(x))


def test_to_meta_and_back():
    layer = Int8Linear.from_linear(_linear())
    sd = layer.state_dict()
    _layout_ok(layer)
    assert layer.to("cpu") is layer
    _layout_ok(layer)
    layer.to("meta")
    assert layer.weight.is_meta
    _layout_ok(layer, native=False)
    layer.to_empty(device="cpu")
    assert not layer.weight.is_meta
    _layout_ok(layer)
    layer.load_state_dict(sd)
    _layout_ok(layer)
    x = torch.randn(5, 37)
    with torch.no_grad():
        _assert_bit_equal(layer(x), memkern.ops.int8_linear(x, sd["weight"], sd["weight_scale"], sd["bias"]))
    clone = copy.deepcopy(layer)
    _layout_ok(clone)
    with torch.no_grad():
        _assert_bit_equal(clone(x), layer(x))


def test_dequantize_matches_the_plain_weight(monkeypatch):
    linear = _linear(bias_dtype=BF16)
    w_q, w_scale = memkern.ops.quantize_rowwise(linear.weight.detach())
    layer = Int8Linear.from_linear(linear)
    back = layer.dequantize(torch.float32)
    assert type(back) is nn.Linear and back.weight.shape == (23, 37)
    assert torch.equal(back.weight, w_q.float() * w_scale[:, None])
    assert torch.equal(back.bias, linear.bias.float())
    assert layer.dequantize().weight.dtype == BF16
    monkeypatch.setattr(memkern.ops, "int8_packed_kernel_native", lambda device: False)
    plain = Int8Linear.from_linear(linear)
    assert not plain.weight_packed
    assert torch.equal(plain.dequantize(torch.float32).weight, back.weight)
    assert torch.equal(plain.dequantized_weight(), layer.dequantized_weight())


def test_memory_footprint_of_a_packed_layer():
    n, k = 64, 64
    model = memkern.convert(nn.Sequential(nn.Linear(k, n)), "int8")
    fp = memkern.memory_footprint(model)
    assert fp.total_bytes == n * k + n * 4 + n * 4
    assert fp.by_dtype == {"int8": n * k, "float32": 2 * n * 4}
    # A shape that is not a multiple of the blocks: the packed layout holds its padding.
    n, k = 23, 37
    model = memkern.convert(nn.Sequential(nn.Linear(k, n)), "int8")
    int8_bytes = math.prod(_expected_packed_shape(n, k)) if NATIVE else n * k
    assert memkern.memory_footprint(model).by_dtype["int8"] == int8_bytes


def test_plain_layout_when_the_kernel_is_not_native(monkeypatch):
    linear = _linear()
    packed_layer = Int8Linear.from_linear(linear)
    x = torch.randn(6, 37)
    with torch.no_grad():
        want = packed_layer(x)
    monkeypatch.setattr(memkern.ops, "int8_packed_kernel_native", lambda device: False)
    layer = Int8Linear.from_linear(linear)
    _layout_ok(layer, native=False)
    assert "weight_layout" not in repr(layer)
    with torch.no_grad():
        _assert_bit_equal(layer(x), want)
    fresh = Int8Linear(37, 23)
    _layout_ok(fresh, native=False)
    fresh.load_state_dict(packed_layer.state_dict())
    _layout_ok(fresh, native=False)
    with torch.no_grad():
        _assert_bit_equal(fresh(x), want)
    # .to() re-settles: a module packed earlier goes plain under the patch ...
    packed_layer.to("cpu")
    _layout_ok(packed_layer, native=False)
    with torch.no_grad():
        _assert_bit_equal(packed_layer(x), want)
    # ... and back to the machine's layout once the patch is gone.
    monkeypatch.undo()
    layer.to("cpu")
    _layout_ok(layer)
    with torch.no_grad():
        _assert_bit_equal(layer(x), want)


CASTS = {
    "half": (lambda m: m.half(), F16),
    "bfloat16": (lambda m: m.bfloat16(), BF16),
    "float": (lambda m: m.float(), F32),
    "double": (lambda m: m.double(), torch.float64),
    "to-dtype": (lambda m: m.to(BF16), BF16),
    "to-device-dtype": (lambda m: m.to("cpu", F16), F16),
}


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("native", (True, False), ids=["packed", "plain"])
def test_layout_survives_module_casts(monkeypatch, native, cast):
    # Either layout (forced here, whatever this CPU has): a module cast keeps the int8
    # bytes in their layout and the float32 scales bit for bit; only the bias follows.
    monkeypatch.setattr(memkern.ops, "int8_packed_kernel_native", lambda device: native)
    linear = _linear()
    w_q, w_scale = memkern.ops.quantize_rowwise(linear.weight.detach())
    layer = Int8Linear.from_linear(linear)
    weight = layer.weight.clone()
    apply, dtype = CASTS[cast]
    apply(layer)
    _layout_ok(layer, native=native)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.int8_weight(), w_q)
    assert layer.weight_scale.dtype == F32 and torch.equal(layer.weight_scale, w_scale)
    assert layer.bias.dtype == dtype
    sd = layer.state_dict()
    assert sd["weight"].shape == (23, 37) and torch.equal(sd["weight"], w_q) and torch.equal(sd["weight_scale"], w_scale)
    x = torch.randn(6, 37)
    kernel_bias = layer.bias.detach().float() if dtype == torch.float64 else layer.bias.detach()
    with torch.no_grad():
        _assert_bit_equal(layer(x), memkern.ops.int8_linear(x, w_q, w_scale, kernel_bias))
        out = layer(x.to(dtype))
    assert out.dtype == dtype
    kernel_dtype = F32 if dtype == torch.float64 else dtype
    ref = reference.int8_linear(x.to(dtype).to(kernel_dtype), w_q, w_scale, kernel_bias,
                                out_dtype=torch.float64, compute_dtype=torch.float64)
    assert_rel_close(out, ref, kernel_dtype)


def test_converted_model_on_the_plain_layout_matches_float64(monkeypatch):
    # Where the packed kernel is not native, a converted model keeps the plain (N, K)
    # weight and int8_linear runs it (on a CPU with AVX512-VNNI: the fused (N, K) VNNI
    # kernel); a checkpoint of a packed model loads into it the same way. Each layer is
    # checked on the input it was given against the float64 reference of its own weights.
    def model():
        return nn.Sequential(nn.Linear(67, 29), nn.ReLU(), nn.Linear(29, 13))

    source = model()
    packed_model = memkern.convert(copy.deepcopy(source), "int8")
    monkeypatch.setattr(memkern.ops, "int8_packed_kernel_native", lambda device: False)
    converted = memkern.convert(copy.deepcopy(source), "int8")
    loaded = memkern.convert(model(), "int8")
    loaded.load_state_dict(packed_model.state_dict())
    x = torch.randn(2, 17, 67)
    for target in (converted, loaded):
        seen = {}
        hooks = [target[i].register_forward_hook(lambda m, args, out, i=i: seen.update({i: (args[0], out)}))
                 for i in (0, 2)]
        with torch.no_grad(), memkern.use_backend("cpp"):
            target(x)
        for hook in hooks:
            hook.remove()
        for i, (inp, out) in seen.items():
            layer = target[i]
            _layout_ok(layer, native=False)
            w_q, w_scale = memkern.ops.quantize_rowwise(source[i].weight.detach())
            assert torch.equal(layer.weight, w_q) and torch.equal(layer.weight_scale, w_scale)
            ref = reference.int8_linear(inp.reshape(-1, inp.shape[-1]), w_q, w_scale, source[i].bias.detach(),
                                        out_dtype=torch.float64, compute_dtype=torch.float64)
            assert_rel_close(out.reshape(-1, out.shape[-1]), ref, F32)
        assert sorted(seen) == [0, 2]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(memkern.backends.OPS["int8_linear_packed"].static_reason("cpp", "cpu") is not None,
                    reason="memkern._C is not built")
def test_native_where_the_build_machine_has_vnni():
    # The extension is built with -march=native (setup.py, MEMKERN_MARCH unset), so on a
    # CPU with AVX512-VNNI the packed kernel must be compiled in, and Int8Linear must use it.
    if os.environ.get("MEMKERN_MARCH", "native") != "native":
        pytest.skip("built for another target than this CPU")
    expected = {"avx512f", "avx512bw", "avx512_vnni"} <= _cpu_flags()
    assert memkern.ops.int8_packed_kernel_native("cpu") is expected
    assert Int8Linear.from_linear(nn.Linear(8, 4)).weight_packed is expected


def test_whole_module_pickles(tmp_path):
    # torch.save(model) pickles the modules themselves, hooks included.
    model = memkern.convert(nn.Sequential(nn.Linear(37, 23), nn.ReLU(), nn.Linear(23, 5)), "int8")
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded[0].weight_packed == model[0].weight_packed
    x = torch.randn(4, 37)
    with torch.no_grad():
        _assert_bit_equal(loaded(x), model(x))
    state = loaded.state_dict()
    assert state["0.weight"].shape == (23, 37)
