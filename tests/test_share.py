import pytest
import torch
from torch import nn

import memkern
from conftest import raises_naming


def _model():
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)) for _ in range(4)])


def test_ties_blocks_and_reports_the_bytes_saved():
    model = _model()
    block_bytes = 2 * (16 * 16 + 16) * 4
    report = memkern.share_layers(model, [["0", "1", "2"]])
    assert model[1] is model[0] and model[2] is model[0] and model[3] is not model[0]
    assert report.bytes_before == 4 * block_bytes
    assert report.bytes_after == 2 * block_bytes == memkern.memory_footprint(model).total_bytes
    assert report.bytes_saved == 2 * block_bytes


def test_tied_blocks_train_as_one():
    model = _model()
    memkern.share_layers(model, [["0", "1"]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    assert model[0][0].weight is model[1][0].weight
    assert len(list(model.parameters())) == 3 * 4  # blocks 0/1 count once


def test_state_dict_round_trip_into_a_model_tied_the_same_way():
    model = _model()
    memkern.share_layers(model, [["0", "2"]])
    fresh = _model()
    memkern.share_layers(fresh, [["0", "2"]])
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "groups, words",
    [
        ([["0", "9"]], ["'9'", "not a module"]),
        ([["0"]], ["at least 2"]),
        ([["0", "1"], ["1", "2"]], ["'1'", "more than one group"]),
        ([["0", "0.1"]], ["Sequential", "ReLU"]),
        ([["0.0", "0.2"], ["1.0", "2.2"]], []),
    ],
    ids=["missing", "single", "overlap", "type-mismatch", "ok"],
)
def test_bad_groups_are_clear_errors(groups, words):
    model = _model()
    if not words:
        memkern.share_layers(model, groups)
        return
    with raises_naming(ValueError, words):
        memkern.share_layers(model, groups)


def test_shape_mismatch_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 8))
    with pytest.raises(ValueError, match="differ in parameter"):
        memkern.share_layers(model, [["0", "1"]])


def test_pruned_blocks_tie_when_their_layouts_match():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(3)])
    memkern.prune.prune_model(model, 0.5, "n:m", skip=())
    model[2][0] = memkern.nn.SparseLinear.from_dense(
        nn.Linear(32, 32), torch.ones(32, 32, dtype=torch.bool), block=(16, 16)
    )
    memkern.share_layers(model, [["0", "1"]])
    assert model[1] is model[0]
    with pytest.raises(ValueError, match="differ in parameter"):
        memkern.share_layers(model, [["0", "2"]])
