"""Pruning masks (exact sparsity, hand-checked Wanda), prune_model and SparseLinear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memkern
from memkern import prune
from memkern.nn import SparseLinear
from memkern.prune import METHODS
from conftest import CPU_BACKENDS, raises_naming


# -- masks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", (0.0, 0.3, 0.5, 0.9, 1.0))
def test_unstructured_magnitude_is_exact_and_prunes_the_smallest(sparsity):
    w = torch.randn(37, 53)
    mask = prune.masks(w, sparsity, "unstructured")
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if 0 < sparsity < 1:
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


@pytest.mark.parametrize("sparsity", (0.25, 0.5, 0.9))
def test_unstructured_wanda_is_exact_per_row(sparsity):
    w = torch.randn(11, 40)
    norms = torch.rand(40) + 0.1
    mask = prune.masks(w, sparsity, "unstructured", "wanda", activation_norms=norms)
    assert ((~mask).sum(1) == round(sparsity * 40)).all()
    score = w.abs() * norms
    for r in range(11):
        assert score[r][~mask[r]].max() <= score[r][mask[r]].min()


def test_wanda_by_hand():
    # Scores |W| * ||x_j||: row 0 -> [4, 2, 3, 2], row 1 -> [16, 3, 2, 0.5]. Half of each
    # row goes: row 0 loses columns 1 and 3 (the tie of 2 and 2), row 1 loses 3 and 2.
    # Magnitude alone would keep columns 2, 3 of row 0 and 0, 1 of row 1 instead.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([4.0, 1.0, 1.0, 0.5])
    wanda = prune.masks(w, 0.5, "unstructured", "wanda", activation_norms=norms)
    assert wanda.tolist() == [[True, False, True, False], [True, True, False, False]]
    magnitude = prune.masks(w, 0.5, "unstructured", "magnitude")
    assert magnitude.tolist() == [[False, False, True, True], [True, True, False, False]]
    # 2:4 compares within the group of 4, which here is the whole row: same as Wanda above.
    nm = prune.masks(w, 0.5, "n:m", "wanda", activation_norms=norms)
    assert nm.tolist() == wanda.tolist()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_keeps_exactly_n_per_group(n, m):
    w = torch.randn(9, 64)
    mask = prune.masks(w, 1 - n / m, "n:m", n=n, m=m)
    groups = mask.reshape(9, 64 // m, m)
    assert (groups.sum(-1) == n).all()
    wg = w.abs().reshape(9, 64 // m, m)
    kept_min = torch.where(groups, wg, torch.inf).amin(-1)
    pruned_max = torch.where(groups, -torch.inf, wg).amax(-1)
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("block", ((16, 16), (32, 64)))
def test_block_masks_are_whole_blocks_at_the_closest_sparsity(sparsity, block):
    w = torch.randn(100, 150)
    mask = prune.masks(w, sparsity, "block", block=block)
    bn, bk = block
    nbr, nbc = -(-100 // bn), -(-150 // bk)
    padded = torch.zeros(nbr * bn, nbc * bk, dtype=torch.bool)
    padded[:100, :150] = mask
    tiles = padded.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3).reshape(nbr, nbc, -1)
    kept_any = tiles.any(-1)
    inside = torch.zeros_like(padded)
    inside[:100, :150] = True
    inside_tiles = inside.reshape(nbr, bn, nbc, bk).permute(0, 2, 1, 3).reshape(nbr, nbc, -1)
    assert torch.equal(tiles, kept_any[..., None] & inside_tiles)  # all or nothing per block
    # Edge blocks hold fewer weights: the pruned weights come within half a whole block of
    # the request, and the pruned blocks are those of lowest mean |W| over the weights held.
    assert abs(int((~mask).sum()) - sparsity * w.numel()) <= bn * bk / 2
    score = torch.zeros(nbr * bn, nbc * bk, dtype=torch.float64)
    score[:100, :150] = w.double().abs()
    mean = score.reshape(nbr, bn, nbc, bk).sum((1, 3)) / inside_tiles.sum(-1)
    if 0 < sparsity < 1:
        assert mean[~kept_any].max() <= mean[kept_any].min()


BAD_MASK_ARGUMENTS = {
    "sparsity-high": ({"sparsity": 1.5}, ValueError, ["sparsity", "[0, 1]", "1.5"]),
    "sparsity-low": ({"sparsity": -0.1}, ValueError, ["sparsity", "-0.1"]),
    "n:m-divides": ({"sparsity": 0.5, "pattern": "n:m", "m": 5}, ValueError, ["in_features", "5", "48"]),
    "n:m-sparsity": ({"sparsity": 0.3, "pattern": "n:m"}, ValueError, ["2:4", "0.5", "0.3"]),
    "block-pow2": ({"sparsity": 0.5, "pattern": "block", "block": (48, 16)}, ValueError, ["power of two", "48"]),
    "pattern": ({"sparsity": 0.5, "pattern": "diagonal"}, ValueError, ["pattern", "n:m", "diagonal"]),
    "wanda-none": ({"sparsity": 0.5, "method": "wanda"}, ValueError, ["activation_norms", "(48,)", "None"]),
    "wanda-shape": (
        {"sparsity": 0.5, "method": "wanda", "activation_norms": torch.ones(47)},
        ValueError,
        ["activation_norms", "(48,)", "(47,)"],
    ),
}


@pytest.mark.parametrize("kwargs, error, words", list(BAD_MASK_ARGUMENTS.values()), ids=list(BAD_MASK_ARGUMENTS))
def test_bad_mask_arguments(kwargs, error, words):
    with raises_naming(error, words):
        prune.masks(torch.randn(16, 48), **kwargs)


# -- SparseLinear ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, pattern", [("block", "block"), ("block", "unstructured"), ("2:4", "n:m")])
def test_sparse_linear_computes_the_masked_linear(fmt, pattern):
    linear = nn.Linear(64, 40)
    mask = prune.masks(linear.weight, 0.5, pattern, block=(16, 32))
    layer = SparseLinear.from_dense(linear, mask, format=fmt, block=(16, 32))
    assert torch.equal(layer.to_dense(), linear.weight.detach() * mask)
    x = torch.randn(3, 5, 64)
    ref = x.double() @ (linear.weight.detach() * mask).double().t() + linear.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert layer.sparsity == pytest.approx(1 - mask.float().mean().item(), abs=1e-6)


def test_sparse_linear_repr_shows_pattern_sparsity_and_block():
    linear = nn.Linear(64, 64, bias=False)
    layer = SparseLinear.from_dense(linear, prune.masks(linear.weight, 0.75, "block", block=(16, 16)), block=(16, 16))
    text = repr(layer)
    assert "pattern=block" in text and "block=16x16" in text and "sparsity=0.750" in text and "bias=False" in text
    layer24 = SparseLinear.from_dense(linear, prune.masks(linear.weight, 0.5, "n:m"), format="2:4")
    assert "pattern=2:4" in repr(layer24) and "sparsity=0.500" in repr(layer24)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))


@pytest.mark.parametrize("pattern", ("block", "unstructured", "n:m"))
def test_state_dict_round_trip_into_a_fresh_model(pattern):
    trained = _model()
    prune.prune_model(trained, 0.5, pattern, block=(16, 16))
    fresh = _model()
    prune.prune_model(fresh, 0.9 if pattern != "n:m" else 0.5, "block", block=(32, 32))  # another layout
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(4, 32)
    assert torch.equal(fresh(x), trained(x))
    for a, b in zip(trained.modules(), fresh.modules()):
        if isinstance(a, SparseLinear):
            assert torch.equal(a.to_dense(), b.to_dense()) and repr(a) == repr(b)
    # A freshly built SparseLinear (not from a dense layer) takes the state as well.
    layer = SparseLinear(32, 64, block=(64, 64))
    layer.load_state_dict(trained[0].state_dict())
    assert torch.equal(layer(x), trained[0](x))


def test_prune_model_report_skip_and_filter():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
            self.lm_head = nn.Linear(64, 10)

        def forward(self, x):
            return self.lm_head(self.body(x))

    net = Net()
    before = memkern.memory_footprint(net).total_bytes
    report = prune.prune_model(net, 0.5, "block", block=(16, 16), filter_fn=lambda name, mod: name != "body.2")
    assert report.layers == ["body.0"]
    assert isinstance(net.body[0], SparseLinear)
    assert type(net.body[2]) is nn.Linear and type(net.lm_head) is nn.Linear
    assert report.sparsity == 0.5
    assert report.bytes_before == before
    assert report.bytes_after == memkern.memory_footprint(net).total_bytes < before
    assert "1 layers" in str(report)


def test_prune_model_wanda_uses_calibration_norms():
    torch.manual_seed(1)
    model = _model()
    first = model[0]
    calibration = [torch.randn(6, 32) * torch.linspace(0.1, 3, 32) for _ in range(3)]
    x = torch.cat(calibration)
    norms = x.double().norm(dim=0)  # hand-computed: ||x_j||_2 over every calibration token
    expected = prune.masks(first.weight, 0.5, "unstructured", "wanda", activation_norms=norms)
    w0 = first.weight.detach().clone()
    prune.prune_model(model, 0.5, "unstructured", "wanda", calibration=calibration)
    assert torch.equal(model[0].to_dense() != 0, expected & (w0 != 0))
    with pytest.raises(ValueError, match="calibration"):
        prune.prune_model(_model(), 0.5, "unstructured", "wanda")


# -- prune_model: shared layers, all or nothing -------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prune_model_prunes_a_shared_layer_once_and_keeps_it_shared(backend):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    memkern.share_layers(model, [["0", "2"]])
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    # 2:4 by magnitude: the two largest |w| of every four consecutive inputs stay.
    groups = w.abs().reshape(64, 16, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    w_kept = w * keep.reshape(64, 64)
    x = torch.randn(5, 64)
    report = prune.prune_model(model, 0.5, "n:m")  # compressing 2:4 has no Triton kernel: default backend
    with memkern.use_backend(backend), torch.no_grad():
        out = model(x)
    assert isinstance(model[0], SparseLinear) and model[2] is model[0]
    assert report.layers == ["0"] and report.sparsity == 0.5
    assert torch.equal(model[0].to_dense().double(), w_kept)
    # One pruned layer: half its weights kept as float32, the float32 bias, and the 2:4
    # index (whatever its dtype) counted once.
    fp = memkern.memory_footprint(model)
    assert fp.by_dtype["float32"] == (64 * 64 // 2 + 64) * 4
    assert fp.total_bytes == report.bytes_after == memkern.memory_footprint(model[0]).total_bytes
    hidden = (x.double() @ w_kept.t() + b).clamp(min=0)
    torch.testing.assert_close(out.double(), hidden @ w_kept.t() + b, rtol=1e-5, atol=1e-5)


def test_prune_model_refuses_to_prune_some_names_of_a_shared_layer():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    memkern.share_layers(model, [["0", "2"]])
    with pytest.raises(ValueError, match=r"prune_model: layer '0' \(also '2'\).* leave out '2'"):
        prune.prune_model(model, 0.5, "n:m", filter_fn=lambda name, mod: name != "2")
    assert type(model[0]) is nn.Linear and model[2] is model[0]


@pytest.mark.parametrize("method", METHODS)
def test_prune_model_checks_every_layer_before_replacing_any(method):
    # n:m needs in_features divisible by m = 4: layer "0" (8 inputs) could be pruned, "2" (6) not.
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [torch.randn(3, 8)] if method != "magnitude" else None
    with raises_naming(ValueError, ["prune_model: layer '2'", "divisible by 4, got 6"]):
        prune.prune_model(model, 0.5, "n:m", method, calibration=calibration)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    after = model.state_dict()
    assert list(after) == list(state)
    for name, value in state.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


# -- masks: blocks cut by the matrix edge ------------------------------------------------------
def test_block_mask_by_hand_does_not_favour_edge_blocks():
    # 70 x 50 in 32 x 16 blocks: 3 x 4 blocks, the last block row 6 rows high and the last
    # block column 2 wide. Every weight is 1 except the edge blocks' (5): by their mean the
    # edge blocks score highest, the six whole blocks tie (lower index first). Half of the
    # 3500 weights is 1750: three whole blocks (1536) come closer than four (2048).
    w = torch.ones(70, 50)
    w[64:] = 5.0
    w[:, 48:] = 5.0
    mask = prune.masks(w, 0.5, "block", block=(32, 16))
    expected = torch.ones(70, 50, dtype=torch.bool)
    expected[:32, :48] = False
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(
    "make",
    [lambda: torch.randn(70, 50), lambda: torch.ones(70, 50), lambda: torch.rand(70, 50) + torch.arange(50) / 10],
    ids=["random", "constant", "growing-columns"],
)
@pytest.mark.parametrize("sparsity", (0.25, 0.5, 0.75))
def test_block_mask_with_edge_blocks_reaches_the_requested_sparsity(make, sparsity):
    mask = prune.masks(make(), sparsity, "block", block=(32, 16))
    pruned = int((~mask).sum())
    assert abs(pruned - sparsity * 3500) <= 32 * 16 / 2  # within half a whole block
    layer = SparseLinear.from_dense(nn.Linear(50, 70), mask, block=(32, 16))
    assert layer.sparsity == pytest.approx(pruned / 3500)  # the achieved sparsity, as reported
