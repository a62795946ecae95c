"""The packed int8 weight layout: pack_int8_weight / unpack_int8_weight against an
independent loop, int8_linear_packed bit for bit against int8_linear (every backend),
integer exactness, NaN rows, autograd, bad input, opcheck and torch.compile, and
memkern.nn.Int8Linear keeping its weight packed (state_dict, meta device, .to(), repr)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import memkern
from memkern import reference
from memkern.nn import Int8Linear
from conftest import (
    CPU_BACKENDS,
    assert_bit_equal,
    assert_rel_close,
    expected_packed_shape,
    pack_loop,
    raises_naming,
    require_backend,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OP = "int8_linear_packed"
NATIVE = memkern.ops.int8_packed_kernel_native("cpu")


def _weights(n: int, k: int):
    w_q, w_scale = memkern.ops.quantize_rowwise(torch.randn(n, k))
    return w_q, w_scale


def _plain_and_packed(x, w_q, w_scale, bias=None, **kwargs):
    """(int8_linear, int8_linear_packed) on the same inputs, whatever backend is forced."""
    plain = memkern.ops.int8_linear(x, w_q, w_scale, bias, **kwargs)
    packed = memkern.ops.int8_linear_packed(x, memkern.ops.pack_int8_weight(w_q), w_scale, bias, **kwargs)
    return plain, packed


def _require_cpp():
    require_backend(OP, "cpp", torch.randn(1, 4), torch.zeros(1, 1, 16, 4, dtype=torch.int8))


# -- pack / unpack ----------------------------------------------------------------------------
ROUND_TRIP_SHAPES = [(1, 1), (17, 31), (16, 4), (33, 4095), (15, 3), (64, 64), (70, 1), (1, 65), (0, 5), (5, 0)]


@pytest.mark.parametrize("n, k", ROUND_TRIP_SHAPES, ids=[f"{n}x{k}" for n, k in ROUND_TRIP_SHAPES])
def test_pack_unpack_round_trip(n, k):
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    packed = memkern.ops.pack_int8_weight(w)
    assert packed.dtype == torch.int8 and packed.is_contiguous()
    assert tuple(packed.shape) == expected_packed_shape(n, k)
    assert memkern.ops.int8_packing.packed_shape(n, k) == expected_packed_shape(n, k)
    back = memkern.ops.unpack_int8_weight(packed, n, k)
    assert back.dtype == torch.int8 and back.shape == (n, k)
    assert torch.equal(back, w)
    # Every byte is kept once and the rest is padding: the multiset of values is w's plus zeros.
    assert packed.numel() - n * k == int((packed == 0).sum()) - int((w == 0).sum())


@pytest.mark.parametrize("n, k", [(17, 31), (16, 4), (5, 9), (33, 8)])
def test_pack_matches_the_element_formula_and_pads_with_zeros(n, k):
    w = torch.randint(1, 128, (n, k), dtype=torch.int8) * torch.where(torch.rand(n, k) < 0.5, -1, 1).to(torch.int8)
    packed = memkern.ops.pack_int8_weight(w)
    assert torch.equal(packed, pack_loop(w))
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
    assert torch.equal(packed, pack_loop(w.contiguous()))
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
    assert tuple(packed.shape) == expected_packed_shape(33, 4095)
    back = memkern.ops.unpack_int8_weight(packed, 33, 4095)
    assert back.is_meta and back.shape == (33, 4095) and back.dtype == torch.int8


@pytest.mark.parametrize(
    "fn, args, error, message",
    [
        (
            "pack_int8_weight",
            (torch.randn(4, 8),),
            TypeError,
            "pack_int8_weight: w_q must have dtype int8; got float32",
        ),
        (
            "pack_int8_weight",
            (torch.zeros(8, dtype=torch.int8),),
            ValueError,
            "pack_int8_weight: w_q must be 2-D, got 1-D",
        ),
        (
            "pack_int8_weight",
            (torch.zeros(2, 4, 8, dtype=torch.int8),),
            ValueError,
            "pack_int8_weight: w_q must be 2-D, got 3-D",
        ),
        ("pack_int8_weight", ([[1, 2]],), TypeError, "pack_int8_weight: w_q must be a torch.Tensor, got list"),
        (
            "unpack_int8_weight",
            (torch.zeros(1, 2, 16, 4, dtype=torch.int8), 6, 9),
            ValueError,
            "unpack_int8_weight: w_packed must have shape (1, 3, 16, 4)",
        ),
        (
            "unpack_int8_weight",
            (torch.zeros(1, 2, 16, 4, dtype=torch.int8), 17, 8),
            ValueError,
            "unpack_int8_weight: w_packed must have shape (2, 2, 16, 4)",
        ),
        ("unpack_int8_weight", (torch.zeros(6, 8, dtype=torch.int8), 6, 8), ValueError, "got (6, 8)"),
        (
            "unpack_int8_weight",
            (torch.zeros(1, 2, 16, 4), 6, 8),
            TypeError,
            "unpack_int8_weight: w_packed must have dtype int8; got float32",
        ),
    ],
    ids=[
        "pack-float",
        "pack-1d",
        "pack-3d",
        "pack-list",
        "unpack-other-k",
        "unpack-other-n",
        "unpack-plain",
        "unpack-float",
    ],
)
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
    assert_bit_equal(packed, plain)
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
    assert_bit_equal(packed, plain)
    if name.endswith("overflow"):
        assert torch.isinf(packed[0]).any() and torch.isfinite(packed[1:]).all()
    if name == "odd-scales":
        assert torch.isnan(packed[:, 5]).all() and torch.equal(packed[:, 3], bias[3].expand(5))


def test_meta_x_gives_the_output_shape():
    w = torch.empty(6, 8, dtype=torch.int8, device="meta")
    out = memkern.ops.int8_linear_packed(
        torch.empty(2, 4, 8, device="meta"),
        memkern.ops.pack_int8_weight(w),
        torch.empty(6, device="meta"),
        out_dtype=BF16,
    )
    assert out.is_meta and out.shape == (2, 4, 6) and out.dtype == BF16


def test_cpp_kernel_called_directly_equals_the_plain_kernel():
    _require_cpp()
    x = torch.randn(21, 45)
    w_q, w_scale = _weights(19, 45)
    bias = torch.randn(19)
    got = torch.ops.memkern.int8_linear_packed_kernel(x, memkern.ops.pack_int8_weight(w_q), w_scale, bias, F16)
    want = torch.ops.memkern.int8_linear_kernel(x, w_q, w_scale, bias, F16)
    assert_bit_equal(got, want)


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
    assert_bit_equal(packed, plain)
    assert_bit_equal(packed, contiguous)


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
    assert_bit_equal(got, want)


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
    assert_bit_equal(packed, plain)


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
    assert_bit_equal(out[keep], plain[keep])
    ref = reference.int8_linear(x[keep], w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert_rel_close(out[keep], ref, F32)


# -- every backend ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "m, k, n, dtype, out_dtype",
    [
        (7, 31, 17, F32, None),
        (3, 5, 20, BF16, F32),
        (17, 9, 33, F16, BF16),
        (0, 8, 5, F32, None),
    ],
    ids=["7x31x17-f32", "3x5x20-bf16-out_f32", "17x9x33-f16-out_bf16", "0x8x5"],
)
def test_backends_agree_with_int8_linear(backend, m, k, n, dtype, out_dtype):
    x = torch.randn(m, k).to(dtype)
    w_q, w_scale = _weights(n, k)
    packed = memkern.ops.pack_int8_weight(w_q)
    bias = torch.randn(n).to(dtype)
    require_backend(OP, backend, x, packed, w_scale, bias)
    with memkern.use_backend(backend):
        plain, got = _plain_and_packed(x, w_q, w_scale, bias, out_dtype=out_dtype)
        got3d = memkern.ops.int8_linear_packed(x.reshape(1, m, k), packed, w_scale, bias, out_dtype=out_dtype)
    assert_bit_equal(got, plain)
    assert_bit_equal(got3d, plain.reshape(1, m, n))
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
    for name, fn, weight in (
        ("plain", memkern.ops.int8_linear, w_q),
        ("packed", memkern.ops.int8_linear_packed, packed),
    ):
        x = x0.clone().requires_grad_()
        bias = b0.clone().requires_grad_()
        with memkern.use_backend(backend):
            out = fn(x, weight, w_scale, bias)
            out.backward(grad)
        assert out.requires_grad and weight.grad is None and w_scale.grad is None
        grads[name] = (out.detach(), x.grad, bias.grad)
    for got, want in zip(grads["packed"], grads["plain"]):
        assert_bit_equal(got, want)
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
    assert_bit_equal(x.grad, x_plain.grad)
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


@pytest.mark.parametrize(
    "args, kwargs, error, words", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_bad_input_is_a_clear_error(args, kwargs, error, words):
    with raises_naming(error, words, match=r"^int8_linear_packed: "):
        memkern.ops.int8_linear_packed(*args, **kwargs)


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
        assert_bit_equal(compiled(x), layer(x))
