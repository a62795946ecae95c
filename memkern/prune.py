"""Pruning masks (magnitude, Wanda, SparseGPT; unstructured, n:m, block) and ``prune_model``,
which replaces ``nn.Linear`` layers by :class:`memkern.nn.SparseLinear` so pruning saves
memory and time instead of multiplying by zeros."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterable

import torch
from torch import nn

from memkern import _validate, sparsegpt
from memkern._pruning import PATTERNS, call_model, check_pattern, check_sparsity, lowest, lowest_blocks
from memkern._replace import Layer, chosen_layers, find_layers, record_for_transformers, replace_layers
from memkern.convert import memory_footprint

__all__ = ["PATTERNS", "METHODS", "PruneReport", "activation_norms", "masks", "prune_model"]
METHODS = ("magnitude", "wanda", "sparsegpt")


def masks(
    weight: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    method: str = "magnitude",
    *,
    block: tuple[int, int] = (64, 64),
    n: int = 2,
    m: int = 4,
    activation_norms: torch.Tensor | None = None,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    blocksize: int = sparsegpt.BLOCKSIZE,
    percdamp: float = sparsegpt.PERCDAMP,
) -> torch.Tensor:
    """The bool keep-mask (True = kept) of ``weight`` at the requested sparsity.

    Args:
        weight: ``(out_features, in_features)`` float tensor.
        sparsity: fraction of weights to prune, in [0, 1]. For ``"n:m"`` it must equal
            ``1 - n/m`` (the pattern fixes it).
        pattern: ``"unstructured"``, ``"n:m"`` (``n`` kept of every ``m`` consecutive input
            columns) or ``"block"`` (whole ``block``-sized tiles, powers of two in 16..128).
        method: ``"magnitude"`` (score ``|W|``), ``"wanda"`` (score
            ``|W| * ||x_j||_2`` with ``activation_norms`` ``(in_features,)``) or
            ``"sparsegpt"`` (:mod:`memkern.sparsegpt`, from the layer's ``calibration``
            inputs). SparseGPT also updates the kept weights; this returns its mask only:
            :func:`memkern.sparsegpt.prune_weight` returns both, and ``prune_model`` uses both.
        activation_norms: per-input-feature L2 norms of calibration activations (Wanda).
        calibration: the layer's inputs ``(..., in_features)``, a tensor or an iterable
            of tensors (SparseGPT).
        blocksize, percdamp: SparseGPT's column block and dampening
            (:func:`memkern.sparsegpt.prune_weight`).

    Exactness: unstructured magnitude prunes ``round(sparsity * numel)`` weights over the
    whole matrix; unstructured Wanda prunes ``round(sparsity * in_features)`` in every output
    row (the Wanda paper's comparison group); n:m keeps exactly n per group. Block prunes
    whole blocks in ascending order of their mean score over the weights they hold (edge
    blocks hold fewer), as many as bring the pruned weights closest to
    ``sparsity * numel``: the achieved sparsity ``1 - mask.float().mean()`` is within half a
    block of the request (exactly ``round(sparsity * blocks)`` blocks, ties pruning fewer,
    when the shape is a multiple of the block). Ties in score prune the lower index first.
    SparseGPT's counts are those of :func:`memkern.sparsegpt.prune_weight`.
    """
    op = "masks"
    _validate.check_tensor(op, "weight", weight)
    _validate.check_dim(op, "weight", weight, 2)
    _validate.check_dtype(op, "weight", weight, (*_validate.FLOAT_DTYPES, torch.float64))
    sparsity = check_sparsity(op, sparsity)
    out_f, in_f = weight.shape
    block = check_pattern(op, in_f, sparsity, pattern, n, m, block)
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "sparsegpt":
        hessian = sparsegpt.hessian_of_inputs(op, calibration, weight)
        return sparsegpt.prune_weight(
            weight,
            hessian,
            sparsity,
            pattern,
            n=n,
            m=m,
            block=block or (64, 64),
            blocksize=blocksize,
            percdamp=percdamp,
            overwrite_hessian=True,
            op=op,
        )[1]
    score = weight.detach().abs().to(torch.float64)
    if method == "wanda":
        if activation_norms is None:
            raise ValueError(f"{op}: method 'wanda' needs activation_norms of shape ({in_f},), got None")
        _validate.check_tensor(op, "activation_norms", activation_norms)
        if activation_norms.shape != (in_f,):
            raise ValueError(f"{op}: activation_norms must have shape ({in_f},), got {tuple(activation_norms.shape)}")
        score = score * activation_norms.detach().to(device=score.device, dtype=torch.float64)[None, :]

    if pattern == "n:m":
        return ~lowest(score.reshape(out_f, in_f // m, m), m - n).reshape(out_f, in_f)
    if pattern == "block":
        return lowest_blocks(score, block, sparsity * weight.numel())
    if method == "wanda":
        return ~lowest(score, round(sparsity * in_f))
    return ~lowest(score.reshape(1, -1), round(sparsity * score.numel())).reshape(out_f, in_f)


@dataclass
class PruneReport:
    """What ``prune_model`` did."""

    layers: list[str] = field(default_factory=list)
    sparsity: float = 0.0
    """Pruned weights / weights of the pruned layers."""
    bytes_before: int = 0
    bytes_after: int = 0
    """Bytes of all parameters and buffers of the model before and after."""

    def __str__(self) -> str:
        return (
            f"pruned {len(self.layers)} layers to {self.sparsity:.1%} sparsity: "
            f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"
        )


def activation_norms(model: nn.Module, names: Iterable[str], calibration: Iterable[Any]) -> dict[str, torch.Tensor]:
    """L2 norm over all calibration tokens of each input feature of the named layers."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach()
            sq = x.reshape(-1, x.shape[-1]).to(torch.float64).square().sum(0)
            sums[name] = sums[name] + sq if name in sums else sq

        return record

    for name in names:
        hooks.append(modules[name].register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in calibration:
                call_model(model, batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"prune_model: calibration never reached layer(s) {', '.join(missing)}")
    return {name: s.sqrt() for name, s in sums.items()}


def prune_model(
    model: nn.Module,
    sparsity: float,
    pattern: str = "unstructured",
    method: str = "magnitude",
    calibration: Iterable[Any] | None = None,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
    skip: Iterable[str] = ("lm_head",),
    *,
    block: tuple[int, int] = (64, 64),
    n: int = 2,
    m: int = 4,
    blocksize: int = sparsegpt.BLOCKSIZE,
    percdamp: float = sparsegpt.PERCDAMP,
) -> PruneReport:
    """Prune every selected ``nn.Linear`` of ``model`` in place into a ``SparseLinear``.

    A layer is selected when its name has no component in ``skip`` and
    ``filter_fn(name, layer)`` (if given) is true. ``method="wanda"`` needs ``calibration``:
    batches (tensors, tuples of positional args or dicts of keyword args) run through
    ``model`` with forward hooks that collect each layer's input norms. 2:4 masks are
    stored compressed (``Sparse24Weight``), block masks as kept ``block``-sized blocks
    (``BlockSparseWeight``), every other mask (unstructured, other n:m) as kept values + a
    bitmask (``BitmaskWeight``, 0.53x of dense float32 at 50%). Returns a :class:`PruneReport`.

    ``method="sparsegpt"`` (needs ``calibration``) prunes the layers one after another in
    the order the model's forward calls them, each with the Hessian of its inputs while the
    model runs the calibration batches with the layers before it already pruned, and keeps
    the weights SparseGPT updated (:mod:`memkern.sparsegpt`; ``blocksize`` and ``percdamp``
    as there). The model runs the calibration once per layer (plus one batch for the
    order); one layer's Hessian (``in_features^2`` floats) exists at a time.

    A layer held under several names (:func:`memkern.share_layers`, tied weights) is
    pruned once (Wanda: with the inputs of all its uses) and put under every name, so it
    stays shared; it is listed once, under its first name, and ``skip`` and ``filter_fn``
    must choose all its names or none. All or nothing: every layer's mask and sparse layer
    are built before any layer is replaced, and a layer that fails (e.g. ``n:m`` with
    ``in_features`` not divisible by ``m``) leaves the model as it was, with an error
    naming the layer.
    """
    from memkern.nn.sparse import SparseLinear

    op = "prune_model"
    sparsity = check_sparsity(op, sparsity)
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in ("wanda", "sparsegpt") and calibration is None:
        raise ValueError(f"{op}: method {method!r} needs calibration batches, got None")
    skip = tuple(skip)

    def chosen(module: nn.Module, name: str) -> bool:
        return not set(name.split(".")) & set(skip) and (filter_fn is None or filter_fn(name, module))

    layers = chosen_layers(op, find_layers(model, lambda module: type(module) is nn.Linear), chosen)
    names = [layer.name for layer in layers]
    norms = activation_norms(model, names, calibration) if method == "wanda" else {}
    before = memory_footprint(model).total_bytes
    # Element-wise masks other than 2:4 in the bitmask format: kept blocks would hold nearly
    # every weight plus an element mask.
    fmt = "block" if pattern == "block" else "2:4" if pattern == "n:m" and (n, m) == (2, 4) else "bitmask"
    pruned = total = 0
    if method == "sparsegpt":
        calibration = list(calibration)  # run once per layer
        layers = sparsegpt.forward_order(model, layers, calibration)
    done: list[tuple[Layer, nn.Module]] = []

    def sparse(layer: Layer) -> nn.Module:
        nonlocal pruned, total
        if method == "sparsegpt":
            linear, mask = sparsegpt.prune_layer(
                op,
                model,
                layer,
                calibration,
                done,
                sparsity,
                pattern,
                n=n,
                m=m,
                block=block,
                blocksize=blocksize,
                percdamp=percdamp,
            )
        else:
            linear = layer.module
            mask = masks(
                linear.weight,
                sparsity,
                pattern,
                method,
                block=block,
                n=n,
                m=m,
                activation_norms=norms.get(layer.name),
            )
        pruned += int((~mask).sum())
        total += mask.numel()
        done.append((layer, SparseLinear.from_dense(linear, mask, format=fmt, block=block)))
        return done[-1][1]

    replace_layers(op, layers, sparse)
    record_for_transformers(model)
    return PruneReport(names, pruned / total if total else 0.0, before, memory_footprint(model).total_bytes)
