"""Replacing layers of a model, as ``convert`` and ``prune_model`` do: a layer shared under
several names (``share_layers``, tied weights) is replaced once and stays shared, and a
layer that cannot be replaced leaves the whole model as it was. After a change, a
transformers model gets its memkern layers recorded in its config (record_for_transformers)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from collections.abc import Callable

from torch import nn


@dataclass
class Layer:
    """One module of a model with every name it has there."""

    module: nn.Module
    names: list[str] = field(default_factory=list)
    """Dotted names, in ``named_modules()`` order; a shared module has several."""
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)
    """``(parent, attribute)`` pairs that hold the module."""

    @property
    def name(self) -> str:
        return self.names[0]

    def describe(self) -> str:
        others = self.names[1:]
        return repr(self.name) + (f" (also {', '.join(map(repr, others))})" if others else "")


def find_layers(
    model: nn.Module,
    is_candidate: Callable[[nn.Module], bool],
    descend: Callable[[nn.Module], bool] = lambda module: True,
) -> list[Layer]:
    """The submodules of ``model`` for which ``is_candidate`` holds, each once, under all
    its names. The search does not enter candidates, nor modules for which ``descend``
    is false."""
    found: dict[int, Layer] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        # parent._modules rather than named_children(), which yields a module held under
        # two attributes of one parent only once: its second name would go unseen.
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = prefix + attr
            if is_candidate(child):
                layer = found.setdefault(id(child), Layer(child))
                layer.names.append(name)
                # A shared parent is visited once per name: the same slot comes back.
                if not any(p is parent and a == attr for p, a in layer.slots):
                    layer.slots.append((parent, attr))
            elif descend(child):
                visit(child, name + ".")

    visit(model, "")
    return list(found.values())


def chosen_layers(op: str, layers: list[Layer], chosen: Callable[[nn.Module, str], bool]) -> list[Layer]:
    """The layers ``chosen(module, name)`` picks under every one of their names. Picking a
    shared layer under some names only is an error: replacing it replaces it everywhere."""
    picked = []
    for layer in layers:
        votes = [bool(chosen(layer.module, name)) for name in layer.names]
        if all(votes):
            picked.append(layer)
        elif any(votes):
            left_out = [name for name, vote in zip(layer.names, votes) if not vote]
            raise ValueError(
                f"{op}: layer {layer.describe()} is one module under several names, and skip or "
                f"filter_fn leave out {', '.join(map(repr, left_out))}; choose every name of a "
                f"shared layer or none"
            )
    return picked


_NAMED_ERRORS = (TypeError, ValueError, RuntimeError)


def _naming_the_layer(op: str, layer: Layer, exc: Exception) -> Exception:
    # Raised as the built-in kind it is (a subclass becomes its base), so callers' except
    # clauses still match.
    kind = next(k for k in _NAMED_ERRORS if isinstance(exc, k))
    return kind(f"{op}: layer {layer.describe()}: {exc}")


def replace_layers(op: str, layers: list[Layer], build: Callable[[Layer], nn.Module]) -> list[nn.Module]:
    """Build every layer's replacement first, then put each one in every slot of its
    layer. A failing build raises the same kind of error naming the layer, with nothing
    replaced yet. Returns the replacements, in the order of ``layers``.

    The price of all-or-nothing: the replacements and the originals exist together until
    the end of the call (for int8 a quarter of the replaced weights' float32 bytes more);
    a model built on the meta device costs nothing either way."""
    built = []
    for layer in layers:
        try:
            built.append(build(layer))
        except _NAMED_ERRORS as exc:
            raise _naming_the_layer(op, layer, exc) from exc
    for layer, replacement in zip(layers, built):
        for parent, attr in layer.slots:
            setattr(parent, attr, replacement)
    return built


def record_for_transformers(model: nn.Module) -> None:
    """After memkern changed ``model``'s layers (convert, prune_model, memkern.load): if it is a
    transformers model, record its memkern layers in its config so transformers'
    save_pretrained / from_pretrained handle them (memkern/integrations/hf_quantizer.py).
    The one place the model tools reach into integrations/, lazily: a model can only be a
    transformers model if transformers is already imported, so other models cost nothing
    and ``import memkern`` still needs no transformers."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not isinstance(model, pretrained):
        return
    from memkern.integrations import hf_quantizer

    hf_quantizer.attach(model)
