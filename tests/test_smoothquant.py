"""SmoothQuant calibration (memkern/smoothquant.py) and convert(..., smooth=, calibration=):
folding keeps the float model's function, the fold targets found by tracing, the layers
that keep their scaling, and the SQNR it buys on outlier channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memkern
from memkern.smoothquant import smooth
from conftest import assert_rel_close, raises_naming, sqnr_db


class Block(nn.Module):
    """A pre-norm transformer block with every case the tracer must tell apart."""

    def __init__(self, d: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d)  # input: the attention mix (not foldable)
        self.ln2 = nn.RMSNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)  # input: GELU (not foldable)
        self.proj_a = nn.Linear(d, 32)  # proj_a -> proj_b directly: foldable into proj_a
        self.proj_b = nn.Linear(32, d)
        with torch.no_grad():  # outlier channels, as trained LLMs have them
            for norm in (self.ln1, self.ln2):
                norm.weight.mul_(torch.where(torch.rand(d) < 0.1, 20.0, 1.0))

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (lin(h).view(b, t, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        x = x + self.down(F.gelu(self.up(self.ln2(x))))
        return x + self.proj_b(self.proj_a(x))


def _batches(n=3, d=64):
    return [torch.randn(2, 5, d) * torch.where(torch.rand(d) < 0.05, 10.0, 1.0) for _ in range(n)]


def test_folding_keeps_the_float_function_and_finds_the_pairs():
    model = Block()
    x = torch.randn(3, 7, 64)
    before = model(x)
    report = smooth(model, _batches(), alpha=0.5)
    assert report.folded == {"ln1": ["k", "q", "v"], "ln2": ["up"], "proj_a": ["proj_b"]}
    assert set(report.pending) == {"o", "down", "proj_a"}  # proj_a's input is the residual stream
    assert all(
        s.shape == (m.in_features,) and (s > 0).all()
        for name, s in report.pending.items()
        for m in [getattr(model, name)]
    )
    assert_rel_close(model(x), before, torch.float32)  # 1e-5 against the unsmoothed model
    # Something moved: the norm's outlier channels are divided down.
    assert model.ln1.weight.abs().max() < 20


def test_norm_output_used_elsewhere_or_returned_is_not_folded():
    class ReusesNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

        def forward(self, x):
            h = self.norm(x)
            return self.fc(h) + h  # the norm's output also feeds the sum

    class ReturnsNorm(ReusesNorm):
        def forward(self, x):
            h = self.norm(x)
            return self.fc(h), h

    for cls in (ReusesNorm, ReturnsNorm):
        model = cls()
        weight = model.norm.weight.detach().clone()
        report = smooth(model, [torch.randn(4, 32)])
        assert report.folded == {} and set(report.pending) == {"fc"}
        assert torch.equal(model.norm.weight, weight)


def test_tied_consumer_weights_are_not_folded_into():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.norm = nn.LayerNorm(32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.norm(self.emb(ids)))

    model = Tied()
    ids = torch.randint(0, 50, (2, 6))
    before = model(ids)
    report = smooth(model, [ids])
    assert report.folded == {}
    assert torch.equal(model(ids), before)


def _outlier_case(k=512, n=256, rows=256):
    x = torch.randn(rows, k)
    outliers = torch.randperm(k)[: k // 100]  # 1% of the channels, 30x larger
    x[:, outliers] *= 30
    return x, nn.Linear(k, n)


def test_outlier_channels_gain_at_least_6_db_over_per_token_w8a8():
    x, linear = _outlier_case()
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    plain = memkern.convert(linear, "int8", inplace=False, skip=())
    smoothed = memkern.convert(linear, "int8", inplace=False, skip=(), smooth=0.5, calibration=[x[:64], x[64:128]])
    assert type(plain) is memkern.nn.Int8Linear and type(smoothed) is memkern.nn.SmoothedInt8Linear
    with torch.no_grad():
        gain = sqnr_db(smoothed(x), exact) - sqnr_db(plain(x), exact)
    assert gain >= 6.0, f"SmoothQuant gained {gain:.1f} dB"


def test_outliers_folded_into_a_norm_gain_too():
    class Normed(nn.Module):
        def __init__(self, k=512):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(k), nn.Linear(k, 256)
            with torch.no_grad():
                self.norm.weight.copy_(torch.where(torch.rand(k) < 0.01, 30.0, 1.0))

        def forward(self, x):
            return self.fc(self.norm(x))

    model = Normed()
    x = torch.randn(256, 512)
    exact = model(x).double()
    plain = memkern.convert(model, "int8", inplace=False)
    smoothed = memkern.convert(model, "int8", inplace=False, smooth=0.5, calibration=[x[:128]])
    assert type(smoothed.fc) is memkern.nn.Int8Linear  # folded: no scaling left in the layer
    with torch.no_grad():
        assert sqnr_db(smoothed(x), exact) >= sqnr_db(plain(x), exact) + 6.0


def test_smoothed_layer_state_dict_round_trip():
    x, linear = _outlier_case(k=64, n=16, rows=32)
    layer = memkern.convert(linear, "int8", inplace=False, skip=(), smooth=0.8, calibration=[x])
    sd = layer.state_dict()
    assert sd["input_scale"].dtype == torch.float32 and sd["input_scale"].shape == (64,)
    fresh = memkern.nn.SmoothedInt8Linear(64, 16)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), layer(x))
    assert "SmoothQuant" in repr(layer)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"smooth": 0.5}, ["smooth", "calibration", "go together"]),
        ({"calibration": [torch.randn(2, 8)]}, ["go together"]),
        (
            {"smooth": 0.5, "calibration": [torch.randn(2, 8)], "scheme": "int4_weight_only"},
            ["smooth applies to scheme 'int8'", "int4_weight_only"],
        ),
        ({"smooth": 1.5, "calibration": [torch.randn(2, 8)]}, ["alpha", "[0, 1]", "1.5"]),
        ({"smooth": 0.5, "calibration": []}, ["calibration gave no batch"]),
    ],
)
def test_bad_smoothing_arguments(kwargs, words):
    with raises_naming(ValueError, words):
        memkern.convert(nn.Sequential(nn.Linear(8, 4)), **{"scheme": "int8", **kwargs})
