"""PEFT LoRA on memkern layers: frozen quantised/sparse base, trainable adapters, merge, save/load."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import memkern
from conftest import REL_TOL, assert_rel_close

pytest.importorskip("peft")
import peft  # noqa: E402

from memkern.integrations.peft import LoraMemkernLinear, dense_weight, load_adapter, lora_config  # noqa: E402

SCHEMES = ["int8", "int8_weight_only", "fp16", "block", "2:4"]
# Relative error of a layer against float64 x @ (dense base + scale * B @ A)^T + b: the
# exact-weight bases compute in float32; fp16 rounds activations to half; W8A8 quantises
# each token's activations to int8 (about 1/127 of the row's absmax per element).
UNMERGED_TOL = {
    "int8": 2e-2,
    "int8_weight_only": REL_TOL[torch.float32],
    "fp16": REL_TOL[torch.float16],
    "block": REL_TOL[torch.float32],
    "2:4": REL_TOL[torch.float32],
}
# Merging stores the merged weight in the base's format again: one more int8 / fp16 rounding.
MERGED_TOL = {"int8": 3e-2, "int8_weight_only": 2e-2, "fp16": REL_TOL[torch.float16]}


def _base(scheme: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(up=nn.Linear(32, 64), act=nn.ReLU(), down=nn.Linear(64, 16)))
    if scheme in ("block", "2:4"):
        memkern.prune.prune_model(model, 0.5, "n:m" if scheme == "2:4" else "block", block=(16, 16), skip=())
    else:
        memkern.convert(model, scheme, skip=())
    return model


def _adapted(scheme: str):
    model = peft.get_peft_model(_base(scheme), lora_config(r=4, lora_alpha=8, target_modules=["up", "down"]))
    torch.manual_seed(1)
    for layer in (model.base_model.model.up, model.base_model.model.down):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.2)  # B starts at 0; make the update visible
    return model


def _reference(layer: LoraMemkernLinear, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = dense_weight(base).double() + layer.get_delta_weight("default").double()
    out = x.double() @ w.T
    return out + base.bias.double() if base.bias is not None else out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapters_train_on_a_frozen_base(scheme):
    model = _adapted(scheme)
    net = model.base_model.model
    assert isinstance(net.up, LoraMemkernLinear) and isinstance(net.down, LoraMemkernLinear)
    base_type = type(net.up.get_base_layer())
    assert base_type is type(_base(scheme).up)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    base_before = {k: v.clone() for k, v in net.up.get_base_layer().state_dict().items() if torch.is_tensor(v)}

    x = torch.randn(8, 5, 32)
    for layer in (net.up, net.down):
        layer_in = x if layer is net.up else torch.relu(net.up(x))
        assert_rel_close(
            layer(layer_in),
            _reference(layer, layer.get_base_layer(), layer_in),
            torch.float32,
            factor=UNMERGED_TOL[scheme] / REL_TOL[torch.float32],
        )

    target = torch.randn(8, 5, 16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert type(net.up.get_base_layer()) is base_type
    after = net.up.get_base_layer().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())


@pytest.mark.parametrize("scheme", ["int8", "int8_weight_only", "fp16"])
def test_merge_requantises_and_unmerge_restores_the_base_exactly(scheme):
    model = _adapted(scheme)
    up = model.base_model.model.up
    original = up.get_base_layer()
    x = torch.randn(6, 32)
    unmerged = up(x)
    reference = _reference(up, original, x)
    up.merge()
    merged_base = up.get_base_layer()
    assert type(merged_base) is type(original) and merged_base.weight.dtype == original.weight.dtype
    assert_rel_close(up(x), reference, torch.float32, factor=MERGED_TOL[scheme] / REL_TOL[torch.float32])
    assert not torch.equal(merged_base.weight, original.weight)
    up.unmerge()
    assert up.get_base_layer() is original
    assert torch.equal(up(x), unmerged)

    merged_model = model.merge_and_unload()
    assert type(merged_model.up) is type(original)


def test_sparse_base_refuses_to_merge():
    model = _adapted("block")
    with pytest.raises(ValueError, match="SparseLinear base cannot hold the dense update"):
        model.base_model.model.up.merge()
    assert not model.base_model.model.up.merged


@pytest.mark.parametrize("scheme", ["int8", "2:4"])
def test_saved_adapters_reload_onto_a_rebuilt_base(tmp_path, scheme):
    model = _adapted(scheme)
    x = torch.randn(4, 32)
    expected = model(x)
    model.save_pretrained(tmp_path)
    reloaded = load_adapter(_base(scheme), str(tmp_path))
    assert isinstance(reloaded.base_model.model.up, LoraMemkernLinear)
    assert torch.equal(reloaded(x), expected)
