"""Shared test machinery: seeding, the tolerance table, backend availability."""

from __future__ import annotations

import contextlib
import math
import os
import zlib
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memkern
from memkern import backends, reference

# Relative error ||out - ref|| / ||ref|| allowed against a float64 reference, by the dtype
# the kernel computes in (docs/numerics.md, "How results are checked").
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

CPU_BACKENDS = ("cpp", "triton", "torch")
REQUIRED_BACKENDS = {b for b in os.environ.get("MEMKERN_REQUIRE_BACKENDS", "").split(",") if b}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} ({dtype})"


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    import math

    noise = (out.double() - ref.double()).norm().item()
    signal = ref.double().norm().item()
    return float("inf") if noise == 0 else 20 * math.log10(signal / noise)


class LargestTensor(TorchDispatchMode):
    """Inside ``with LargestTensor() as mode``: mode.largest is the most elements of any
    tensor an op produced (to prove that no rows x vocab tensor ever exists)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def require_backend(op: str, backend: str, *args) -> None:
    """Skip (or fail, when the build promises it) if ``backend`` cannot run ``op`` here."""
    reason = backends.OPS[op].reason(backend, *args)
    if reason is None:
        return
    if backend in REQUIRED_BACKENDS:
        pytest.fail(f"backend {backend} is required (MEMKERN_REQUIRE_BACKENDS) but cannot run {op}: {reason}")
    pytest.skip(f"{backend} cannot run {op} here: {reason}")


@contextlib.contextmanager
def raises_naming(error: type[Exception], words, **raises_kwargs):
    """``pytest.raises(error, **raises_kwargs)`` around the block, and then every one of ``words``
    (the argument, the expected and the actual value) in the message."""
    with pytest.raises(error, **raises_kwargs) as info:
        yield info
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


_DTYPE_NAMES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def dtype_pairs(*names: str) -> list:
    """Parameters (student dtype, teacher dtype) from names like "bf16-f32", which are their ids."""
    return [pytest.param(*(_DTYPE_NAMES[part] for part in name.split("-")), id=name) for name in names]


def assert_compiled_matches_eager(f, grad_inputs, *other_inputs, exact: bool = False) -> None:
    """``f(*grad_inputs, *other_inputs)`` compiled with ``fullgraph=True`` (no graph break) gives
    eager's value and gradients with respect to ``grad_inputs``: bit for bit when ``exact``
    (aot_eager: no kernel fusion to round differently), else within assert_close's tolerance."""
    tolerance = dict(rtol=0, atol=0) if exact else {}
    ins_c = [x.detach().clone().requires_grad_() for x in grad_inputs]
    ins_e = [x.detach().clone().requires_grad_() for x in grad_inputs]
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins_c, *other_inputs)
    out_e = f(*ins_e, *other_inputs)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e, **tolerance)
    for a, b in zip(ins_c, ins_e):
        torch.testing.assert_close(a.grad, b.grad, **tolerance)


def assert_compiles_like_eager(f, x: torch.Tensor) -> None:
    """``f(x)`` compiled with ``fullgraph=True`` gives eager's value and gradient bit for bit."""
    assert_compiled_matches_eager(f, [x], exact=True)


class KDOptions64(NamedTuple):
    """kd_loss's scalar options with its documented defaults, as the float64 formulas written
    out in the tests read them (a misspelt option is a TypeError)."""

    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    soft_loss_scale: str = "t2"


def tiny_decoder_config(vocab_size: int, hidden_size: int = 32, **overrides) -> dict:
    """Keyword arguments of a two-layer Llama-style transformers config (LlamaConfig, Qwen2Config)
    small enough for the CPU, with grouped-query attention: 4 query heads on 2 key-value heads."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def poisoned_outputs():
    """Fill every fresh allocation (torch.empty, at::empty) with a known value, so an
    element a kernel forgot to write shows up as a mismatch."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
    torch.use_deterministic_algorithms(prev_det)


@pytest.fixture
def backend(request):
    """Run the test body with ``request.param`` forced."""
    with memkern.use_backend(request.param):
        yield request.param


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


# -- the packed int8 layout, written out (tests/test_int8_packing.py, tests/test_nn_quantized.py)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """torch.equal, with NaN equal to NaN (in the same places only)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN in different places"
    got, want = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{int((diff != 0).sum())} of {got.numel()} elements differ; worst at {idx}: "
            f"got {got[idx].item()!r}, want {want[idx].item()!r}"
        )


def expected_packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return (math.ceil(n / 16), math.ceil(k / 4), 16, 4)


def pack_loop(w: torch.Tensor) -> torch.Tensor:
    """The packed layout written element by element: packed[j, g, c, t] = w[16j + c, 4g + t]."""
    n, k = w.shape
    bn, groups, _, _ = expected_packed_shape(n, k)
    out = [[[[0] * 4 for _ in range(16)] for _ in range(groups)] for _ in range(bn)]
    rows = w.tolist()
    for r in range(n):
        for c in range(k):
            out[r // 16][c // 4][r % 16][c % 4] = rows[r][c]
    return torch.tensor(out, dtype=torch.int8).reshape(bn, groups, 16, 4)


# -- the low-precision linear ops (tests/test_lowp.py, tests/test_nn_quantized.py)
def call_lowp(op: str, x, weight_args, bias=None, **kwargs):
    return getattr(memkern.ops, op)(x, *weight_args, bias, **kwargs)


def lowp_reference64(op: str, x, weight_args, bias=None):
    """The low-precision op's reference evaluated in float64 (int8_linear: the quantisation of x and
    the integer product are exact, the epilogue is float64)."""
    f64 = torch.float64
    if op == "int8_linear":
        return reference.int8_linear(x, *weight_args, bias, out_dtype=f64, compute_dtype=f64)
    if op == "int8_weight_only_linear":
        return reference.int8_weight_only_linear(x, *weight_args, bias, compute_dtype=f64)
    return reference.fp16_linear(x, *weight_args, bias, compute_dtype=f64)
