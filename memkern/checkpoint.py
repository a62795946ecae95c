"""Checkpoints of converted, pruned and tied models: safetensors plus a JSON manifest.

``save(model, directory)`` writes ``model.safetensors`` (every tensor of the state dict
once, contiguous, on the CPU) and ``memkern.json``: each memkern layer (qualified name,
class, scheme, format, constructor settings, tensor shapes and dtypes, the names tied to
it), the modules tied together (:func:`memkern.share_layers`), the tensor names that are
the same tensor (e.g. an lm_head tied to the embedding), non-tensor extra states, and a
SHA-256 of every tensor's bytes.

``load(directory, model)`` turns a freshly built model (``from_config``, or built on the
meta device) into the saved one: it re-creates each memkern layer from the manifest, ties
what was tied and loads every tensor. All checks run before the model changes: a missing,
truncated, corrupted or mismatched file raises a ValueError naming the file or tensor and
leaves the model as it was.

Only safetensors is needed, and only inside the two functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from memkern._replace import record_for_transformers
from memkern.layer_records import (
    build_layer,
    dtype_name,
    layer_record,
    layer_types,
    tensor_spec,
)

TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "memkern.json"
MANIFEST_FORMAT = "memkern-checkpoint"
MANIFEST_VERSION = 1

# safetensors header dtype codes -> torch dtype names, for checking a header without loading it.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


# -- save ----------------------------------------------------------------------------------
def _tied_modules(model: nn.Module) -> dict[str, str]:
    """{name: owner name} for each module reachable under more than one name, counting only
    the topmost name of a tie (children of tied modules are tied by implication)."""
    owner_of: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in owner_of:
            owner_of[id(module)] = name
        elif not any(name.startswith(dup + ".") for dup in ties):
            ties[name] = owner_of[id(module)]
    return ties


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` to ``directory`` as ``model.safetensors`` and ``memkern.json``.

    Works for any module: memkern layers are recorded so :func:`load` can rebuild them;
    tensors reachable under several names are stored once. Models holding tensors on the
    meta device, tensors that partly overlap, or extra states that are not JSON data are
    refused with a ValueError naming the tensor. Save a Hugging Face config beside it
    with ``model.config.save_pretrained(directory)``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"memkern.save: model must be a torch.nn.Module, got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    extra_states: dict[str, Any] = {}
    first_by_storage: dict[tuple, str] = {}
    storages: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            try:
                json.dumps(value)
            except TypeError as e:
                raise ValueError(f"memkern.save: extra state {key!r} is not JSON data ({e})") from None
            extra_states[key] = value
            continue
        if value.device.type == "meta":
            raise ValueError(
                f"memkern.save: tensor {key!r} is on the meta device (it holds no data); "
                "load or initialise the model before saving it"
            )
        ident = (
            value.untyped_storage().data_ptr(),
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
            value.dtype,
        )
        if ident in first_by_storage:
            aliases[key] = first_by_storage[ident]
            continue
        storage = (value.device, value.untyped_storage().data_ptr())
        if value.numel() and storage in storages:
            raise ValueError(
                f"memkern.save: tensor {key!r} shares memory with {storages[storage]!r} without "
                "being the same tensor (a view); store them as separate tensors"
            )
        first_by_storage[ident] = key
        if value.numel():
            storages[storage] = key
        tensors[key] = value.detach().to("cpu").contiguous()

    ties = _tied_modules(model)
    groups: dict[str, list[str]] = {}
    for dup, owner in ties.items():
        groups.setdefault(owner, [owner]).append(dup)
    types = tuple(layer_types().values())
    layers = []
    for name, module in model.named_modules():
        if type(module) in types:
            tied = [
                dup + name[len(owner) :] for dup, owner in ties.items() if name == owner or name.startswith(owner + ".")
            ]
            layers.append(layer_record(name, module, tied))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tensors_file": TENSORS_FILE,
        "layers": layers,
        "tied_modules": list(groups.values()),
        "aliases": aliases,
        "extra_states": extra_states,
        "tensors": {k: {**tensor_spec(t), "sha256": _sha256(t)} for k, t in tensors.items()},
    }
    os.makedirs(directory, exist_ok=True)
    # Write beside, then rename: an interrupted save never leaves a half-written file under the real name.
    for file, write in (
        (TENSORS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
        (MANIFEST_FILE, lambda p: _write_json(p, manifest)),
    ):
        path = os.path.join(directory, file)
        write(path + ".partial")
        os.replace(path + ".partial", path)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# -- load ----------------------------------------------------------------------------------
def _read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"memkern.load: {path} is missing (directories written by memkern.save hold "
            f"{MANIFEST_FILE} and {TENSORS_FILE})"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"memkern.load: {path} is not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"memkern.load: {path} is not a memkern manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
            f"expected {MANIFEST_FORMAT!r})"
        )
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"memkern.load: {path} has manifest version {manifest.get('version')!r}; this memkern "
            f"reads version {MANIFEST_VERSION}"
        )
    return manifest


def _check_file(path: str, expected: dict[str, dict]) -> None:
    """Check the safetensors header against the manifest and the file's length, naming the
    first tensor that is missing, mismatched or cut off."""
    if not os.path.isfile(path):
        raise ValueError(f"memkern.load: {path} is missing")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise ValueError(
                f"memkern.load: {path} is truncated or not a safetensors file "
                f"({size} bytes, header length {header_len})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"memkern.load: {path} has a corrupted header: {e}") from None
    header.pop("__metadata__", None)
    for name, spec in expected.items():
        if name not in header:
            raise ValueError(f"memkern.load: tensor {name!r} is missing from {path}")
        found = header[name]
        dtype = _SAFETENSORS_DTYPES.get(found.get("dtype"), found.get("dtype"))
        if dtype != spec["dtype"] or list(found.get("shape", ())) != spec["shape"]:
            raise ValueError(
                f"memkern.load: tensor {name!r} in {path} has shape {found.get('shape')} dtype "
                f"{dtype}; the manifest says shape {spec['shape']} dtype {spec['dtype']}"
            )
        end = 8 + header_len + found["data_offsets"][1]
        if end > size:
            raise ValueError(
                f"memkern.load: tensor {name!r} is truncated: {path} ends at byte {size}, the tensor at byte {end}"
            )
    extra = sorted(set(header) - set(expected))
    if extra:
        raise ValueError(f"memkern.load: {path} holds tensors the manifest does not name: {', '.join(extra[:5])}")


def _read_tensors(path: str, expected: dict[str, dict]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    _check_file(path, expected)
    tensors = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, spec in expected.items():
            t = f.get_tensor(name)
            if _sha256(t) != spec["sha256"]:
                raise ValueError(
                    f"memkern.load: tensor {name!r} in {path} is corrupted (its SHA-256 differs from the manifest's)"
                )
            tensors[name] = t
    return tensors


def _owner_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _compare(model: nn.Module, state: dict[str, Any]) -> None:
    """The model's state dict (keys, shapes, dtypes) must equal what will be loaded."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            "memkern.load: the checkpoint does not fit the model: "
            + (f"tensors the model has and the checkpoint lacks: {', '.join(missing[:5])}; " if missing else "")
            + (f"tensors the checkpoint has and the model lacks: {', '.join(unexpected[:5])}" if unexpected else "")
            + " (is it the model the checkpoint was saved from, built from the same config?)"
        )
    for key, value in own.items():
        incoming = state[key]
        if isinstance(value, torch.Tensor) and (value.shape != incoming.shape or value.dtype != incoming.dtype):
            raise ValueError(
                f"memkern.load: tensor {key!r} has shape {tuple(incoming.shape)} dtype "
                f"{dtype_name(incoming.dtype)} in the checkpoint but shape {tuple(value.shape)} "
                f"dtype {dtype_name(value.dtype)} in the model"
            )


def load(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Make ``model`` the model saved by :func:`save` in ``directory``; returns ``model``.

    ``model`` is the architecture freshly built (e.g. ``AutoModelForCausalLM.from_config``),
    on any device or on the meta device (then the loaded tensors are CPU tensors assigned to
    it). Each memkern layer named in the manifest replaces the ``nn.Linear`` (or layer of
    the same class) at that name, tied modules and tensors are tied again, and every tensor
    is loaded, so outputs are bit-identical to the saved model's. Every name, shape, dtype
    and checksum is checked before anything changes; on any error the model is left as it
    was. Raises ValueError naming the file or tensor at fault.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memkern.load: model must be a torch.nn.Module, got {type(model).__name__}")
    directory = os.fspath(directory)
    manifest = _read_manifest(directory)
    tensors = _read_tensors(os.path.join(directory, manifest["tensors_file"]), manifest["tensors"])
    state: dict[str, Any] = dict(tensors)
    for alias, canonical in manifest["aliases"].items():
        state[alias] = tensors[canonical]
    state.update(manifest["extra_states"])

    own = list(model.parameters()) + list(model.buffers())
    on_meta = any(t.device.type == "meta" for t in own)
    if on_meta:
        saved = model.state_dict().keys()
        unsaved = [n for n, b in model.named_buffers() if b.device.type == "meta" and n not in saved]
        if unsaved:
            raise ValueError(
                f"memkern.load: the model is on the meta device and its non-persistent buffers "
                f"{', '.join(unsaved[:3])} are in no checkpoint, so they would stay without data; "
                "build the model on a real device (e.g. from_config on the CPU) or fill them first"
            )
    device = torch.device("cpu") if on_meta or not own else own[0].device
    modules = dict(model.named_modules())
    types = layer_types()
    built: dict[str, nn.Module] = {}
    for entry in manifest["layers"]:
        name, cls_name = entry["name"], entry["class"]
        if cls_name not in types:
            raise ValueError(f"memkern.load: layer {name!r} has class {cls_name!r}; known: {', '.join(types)}")
        current = modules.get(name)
        config = entry["config"]
        if not isinstance(current, (nn.Linear, types[cls_name])):
            raise ValueError(
                f"memkern.load: the checkpoint has a {cls_name} at {name!r}, but the model has "
                f"{type(current).__name__ if current is not None else 'no module'} there"
            )
        if (current.in_features, current.out_features) != (config["in_features"], config["out_features"]):
            raise ValueError(
                f"memkern.load: layer {name!r} is {config['in_features']} -> {config['out_features']} "
                f"in the checkpoint but {current.in_features} -> {current.out_features} in the model"
            )
        layer = build_layer(entry, device)
        prefix = name + "."
        layer_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            layer.load_state_dict(layer_state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"memkern.load: layer {name!r} cannot take its tensors: {e}") from None
        built[name] = layer

    # Change the structure, check the whole state dict, and undo the change if it does not fit.
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, layer in built.items():
            parent, attr = _owner_and_attr(model, name)
            undo.append((parent, attr, getattr(parent, attr)))
            setattr(parent, attr, layer)
        for group in manifest["tied_modules"]:
            owner = model.get_submodule(group[0])
            for name in group[1:]:
                parent, attr = _owner_and_attr(model, name)
                undo.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, owner)
        _compare(model, state)
        model.load_state_dict(state, strict=True, assign=on_meta)
    except BaseException:
        for parent, attr, previous in reversed(undo):
            setattr(parent, attr, previous)
        raise
    if on_meta:
        # assign=True gave each name its own Parameter; tied names must hold the same one.
        for alias, canonical in manifest["aliases"].items():
            owner, attr = _owner_and_attr(model, alias)
            source, source_attr = _owner_and_attr(model, canonical)
            if owner is not source or attr != source_attr:
                setattr(owner, attr, getattr(source, source_attr))
    record_for_transformers(model)
    return model
