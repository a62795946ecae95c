"""Pruning masks (magnitude, Wanda; unstructured, n:m, block) and ``prune_model``, which
replaces ``nn.Linear`` layers by :class:`memkern.nn.SparseLinear` so pruning saves memory
and time instead of multiplying by zeros."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterable

import torch
from torch import nn

from memkern import _validate
from memkern._replace import Layer, chosen_layers, find_layers, replace_layers
from memkern.integrations import record_for_transformers
from memkern.convert import memory_footprint
from memkern.ops.sparse_format import check_block

PATTERNS = ("unstructured", "n:m", "block")
METHODS = ("magnitude", "wanda")


def _check_sparsity(op: str, sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{op}: sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (last dim) of the ``count`` lowest scores per row; ties go to the lower index."""
    order = torch.argsort(scores, dim=-1, stable=True)
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned.scatter_(-1, order[..., :count], True)
    return pruned


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
) -> torch.Tensor:
    """The bool keep-mask (True = kept) of ``weight`` at the requested sparsity.

    Args:
        weight: ``(out_features, in_features)`` float tensor.
        sparsity: fraction of weights to prune, in [0, 1]. For ``"n:m"`` it must equal
            ``1 - n/m`` (the pattern fixes it).
        pattern: ``"unstructured"``, ``"n:m"`` (``n`` kept of every ``m`` consecutive input
            columns) or ``"block"`` (whole ``block``-sized tiles, powers of two in 16..128).
        method: ``"magnitude"`` (score ``|W|``) or ``"wanda"`` (score
            ``|W| * ||x_j||_2`` with ``activation_norms`` ``(in_features,)``).
        activation_norms: per-input-feature L2 norms of calibration activations (Wanda).

    Exactness: unstructured magnitude prunes ``round(sparsity * numel)`` weights over the
    whole matrix; unstructured Wanda prunes ``round(sparsity * in_features)`` in every output
    row (the Wanda paper's comparison group); n:m keeps exactly n per group. Block prunes
    whole blocks in ascending order of their mean score over the weights they hold (edge
    blocks hold fewer), as many as bring the pruned weights closest to
    ``sparsity * numel``: the achieved sparsity ``1 - mask.float().mean()`` is within half a
    block of the request (exactly ``round(sparsity * blocks)`` blocks, ties pruning fewer,
    when the shape is a multiple of the block). Ties in score prune the lower index first.
    """
    op = "masks"
    _validate.check_tensor(op, "weight", weight)
    _validate.check_dim(op, "weight", weight, 2)
    _validate.check_dtype(op, "weight", weight, (*_validate.FLOAT_DTYPES, torch.float64))
    sparsity = _check_sparsity(op, sparsity)
    if pattern not in PATTERNS:
        raise ValueError(f"{op}: pattern must be one of {', '.join(PATTERNS)}; got {pattern!r}")
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(METHODS)}; got {method!r}")
    out_f, in_f = weight.shape
    score = weight.detach().abs().to(torch.float64)
    if method == "wanda":
        if activation_norms is None:
            raise ValueError(f"{op}: method 'wanda' needs activation_norms of shape ({in_f},), got None")
        _validate.check_tensor(op, "activation_norms", activation_norms)
        if activation_norms.shape != (in_f,):
            raise ValueError(f"{op}: activation_norms must have shape ({in_f},), got {tuple(activation_norms.shape)}")
        score = score * activation_norms.detach().to(device=score.device, dtype=torch.float64)[None, :]

    if pattern == "n:m":
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
            raise ValueError(f"{op}: n:m needs integers 0 < n <= m, got n={n!r}, m={m!r}")
        if in_f % m:
            raise ValueError(f"{op}: n:m with m={m} needs in_features divisible by {m}, got {in_f}")
        if not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(
                f"{op}: pattern {n}:{m} prunes exactly {1 - n / m:g} of the weights; got sparsity {sparsity:g}"
            )
        pruned = _lowest(score.reshape(out_f, in_f // m, m), m - n)
        return ~pruned.reshape(out_f, in_f)
    if pattern == "block":
        bn, bk = check_block(op, block)
        nbr, nbc = -(-out_f // bn), -(-in_f // bk)
        padded = score.new_zeros(nbr * bn, nbc * bk)
        padded[:out_f, :in_f] = score
        # Blocks cut by the matrix edge hold fewer weights. Scored by their sum they would
        # go first and count little (a 70 x 50 weight in 32 x 16 blocks at 0.5 lost 12% of
        # its weights), so blocks are scored by their mean over the weights they hold and
        # counted by those weights.
        rows = (out_f - torch.arange(nbr, device=score.device) * bn).clamp(max=bn)
        cols = (in_f - torch.arange(nbc, device=score.device) * bk).clamp(max=bk)
        held = (rows[:, None] * cols[None, :]).reshape(-1)
        block_score = padded.reshape(nbr, bn, nbc, bk).sum(dim=(1, 3)).reshape(-1) / held
        order = torch.argsort(block_score, stable=True)
        pruned_weights = torch.cat([held.new_zeros(1), held[order].cumsum(0)]).to(torch.float64)
        count = int((pruned_weights - sparsity * weight.numel()).abs().argmin())  # first minimum: ties prune fewer
        pruned = torch.zeros(nbr * nbc, dtype=torch.bool, device=score.device)
        pruned[order[:count]] = True
        keep = (~pruned).reshape(nbr, nbc).repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return keep[:out_f, :in_f].contiguous()
    if method == "wanda":
        return ~_lowest(score, round(sparsity * in_f))
    return ~_lowest(score.reshape(1, -1), round(sparsity * score.numel())).reshape(out_f, in_f)


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


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


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
                _call(model, batch)
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
) -> PruneReport:
    """Prune every selected ``nn.Linear`` of ``model`` in place into a ``SparseLinear``.

    A layer is selected when its name has no component in ``skip`` and
    ``filter_fn(name, layer)`` (if given) is true. ``method="wanda"`` needs ``calibration``:
    batches (tensors, tuples of positional args or dicts of keyword args) run through
    ``model`` with forward hooks that collect each layer's input norms. 2:4 masks are
    stored compressed (``Sparse24Weight``); every other mask as kept ``block``-sized blocks
    (``BlockSparseWeight``). Returns a :class:`PruneReport`.

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
    sparsity = _check_sparsity(op, sparsity)
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "wanda" and calibration is None:
        raise ValueError(f"{op}: method 'wanda' needs calibration batches, got None")
    skip = tuple(skip)

    def chosen(module: nn.Module, name: str) -> bool:
        return not set(name.split(".")) & set(skip) and (filter_fn is None or filter_fn(name, module))

    layers = chosen_layers(op, find_layers(model, lambda module: type(module) is nn.Linear), chosen)
    names = [layer.name for layer in layers]
    norms = activation_norms(model, names, calibration) if method == "wanda" else {}
    before = memory_footprint(model).total_bytes
    fmt = "2:4" if pattern == "n:m" and (n, m) == (2, 4) else "block"
    pruned = total = 0

    def sparse(layer: Layer) -> nn.Module:
        nonlocal pruned, total
        mask = masks(
            layer.module.weight,
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
        return SparseLinear.from_dense(layer.module, mask, format=fmt, block=block)

    replace_layers(op, layers, sparse)
    record_for_transformers(model)
    return PruneReport(names, pruned / total if total else 0.0, before, memory_footprint(model).total_bytes)
