"""int8_linear, int8_weight_only_linear, fp16_linear: every backend against a float64
reference, bit-exact integer products, SQNR, edge cases, autograd, bad input, opcheck and
torch.compile."""

from __future__ import annotations

import re

import pytest
import torch

import memkern
from memkern import reference
from conftest import (
    CPU_BACKENDS,
    assert_compiles_like_eager,
    assert_rel_close,
    call_lowp,
    lowp_reference64,
    raises_naming,
    require_backend,
    sqnr_db,
)

OPS = ("int8_linear", "int8_weight_only_linear", "fp16_linear")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (M, K, N, dtype): every M in {1, 7, 17, 128}, every K in {1, 31, 4095} and every dtype
# appears, with N never a multiple of a block size; not the full cartesian product.
CASES = (
    (1, 31, 17, F32),
    (7, 4095, 5, BF16),
    (17, 1, 33, F16),
    (128, 31, 9, F32),
    (17, 31, 33, BF16),
    (7, 31, 19, F16),
    (1, 16, 9, BF16),  # one row: 8 weight rows per CPU tile, N past them; K without a tail
    (129, 45, 21, F32),  # past the CPU's register-widening kernel: widened blocks and the float32 GEMM
)


def _case_id(c):
    return f"{c[0]}x{c[1]}x{c[2]}-{str(c[3]).removeprefix('torch.')}"


def _weights(n: int, k: int, device="cpu"):
    w = torch.randn(n, k, device=device)
    w_q, w_scale = memkern.ops.quantize_rowwise(w)
    return w, w_q, w_scale


def _args(op: str, w, w_q, w_scale, half_dtype=torch.float16):
    """The weight arguments of ``op`` for a float weight ``w``."""
    if op == "fp16_linear":
        return (w.to(half_dtype),)
    return (w_q, w_scale)


def _run(op, backend, x, weight_args, bias=None, **kwargs):
    require_backend(op, backend, x, *weight_args, bias)
    with memkern.use_backend(backend):
        return call_lowp(op, x, weight_args, bias, **kwargs)


# -- agreement with the float64 reference ----------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(op, backend, case, poisoned_outputs):
    m, k, n, dtype = case
    x = torch.randn(m, k).to(dtype)
    w, w_q, w_scale = _weights(n, k)
    weight_args = _args(op, w, w_q, w_scale)
    bias = torch.randn(n).to(dtype)
    out = _run(op, backend, x, weight_args, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = lowp_reference64(op, x, weight_args, bias)
    assert torch.isfinite(out).all()
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", (F32, F16, BF16))
def test_int8_linear_out_dtype(backend, out_dtype):
    x = torch.randn(129, 45, dtype=torch.bfloat16)  # past the CPU's VNNI row limit: _int_mm
    w, w_q, w_scale = _weights(21, 45)
    bias = torch.randn(21, dtype=torch.float16)
    out = _run("int8_linear", backend, x, (w_q, w_scale), bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert_rel_close(out, lowp_reference64("int8_linear", x, (w_q, w_scale), bias), out_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "m, k, w_bound", [(17, 31, 128), (17, 4095, 32), (129, 4095, 32)], ids=["17x31-full-range", "17x4095", "129x4095"]
)
def test_int8_products_are_bit_exact(backend, m, k, w_bound):
    # Integer-valued x whose rows reach +-127 quantise with scale exactly 1, so with unit
    # weight scales the output is the integer product itself. |x| <= 127 and |w| <= w_bound
    # keep every sum below 2^24, where float32 holds integers exactly; w_bound 128 includes
    # -128, which quantize_rowwise never produces but the kernels must still multiply.
    # On the CPU, 17 rows take the VNNI kernel where built and 129 rows torch._int_mm.
    n = 23
    x = torch.randint(-127, 128, (m, k)).float()
    x[:, k // 2] = torch.where(torch.rand(m) < 0.5, 127.0, -127.0)
    w_q = torch.randint(-w_bound, w_bound, (n, k), dtype=torch.int8)
    w_scale = torch.ones(n)
    out = _run("int8_linear", backend, x, (w_q, w_scale), out_dtype=torch.float32)
    exact = x.long() @ w_q.long().t()
    assert exact.abs().max() < 2**24
    assert torch.equal(out.long(), exact)


# K past 2^17, the longest stretch whose int8 products sum inside int32 (127 * 128 * 2^17
# < 2^31): 140,000 needs two int32 partial sums; 2^18 + 1 two full ones and a one-column
# one (the CPU's _int_mm cannot take K = 1).
LONG_K = [("cpp", 140_000), ("torch", 140_000), ("triton", 140_000), ("cpp", 2**18 + 1)]


@pytest.mark.parametrize("backend, k", LONG_K, ids=[f"{b}-K{k}" for b, k in LONG_K])
def test_int8_products_past_the_int32_range_are_exact(backend, k):
    # Row 0 is all 127 and row 1 integers with a 127: both quantise with scale exactly 1,
    # so with unit weight scales the output is the integer product rounded once to float32.
    # Against weights of all 127 (sum 127^2 K = 2.26e9 > 2^31 - 1) and all -128 (-2.28e9)
    # an int32 accumulator wraps; the int64 product does not.
    x = torch.randint(-127, 128, (2, k)).float()
    x[0] = 127.0
    x[1, 7] = 127.0
    w_q = torch.stack([torch.full((k,), 127), torch.full((k,), -128), torch.randint(-128, 128, (k,))]).to(torch.int8)
    out = _run("int8_linear", backend, x, (w_q, torch.ones(3)), out_dtype=torch.float32)
    exact = x.long() @ w_q.long().t()
    assert exact[0, 0] == 127 * 127 * k and exact[0, 0] > 2**31 and exact[0, 1] < -(2**31)
    assert torch.equal(out, exact.float())
    # The case as met: x = 1 (scale 1/127), weights of 127: 127 * K within float32 rounding.
    ones = _run("int8_linear", backend, torch.ones(1, k), (w_q[:1], torch.ones(1)))
    assert abs(ones.item() - 127.0 * k) <= 1e-6 * 127 * k


@pytest.mark.parametrize("allow_vnni", (True, False), ids=["vnni", "portable"])
@pytest.mark.parametrize("m, k, n", [(13, 4097, 37), (1, 1, 5), (6, 65, 1), (5, 0, 3), (9, 130, 10)])
def test_cpu_int8_gemms_are_bit_exact(allow_vnni, m, k, n):
    # The CPU's own int8 GEMMs (the AVX512-VNNI kernel where built, and the portable loop
    # used where torch._int_mm refuses): full int8 range including -128 (the VNNI kernel
    # biases a by 128 and must take it back exactly), rows of all -128, K tails of every
    # length modulo 64, N tails modulo 4.
    require_backend("int8_linear", "cpp", torch.randn(1, 1))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    a[0] = -128
    b[-1] = -128
    out = torch.ops.memkern_internal.int8_mm_kernel(a, b, allow_vnni)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long().t())


def test_compiled_schemas_are_all_defined_in_memkern_cpp():
    # csrc/memkern.cpp holds every schema of memkern._C; the cpu/ and cuda/ files register
    # implementations only. The test-only int8 GEMM lives outside the public namespace.
    require_backend("int8_linear", "cpp", torch.randn(1, 1))
    where = {}
    for name in torch._C._dispatch_get_all_op_names():
        if name.split("::")[0] in ("memkern", "memkern_internal"):
            debug = [line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("debug:")]
            if debug and ".cpp:" in debug[0]:  # defined in C++, not by torch.library.custom_op
                where[name] = debug[0]
    assert "memkern::int8_linear_kernel" in where and "memkern::int8_packed_kernel_native" in where
    elsewhere = {name: d for name, d in where.items() if not re.search(r"csrc[/\\]memkern\.cpp:\d+$", d)}
    assert not elsewhere, elsewhere
    assert "memkern_internal::int8_mm_kernel" in where
    assert "memkern::int8_mm_kernel" not in where
    assert not hasattr(torch.ops.memkern, "int8_mm_kernel")


@pytest.mark.parametrize(
    "m, k, n", [(131, 4097, 9), (4, 64, 8), (3, 65, 2), (260, 2100, 6), (1, 4097, 7), (65, 33, 5), (6, 15, 3)]
)
def test_cpu_int8_linear_kernel_blocks_and_edges(m, k, n):
    # The fused C++ kernel walks rows in L2-sized blocks (128 rows of 4 KiB), tiles of 4 x 4,
    # and prefetches the next weight group: row counts past a block and not a multiple of 4,
    # K tails, N tails (including fewer than one group). Integer-valued activations with a
    # 127 in every row quantise exactly (scale 1), so with unit weight scales the output is
    # the int32 accumulator rounded once to float32: it must equal the int64 product so
    # rounded. Gaussian activations, scales and a bias must then match the float64 reference.
    # The AVX2 kernel (no VNNI) adds: one row (1 x 4 tiles), 64-row blocks of x (65 rows),
    # K below one 16-wide step.
    require_backend("int8_linear", "cpp", torch.randn(1, 1))
    x = torch.randint(-127, 128, (m, k)).float()
    x[:, 0] = 127.0
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w_scale = torch.ones(n)
    with memkern.backends.use_backend("cpp"):
        out = memkern.ops.int8_linear(x, w_q, w_scale)
        exact = x.long() @ w_q.long().t()
        assert torch.equal(out, exact.float())
        xr = torch.randn(m, k)
        bias = torch.randn(n)
        w_scale = torch.rand(n) + 0.5
        got = memkern.ops.int8_linear(xr, w_q, w_scale, bias)
    want = reference.int8_linear(xr, w_q, w_scale, bias, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert_rel_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["float32", "float16", "bfloat16", "float32-strided"])
def test_int8_linear_quantises_ties_half_to_even(backend, layout):
    # The activation quantisation inside int8_linear (fused into the CPU's VNNI kernel)
    # rounds x / scale half to even. Rows with exact .5 ties at scale 1 and at scale 2,
    # times an identity weight with unit scales: each output is q * x_scale.
    rows = [
        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, -125.5, 127.0],
        [1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 251.0, 253.0, -251.0, 254.0],
    ]
    half_even = torch.tensor([0, 2, 2, 0, -2, -2, 126, 126, -126, 127], dtype=torch.float64)
    x = torch.tensor(rows)
    if layout == "float32-strided":
        x = torch.stack([x, torch.full_like(x, 1e30)], dim=-1)[..., 0]
    else:
        x = x.to(getattr(torch, layout))
    eye = torch.eye(10, dtype=torch.int8)
    out = _run("int8_linear", backend, x, (eye, torch.ones(10)), out_dtype=torch.float32)
    assert torch.equal(out.double(), torch.stack([half_even, 2 * half_even]))


@pytest.mark.parametrize(
    "op, min_db", [("int8_linear", 38.0), ("int8_weight_only_linear", 40.0), ("fp16_linear", 60.0)]
)
def test_sqnr_against_the_float64_product(op, min_db):
    # Gaussian activations and weights; the reference is the unquantised float64 product.
    x = torch.randn(128, 1024)
    w, w_q, w_scale = _weights(256, 1024)
    out = call_lowp(op, x, _args(op, w, w_q, w_scale))
    exact = x.double() @ w.double().t()
    assert sqnr_db(out, exact) >= min_db


# -- edge cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_empty_batch_and_leading_dims(op, backend):
    w, w_q, w_scale = _weights(6, 10)
    weight_args = _args(op, w, w_q, w_scale)
    out = _run(op, backend, torch.randn(0, 10), weight_args)
    assert out.shape == (0, 6)
    x = torch.randn(2, 3, 10)
    out = _run(op, backend, x, weight_args)
    assert out.shape == (2, 3, 6)
    assert_rel_close(out.reshape(6, 6), lowp_reference64(op, x.reshape(6, 10), weight_args), F32)
    out = _run(op, backend, x[0, 0], weight_args)  # a single 1-D vector
    assert out.shape == (6,)
    assert_rel_close(out, lowp_reference64(op, x[0, 0][None], weight_args)[0], F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_nan_row_stays_in_its_row(op, backend):
    x = torch.randn(5, 40)
    x[2, 7] = float("nan")
    w, w_q, w_scale = _weights(11, 40)
    out = _run(op, backend, x, _args(op, w, w_q, w_scale))
    assert torch.isnan(out[2]).all()
    keep = [0, 1, 3, 4]
    assert torch.isfinite(out[keep]).all()
    assert_rel_close(out[keep], lowp_reference64(op, x[keep], _args(op, w, w_q, w_scale)), F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", (F16, BF16))
def test_largest_finite_activations(op, backend, dtype):
    big = torch.finfo(dtype).max
    if dtype == BF16 and op == "int8_weight_only_linear":
        big = 1e33  # the documented limit: |x| * 127 * K must fit float32 before the scale
    x = torch.randn(3, 31)
    x[0, :4] = torch.tensor([big, -big, big / 3, 1.0])
    x = x.to(dtype)
    w, w_q, w_scale = _weights(7, 31)
    w = w * 1e-3  # keeps the true products inside the output dtype's range
    w_q, w_scale = memkern.ops.quantize_rowwise(w)
    weight_args = _args(op, w, w_q, w_scale, half_dtype=dtype)
    out = _run(op, backend, x, weight_args)
    ref = lowp_reference64(op, x, weight_args)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert_rel_close(out, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op, backend):
    x = torch.randn(40, 25).t()  # (25, 40), column-major
    w, w_q, w_scale = _weights(40, 13)
    w, w_q = w.t(), w_q.t()  # (13, 40) transposed views
    w_scale = torch.rand(26)[::2] + 0.01
    bias = torch.randn(26)[1::2]
    weight_args = _args(op, w, w_q, w_scale)
    assert not x.is_contiguous() and not weight_args[0].is_contiguous()
    out = _run(op, backend, x, weight_args, bias)
    assert_rel_close(out, lowp_reference64(op, x, weight_args, bias), F32)


@pytest.mark.parametrize("op", OPS)
def test_default_backend_on_cpu_is_cpp_when_built(op):
    from memkern import _library, backends

    expected = "cpp" if _library.has_cpp() else "torch"
    w, w_q, w_scale = _weights(3, 4)
    assert backends.OPS[op].select(torch.randn(2, 4), *_args(op, w, w_q, w_scale), None).backend == expected


# -- autograd ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", (F32, BF16))
def test_backward_through_the_dequantised_weight(op, backend, dtype):
    m, k, n = 9, 37, 21
    x = torch.randn(3, m, k).to(dtype).requires_grad_()
    w, w_q, w_scale = _weights(n, k)
    weight_args = _args(op, w, w_q, w_scale)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, m, n).to(dtype)
    require_backend(op, backend, x, *weight_args, bias)
    with memkern.use_backend(backend):
        call_lowp(op, x, weight_args, bias).backward(grad)
    w_deq = w.to(torch.float16).double() if op == "fp16_linear" else w_q.double() * w_scale.double()[:, None]
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    assert_rel_close(x.grad, grad.double() @ w_deq, dtype)
    assert_rel_close(bias.grad, grad.double().sum((0, 1)), dtype)


@pytest.mark.parametrize("op", ("int8_weight_only_linear", "fp16_linear"))
def test_gradcheck(op):
    # Linear in x, so finite differences in float32 check the registered backward.
    w, w_q, w_scale = _weights(5, 7)
    weight_args = _args(op, w, w_q, w_scale)
    x = torch.randn(3, 7, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: call_lowp(op, x, weight_args, b), (x, bias), eps=1e-2, atol=1e-3, rtol=1e-3
    )


def test_weights_get_no_gradient_and_frozen_model_passes_gradients():
    w, w_q, w_scale = _weights(6, 8)
    x = torch.randn(4, 8, requires_grad=True)
    out = memkern.ops.int8_linear(x, w_q, w_scale)
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and w_q.grad is None and w_scale.grad is None


# -- bad input --------------------------------------------------------------------------------
def _bad_inputs():
    x = torch.randn(4, 8)
    w_q = torch.randint(-127, 128, (6, 8), dtype=torch.int8)
    s = torch.ones(6)
    return [
        ("int8_linear", (x, w_q, torch.ones(5)), {}, ValueError, ["w_scale", "(6,)", "(5,)"]),
        ("int8_linear", (x, w_q, torch.ones(6, 1)), {}, ValueError, ["w_scale", "(6,)", "(6, 1)"]),
        ("int8_linear", (x, w_q.float(), s), {}, TypeError, ["w_q", "int8", "float32"]),
        ("int8_linear", (torch.randn(4, 9), w_q, s), {}, ValueError, ["K", "8", "(4, 9)"]),
        ("int8_linear", (x, w_q, s.double()), {}, TypeError, ["w_scale", "float32", "float64"]),
        ("int8_linear", (x, w_q, s, torch.ones(7)), {}, ValueError, ["bias", "(6,)", "(7,)"]),
        ("int8_linear", (x, w_q, s), {"out_dtype": torch.int32}, TypeError, ["out_dtype", "int32"]),
        ("int8_linear", (x.long(), w_q, s), {}, TypeError, ["x", "float32", "int64"]),
        ("int8_linear", (x, w_q[0], s), {}, ValueError, ["w_q", "2-D", "1-D"]),
        ("int8_linear", (x, w_q, s.to("meta")), {}, ValueError, ["device", "w_scale on meta", "x on cpu"]),
        ("int8_weight_only_linear", (x, w_q.half(), s), {}, TypeError, ["w_q", "int8", "float16"]),
        ("int8_weight_only_linear", (x, w_q, torch.ones(8)), {}, ValueError, ["w_scale", "(6,)", "(8,)"]),
        ("int8_weight_only_linear", (x.t(), w_q, s), {}, ValueError, ["K", "8", "(8, 4)"]),
        ("fp16_linear", (x, w_q), {}, TypeError, ["w_half", "float16", "int8"]),
        ("fp16_linear", (x, torch.randn(6, 3).half()), {}, ValueError, ["K", "3", "(4, 8)"]),
        ("fp16_linear", ([[1.0]], torch.randn(6, 1).half()), {}, TypeError, ["x", "Tensor", "list"]),
    ]


@pytest.mark.parametrize(
    "op, args, kwargs, error, words", _bad_inputs(), ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_inputs())]
)
def test_bad_input_is_a_clear_error(op, args, kwargs, error, words):
    with raises_naming(error, words):
        getattr(memkern.ops, op)(*args, **kwargs)


# -- opcheck and torch.compile ------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend):
    x = torch.randn(5, 19, requires_grad=True)
    w, w_q, w_scale = _weights(11, 19)
    args = (x, *_args(op, w, w_q, w_scale), torch.randn(11, requires_grad=True))
    if op == "int8_linear":
        args = (*args, None)
    require_backend(op, backend, *args)
    with memkern.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.memkern, op).default, args)


@pytest.mark.parametrize("op", OPS)
def test_compiles_without_graph_breaks(op):
    w, w_q, w_scale = _weights(12, 20)
    weight_args = _args(op, w, w_q, w_scale)
    bias = torch.randn(12)

    def f(x):
        return call_lowp(op, x * 2, weight_args, bias).relu().sum()

    x = torch.randn(3, 5, 20, requires_grad=True)
    assert_compiles_like_eager(f, x)


# -- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton", "torch"))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "case", ((1, 4095, 257, F16), (7, 31, 130, BF16), (128, 1, 64, F32), (300, 1000, 515, BF16)), ids=_case_id
)
def test_gpu_matches_reference(op, backend, case):
    m, k, n, dtype = case
    x = torch.randn(m, k, device="cuda").to(dtype)
    w, w_q, w_scale = _weights(n, k, device="cuda")
    weight_args = _args(op, w, w_q, w_scale)
    bias = torch.randn(n, device="cuda").to(dtype)
    out = _run(op, backend, x, weight_args, bias)
    ref = lowp_reference64(op, x.cpu(), tuple(a.cpu() for a in weight_args), bias.cpu())
    # fp32 GEMMs on the GPU may run in tf32 (torch backend): its tolerance, not fp32's.
    assert_rel_close(out.cpu(), ref, dtype, factor=30 if dtype == F32 else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton", "torch"))
def test_gpu_int8_products_are_bit_exact(backend):
    m, k, n = 129, 4095, 257
    x = torch.randint(-127, 128, (m, k), device="cuda").float()
    x[:, 0] = 127.0
    w_q = torch.randint(-32, 32, (n, k), dtype=torch.int8, device="cuda")
    out = _run("int8_linear", backend, x, (w_q, torch.ones(n, device="cuda")), out_dtype=torch.float32)
    assert torch.equal(out.cpu().long(), x.cpu().long() @ w_q.cpu().long().t())
