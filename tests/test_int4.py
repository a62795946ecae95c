"""int4_weight_only_linear, quantize_int4 and Int4WeightOnlyLinear: every backend against a
float64 reference, group sizes and ragged last groups, SQNR against torchao's scheme, edge
cases, autograd, bad input, opcheck, torch.compile, and the module's state_dict, meta,
casts, pickling and footprint."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import memkern
from memkern import reference_int4
from conftest import CPU_BACKENDS, assert_compiles_like_eager, assert_rel_close, raises_naming, require_backend, sqnr_db

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OP = "int4_weight_only_linear"


def _random_format(n: int, k: int, group_size: int, device="cpu"):
    """Arbitrary codes, scales and fractional zero points: the whole format, not only what
    quantize_int4 produces."""
    groups = -(-k // group_size)
    w_int4 = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, device=device)
    scales = torch.rand(n, groups, device=device) * 0.2 + 0.01
    zeros = torch.rand(n, groups, device=device) * 15
    return w_int4, scales, zeros


def _reference64(x, w_int4, scales, zeros, group_size, bias=None):
    return reference_int4.int4_weight_only_linear(
        x.double(),
        w_int4,
        scales,
        zeros,
        group_size,
        None if bias is None else bias.double(),
        compute_dtype=torch.float64,
    )


def _run(backend, x, w_int4, scales, zeros, group_size, bias=None):
    require_backend(OP, backend, x, w_int4, scales, zeros, group_size, bias)
    with memkern.use_backend(backend):
        return memkern.ops.int4_weight_only_linear(x, w_int4, scales, zeros, group_size, bias)


# (M, K, N, group_size, dtype): M = 1 (the CPU's one-row tiles), 2..64 (four-row tiles)
# and 65 (past the fused kernel: dequantised blocks and the float32 GEMM); K below,
# at and past one group, odd, not a multiple of any vector width; N past the tiles.
CASES = (
    (1, 47, 13, 32, F32),
    (1, 256, 9, 128, BF16),
    (7, 100, 19, 64, F16),
    (17, 31, 33, 32, F32),
    (4, 1, 5, 32, F32),
    (3, 257, 7, 128, BF16),
    (65, 130, 11, 64, F32),
    (66, 45, 17, 32, BF16),
)


def _case_id(c):
    return f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}-{str(c[4]).removeprefix('torch.')}"


# -- agreement with the float64 reference ----------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(backend, case, poisoned_outputs):
    m, k, n, group_size, dtype = case
    x = torch.randn(m, k).to(dtype)
    w_int4, scales, zeros = _random_format(n, k, group_size)
    bias = torch.randn(n).to(dtype)
    out = _run(backend, x, w_int4, scales, zeros, group_size, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    assert_rel_close(out, _reference64(x, w_int4, scales, zeros, group_size, bias), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("group_size", (32, 64, 128, 96))
def test_each_group_uses_its_own_scale_and_zero(backend, group_size):
    # Codes all 15, one scale per group and row that no other group shares, zero 0: every
    # output is 15 * sum_g scale[n, g] * sum of x over group g, computed here in float64.
    # K = 2 groups + 17 leaves a ragged last group; a kernel reading the wrong group's
    # scale, or the padding past K, gets another number.
    k, n = 2 * group_size + 17, 5
    groups = 3
    x = torch.randn(4, k)
    w_int4 = torch.full((n, (k + 1) // 2), 0xFF, dtype=torch.uint8)
    scales = (torch.arange(n * groups, dtype=torch.float32).reshape(n, groups) + 1) / 8
    zeros = torch.zeros(n, groups)
    out = _run(backend, x, w_int4, scales, zeros, group_size)
    group_sums = torch.stack([x.double()[:, g * group_size : (g + 1) * group_size].sum(1) for g in range(groups)], 1)
    expected = 15 * group_sums @ scales.double().t()
    assert_rel_close(out, expected, F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nibble_order_low_is_even(backend):
    # One byte: 0x1F holds code 15 for input 0 and code 1 for input 1.
    x = torch.tensor([[1.0, 1000.0]])
    w_int4 = torch.tensor([[0x1F]], dtype=torch.uint8)
    out = _run(backend, x, w_int4, torch.ones(1, 1), torch.zeros(1, 1), 32)
    assert out.item() == 15.0 + 1000.0


# -- quantisation --------------------------------------------------------------------------
def test_pack_unpack_round_trip_and_odd_k_padding():
    q = torch.randint(0, 16, (6, 11), dtype=torch.uint8)
    packed = reference_int4.pack_int4(q)
    assert packed.shape == (6, 6) and packed.dtype == torch.uint8
    assert torch.equal(reference_int4.unpack_int4(packed, 11), q)
    assert torch.equal(packed[:, 0], q[:, 0] | (q[:, 1] << 4))
    assert (packed[:, -1] >> 4 == 0).all()  # the padding nibble of odd K


@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_quantize_beats_the_plain_min_max_grid_in_every_group(group_size):
    # Each group's squared error is at most that of the plain min/max grid (scale (max -
    # min) / 15, zero -min / scale, computed here in float64), one of the candidates, and
    # its scale is at most the min/max one (the range only shrinks).
    k = 2 * group_size + 5
    w = torch.randn(9, k)
    w_int4, scales, zeros = memkern.ops.quantize_int4(w, group_size)
    assert w_int4.shape == (9, (k + 1) // 2) and scales.shape == zeros.shape == (9, 3)
    deq = memkern.ops.dequantize_int4(w_int4, scales, zeros, group_size, k).double()
    shrunk = 0
    for g in range(3):
        block = w[:, g * group_size : min(k, (g + 1) * group_size)].double()
        lo, hi = block.amin(1, keepdim=True), block.amax(1, keepdim=True)
        scale = (hi - lo) / 15
        plain = (torch.round(block / scale - lo / scale).clamp(0, 15) * scale + lo - block).square().sum(1)
        ours = (deq[:, g * group_size : g * group_size + block.shape[1]] - block).square().sum(1)
        assert (ours <= plain * (1 + 1e-4)).all()
        assert (scales[:, g].double() <= scale.squeeze(1) * (1 + 1e-6)).all()
        shrunk += int((scales[:, g].double() < scale.squeeze(1) * (1 - 1e-3)).sum())
    assert shrunk > 0  # Gaussian groups gain from clipping their extremes


def test_constant_group_is_exact_and_meta_quantises():
    w = torch.full((2, 40), 0.375)
    w[1] = 0.0
    w_int4, scales, zeros = memkern.ops.quantize_int4(w, 32)
    assert torch.equal(memkern.ops.dequantize_int4(w_int4, scales, zeros, 32, 40), w)
    meta = memkern.ops.quantize_int4(torch.empty(7, 100, device="meta"), 64)
    assert [tuple(t.shape) for t in meta] == [(7, 50), (7, 2), (7, 2)]
    assert [t.dtype for t in meta] == [torch.uint8, torch.float32, torch.float32]


def _torchao_int4_dequantized(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """torchao's int4 weight-only scheme (int4_weight_only / tinygemm layout), from its
    documented formula: per group min/max, scale = (max - min) / 15 (at least 1e-6), zero
    = min + 8 * scale, both stored in bfloat16, q = clamp(round((w - (zero - 8 * scale)) /
    scale), 0, 15), w = (q - 8) * scale + zero."""
    n, k = w.shape
    g = w.double().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6).to(torch.bfloat16).double()
    zero = (lo + 8 * scale).to(torch.bfloat16).double()
    q = torch.round((g - (zero - 8 * scale)) / scale).clamp(0, 15)
    return ((q - 8) * scale + zero).reshape(n, k)


def _symmetric_int4_dequantized(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = w.double().reshape(n, k // group_size, group_size)
    scale = g.abs().amax(2, keepdim=True) / 7
    return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(n, k)


@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_sqnr_at_least_torchaos_and_above_symmetric(group_size):
    # The output SQNR against the unquantised float64 product, Gaussian x and weights.
    x, w = torch.randn(64, 1024), torch.randn(512, 1024)
    exact = x.double() @ w.double().t()
    out = memkern.ops.int4_weight_only_linear(x, *memkern.ops.quantize_int4(w, group_size), group_size)
    ours = sqnr_db(out, exact)
    torchao = sqnr_db(x.double() @ _torchao_int4_dequantized(w, group_size).t(), exact)
    symmetric = sqnr_db(x.double() @ _symmetric_int4_dequantized(w, group_size).t(), exact)
    assert ours >= torchao
    assert ours >= symmetric + 1.0
    assert ours >= {32: 22.0, 64: 20.5, 128: 19.0}[group_size]


# -- edge cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_leading_dims_and_a_vector(backend):
    w_int4, scales, zeros = _random_format(6, 40, 32)
    args = (w_int4, scales, zeros, 32)
    assert _run(backend, torch.randn(0, 40), *args).shape == (0, 6)
    assert _run(backend, torch.randn(2, 0, 40), *args).shape == (2, 0, 6)
    x = torch.randn(2, 3, 40)
    out = _run(backend, x, *args)
    assert out.shape == (2, 3, 6)
    assert_rel_close(out.reshape(6, 6), _reference64(x.reshape(6, 40), *args), F32)
    assert _run(backend, x[0, 0], *args).shape == (6,)
    assert _run(backend, torch.randn(3, 40), w_int4[:0], scales[:0], zeros[:0], 32).shape == (3, 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    x = torch.randn(70, 9).t()  # (9, 70), column-major
    w_int4, scales, zeros = _random_format(22, 70, 32)
    w_view, s_view, z_view = w_int4[::2], scales[::2], zeros[::2]  # (11, 35), row strides doubled
    bias = torch.randn(22)[1::2]
    assert not (x.is_contiguous() or w_view.is_contiguous() or s_view.is_contiguous() or bias.is_contiguous())
    out = _run(backend, x, w_view, s_view, z_view, 32, bias)
    assert_rel_close(out, _reference64(x, w_view, s_view, z_view, 32, bias), F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_row_stays_in_its_row(backend):
    x = torch.randn(5, 70)
    x[2, 33] = float("nan")
    w_int4, scales, zeros = _random_format(11, 70, 64)
    out = _run(backend, x, w_int4, scales, zeros, 64)
    keep = [0, 1, 3, 4]
    assert torch.isnan(out[2]).all() and torch.isfinite(out[keep]).all()
    assert_rel_close(out[keep], _reference64(x[keep], w_int4, scales, zeros, 64), F32)


def test_default_backend_on_cpu_is_cpp_when_built():
    from memkern import _library, backends

    expected = "cpp" if _library.has_cpp() else "torch"
    args = (torch.randn(2, 40), *_random_format(3, 40, 32), 32, None)
    assert backends.OPS[OP].select(*args).backend == expected
    if _library.has_cpp():
        assert memkern.ops.int4_cpu_kernel_simd() in ("avx512", "avx2", "scalar")


# -- autograd ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (F32, BF16))
def test_backward_through_the_dequantised_weight(backend, dtype):
    m, k, n, group_size = 9, 75, 21, 32
    x = torch.randn(3, m, k).to(dtype).requires_grad_()
    w_int4, scales, zeros = _random_format(n, k, group_size)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, m, n).to(dtype)
    require_backend(OP, backend, x, w_int4, scales, zeros, group_size, bias)
    with memkern.use_backend(backend):
        memkern.ops.int4_weight_only_linear(x, w_int4, scales, zeros, group_size, bias).backward(grad)
    w_deq = reference_int4.dequantize_int4(w_int4, scales, zeros, group_size, k, torch.float64)
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype
    assert_rel_close(x.grad, grad.double() @ w_deq, dtype)
    assert_rel_close(bias.grad, grad.double().sum((0, 1)), dtype)


def test_backward_in_blocks_of_rows(monkeypatch):
    # The backward dequantises a few rows at a time; blocks of 4 rows of 11 must still
    # cover every row once.
    monkeypatch.setattr(memkern.ops.int4, "_BACKWARD_BLOCK_ELEMENTS", 4 * 40)
    x = torch.randn(3, 40, requires_grad=True)
    w_int4, scales, zeros = _random_format(11, 40, 32)
    grad = torch.randn(3, 11)
    memkern.ops.int4_weight_only_linear(x, w_int4, scales, zeros, 32).backward(grad)
    w_deq = reference_int4.dequantize_int4(w_int4, scales, zeros, 32, 40, torch.float64)
    assert_rel_close(x.grad, grad.double() @ w_deq, F32)


def test_gradcheck_and_weights_get_no_gradient():
    w_int4, scales, zeros = _random_format(5, 40, 32)
    x = torch.randn(3, 40, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    f = lambda x, b: memkern.ops.int4_weight_only_linear(x, w_int4, scales, zeros, 32, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, bias), eps=1e-2, atol=1e-3, rtol=1e-3)
    scales.requires_grad_()
    f(x, bias).sum().backward()
    assert scales.grad is None and x.grad is not None


# -- bad input --------------------------------------------------------------------------------
def _bad_inputs():
    x = torch.randn(4, 70)
    w, s, z = _random_format(6, 70, 32)
    return [
        ((x, w, s, z, 48), ValueError, ["group_size", "multiple of 32", "48"]),
        ((x, w, s, z, 0), ValueError, ["group_size", "0"]),
        ((x, w, s, z, 32.0), ValueError, ["group_size", "32.0"]),
        ((x, w.to(torch.int8), s, z, 32), TypeError, ["w_int4", "uint8", "int8"]),
        ((x, w[:, :34], s, z, 32), ValueError, ["w_int4", "(6, 35)", "K = 70", "(6, 34)"]),
        ((torch.randn(4, 71), w, s, z, 32), ValueError, ["w_int4", "(6, 36)", "(6, 35)"]),
        ((x, w, s[:, :2], z, 32), ValueError, ["scales", "(6, 3)", "(6, 2)"]),
        ((x, w, s, z, 64), ValueError, ["scales", "(6, 2)", "group_size = 64", "(6, 3)"]),
        ((x, w, s, z.half(), 32), TypeError, ["zeros", "float32", "float16"]),
        ((x, w, s, z, 32, torch.ones(7)), ValueError, ["bias", "(6,)", "(7,)"]),
        ((x.long(), w, s, z, 32), TypeError, ["x", "float32", "int64"]),
        ((x, w[0], s, z, 32), ValueError, ["w_int4", "2-D", "1-D"]),
        ((x, w, s.to("meta"), z, 32), ValueError, ["device", "scales on meta", "x on cpu"]),
        (([[1.0]], w, s, z, 32), TypeError, ["x", "Tensor", "list"]),
    ]


@pytest.mark.parametrize("args, error, words", _bad_inputs(), ids=[str(i) for i in range(len(_bad_inputs()))])
def test_bad_input_is_a_clear_error(args, error, words):
    with raises_naming(error, words):
        memkern.ops.int4_weight_only_linear(*args)


def test_bad_quantize_and_layer_arguments():
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32.*got 100"):
        memkern.ops.quantize_int4(torch.randn(4, 64), 100)
    with pytest.raises(TypeError, match="weight must be floating point, got int32"):
        memkern.ops.quantize_int4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="Int4WeightOnlyLinear: group_size .* got 16"):
        memkern.nn.Int4WeightOnlyLinear.from_linear(nn.Linear(64, 4), group_size=16)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        memkern.nn.Int4WeightOnlyLinear.from_linear(nn.Conv1d(3, 3, 1))


# -- opcheck and torch.compile ------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x = torch.randn(5, 45, requires_grad=True)
    args = (x, *_random_format(11, 45, 32), 32, torch.randn(11, requires_grad=True))
    require_backend(OP, backend, *args)
    with memkern.use_backend(backend):
        torch.library.opcheck(torch.ops.memkern.int4_weight_only_linear.default, args)


def test_compiles_without_graph_breaks():
    layer = memkern.nn.Int4WeightOnlyLinear.from_linear(nn.Linear(40, 12), group_size=32)

    def f(x):
        return layer(x * 2).relu().sum()

    x = torch.randn(3, 5, 40, requires_grad=True)
    assert_compiles_like_eager(f, x)


# -- the module ---------------------------------------------------------------------------------
def _layer(k=70, n=9, group_size=32, bias=True):
    linear = nn.Linear(k, n, bias=bias)
    return linear, memkern.nn.Int4WeightOnlyLinear.from_linear(linear, group_size=group_size)


def test_from_linear_buffers_forward_and_dequantize():
    linear, layer = _layer()
    sd = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "weight": (torch.uint8, (9, 35)),
        "weight_scale": (F32, (9, 3)),
        "weight_zero": (F32, (9, 3)),
        "bias": (F32, (9,)),
    }
    assert "group_size=32" in repr(layer) and "int4_weight_only" in repr(layer)
    x = torch.randn(4, 70)
    w_deq = layer.dequantized_weight()
    assert_rel_close(layer(x), x.double() @ w_deq.double().t() + linear.bias.double(), F32)
    assert sqnr_db(w_deq, linear.weight) > 18
    assert torch.equal(layer.dequantize().weight, w_deq)


def test_state_dict_meta_assign_and_pickle_round_trips():
    _, layer = _layer()
    x = torch.randn(3, 70)
    expected = layer(x)
    fresh = memkern.nn.Int4WeightOnlyLinear(70, 9, group_size=32)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)
    meta = memkern.nn.Int4WeightOnlyLinear(70, 9, group_size=32, device="meta")
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert meta.weight.device.type == "cpu" and torch.equal(meta(x), expected)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
    with pytest.raises(RuntimeError, match="weight_scale"):
        memkern.nn.Int4WeightOnlyLinear(70, 9, group_size=64).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("cast", ("half", "bfloat16", "double", "to_float16"))
def test_casts_keep_the_storage_dtypes_and_cast_the_bias(cast):
    _, layer = _layer()
    scale_before = layer.weight_scale.clone()
    layer = layer.to(torch.float16) if cast == "to_float16" else getattr(layer, cast)()
    assert layer.weight.dtype == torch.uint8
    assert layer.weight_scale.dtype == layer.weight_zero.dtype == F32
    assert torch.equal(layer.weight_scale, scale_before)  # never through a lossy dtype
    want = {"half": F16, "bfloat16": BF16, "double": torch.float64, "to_float16": F16}[cast]
    assert layer.bias.dtype == want and isinstance(layer.bias, nn.Parameter)
    if want != torch.float64:
        x = torch.randn(2, 70).to(want)
        assert layer(x).dtype == want
    assert layer.float().bias.dtype == F32 and layer.weight_scale.dtype == F32


def test_to_device_moves_everything():
    _, layer = _layer()
    layer = layer.to("meta")
    assert all(t.device.type == "meta" for t in (layer.weight, layer.weight_scale, layer.weight_zero, layer.bias))
    assert layer.weight_scale.dtype == F32
    layer = layer.to_empty(device="cpu")
    assert layer.weight.device.type == "cpu"


def test_memory_footprint_is_under_a_seventh_of_float32_at_group_128():
    model = nn.Sequential(nn.Linear(4096, 512, bias=False), nn.Linear(512, 4096, bias=False))
    fp32 = memkern.memory_footprint(model).total_bytes
    converted = memkern.convert(model, "int4_weight_only", group_size=128, skip=())
    fp = memkern.memory_footprint(converted)
    # 0.5 byte a weight, 8 bytes (scale + zero) a group of 128: 9 / 64 of float32.
    assert fp.total_bytes == 2 * 4096 * 512 * 9 // 16
    assert fp.total_bytes <= fp32 / 7
    assert fp.by_layer_type == {"Int4WeightOnlyLinear": fp.total_bytes}
    assert set(fp.by_dtype) == {"uint8", "float32"}


def test_convert_with_group_size_and_frozen_base_passes_gradients():
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 8))
    x = torch.randn(5, 64)
    exact = model(x)
    converted = memkern.convert(model, "int4_weight_only", group_size=32, inplace=False, skip=())
    assert [type(m).__name__ for m in converted] == ["Int4WeightOnlyLinear", "GELU", "Int4WeightOnlyLinear"]
    assert converted[0].group_size == 32 and converted[0].weight_scale.shape == (96, 2)
    assert memkern.convert(model, "int4_weight_only", inplace=False, skip=())[0].group_size == 128
    assert sqnr_db(converted(x), exact) > 15
    x.requires_grad_()
    converted(x).sum().backward()
    assert x.grad is not None and converted[2].bias.grad is not None
    with pytest.raises(ValueError, match="already converted"):
        memkern.convert(converted, "int4_weight_only", skip=())
    with pytest.raises(ValueError, match="group_size applies to scheme 'int4_weight_only' only"):
        memkern.convert(model, "int8", group_size=64)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        memkern.convert(model, "int4_weight_only", group_size=50)


def test_convert_on_the_meta_device_then_load():
    model = nn.Sequential(nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 8))
    converted = memkern.convert(model, "int4_weight_only", group_size=32, inplace=False, skip=())
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 8))
    skeleton = memkern.convert(skeleton, "int4_weight_only", group_size=32, skip=())
    skeleton.load_state_dict(converted.state_dict(), assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(skeleton(x), converted(x))
    assert math.isclose(memkern.memory_footprint(skeleton).total_bytes, memkern.memory_footprint(converted).total_bytes)
