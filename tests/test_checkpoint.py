"""memkern.save / memkern.load: converted, pruned and tied models round-trip bit for bit;
bad files are refused before the model changes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import memkern
from memkern.nn import SparseLinear
from conftest import raises_naming, tiny_decoder_config

pytest.importorskip("safetensors")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)) for _ in range(3))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


SCHEMES = ["int8", "int8_weight_only", "int8_smooth", "fp16", "int4_weight_only", "block", "2:4"]


def _saved_model(scheme: str) -> Net:
    """A model changed by `scheme`, with blocks 0 and 2 tied."""
    torch.manual_seed(0)
    model = Net()
    if scheme in ("block", "2:4"):
        pattern = "n:m" if scheme == "2:4" else "block"
        memkern.prune.prune_model(model, 0.5, pattern, block=(16, 16), skip=("head",))
    elif scheme == "int4_weight_only":  # a group size that is not the default: the manifest must carry it
        memkern.convert(model, scheme, group_size=32, skip=("head",))
    elif scheme == "int8_smooth":  # SmoothedInt8Linear wherever the factors cannot be folded
        memkern.convert(model, "int8", smooth=0.5, calibration=[torch.randn(8, 32)], skip=("head",))
    else:
        memkern.convert(model, scheme, skip=("head",))
    memkern.share_layers(model, [["blocks.0", "blocks.2"]])
    return model


def _state(model: nn.Module) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict) -> None:
    assert all(
        type(m) is not SparseLinear and type(m).__module__ == "torch.nn.modules.linear"
        for m in model.modules()
        if hasattr(m, "in_features")
    )
    assert model.blocks[0] is not model.blocks[2]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("on_meta", [False, True], ids=["cpu", "meta"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_is_bit_identical_and_keeps_ties(tmp_path, scheme, on_meta):
    model = _saved_model(scheme)
    x = torch.randn(5, 32)
    expected = model(x)
    memkern.save(model, tmp_path)
    with torch.device("meta" if on_meta else "cpu"):
        fresh = Net()
    assert memkern.load(tmp_path, fresh) is fresh
    assert torch.equal(fresh(x), expected)
    assert fresh.blocks[0] is fresh.blocks[2] and fresh.blocks[1] is not fresh.blocks[0]
    for name, module in model.named_modules():
        assert type(fresh.get_submodule(name)) is type(module), name
    assert all(t.device.type == "cpu" for t in fresh.state_dict().values() if isinstance(t, torch.Tensor))
    # The parameters still train as one where they were tied.
    assert len(list(fresh.parameters())) == len(list(model.parameters()))


def test_manifest_names_every_layer(tmp_path):
    model = _saved_model("block")
    memkern.save(model, tmp_path)
    manifest = json.loads((tmp_path / "memkern.json").read_text())
    layers = {entry["name"]: entry for entry in manifest["layers"]}
    assert sorted(layers) == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    first = layers["blocks.0.0"]
    assert first["class"] == "SparseLinear" and first["scheme"] == "sparse" and first["format"] == "block"
    assert first["config"] == {
        "in_features": 32,
        "out_features": 64,
        "bias": True,
        "format": "block",
        "block": [16, 16],
        "dtype": "float32",
    }
    assert first["tied"] == ["blocks.2.0"]
    kept = model.blocks[0][0].values
    assert first["tensors"]["values"] == {"shape": list(kept.shape), "dtype": "float32"}
    assert manifest["tied_modules"] == [["blocks.0", "blocks.2"]]
    assert manifest["aliases"]["blocks.2.0.values"] == "blocks.0.0.values"
    assert "blocks.2.0.values" not in manifest["tensors"]  # stored once

    memkern.save(_saved_model("int8"), tmp_path)
    entry = json.loads((tmp_path / "memkern.json").read_text())["layers"][0]
    assert (entry["class"], entry["scheme"], entry["format"]) == ("Int8Linear", "int8", "int8")
    assert entry["tensors"]["weight"] == {"shape": [64, 32], "dtype": "int8"}
    assert entry["tensors"]["weight_scale"] == {"shape": [64], "dtype": "float32"}


def _flip_byte_inside(path, tensor: str) -> None:
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + header_len])[tensor]["data_offsets"]
    raw[8 + header_len + (start + end) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _cut_last_tensor(path) -> str:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    path.write_bytes(raw[:-100])
    return f"tensor {max(header, key=lambda name: header[name]['data_offsets'][1])!r} is truncated"


def _edit_manifest(path, edit) -> None:
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


BAD_FILES = {
    "no-tensors-file": (lambda d: os.remove(d / "model.safetensors"), ["model.safetensors", "missing"]),
    "no-manifest": (lambda d: os.remove(d / "memkern.json"), ["memkern.json", "missing"]),
    "truncated": (lambda d: _cut_last_tensor(d / "model.safetensors"), ["truncated"]),
    "corrupted": (
        lambda d: _flip_byte_inside(d / "model.safetensors", "blocks.1.0.weight"),
        ["'blocks.1.0.weight'", "corrupted"],
    ),
    "manifest-shape": (
        lambda d: _edit_manifest(
            d / "memkern.json", lambda m: m["tensors"]["blocks.1.0.weight_scale"].update(shape=[65])
        ),
        ["'blocks.1.0.weight_scale'", "[65]"],
    ),
    "manifest-json": (
        lambda d: (d / "memkern.json").write_text((d / "memkern.json").read_text()[:50]),
        ["memkern.json", "not valid JSON"],
    ),
}


@pytest.mark.parametrize("damage", sorted(BAD_FILES))
def test_bad_files_are_refused_and_leave_the_model_untouched(tmp_path, damage):
    memkern.save(_saved_model("int8"), tmp_path)
    spoil, words = BAD_FILES[damage]
    named = spoil(tmp_path)  # the truncation names the tensor it cut
    words = [*words, named] if isinstance(named, str) else words
    _assert_load_refused_untouched(tmp_path, Net(), words)


def _assert_load_refused_untouched(directory, fresh: nn.Module, words: list[str]) -> None:
    before = _state(fresh)
    with raises_naming(ValueError, words):
        memkern.load(directory, fresh)
    _assert_untouched(fresh, before)


class Wider(Net):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 24)


class Narrower(Net):
    def __init__(self):
        super().__init__()
        self.blocks[1][0] = nn.Linear(32, 48)
        self.blocks[1][2] = nn.Linear(48, 32)


@pytest.mark.parametrize(
    "model_cls, words",
    [(Wider, ["'head.weight'", "(16, 32)", "(24, 32)"]), (Narrower, ["'blocks.1.0'", "32 -> 64", "32 -> 48"])],
    ids=["plain-tensor", "memkern-layer"],
)
def test_a_model_that_does_not_fit_is_refused_untouched(tmp_path, model_cls, words):
    memkern.save(_saved_model("int8"), tmp_path)
    _assert_load_refused_untouched(tmp_path, model_cls(), words)


def test_save_refuses_what_it_cannot_store(tmp_path):
    with torch.device("meta"):
        meta_model = Net()
    with pytest.raises(ValueError, match="'blocks.0.0.weight' is on the meta device"):
        memkern.save(meta_model, tmp_path)
    model = Net()
    model.head.weight = nn.Parameter(model.blocks[0][0].weight[:16])  # a view into another tensor
    with pytest.raises(ValueError, match="'head.weight' shares memory with 'blocks.0.0.weight'"):
        memkern.save(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_hugging_face_model_round_trips_beside_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from memkern.integrations import hf

    config = transformers.LlamaConfig(**tiny_decoder_config(128, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    memkern.prune.prune_model(model, 0.5, "n:m", filter_fn=lambda name, _: ".mlp." in name)
    memkern.convert(model, "int8", filter_fn=lambda _, name: ".self_attn." in name)
    memkern.share_layers(model, [["model.layers.0.self_attn", "model.layers.1.self_attn"]])
    ids = torch.randint(0, 128, (2, 7))
    expected = model(ids).logits
    hf.save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", "memkern.json"} <= set(os.listdir(tmp_path))

    loaded = hf.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, expected)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn is loaded.model.layers[1].self_attn
    assert type(loaded.model.layers[1].self_attn.q_proj).__name__ == "Int8Linear"
    assert type(loaded.model.layers[0].mlp.up_proj) is SparseLinear

    # A transformers model built on the meta device would keep its rotary buffers without
    # data: refused up front, the model untouched.
    with torch.device("meta"):
        meta_model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="non-persistent buffers .*inv_freq"):
        memkern.load(tmp_path, meta_model)
    assert type(meta_model.model.layers[0].mlp.up_proj) is nn.Linear
