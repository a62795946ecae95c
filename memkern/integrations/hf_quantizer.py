"""transformers' own ``save_pretrained`` / ``from_pretrained`` for models memkern changed.

``memkern.convert`` and ``memkern.prune.prune_model`` on a transformers model record the
memkern layers in ``model.config.quantization_config`` (``quant_method: "memkern"``, one
entry per layer: class, constructor settings, tensor shapes and dtypes, as
memkern.layer_records writes them) and attach the quantizer below. Then:

* ``model.save_pretrained(d)`` writes config.json with that record and the layers' tensors
  (int8 / uint8 codes, float32 scales) as they are;
* ``AutoModelForCausalLM.from_pretrained(d)``, in a process that has imported
  ``memkern.integrations.hf`` (which registers the ``"memkern"`` method with transformers),
  builds each recorded layer in place of its ``nn.Linear`` before the weights load, checks
  that the checkpoint holds every tensor each layer needs, and gives outputs bit-identical
  to the saved model's;
* pruned models (``SparseLinear``, ``SparseInt8Linear``: index tensors whose sizes depend
  on the mask, and a format record that safetensors cannot store) are refused by
  ``save_pretrained`` with a ValueError saying to use :func:`memkern.save`; models with
  layers tied by ``share_layers`` are refused by transformers itself (shared tensors).

Without the import, transformers does not know the method, warns "Unknown quantization
type, got memkern" and would load int8 codes into float layers: import
``memkern.integrations.hf`` first, or use :func:`memkern.integrations.hf.from_pretrained`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from memkern import layer_records

QUANT_METHOD = "memkern"
# Layers whose index tensors vary in size with the mask: transformers builds each layer
# before it reads the checkpoint and refuses tensors of another shape.
_SPARSE_LAYERS = ("SparseLinear", "SparseInt8Linear")


@register_quantization_config(QUANT_METHOD)
class MemkernQuantizationConfig(QuantizationConfigMixin):
    """The record of a model's memkern layers, saved in config.json."""

    def __init__(self, layers: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.layers = list(layers or [])
        for record in self.layers:
            if not isinstance(record, dict) or not {"name", "class", "config", "tensors"} <= record.keys():
                raise ValueError(
                    f"memkern quantization_config: each entry of layers must be a layer record with "
                    f"name, class, config and tensors; got {record!r}"
                )
            if record["class"] not in layer_records.layer_types():
                raise ValueError(
                    f"memkern quantization_config: layer {record['name']!r} has class {record['class']!r}; "
                    f"known: {', '.join(layer_records.layer_types())}"
                )


@register_quantizer(QUANT_METHOD)
class MemkernHfQuantizer(HfQuantizer):
    """Builds the recorded memkern layers before transformers loads the weights."""

    requires_calibration = True  # only checkpoints memkern wrote: nothing is quantised on load

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for record in self.quantization_config.layers:
            name = record["name"]
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, attr, None)
            config = record["config"]
            if not isinstance(current, nn.Linear) or (current.in_features, current.out_features) != (
                config["in_features"],
                config["out_features"],
            ):
                raise ValueError(
                    f"memkern quantization_config: layer {name!r} is a {config['in_features']} -> "
                    f"{config['out_features']} {record['class']}, but the model has "
                    f"{type(current).__name__ if current is not None else 'no module'} there"
                )
            device = current.weight.device
            setattr(parent, attr, layer_records.build_layer(record, device))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for record in self.quantization_config.layers:
            layer = model.get_submodule(record["name"])
            # transformers reports a tensor missing from the checkpoint and carries on; a
            # layer left with its placeholder codes or scales would compute garbage.
            held = {**dict(layer.named_parameters(recurse=False)), **dict(layer.named_buffers(recurse=False))}
            missing = [n for n in record["tensors"] if not getattr(held.get(n), "_is_hf_initialized", False)]
            if missing:
                raise ValueError(
                    f"from_pretrained: the checkpoint lacks {', '.join(record['name'] + '.' + n for n in missing)}, "
                    f"which the memkern {record['class']} recorded in config.json needs"
                )
            settle = getattr(layer, "_settle_layout", None)  # Int8Linear: the CPU kernel's packed layout
            if callable(settle):
                settle()

    def is_serializable(self) -> bool:
        pruned = [r["name"] for r in self.quantization_config.layers if r["class"] in _SPARSE_LAYERS]
        if pruned:
            raise ValueError(
                f"save_pretrained cannot write memkern's pruned layers ({', '.join(pruned[:3])}"
                f"{', ...' if len(pruned) > 3 else ''}): their index tensors and format record are not "
                "safetensors data. Use memkern.save(model, directory) with model.config.save_pretrained"
                "(directory), or memkern.integrations.hf.save_pretrained(model, directory)"
            )
        return True

    @property
    def is_trainable(self) -> bool:
        # memkern layers decide what trains: SparseLinear's kept values do, quantised
        # weights are buffers (LoRA adapters through memkern.integrations.peft).
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def attach(model: nn.Module) -> None:
    """Record ``model``'s memkern layers in its config and attach the quantizer (or remove
    both when it holds none)."""
    types = tuple(layer_records.layer_types().values())
    records = [layer_records.layer_record(name, m) for name, m in model.named_modules() if type(m) in types]
    if not records:
        if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == QUANT_METHOD:
            del model.config.quantization_config
            model.hf_quantizer = None
        return
    config = MemkernQuantizationConfig(layers=records)
    model.config.quantization_config = config
    model.hf_quantizer = MemkernHfQuantizer(config, pre_quantized=True)
