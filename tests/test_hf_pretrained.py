"""transformers' own save_pretrained / from_pretrained on models memkern converted or
pruned: quantised layers round-trip bit for bit through the registered "memkern" method,
and what cannot be stored (pruned layers, tied layers) or loaded (missing tensors) is
refused loudly."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import memkern  # noqa: E402
from memkern.integrations import hf  # noqa: E402,F401  (registers the "memkern" method)
from conftest import tiny_decoder_config  # noqa: E402

CONFIG = tiny_decoder_config(96, hidden_size=64, max_position_embeddings=32)

CONVERSIONS = {
    "int8": lambda m: memkern.convert(m, "int8", skip=("lm_head",)),
    "int8_weight_only": lambda m: memkern.convert(m, "int8_weight_only", skip=("lm_head",)),
    "fp16": lambda m: memkern.convert(m, "fp16", skip=("lm_head",)),
    # A group size other than the default: it must travel in config.json.
    "int4_weight_only": lambda m: memkern.convert(m, "int4_weight_only", group_size=32, skip=("lm_head",)),
    "int8_smooth": lambda m: memkern.convert(
        m, "int8", smooth=0.5, calibration=[torch.randint(0, 96, (2, 8))], skip=("lm_head",)
    ),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG)).eval()


@pytest.mark.parametrize("scheme", list(CONVERSIONS))
def test_converted_model_round_trips_through_transformers(tmp_path, scheme):
    model = _model()
    CONVERSIONS[scheme](model)
    ids = torch.randint(0, 96, (2, 9))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "memkern"
    assert {layer["name"] for layer in record["layers"]} >= {"model.layers.1.mlp.down_proj"}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, module in model.named_modules():
        assert type(loaded.get_submodule(name)) is type(module), name
    assert torch.equal(loaded(ids).logits, expected)
    # The loaded model carries the record on: saving it again writes the same checkpoint.
    loaded.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert torch.equal(again(ids).logits, expected)


def test_a_tensor_missing_from_the_checkpoint_is_refused(tmp_path):
    model = _model()
    memkern.convert(model, "int8", skip=("lm_head",))
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks model\.layers\.0\.mlp\.up_proj\.weight_scale"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_layer_recorded_where_the_model_has_none_is_refused(tmp_path):
    model = _model()
    memkern.convert(model, "int8", skip=("lm_head",))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["layers"][0]["name"] = "model.layers.0.mlp.no_such_proj"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.no_such_proj'.*has no module there"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_pruned_model_is_refused_by_save_pretrained_with_the_way_out(tmp_path):
    model = _model()
    memkern.prune.prune_model(model, 0.5, "n:m", skip=("lm_head",))
    with pytest.raises(ValueError, match=r"cannot write memkern's pruned layers.*memkern\.save"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    # memkern's own checkpoint beside the config is the way: it round-trips.
    hf.save_pretrained(model, tmp_path)
    ids = torch.randint(0, 96, (1, 6))
    assert torch.equal(hf.from_pretrained(tmp_path).eval()(ids).logits, model(ids).logits)


def test_tied_layers_are_refused_by_save_pretrained(tmp_path):
    model = _model()
    memkern.share_layers(model, [["model.layers.0.mlp", "model.layers.1.mlp"]])
    with pytest.raises(RuntimeError, match="shared tensors"):
        model.save_pretrained(tmp_path)


def test_a_pruned_student_still_trains_under_the_trainer_checks():
    from transformers.trainer_utils import validate_quantization_for_training

    model = _model()
    memkern.prune.prune_model(model, 0.5, "n:m", skip=("lm_head",))
    validate_quantization_for_training(model)  # raises for "purely quantized" models
    assert model.hf_quantizer.is_trainable
