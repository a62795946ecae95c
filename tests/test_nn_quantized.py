"""memkern.nn's quantised layers: Int8Linear keeps its weight in the packed layout where the
kernel reads it (state_dict, meta device, .to(), pickling, repr), and every layer keeps its
quantised storage under module casts, runs float64 and checks its constructor arguments."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

import memkern
from memkern import reference
from memkern.nn import Int8Linear
from conftest import (
    assert_bit_equal,
    assert_rel_close,
    call_lowp,
    expected_packed_shape,
    lowp_reference64,
    pack_loop,
    raises_naming,
    sqnr_db,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
OPS = ("int8_linear", "int8_weight_only_linear", "fp16_linear")
NATIVE = memkern.ops.int8_packed_kernel_native("cpu")


# -- modules: dtype casts, float64 layers, constructor arguments ------------------------------------
LAYERS = {
    "int8_linear": memkern.nn.Int8Linear,
    "int8_weight_only_linear": memkern.nn.Int8WeightOnlyLinear,
    "fp16_linear": memkern.nn.Fp16Linear,
}
CASTS = {
    "half": (lambda m: m.half(), F16),
    "bfloat16": (lambda m: m.bfloat16(), BF16),
    "float": (lambda m: m.float(), F32),
    "double": (lambda m: m.double(), torch.float64),
    "to-dtype": (lambda m: m.to(F16), F16),
    "to-device-dtype": (lambda m: m.to("cpu", BF16), BF16),
    "type": (lambda m: m.type(torch.float64), torch.float64),
}


def _storage(layer) -> dict[str, torch.Tensor]:
    """The layer's weight buffers (what a module cast must leave alone), copied."""
    return {name: buf.clone() for name, buf in layer.named_buffers()}


def _layer_weight_args(op, storage):
    """The op's weight arguments in the plain (N, K) layout."""
    if op == "fp16_linear":
        return (storage["weight"],)
    return (storage["int8_weight"], storage["weight_scale"])


def _plain_storage(layer) -> dict[str, torch.Tensor]:
    storage = _storage(layer)
    if "weight_scale" in storage:
        storage["int8_weight"] = layer.int8_weight().clone()
    return storage


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("op", OPS)
def test_module_casts_keep_the_quantised_storage(op, cast):
    linear = nn.Linear(37, 11)
    layer = LAYERS[op].from_linear(linear)
    before = _plain_storage(layer)
    apply, dtype = CASTS[cast]
    assert apply(layer) is layer
    for name, buf in layer.named_buffers():  # bit for bit, dtype included
        assert buf.dtype == before[name].dtype and torch.equal(buf, before[name]), name
    assert layer.bias.dtype == dtype and layer.bias.requires_grad
    torch.testing.assert_close(layer.bias.double(), linear.bias.detach().to(dtype).double(), rtol=0, atol=0)
    # It runs, in the caller's dtype, on the weights it had before the cast.
    x = torch.randn(5, 37).to(dtype)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype and out.shape == (5, 11)
    kernel_dtype = F32 if dtype == torch.float64 else dtype
    ref = lowp_reference64(op, x.to(kernel_dtype), _layer_weight_args(op, before), layer.bias.detach().to(kernel_dtype))
    assert_rel_close(out, ref, kernel_dtype)
    # ... and back to float32: the same outputs as the uncast weights with the cast bias.
    layer.float()
    x32 = torch.randn(4, 37)
    with torch.no_grad():
        got = layer(x32)
        want = call_lowp(op, x32, _layer_weight_args(op, before), layer.bias)
    assert torch.equal(got, want)


@pytest.mark.parametrize("op", OPS)
def test_state_dict_round_trips_after_a_cast(op):
    cls = LAYERS[op]
    layer = cls.from_linear(nn.Linear(37, 11)).half()
    before = _plain_storage(layer)
    sd = layer.state_dict()
    storage_dtypes = {"weight": torch.float16 if op == "fp16_linear" else torch.int8, "weight_scale": F32}
    assert {k: v.dtype for k, v in sd.items()} == {"bias": F16, **{k: storage_dtypes[k] for k in sd if k != "bias"}}
    x = torch.randn(3, 37).half()
    with torch.no_grad():
        want = layer(x)
    # into a float32 layer (bias copied into float32, exactly), then cast like the source
    fresh = cls(37, 11)
    fresh.load_state_dict(sd)
    assert fresh.bias.dtype == F32 and fresh.half().bias.dtype == F16
    # into a layer cast before the load, and with assign=True from the meta device
    cast_first = cls(37, 11).half()
    cast_first.load_state_dict(sd)
    with torch.device("meta"):
        on_meta = cls(37, 11)
    on_meta.load_state_dict(sd, assign=True)
    for target in (fresh, cast_first, on_meta):
        after = _plain_storage(target)
        for name, buf in before.items():
            assert after[name].dtype == buf.dtype and torch.equal(after[name], buf), name
        with torch.no_grad():
            assert torch.equal(target(x), want)


@pytest.mark.parametrize("op", OPS)
def test_float64_layers_run(op):
    # A float64 nn.Linear (or a converted float64 model) gives a layer that takes float64
    # input and answers in float64, computed in float32 like every kernel.
    linear = nn.Linear(37, 11).double()
    layer = LAYERS[op].from_linear(linear)
    assert layer.bias.dtype == torch.float64
    storage = _plain_storage(layer)
    x = torch.randn(2, 5, 37, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float64 and out.shape == (2, 5, 11)
    weight_args = _layer_weight_args(op, storage)
    ref = lowp_reference64(op, x.detach().float().reshape(10, 37), weight_args, layer.bias.detach().float())
    assert_rel_close(out.reshape(10, 11), ref, F32)
    out.sum().backward()
    assert x.grad.dtype == torch.float64 and layer.bias.grad.dtype == torch.float64
    w_deq = (
        storage["weight"].double()
        if op == "fp16_linear"
        else (storage["int8_weight"].double() * storage["weight_scale"].double()[:, None])
    )
    assert_rel_close(x.grad.reshape(10, 37), torch.ones(10, 11, dtype=torch.float64) @ w_deq, F32)
    with torch.no_grad():  # float32 input to the float64 layer: float32 output
        assert layer(x.detach().float()).dtype == F32
    model = nn.Sequential(nn.Linear(37, 11), nn.ReLU(), nn.Linear(11, 3)).double()
    with torch.no_grad():
        want = model(x.detach())
        got = memkern.convert(model, op.removesuffix("_linear"))(x.detach())
    assert got.dtype == torch.float64 and sqnr_db(got, want) > 30


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "args, error, words",
    [
        ((-1, 4), ValueError, ["in_features", ">= 0", "-1"]),
        ((4, -3), ValueError, ["out_features", ">= 0", "-3"]),
        ((4.0, 3), TypeError, ["in_features", "int", "float"]),
        ((4, None), TypeError, ["out_features", "int", "NoneType"]),
    ],
    ids=["in-negative", "out-negative", "in-float", "out-none"],
)
def test_layer_constructor_checks_its_sizes(op, args, error, words):
    cls = LAYERS[op]
    with raises_naming(error, words, match=f"^{cls.__name__}: "):
        cls(*args)


# -- Int8Linear -------------------------------------------------------------------------------------
def _linear(k: int = 37, n: int = 23, bias_dtype=F32) -> nn.Linear:
    linear = nn.Linear(k, n)
    linear.bias.data = linear.bias.data.to(bias_dtype)
    return linear


def _layout_ok(layer: Int8Linear, native: bool = NATIVE) -> None:
    n, k = layer.out_features, layer.in_features
    assert layer.weight.dtype == torch.int8
    assert layer.weight_packed is native
    assert tuple(layer.weight.shape) == (expected_packed_shape(n, k) if native else (n, k))
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
        assert torch.equal(layer.weight, pack_loop(w_q))
    for x in (torch.randn(3, 5, 37), torch.randn(4, 37).to(BF16), torch.randn(37, 7).t()):
        with torch.no_grad():
            assert_bit_equal(layer(x), memkern.ops.int8_linear(x, w_q, w_scale, linear.bias.detach()))


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
    assert_bit_equal(x.grad, x2.grad)
    assert_bit_equal(layer.bias.grad, bias2.grad)


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
        assert_bit_equal(fresh(x), layer(x))


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
        assert_bit_equal(target(x), source(x))


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
        assert_bit_equal(layer(x), memkern.ops.int8_linear(x, sd["weight"], sd["weight_scale"], sd["bias"]))
    clone = copy.deepcopy(layer)
    _layout_ok(clone)
    with torch.no_grad():
        assert_bit_equal(clone(x), layer(x))


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
    int8_bytes = math.prod(expected_packed_shape(n, k)) if NATIVE else n * k
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
        assert_bit_equal(layer(x), want)
    fresh = Int8Linear(37, 23)
    _layout_ok(fresh, native=False)
    fresh.load_state_dict(packed_layer.state_dict())
    _layout_ok(fresh, native=False)
    with torch.no_grad():
        assert_bit_equal(fresh(x), want)
    # .to() re-settles: a module packed earlier goes plain under the patch ...
    packed_layer.to("cpu")
    _layout_ok(packed_layer, native=False)
    with torch.no_grad():
        assert_bit_equal(packed_layer(x), want)
    # ... and back to the machine's layout once the patch is gone.
    monkeypatch.undo()
    layer.to("cpu")
    _layout_ok(layer)
    with torch.no_grad():
        assert_bit_equal(layer(x), want)


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
    assert (
        sd["weight"].shape == (23, 37) and torch.equal(sd["weight"], w_q) and torch.equal(sd["weight_scale"], w_scale)
    )
    x = torch.randn(6, 37)
    kernel_bias = layer.bias.detach().float() if dtype == torch.float64 else layer.bias.detach()
    with torch.no_grad():
        assert_bit_equal(layer(x), memkern.ops.int8_linear(x, w_q, w_scale, kernel_bias))
        out = layer(x.to(dtype))
    assert out.dtype == dtype
    kernel_dtype = F32 if dtype == torch.float64 else dtype
    ref = reference.int8_linear(
        x.to(dtype).to(kernel_dtype), w_q, w_scale, kernel_bias, out_dtype=torch.float64, compute_dtype=torch.float64
    )
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
        hooks = [
            target[i].register_forward_hook(lambda m, args, out, i=i, seen=seen: seen.update({i: (args[0], out)}))
            for i in (0, 2)
        ]
        with torch.no_grad(), memkern.use_backend("cpp"):
            target(x)
        for hook in hooks:
            hook.remove()
        for i, (inp, out) in seen.items():
            layer = target[i]
            _layout_ok(layer, native=False)
            w_q, w_scale = memkern.ops.quantize_rowwise(source[i].weight.detach())
            assert torch.equal(layer.weight, w_q) and torch.equal(layer.weight_scale, w_scale)
            ref = reference.int8_linear(
                inp.reshape(-1, inp.shape[-1]),
                w_q,
                w_scale,
                source[i].bias.detach(),
                out_dtype=torch.float64,
                compute_dtype=torch.float64,
            )
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


@pytest.mark.skipif(
    memkern.backends.OPS["int8_linear_packed"].static_reason("cpp", "cpu") is not None, reason="memkern._C is not built"
)
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
        assert_bit_equal(loaded(x), model(x))
    state = loaded.state_dict()
    assert state["0.weight"].shape == (23, 37)
