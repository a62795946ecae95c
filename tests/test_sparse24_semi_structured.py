"""masked_matmul on 2:4 weights through PyTorch's semi-structured sparse kernels: when the
path is taken (semi_structured_reason), that CPU calls never reach it, the cached copy and
its invalidation, the product's gradients, and on a GPU the outputs against float64.

The 2:4 int8 layers' W8A8 path (semi_structured_int8_reason) likewise, with the device,
its capability and PyTorch's two int8 products faked on the CPU: the gate's decisions,
the call's layout (padding, column-major operand, int32 sums), the epilogue and gradient
against float64, the cache, and the fallback after a failed build or product. Its GPU
test is in test_gpu.py."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import memkern
from memkern import prune
from memkern.nn import SparseInt8Linear, SparseLinear
from memkern.ops import Sparse24Weight, masked_matmul
from memkern.ops import semi_structured as sparse_mod
from memkern.ops import sparse_int8 as int8_mod
from conftest import assert_rel_close

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _weight(out: int, inp: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    w = torch.randn(out, inp)
    mask = prune.masks(w, 0.5, "n:m")
    return Sparse24Weight.from_dense(w.to(dtype).to(device), mask.to(device)), (w * mask).to(dtype)


def _reference(x, dense_masked, bias):
    y = x.detach().double().cpu() @ dense_masked.double().cpu().t()
    return y if bias is None else y + bias.detach().double().cpu()


class _CountingBuilder:
    """Stands in for the semi-structured build on the CPU: returns the dense weight, so
    F.linear on it is the plain product."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, dense):
        self.calls += 1
        if self.fail:
            raise RuntimeError("no kernel for this device")
        return dense.clone()


# -- the predicate -------------------------------------------------------------------------
def test_reason_for_cpu_float32_and_block_weights():
    sw, _ = _weight(32, 64)
    assert "float32" in sparse_mod.semi_structured_reason(torch.randn(4, 64), sw)
    half, _ = _weight(32, 64, torch.float16)
    assert "CUDA" in sparse_mod.semi_structured_reason(torch.randn(4, 64, dtype=torch.float16), half)
    block = memkern.ops.BlockSparseWeight.from_dense(torch.randn(32, 64), None, (16, 16))
    assert "2:4" in sparse_mod.semi_structured_reason(torch.randn(4, 64), block)


def test_reason_for_cpu_tensors_never_asks_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda was called for CPU tensors")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    for dtype in HALF_DTYPES:
        sw, _ = _weight(128, 256, dtype)
        assert sparse_mod.semi_structured_reason(torch.randn(64, 256).to(dtype), sw) is not None


@pytest.mark.parametrize(
    "like, capability, words",
    [
        ("SparseSemiStructuredTensorCUTLASS", (9, 0), "compute capability 8.x, device has 9.0"),
        ("SparseSemiStructuredTensorCUTLASS", (8, 6), None),
        ("SparseSemiStructuredTensorCUSPARSELT", (9, 0), None),
        ("SparseSemiStructuredTensorCUSPARSELT", (7, 5), "compute capability >= 8.0, device has 7.5"),
    ],
)
def test_reason_on_a_faked_cuda_device_knows_cutlass_runs_on_8x_only(monkeypatch, like, capability, words):
    # PyTorch's CUTLASS sparse kernels refuse any device but sm_8x when the product runs,
    # after the copy was built: the predicate must say no first.
    monkeypatch.setattr(sparse_mod, "_on_cuda", lambda t: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(sparse_mod, "_semi_structured_class", lambda: getattr(torch.sparse, like))
    sw, _ = _weight(64, 128, torch.float16)
    reason = sparse_mod.semi_structured_reason(torch.randn(4, 128).half(), sw)
    assert reason is None if words is None else words in reason, reason


# -- CPU calls never take the path -----------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, *HALF_DTYPES))
@pytest.mark.parametrize("batch", ((64,), (3, 50)), ids=["NK", "BTK"])
def test_cpu_masked_matmul_never_builds_a_semi_structured_weight(monkeypatch, dtype, batch):
    def refuse(*args, **kwargs):
        raise AssertionError("the semi-structured path was entered on the CPU")

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", refuse)
    monkeypatch.setattr(sparse_mod, "_build_semi_structured", refuse)
    monkeypatch.setattr(sparse_mod.SemiStructuredProduct, "apply", refuse)
    sw, dense = _weight(128, 256, dtype)
    x = torch.randn(*batch, 256).to(dtype)
    bias = torch.randn(128).to(dtype)
    with torch.no_grad():
        y = masked_matmul(x, sw, bias)
    assert sw.semi_structured_cache is None
    assert_rel_close(y, _reference(x, dense, bias), dtype)


# -- the cached copy ---------------------------------------------------------------------------
def test_copy_is_built_once_per_weight_state(monkeypatch):
    builder = _CountingBuilder()
    monkeypatch.setattr(sparse_mod, "_build_semi_structured", builder)
    sw, dense = _weight(32, 64)
    first = sparse_mod.semi_structured_weight(sw)
    assert torch.equal(first, dense)
    assert sparse_mod.semi_structured_weight(sw) is first
    assert builder.calls == 1

    with torch.no_grad():
        sw.values.mul_(2)  # what an optimiser step does: in place, same tensor
    second = sparse_mod.semi_structured_weight(sw)
    assert builder.calls == 2
    assert torch.equal(second, 2 * dense)

    sw.values = sw.values.clone()  # equal values, another tensor
    sparse_mod.semi_structured_weight(sw)
    assert builder.calls == 3

    sw.meta = sw.meta.clone()
    sparse_mod.semi_structured_weight(sw)
    assert builder.calls == 4

    sw.values.data = sw.values.data.clone()  # what Module.to / .half() do to a parameter
    sparse_mod.semi_structured_weight(sw)
    assert builder.calls == 5
    sparse_mod.semi_structured_weight(sw)
    assert builder.calls == 5


def test_failed_build_is_remembered_until_the_weight_changes(monkeypatch):
    builder = _CountingBuilder(fail=True)
    monkeypatch.setattr(sparse_mod, "_build_semi_structured", builder)
    sw, _ = _weight(32, 64)
    with pytest.warns(RuntimeWarning, match="no kernel for this device"):
        assert sparse_mod.semi_structured_weight(sw) is None
    assert sw.semi_structured_cache.matches(sw)
    assert "no kernel for this device" in sw.semi_structured_cache.failure
    assert sparse_mod.semi_structured_weight(sw) is None
    assert builder.calls == 1
    with torch.no_grad():
        sw.values.add_(1)
    assert not sw.semi_structured_cache.matches(sw)
    with pytest.warns(RuntimeWarning):
        sparse_mod.semi_structured_weight(sw)
    assert builder.calls == 2


def test_copies_of_the_weight_drop_the_cached_copy(monkeypatch):
    monkeypatch.setattr(sparse_mod, "_build_semi_structured", _CountingBuilder())
    sw, _ = _weight(32, 64)
    sparse_mod.semi_structured_weight(sw)
    assert sw.semi_structured_cache.tensor is not None
    for clone in (copy.deepcopy(sw), pickle.loads(pickle.dumps(sw))):
        assert clone.semi_structured_cache is None or clone.semi_structured_cache.tensor is None
        assert torch.equal(clone.values, sw.values)


def test_sparse_linear_keeps_one_weight_object_while_its_tensors_stay():
    linear = torch.nn.Linear(64, 32)
    layer = SparseLinear.from_dense(linear, prune.masks(linear.weight, 0.5, "n:m"), format="2:4")
    first = layer.weight
    assert layer.weight is first
    with torch.no_grad():
        layer.values.add_(1)  # an optimiser step: same tensors, so the same object
    assert layer.weight is first
    layer.values = torch.nn.Parameter(layer.values.detach().clone())
    assert layer.weight is not first
    assert layer.weight.values is layer.values
    layer.load_state_dict(copy.deepcopy(layer.state_dict()))  # takes new tensors of the stored layout
    assert layer.weight.values is layer.values and layer.weight.meta is layer.meta


# -- the product and its gradients, with the build faked on the CPU ----------------------------
def _take_the_path_on_cpu(monkeypatch, builder):
    # Stands in for a GPU: the predicate says yes, the "semi-structured" weight is dense.
    monkeypatch.setattr(sparse_mod, "semi_structured_reason", lambda x, weight: None)
    monkeypatch.setattr(sparse_mod, "_build_semi_structured", builder)


@pytest.mark.parametrize("with_bias", (True, False), ids=["bias", "no-bias"])
def test_masked_matmul_routes_through_the_cached_copy(monkeypatch, with_bias):
    builder = _CountingBuilder()
    _take_the_path_on_cpu(monkeypatch, builder)
    sw, dense = _weight(48, 64)
    x = torch.randn(2, 7, 64, requires_grad=True)
    bias = torch.randn(48, requires_grad=True) if with_bias else None
    grad = torch.randn(2, 7, 48)
    for _ in range(2):
        x.grad = None
        y = masked_matmul(x, sw, bias)
        y.backward(grad)
    assert builder.calls == 1
    assert y.shape == (2, 7, 48)
    x64 = x.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    y64 = x64 @ dense.double().t() + (0 if b64 is None else b64)
    y64.backward(grad.double())
    assert_rel_close(y, y64, torch.float32)
    assert_rel_close(x.grad, x64.grad, torch.float32)
    if bias is not None:
        assert_rel_close(bias.grad, b64.grad * 2, torch.float32)  # two backward passes


def test_a_call_off_the_path_frees_the_copy_and_the_next_one_rebuilds(monkeypatch):
    builder = _CountingBuilder()
    monkeypatch.setattr(sparse_mod, "_build_semi_structured", builder)
    allowed = {"now": True}
    monkeypatch.setattr(
        sparse_mod, "semi_structured_reason", lambda x, weight: None if allowed["now"] else "training step"
    )
    sw, dense = _weight(32, 64)
    x = torch.randn(5, 64)
    masked_matmul(x, sw)
    assert builder.calls == 1 and sw.semi_structured_cache.tensor is not None
    allowed["now"] = False
    masked_matmul(x, sw)
    assert sw.semi_structured_cache is None
    allowed["now"] = True
    y = masked_matmul(x, sw)
    assert builder.calls == 2
    assert_rel_close(y, x.double() @ dense.double().t(), torch.float32)


def test_ragged_batches_are_padded_to_the_kernel_tile(monkeypatch):
    class Tile:
        dense_min_rows = 8

    seen = []
    real_linear = torch.nn.functional.linear

    def spy_linear(x, w, b=None):
        seen.append(x.shape[0])
        return real_linear(x, w, b)

    monkeypatch.setattr(sparse_mod, "_semi_structured_constraints", lambda cls, dtype: Tile)
    monkeypatch.setattr(torch.nn.functional, "linear", spy_linear)
    dense = torch.randn(16, 32)
    x = torch.randn(5, 32)
    y = sparse_mod._semi_structured_linear(x, dense, None)
    assert seen == [8]
    assert y.shape == (5, 16)
    assert_rel_close(y, x.double() @ dense.double().t(), torch.float32)


# -- GPU ---------------------------------------------------------------------------------------
@pytest.fixture
def semi_structured_calls(monkeypatch):
    """Counts products run by PyTorch's semi-structured kernels and copies built."""
    counts = {"mm": 0, "build": 0}
    for name in ("SparseSemiStructuredTensorCUTLASS", "SparseSemiStructuredTensorCUSPARSELT"):
        cls = getattr(torch.sparse, name, None)
        if cls is None:
            continue
        real_mm = cls._mm

        def counting_mm(self, *args, _real=real_mm, **kwargs):
            counts["mm"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_mm", counting_mm)
    real_build = sparse_mod._build_semi_structured

    def counting_build(dense):
        counts["build"] += 1
        return real_build(dense)

    monkeypatch.setattr(sparse_mod, "_build_semi_structured", counting_build)
    return counts


def _require_semi_structured_device(x, sw):
    reason = sparse_mod.semi_structured_reason(x, sw)
    if reason is not None and ("compute capability" in reason or "this torch has no" in reason):
        pytest.skip(reason)
    assert reason is None, reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("with_bias", (True, False), ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch", ((64,), (3, 50)), ids=["NK", "BTK-ragged"])
def test_gpu_semi_structured_path_matches_reference(semi_structured_calls, dtype, with_bias, batch):
    sw, dense = _weight(128, 256, dtype, "cuda")
    x = torch.randn(*batch, 256).to(dtype).cuda()
    bias = torch.randn(128).to(dtype).cuda() if with_bias else None
    _require_semi_structured_device(x.reshape(-1, 256), sw)
    y = masked_matmul(x, sw, bias)
    assert semi_structured_calls["mm"] >= 1, "the semi-structured kernels did not run"
    assert y.shape == (*batch, 128) and y.dtype == dtype
    assert_rel_close(y.cpu(), _reference(x, dense, bias), dtype)

    masked_matmul(x, sw, bias)
    assert semi_structured_calls["build"] == 1, "the cached copy was not reused"
    with torch.no_grad():
        sw.values.mul_(-0.5)
    y2 = masked_matmul(x, sw, bias)
    assert semi_structured_calls["build"] == 2, "an in-place change did not invalidate the copy"
    assert_rel_close(y2.cpu(), _reference(x, (dense.double() * -0.5), bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gpu_semi_structured_gradients_of_x_and_bias(semi_structured_calls, dtype):
    sw, dense = _weight(128, 256, dtype, "cuda")
    x = torch.randn(2, 33, 256).to(dtype).cuda().requires_grad_(True)
    bias = torch.randn(128).to(dtype).cuda().requires_grad_(True)
    _require_semi_structured_device(x.detach().reshape(-1, 256), sw)
    grad = torch.randn(2, 33, 128).to(dtype).cuda()
    y = masked_matmul(x, sw, bias)
    y.backward(grad)
    assert semi_structured_calls["mm"] >= 1
    x64 = x.detach().double().cpu().requires_grad_(True)
    b64 = bias.detach().double().cpu().requires_grad_(True)
    (x64 @ dense.double().t() + b64).backward(grad.double().cpu())
    assert_rel_close(y.cpu(), _reference(x, dense, bias), dtype)
    assert_rel_close(x.grad.cpu(), x64.grad, dtype)
    assert_rel_close(bias.grad.cpu(), b64.grad, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gpu_training_and_unsupported_shapes_keep_the_memkern_op(semi_structured_calls, dtype):
    # 40 rows: a multiple of neither cuSPARSELt's 16 nor CUTLASS's 32.
    sw, dense = _weight(40, 256, dtype, "cuda")
    x = torch.randn(64, 256).to(dtype).cuda()
    assert "not a positive multiple" in sparse_mod.semi_structured_reason(x, sw)
    assert_rel_close(masked_matmul(x, sw).cpu(), _reference(x, dense, None), dtype)

    trained, dense = _weight(128, 256, dtype, "cuda")
    trained.values.requires_grad_(True)
    assert "gradient" in sparse_mod.semi_structured_reason(x, trained)
    y = masked_matmul(x, trained)
    y.sum().backward()
    assert trained.values.grad is not None
    assert_rel_close(y.detach().cpu(), _reference(x, dense, None), dtype)
    with memkern.use_backend("torch"):
        assert "forced" in sparse_mod.semi_structured_reason(x, _weight(128, 256, dtype, "cuda")[0])
    assert semi_structured_calls["mm"] == 0
    assert semi_structured_calls["build"] == 0


@pytest.mark.gpu
def test_gpu_sparse_linear_inference_builds_once(semi_structured_calls):
    linear = torch.nn.Linear(256, 128).cuda().half()
    layer = SparseLinear.from_dense(linear, prune.masks(linear.weight, 0.5, "n:m"), format="2:4").eval()
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    _require_semi_structured_device(x, layer.weight)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert semi_structured_calls["build"] == 1 and semi_structured_calls["mm"] >= 2
    torch.testing.assert_close(y1, y2)
    assert_rel_close(y1.cpu(), _reference(x, layer.to_dense(), layer.bias), torch.float16)


def test_free_slots_stay_out_of_the_semi_structured_product(monkeypatch):
    # Groups keeping fewer than 2 weights have masked free slots; whatever those hold (here
    # a stray write), the cached copy and the gradient of x must see zeros there.
    _take_the_path_on_cpu(monkeypatch, _CountingBuilder())
    w = torch.randn(32, 64)
    mask = torch.rand(32, 64) < 0.3
    mask &= mask.reshape(32, 16, 4).cumsum(-1).reshape(32, 64) <= 2  # at most 2 per group
    sw = Sparse24Weight.from_dense(w, mask)
    assert sw.mask is not None
    with torch.no_grad():
        sw.values.add_(3.0)
    dense = (sw.values.detach() * sw.mask).double()
    dense = memkern.reference.sparse24_decompress(dense, sw.meta, 64)
    x = torch.randn(5, 64, requires_grad=True)
    grad = torch.randn(5, 32)
    y = masked_matmul(x, sw)
    y.backward(grad)
    assert (dense[~mask] == 0).all()
    assert_rel_close(y, x.detach().double() @ dense.t(), torch.float32)
    assert_rel_close(x.grad, grad.double() @ dense, torch.float32)


# -- int8 2:4 (W8A8) on PyTorch's semi-structured int8 kernels ----------------------------------
CUSPARSELT = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
CUTLASS = torch.sparse.SparseSemiStructuredTensorCUTLASS


def _int8_layer(out: int, inp: int, device: str = "cpu", bias: bool = True) -> SparseInt8Linear:
    linear = torch.nn.Linear(inp, out, bias=bias)
    mask = prune.masks(linear.weight, 0.5, "n:m")
    mask[0] = False  # a row with no kept weight: scale 1, int8 zeros
    mask[1, 4:8] &= torch.tensor([True, False, False, False])  # a group keeping one weight
    layer = SparseInt8Linear.from_sparse(SparseLinear.from_dense(linear, mask, format="2:4"))
    return layer.to(device)


def _w8a8_float64(x, layer):
    """The W8A8 math written out: x quantised per row (absmax / 127, round half to even,
    scale 1 for a zero row), exact integer sums, the float32 epilogue, bias in float32."""
    x = x.detach().cpu().float()
    x_scale = x.abs().amax(dim=1) / 127
    x_scale = torch.where(x_scale == 0, torch.ones_like(x_scale), x_scale)
    x_q = torch.round(x / x_scale[:, None]).clamp(-127, 127)
    w_q = memkern.reference.sparse24_decompress(layer.values.cpu().double(), layer.meta.cpu(), layer.in_features)
    acc = x_q.double() @ w_q.t()
    out = acc.float() * (x_scale[:, None] * layer.scales.cpu()[None, :])
    return out if layer.bias is None else out + layer.bias.detach().cpu().float()


def _fake_int8_copy(dense, like):
    """Stands in for a semi-structured int8 copy on the CPU: the dense int8 weight, of a
    class with the int8 tile of the one it imitates (and no meta for cuSPARSELt)."""
    cls = type("FakeInt8Copy", (), {"_DTYPE_SHAPE_CONSTRAINTS": like._DTYPE_SHAPE_CONSTRAINTS})
    copy_ = cls()
    copy_.packed, copy_.meta = dense, None if like is CUSPARSELT else torch.zeros(1)
    return copy_


class _FakeInt8Kernels:
    """The two int8 products, on the CPU: each checks the layout the real kernel needs
    (int8 operands, a column-major dense operand padded to 16 columns, int32 output) and
    returns the exact sums; ``fail`` makes them raise as a missing kernel does."""

    def __init__(self, monkeypatch, like, fail: bool = False):
        self.builds = self.products = 0
        self.fail, self.like = fail, like
        monkeypatch.setattr(sparse_mod, "_on_cuda", lambda t: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        monkeypatch.setattr(sparse_mod, "_semi_structured_class", lambda: like)
        monkeypatch.setattr(sparse_mod, "_build_int8_semi_structured", self.build)
        monkeypatch.setattr(torch, "_cslt_sparse_mm", self.cusparselt)
        monkeypatch.setattr(torch, "_sparse_semi_structured_mm", self.cutlass)

    def build(self, dense):
        self.builds += 1
        assert dense.dtype == torch.int8 and dense.is_contiguous()
        return _fake_int8_copy(dense, self.like)

    def _product(self, packed, dense, out_dtype):
        self.products += 1
        if self.fail:
            raise RuntimeError("no int32 output in this cuSPARSELt")
        assert out_dtype == torch.int32 and dense.dtype == torch.int8
        assert dense.stride(0) == 1 and dense.shape[1] % 16 == 0, "dense operand not column-major, padded"
        return (packed.long() @ dense.long()).to(torch.int32)

    def cusparselt(self, packed, dense, out_dtype=None):
        assert self.like is CUSPARSELT
        return self._product(packed, dense, out_dtype)

    def cutlass(self, packed, meta, dense, out_dtype=None):
        assert self.like is CUTLASS
        return self._product(packed, dense, out_dtype)


def test_int8_reason_for_cpu_tensors_and_w8a16_never_asks_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda was called for CPU tensors")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)
    layer = _int8_layer(32, 128)
    x = torch.randn(3, 128)
    assert "CUDA" in int8_mod.semi_structured_int8_reason(x, layer.values, layer.meta)
    assert "W8A16" in int8_mod.semi_structured_int8_reason(x, layer.values, layer.meta, weight_only=True)


@pytest.mark.parametrize(
    "like, capability, shape, words",
    [
        (CUSPARSELT, (7, 5), (32, 128), "compute capability >= 8.0, device has 7.5"),
        (CUTLASS, (9, 0), (32, 128), "compute capability 8.x, device has 9.0"),
        (CUSPARSELT, (9, 0), (32, 128), None),  # cuSPARSELt runs on Hopper
        (CUTLASS, (8, 6), (32, 128), None),
        (CUSPARSELT, (8, 0), (48, 128), "(48, 128) is not a positive multiple of (32, 32)"),
        (CUTLASS, (8, 0), (32, 96), "(32, 96) is not a positive multiple of (16, 128)"),
        (CUSPARSELT, (8, 0), (32, 266_272), None),  # 133,136 products of 127 * 127 fit int32
        (CUSPARSELT, (8, 0), (32, 266_304), "int32 sums of 133152 int8 products could overflow"),
    ],
)
def test_int8_reason_on_a_faked_cuda_device(monkeypatch, like, capability, shape, words):
    monkeypatch.setattr(sparse_mod, "_on_cuda", lambda t: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(sparse_mod, "_semi_structured_class", lambda: like)
    n, k = shape
    values = torch.zeros(n, k // 2, dtype=torch.int8)
    meta = torch.zeros(n, k // 8, dtype=torch.uint8)
    reason = int8_mod.semi_structured_int8_reason(torch.ones(1, k), values, meta)
    assert reason is None if words is None else words in reason, reason
    if words is None:
        assert "empty batch" in int8_mod.semi_structured_int8_reason(torch.ones(0, k), values, meta)
        assert "weight is on meta" in int8_mod.semi_structured_int8_reason(torch.ones(1, k), values.to("meta"), meta)
        with memkern.use_backend("torch"):
            assert "forced" in int8_mod.semi_structured_int8_reason(torch.ones(1, k), values, meta)


def test_cpu_int8_calls_never_build_a_copy(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the semi-structured int8 path was entered on the CPU")

    monkeypatch.setattr(sparse_mod, "_build_int8_semi_structured", refuse)
    monkeypatch.setattr(sparse_mod, "semi_structured_int8_mm", refuse)
    layer = _int8_layer(32, 128)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = layer(x)
    assert layer.values not in sparse_mod._INT8_COPIES
    assert_rel_close(y, _w8a8_float64(x, layer), torch.float32)


@pytest.mark.parametrize("like", (CUSPARSELT, CUTLASS), ids=["cusparselt", "cutlass"])
@pytest.mark.parametrize("with_bias", (True, False), ids=["bias", "no-bias"])
def test_int8_path_matches_float64_and_builds_once(monkeypatch, like, with_bias):
    kernels = _FakeInt8Kernels(monkeypatch, like)
    layer = _int8_layer(32, 128, bias=with_bias)
    x = torch.randn(2, 7, 128, requires_grad=True)  # 14 rows: padded to 16 for the kernel
    grad = torch.randn(2, 7, 32)
    assert int8_mod.semi_structured_int8_reason(x, layer.values, layer.meta) is None
    for _ in range(2):
        x.grad = None
        y = layer(x)
        y.backward(grad)
    assert kernels.builds == 1 and kernels.products == 2
    assert y.shape == (2, 7, 32) and y.dtype == torch.float32 and y.is_contiguous()
    expected = _w8a8_float64(x.reshape(14, 128), layer).reshape(2, 7, 32)
    assert_rel_close(y, expected, torch.float32)
    assert (y[..., 0] == (layer.bias[0] if with_bias else 0)).all()  # the row with no kept weight
    # d/dx straight through the quantisation: grad @ (W_q * scales)
    w = memkern.reference.sparse24_decompress(layer.values.double(), layer.meta, 128) * layer.scales.double()[:, None]
    assert_rel_close(x.grad, grad.double() @ w, torch.float32)

    with torch.no_grad():
        layer.values.copy_(-layer.values)  # in place: what load_state_dict does
        y2 = layer(x)
    assert kernels.builds == 2
    assert_rel_close(y2, _w8a8_float64(x.reshape(14, 128), layer).reshape(2, 7, 32), torch.float32)


def test_int8_path_under_autocast_casts_like_the_op(monkeypatch):
    _FakeInt8Kernels(monkeypatch, CUSPARSELT)
    layer = _int8_layer(32, 128)
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_rel_close(y, _w8a8_float64(x.bfloat16(), layer), torch.bfloat16)


def test_int8_call_off_the_path_frees_the_copy(monkeypatch):
    kernels = _FakeInt8Kernels(monkeypatch, CUSPARSELT)
    layer = _int8_layer(32, 128)
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
        assert sparse_mod._INT8_COPIES[layer.values].tensor is not None
        with memkern.use_backend("torch"):
            y = layer(x)
        assert layer.values not in sparse_mod._INT8_COPIES
        layer(x)
    assert kernels.builds == 2 and kernels.products == 2
    assert_rel_close(y, _w8a8_float64(x, layer), torch.float32)


@pytest.mark.parametrize("where", ("build", "product"))
def test_int8_failure_is_remembered_warned_once_and_falls_back(monkeypatch, where):
    kernels = _FakeInt8Kernels(monkeypatch, CUSPARSELT, fail=where == "product")
    if where == "build":

        def failing_build(dense):
            kernels.builds += 1
            raise RuntimeError("no kernel for this device")

        monkeypatch.setattr(sparse_mod, "_build_int8_semi_structured", failing_build)
    layer = _int8_layer(32, 128)
    x = torch.randn(5, 128)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="no kernel for this device|no int32 output"):
            y = layer(x)
        reason = int8_mod.semi_structured_int8_reason(x, layer.values, layer.meta)
        assert ("building" if where == "build" else "product failed") in reason
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning for the same weight
            y2 = layer(x)
    assert kernels.builds == 1 and kernels.products == (1 if where == "product" else 0)
    assert_rel_close(y, _w8a8_float64(x, layer), torch.float32)
    assert torch.equal(y, y2)
    with torch.no_grad():
        layer.values.add_(1)  # a changed weight is tried again
    assert int8_mod.semi_structured_int8_reason(x, layer.values, layer.meta) is None


def test_cutlass_int8_layout_keeps_groups_with_fewer_than_two_nonzeros():
    # Kept int8 values may quantise to 0, leaving a group with one or no nonzero: the
    # CUTLASS layout built from the dense int8 weight must still give that weight back.
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    layer = _int8_layer(32, 128)
    with torch.no_grad():
        layer.values[2, :10] = 0
    dense = memkern.reference.sparse24_decompress(layer.values, layer.meta, 128)
    packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), dense)
