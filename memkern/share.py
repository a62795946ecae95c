"""Parameter sharing: tie repeated blocks of a model so they hold one set of weights."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch import nn

from memkern.convert import memory_footprint


@dataclass
class ShareReport:
    groups: list[list[str]]
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        return (
            f"tied {sum(len(g) - 1 for g in self.groups)} block(s) in {len(self.groups)} group(s): "
            f"{self.bytes_before / 2**20:.2f} -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.bytes_saved / 2**20:.2f} MiB saved)"
        )


def _signature(module: nn.Module) -> list[tuple]:
    # Extra states (e.g. a SparseLinear's format and shape) are plain data: compared as they are.
    return [
        (n, tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else (n, t)
        for n, t in module.state_dict().items()
    ]


def share_layers(model: nn.Module, groups: Sequence[Sequence[str]]) -> ShareReport:
    """Make every module in each group the same module object as the group's first.

    Args:
        model: the model, changed in place.
        groups: lists of module names as ``model.named_modules()`` spells them, e.g.
            ``[["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"]]``. Modules in a group must
            have the same type and the same parameter and buffer names, shapes and dtypes.

    Returns:
        A :class:`ShareReport` with the model's bytes before and after (shared tensors
        counted once, as :func:`memkern.memory_footprint` counts them).

    The first module of a group keeps its weights; the others are replaced by it, so the
    tied blocks train as one (their gradients add up) and ``state_dict`` keeps one entry per
    name (loading it into a model tied the same way restores it exactly).
    """
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for g, group in enumerate(groups):
        if len(group) < 2:
            raise ValueError(f"share_layers: group {g} must name at least 2 modules, got {list(group)}")
        for name in group:
            if name not in modules or name == "":
                near = [n for n in modules if n and n.split(".")[0] == name.split(".")[0]][:6]
                raise ValueError(
                    f"share_layers: group {g} names {name!r}, which is not a module of the model"
                    + (f" (modules nearby: {', '.join(near)})" if near else "")
                )
            if name in seen:
                raise ValueError(f"share_layers: module {name!r} appears in more than one group")
            seen.add(name)
        first = modules[group[0]]
        for name in group[1:]:
            other = modules[name]
            if type(other) is not type(first):
                raise ValueError(
                    f"share_layers: group {g} mixes {type(first).__name__} ({group[0]}) "
                    f"and {type(other).__name__} ({name})"
                )
            if _signature(other) != _signature(first):
                raise ValueError(
                    f"share_layers: {name} and {group[0]} differ in parameter names, shapes "
                    "or dtypes, so they cannot share weights"
                )
    before = memory_footprint(model).total_bytes
    for group in groups:
        first = modules[group[0]]
        for name in group[1:]:
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, first)
    return ShareReport([list(g) for g in groups], before, memory_footprint(model).total_bytes)
