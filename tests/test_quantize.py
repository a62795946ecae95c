"""quantize_rowwise: every backend bit-identical to the reference, edge cases, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import memkern
from memkern import reference
from conftest import CPU_BACKENDS, raises_naming, require_backend

OP = "quantize_rowwise"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 1), (3, 4097), (0, 7), (47, 123), (5, 0), (64, 1024))


def _run(backend: str, x: torch.Tensor):
    require_backend(OP, backend, x)
    with memkern.use_backend(backend):
        return memkern.ops.quantize_rowwise(x)


def _assert_identical(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    q_ref, scale_ref = reference.quantize_rowwise(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == (x.shape[0],)
    assert q.is_contiguous()
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} q elements differ"
    assert torch.equal(scale, scale_ref) or torch.allclose(scale, scale_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference_bit_for_bit(backend, dtype, shape, poisoned_outputs):
    if backend == "triton" and shape == (3, 4097) and dtype != torch.float32:
        shape = (2, 1031)  # keeps the interpreter quick; width still spans several blocks
    x = (torch.randn(shape) * 3).to(dtype)
    q, scale = _run(backend, x)
    _assert_identical(x, q, scale)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dequantised_error_is_at_most_half_a_step(backend):
    # Independent of reference.py: the float64 round trip error is bounded by scale / 2.
    x = torch.randn(33, 517, dtype=torch.float64).float()
    q, scale = _run(backend, x)
    x64 = x.double()
    absmax = x64.abs().amax(dim=1)
    torch.testing.assert_close(scale.double(), absmax / 127, rtol=1e-6, atol=0)
    err = (q.double() * scale.double()[:, None] - x64).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert q.abs().max().item() == 127  # the row maximum maps to +-127


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_round_half_to_even(backend):
    # absmax 127 gives scale exactly 1, so x / scale is x and the ties are exact.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0]])
    q, scale = _run(backend, x)
    assert scale.item() == 1.0
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 126, 127]]


# Rows that reach the C++ kernel's scalar loop on every build: the AVX-512 loop takes only
# contiguous float32 rows (csrc/cpu/quantize_row.h). Both rows hold exact .5 ties of
# x / scale: the first has absmax 127 (scale 1), the second absmax 254 (scale 2, so the
# division makes the ties). Every value is exact in float16 and bfloat16.
TIE_ROWS = [
    [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, -125.5, 127.0],
    [1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 251.0, 253.0, -251.0, 254.0],
]
TIE_HALF_EVEN = [0, 2, 2, 0, -2, -2, 126, 126, -126, 127]  # round half away from zero: 1, 2, 3, ...


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["float16", "bfloat16", "float32-strided", "float32-transposed"])
def test_ties_round_half_to_even_on_the_scalar_path(backend, layout):
    x = torch.tensor(TIE_ROWS)
    if layout in ("float16", "bfloat16"):
        x = x.to(getattr(torch, layout))
    elif layout == "float32-strided":
        x = torch.stack([x, torch.full_like(x, 1e30)], dim=-1)[..., 0]  # column stride 2
    else:
        x = x.t().contiguous().t()  # column stride 2 (rows), row stride 1
    assert x.dtype != torch.float32 or x.stride(1) != 1
    q, scale = _run(backend, x)
    assert scale.tolist() == [1.0, 2.0]
    assert q.tolist() == [TIE_HALF_EVEN, TIE_HALF_EVEN]


def _float32_quantisation(row: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """quantize_rowwise's arithmetic spelled out in IEEE float32 (numpy keeps subnormals):
    scale = absmax / 127, q = clip(rint(x / scale), -127, 127)."""
    scale = np.abs(row).max() / np.float32(127)
    return np.clip(np.rint(row / scale), -127, 127).astype(np.int8), scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_subnormal_rows_stay_in_the_symmetric_range(backend, strided):
    # absmax = (127 j + 63) * 2^-149 (subnormal) gives scale = j * 2^-149: the division by
    # 127 rounds down to the subnormal grid, so -absmax / scale = -127 - 63 / j, below
    # -127.5 for j < 126. Those rows must clamp to -127, never -128 (and +127 likewise).
    tiny = np.float32(2.0**-149)
    rows = []
    for j in (1, 2, 5, 50, 125, 126, 200):
        a = np.float32(127 * j + 63) * tiny
        rng = np.random.default_rng(j)
        others = rng.integers(-(127 * j + 62), 127 * j + 63, size=9).astype(np.float32) * tiny
        rows.append(np.concatenate([[-a, a], others]).astype(np.float32))
    x = torch.from_numpy(np.stack(rows))
    if strided:
        x = torch.stack([x, torch.ones_like(x)], dim=-1)[..., 0]
    assert (x.abs().amax(dim=1) < 4.6e-41).all() and (x != 0).any(dim=1).all()
    q, scale = _run(backend, x)
    for r, row in enumerate(rows):
        q_want, scale_want = _float32_quantisation(row)
        assert scale[r].item() == float(scale_want), f"row {r}"
        assert q[r].tolist() == q_want.tolist(), f"row {r}"
    assert q[:6, 0].tolist() == [-127] * 6 and q[:6, 1].tolist() == [127] * 6
    assert q.min().item() >= -127


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_nonfinite_rows_are_documented(backend, dtype):
    x = torch.randn(5, 40).to(dtype)
    x[1] = 0
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    x[4, 39] = float("-inf")
    q, scale = _run(backend, x)
    assert scale[1].item() == 1.0 and (q[1] == 0).all()
    for row in (2, 3, 4):
        assert torch.isnan(scale[row]) and (q[row] == 0).all()
    _assert_identical(x[:1], q[:1], scale[:1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_largest_finite_values(backend, dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, big / 3, 1.0]]).to(dtype)
    q, scale = _run(backend, x)
    assert torch.isfinite(scale).all()
    assert q.tolist()[0][:2] == [127, -127]
    _assert_identical(x, q, scale)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "make",
    [lambda: torch.randn(40, 70).t(), lambda: torch.randn(20, 90)[:, ::3], lambda: torch.randn(30, 50)[::2, 5:45]],
    ids=["transposed", "column-stride", "row-slice"],
)
def test_non_contiguous_input(backend, make):
    x = make()
    assert not x.is_contiguous()
    q, scale = _run(backend, x)
    _assert_identical(x.contiguous(), q, scale)


def test_default_backend_on_cpu_is_cpp_when_built():
    from memkern import _library, backends

    expected = "cpp" if _library.has_cpp() else "torch"
    assert backends.OPS[OP].select(torch.randn(2, 3)).backend == expected


@pytest.mark.parametrize(
    "x, kwargs, error, words",
    [
        (torch.arange(6).reshape(2, 3), {}, TypeError, ["x", "float32", "int64"]),
        (torch.randn(2, 3, 4), {}, ValueError, ["x", "2-D", "3-D"]),
        (torch.randn(2, 3, dtype=torch.float64), {}, TypeError, ["x", "float64"]),
        (torch.randn(2, 3), {"dtype": torch.uint8}, ValueError, ["dtype", "int8", "uint8"]),
        ([[1.0]], {}, TypeError, ["x", "Tensor", "list"]),
    ],
    ids=["int-tensor", "3-D", "float64", "uint8-target", "not-a-tensor"],
)
def test_bad_input_is_a_clear_error(x, kwargs, error, words):
    with raises_naming(error, words):
        memkern.ops.quantize_rowwise(x, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x = torch.randn(9, 33)
    require_backend(OP, backend, x)
    with memkern.use_backend(backend):
        torch.library.opcheck(torch.ops.memkern.quantize_rowwise.default, (x,))


def test_compiles_without_graph_breaks():
    def f(x):
        q, scale = memkern.ops.quantize_rowwise(x * 2)
        return q.float() * scale[:, None]

    x = torch.randn(8, 40)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton", "torch"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_reference(backend, dtype):
    x = (torch.randn(257, 4099, device="cuda") * 3).to(dtype)
    x[3] = 0
    x[5, 9] = float("nan")
    require_backend(OP, backend, x)
    with memkern.use_backend(backend):
        q, scale = memkern.ops.quantize_rowwise(x[:, 1:])
    q_ref, s_ref = reference.quantize_rowwise(x[:, 1:].cpu())
    assert torch.equal(q.cpu(), q_ref)
    assert torch.allclose(scale.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
