"""Int8Linear, Int8WeightOnlyLinear, Fp16Linear and memkern.convert: accuracy of a converted
model, state_dict and meta-device round trips, filter/skip behaviour, memory footprint."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import memkern
from memkern.nn import Fp16Linear, Int8Linear, Int8WeightOnlyLinear
from conftest import CPU_BACKENDS, raises_naming, sqnr_db

SCHEMES = {"int8": Int8Linear, "int8_weight_only": Int8WeightOnlyLinear, "fp16": Fp16Linear}


class Block(nn.Module):
    """A pre-norm transformer block with its own attention projections (nn.Linear)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 97, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, *SCHEMES.values()))}


# -- modules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_from_linear_buffers_repr_and_dequantize(scheme):
    cls = SCHEMES[scheme]
    linear = nn.Linear(37, 23)
    linear.bias.data = linear.bias.data.to(torch.bfloat16)
    layer = cls.from_linear(linear)
    buffers = dict(layer.named_buffers())
    if scheme == "fp16":
        assert set(buffers) == {"weight"} and buffers["weight"].dtype == torch.float16
    else:
        assert set(buffers) == {"weight", "weight_scale"}
        # Int8Linear may hold its weight packed (test_lowp_packed.py); int8_weight() is (N, K).
        weight = layer.int8_weight()
        assert weight.dtype == torch.int8 and weight.shape == (23, 37)
        assert buffers["weight_scale"].dtype == torch.float32 and buffers["weight_scale"].shape == (23,)
        # Per output channel: each row's largest weight maps to +-127.
        assert (weight.abs().amax(dim=1) == 127).all()
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, linear.bias)
    assert scheme in repr(layer) and "in_features=37" in repr(layer)

    back = layer.dequantize()
    assert type(back) is nn.Linear and back.weight.dtype == torch.bfloat16
    back32 = layer.dequantize(torch.float32)
    # At most half a quantisation step (or fp16 rounding) from the original weight.
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127 if scheme != "fp16" else 1e-3
    assert ((back32.weight - linear.weight).abs() <= step / 2 * 1.0001 + 1e-7).all()
    x = torch.randn(5, 37)
    assert sqnr_db(layer(x).float(), linear.float()(x).detach().double()) > 35


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="Int8Linear.from_linear: linear must be a torch.nn.Linear, got Conv1d"):
        Int8Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="weight_dtype must be float16 or bfloat16, got torch.float32"):
        Fp16Linear(3, 4, weight_dtype=torch.float32)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradients_flow_through_a_frozen_converted_layer(scheme):
    linear = nn.Linear(16, 8)
    layer = SCHEMES[scheme].from_linear(linear)
    x = torch.randn(3, 16, requires_grad=True)
    grad = torch.randn(3, 8)
    layer(x).backward(grad)
    expected = grad.double() @ layer.dequantized_weight().double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, grad.sum(0))


# -- convert on a small transformer --------------------------------------------------------------
@pytest.mark.parametrize("scheme, min_db", [("int8", 30.0), ("int8_weight_only", 30.0), ("fp16", 50.0)])
def test_converted_transformer_stays_close(scheme, min_db):
    model = TinyLM().eval()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = model(tokens).double()
        converted = memkern.convert(model, scheme, inplace=False)
        out = converted(tokens)
    layers = _linears(converted)
    assert type(layers["lm_head"]) is nn.Linear  # skipped by default
    others = [m for n, m in layers.items() if n != "lm_head"]
    assert len(others) == 12 and all(type(m) is SCHEMES[scheme] for m in others)
    assert all(type(m) is nn.Linear for m in _linears(model).values())  # inplace=False left it alone
    assert sqnr_db(out, ref) >= min_db


def test_filter_fn_and_skip_choose_layers():
    model = TinyLM()
    seen = []

    def only_mlp(module, fqn):
        seen.append(fqn)
        return fqn.endswith(("up", "down"))

    out = memkern.convert(model, "int8", filter_fn=only_mlp, skip=("lm_head", "blocks.1.up"))
    assert out is model
    converted = {n for n, m in _linears(model).items() if isinstance(m, Int8Linear)}
    assert converted == {"blocks.0.up", "blocks.0.down", "blocks.1.down"}
    assert "lm_head" not in seen and "blocks.1.up" not in seen  # skipped before filter_fn
    assert "blocks.0.q" in seen


def test_skip_matches_names_at_any_depth_and_a_bare_linear_converts():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    with pytest.warns(UserWarning, match="no layer was replaced"):
        memkern.convert(model, "fp16", skip="0")
    assert type(model[0]) is nn.Linear and type(model[1][0]) is nn.Linear  # "1.0" ends with ".0"
    assert isinstance(memkern.convert(nn.Linear(4, 2), "int8"), Int8Linear)


def test_already_converted_layer_is_an_error():
    model = memkern.convert(TinyLM(), "int8_weight_only")
    with pytest.raises(ValueError, match=r"layer 'blocks.0.q' is already converted \(Int8WeightOnlyLinear"):
        memkern.convert(model, "int8")
    # Excluding the converted layers converts what is left.
    memkern.convert(model, "fp16", skip=(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert isinstance(model.lm_head, Fp16Linear)


def test_warns_when_nothing_is_replaced():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(3))
    with pytest.warns(UserWarning, match="no layer was replaced"):
        assert memkern.convert(model, "int8") is model


def test_multihead_attention_projections_are_left_alone():
    # nn.MultiheadAttention reads its projections' weights directly, and so does the fused
    # inference path of nn.TransformerEncoderLayer (eval, no autograd) read linear1/linear2's.
    encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(encoder, nn.Linear(16, 16)).eval()
    reference = copy.deepcopy(model)
    tensors = encoder.state_dict(keep_vars=True)
    memkern.convert(model, "int8")
    assert type(encoder.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(encoder.linear1) is nn.Linear and type(encoder.linear2) is nn.Linear
    assert isinstance(model[1], Int8Linear)
    after = encoder.state_dict(keep_vars=True)
    assert list(after) == list(tensors) and all(after[name] is t for name, t in tensors.items())
    head = reference[1]
    x = torch.randn(2, 5, 16)
    for grad in (False, True):  # the fused inference path, then the module-by-module one
        with torch.set_grad_enabled(grad):
            hidden, out = encoder(x), model(x)
            assert torch.equal(hidden, reference[0](x))  # untouched: bit for bit
        ref = hidden.double() @ head.weight.double().t() + head.bias.double()
        assert sqnr_db(out, ref) >= 30.0  # the int8 head, as test_converted_transformer_stays_close


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"scheme": "int4"}, ValueError, ["scheme", "'int8'", "'int4'"]),
        ({"scheme": "int8", "filter_fn": 3}, TypeError, ["filter_fn", "int"]),
    ],
)
def test_convert_bad_arguments(kwargs, error, words):
    with raises_naming(error, words):
        memkern.convert(TinyLM(), **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        memkern.convert([nn.Linear(2, 2)], "int8")


# -- state_dict round trips --------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_round_trip_into_a_fresh_conversion(scheme):
    source = memkern.convert(TinyLM(), scheme)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    target = memkern.convert(TinyLM(), scheme)  # different random weights
    target.load_state_dict(torch.load(buf))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(source(tokens), target(tokens))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_meta_device_round_trip(scheme):
    source = memkern.convert(TinyLM(), scheme)
    state = source.state_dict()
    with torch.device("meta"):
        target = TinyLM()
    memkern.convert(target, scheme)
    assert target.blocks[0].q.weight.is_meta
    target.load_state_dict(state, assign=True)
    assert not any(t.is_meta for t in target.state_dict().values())
    for name, value in state.items():
        got = target.state_dict()[name]
        assert got.dtype == value.dtype and torch.equal(got, value), name
    assert isinstance(target.blocks[0].q.bias, nn.Parameter)
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(source(tokens), target(tokens))


# -- memory footprint ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, weight_bytes", [("int8", 1), ("int8_weight_only", 1), ("fp16", 2)])
def test_memory_footprint_counts_scales(scheme, weight_bytes):
    n, k = 256, 512
    model = nn.Sequential(nn.Linear(k, n))
    fp32 = memkern.memory_footprint(model)
    assert fp32.total_bytes == (n * k + n) * 4
    memkern.convert(model, scheme)
    fp = memkern.memory_footprint(model)
    scales = n * 4 if scheme != "fp16" else 0
    expected = n * k * weight_bytes + scales + n * 4
    layer = SCHEMES[scheme].__name__
    assert fp.total_bytes == expected and fp.by_layer_type == {layer: expected}
    if scheme != "fp16":
        assert fp.by_dtype == {"int8": n * k, "float32": 2 * n * 4}
        # Weight memory (scales included) against float32: 4x smaller, to within the scales.
        assert (n * k * 4) / (n * k + scales) > 3.95


# -- shared layers and all-or-nothing --------------------------------------------------------
def _tied_pair() -> nn.Sequential:
    """Linear -> ReLU -> the same Linear, tied by share_layers."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    memkern.share_layers(model, [["0", "2"]])
    return model


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "scheme, weight_bytes, min_db", [("int8", 1, 30.0), ("int8_weight_only", 1, 30.0), ("fp16", 2, 50.0)]
)
def test_a_shared_layer_is_converted_once_and_stays_shared(backend, scheme, weight_bytes, min_db):
    model = _tied_pair()
    assert memkern.memory_footprint(model).total_bytes == (64 * 64 + 64) * 4  # one layer: 16,640 bytes
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    x = torch.randn(5, 64)
    with memkern.use_backend(backend), torch.no_grad():
        memkern.convert(model, scheme)
        out = model(x)
    assert type(model[0]) is SCHEMES[scheme] and model[2] is model[0]
    # One converted layer: its weight, the float32 scales (int8 only) and the float32 bias.
    scales = 64 * 4 if scheme != "fp16" else 0
    assert memkern.memory_footprint(model).total_bytes == 64 * 64 * weight_bytes + scales + 64 * 4
    hidden = (x.double() @ w.t() + b).clamp(min=0)
    assert sqnr_db(out, hidden @ w.t() + b) >= min_db


def test_shared_blocks_stay_shared_after_convert():
    model = TinyLM(layers=3)
    memkern.share_layers(model, [["blocks.0", "blocks.2"]])
    memkern.convert(model, "int8")
    assert model.blocks[2] is model.blocks[0] and isinstance(model.blocks[0].q, Int8Linear)
    assert isinstance(model.blocks[1].q, Int8Linear) and type(model.lm_head) is nn.Linear


def test_choosing_some_names_of_a_shared_layer_is_an_error():
    model = _tied_pair()
    with pytest.raises(ValueError, match=r"convert: layer '0' \(also '2'\).* leave out '2'"):
        memkern.convert(model, "int8", skip=("2",))
    assert type(model[0]) is nn.Linear and model[2] is model[0]


def test_a_layer_that_fails_to_convert_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    # An integer weight cannot be quantised; the layers before and after it could be.
    model[2].weight = nn.Parameter(torch.arange(64, dtype=torch.int32).reshape(8, 8), requires_grad=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with raises_naming(TypeError, ["convert: layer '2'", "floating point"]):
        memkern.convert(model, "int8")
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert list(after) == list(state)
    for name, value in state.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
