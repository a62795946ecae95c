"""torch.distributed.checkpoint with memkern layers: a model sharded on 2 ranks is saved and
loads bit for bit on 4 ranks, on 1 rank and into a one-process model without a process
group (which takes the saved SparseLinear layout); a checkpoint with a broken block index is
refused before the model changes, and a sharded layer of another layout is refused."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from memkern.nn import SparseLinear
from tests.multirank import run_ranks
from tests.test_fsdp import Net

BAD = "bad_index"


def _state(model) -> dict:
    """The model's state as full plain tensors (gathering sharded ones) and extra states."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() if isinstance(v, torch.Tensor) else v
        for k, v in model.state_dict().items()
    }


def _scaled(model) -> None:
    """Parameters changed from their initial values in a rank-independent way, so that a
    checkpoint holds something no freshly built model has."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.mul_(1.5 + i)


def _save_body(rank, world_size, directory):
    import torch.distributed.checkpoint as dcp

    from memkern.distributed.fsdp import shard_model

    model = shard_model(Net())
    _scaled(model)
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(directory, "good"))
    # The same model with a block listed twice in the row index (col[1] = col[0]).
    with torch.no_grad():
        model.block.col[1] = model.block.col[0]
    dcp.save(model.state_dict(), checkpoint_id=os.path.join(directory, BAD))
    return "saved"


def _load_body(rank, world_size, directory):
    from memkern.distributed.fsdp import load, shard_model

    model = shard_model(Net(seed=1))  # the same kept blocks, other values and element masks
    result = load(model, os.path.join(directory, "good"))
    assert not result.missing_keys and not result.unexpected_keys
    local = model.block.values.to_local()
    # Other layout, sharded: refused with the shapes named.
    fewer_blocks = Net()
    fewer_blocks.block = SparseLinear.from_dense(
        torch.nn.Linear(64, 48), torch.ones(48, 64, dtype=torch.bool).tril(), block=(16, 16)
    )
    shard_model(fewer_blocks)
    # A sharded layer copies a state of its own layout into its shards and refuses another.
    with pytest.raises(RuntimeError, match=r"block\.values is sharded \(fully_shard\) with shape \(6, 16, 16\)"):
        fewer_blocks.load_state_dict(model.state_dict())
    with pytest.raises(
        ValueError, match=r"block\.values is sharded with shape \(6, 16, 16\), the checkpoint holds \(7, 16, 16\)"
    ):
        load(fewer_blocks, os.path.join(directory, "good"))
    dist.barrier()
    _assert_saved_state(model)
    return local.shape[0]


def _saved_model() -> Net:
    """What the save body wrote, built in this process."""
    model = Net()
    _scaled(model)
    return model


def _assert_saved_state(model) -> None:
    """``model`` holds the saved state bit for bit (sharded tensors gathered first)."""
    expected, state = _state(_saved_model()), _state(model)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        else:
            assert state[key] == value, key


def _one_process_model() -> Net:
    """A one-process model as a user builds it before loading: every block kept."""
    model = Net(seed=2)
    model.block = SparseLinear(64, 48, block=(16, 16))
    model.two_four = SparseLinear(48, 32, format="2:4")
    return model


def test_dcp_saved_on_2_ranks_loads_on_4_1_and_one_process(tmp_path):
    assert run_ranks(_save_body, 2, str(tmp_path), timeout=120) == ["saved"] * 2

    for world_size in (4, 1):
        rows = run_ranks(_load_body, world_size, str(tmp_path), timeout=120)
        # 7 kept blocks split into ceil(7 / world_size)-block shards.
        assert rows == ([2, 2, 2, 1] if world_size == 4 else [7])

    # No process group: a model built with every block kept takes the saved layout.
    from memkern.distributed.fsdp import load

    model = _one_process_model()
    load(model, tmp_path / "good")
    assert model.block.values.shape == (7, 16, 16) and model.block.mask is not None
    _assert_saved_state(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _saved_model()(x), rtol=0, atol=0)

    # dcp_to_torch_save: one torch.save file that load_state_dict takes, layout included.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "good", tmp_path / "good.pt")
    converted = _one_process_model()
    converted.load_state_dict(torch.load(tmp_path / "good.pt", weights_only=True))
    _assert_saved_state(converted)

    # A broken index is refused, naming the tensor, and the model keeps its state.
    before = _state(model)
    with pytest.raises(RuntimeError, match=r"block\.col"):
        load(model, tmp_path / BAD)
    after = _state(model)
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())


def test_load_state_dict_of_the_same_layout_keeps_the_parameter_objects():
    """An optimiser (or fully_shard) holding a SparseLinear's values keeps training the
    layer's own tensor after a load of the same layout; another layout still replaces it."""
    model, source = Net(), Net(seed=1)
    values, opt = model.block.values, torch.optim.SGD(model.parameters(), lr=1.0)
    model.load_state_dict(source.state_dict())
    assert model.block.values is values and torch.equal(values, source.block.values)
    model.block.values.grad = torch.ones_like(values)
    opt.step()
    assert torch.equal(model.block.values, source.block.values - 1)
    every_block = SparseLinear(64, 48, block=(16, 16))
    model.block.load_state_dict(every_block.state_dict())
    assert model.block.values.shape == (12, 16, 16) and model.block.mask is None
