"""SparseGPT (Frantar & Alistarh, 2023, Algorithm 1): prune a linear layer and update the
weights it keeps, so that its outputs on calibration inputs change as little as possible.

For a layer ``y = x W^T`` and calibration inputs ``X`` (``N`` tokens), the layer-wise loss
``||X W^T - X W'^T||^2`` has the Hessian ``H = 2/N X^T X`` (``in x in``), the same for every
output row. Columns are visited left to right; pruning column ``j`` of a row (or keeping
it) and moving its error onto the columns right of it is the optimal brain surgeon (OBS)
update with the inverse Hessian of the columns not yet visited. Those inverses are the rows
of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): pruning ``w_j`` adds
``-(w_j / U_jj) * U_j,k`` to every ``w_k`` with ``k > j``. The updates inside a block of
``blocksize`` columns are applied at once, and those to the columns right of the block as
one matrix product when the block is done (lazy batch updates).

The saliency of a weight is ``w_j^2 / U_jj^2``, the OBS loss of pruning it; the mask is
chosen from it, with the weights as updated so far, at the start of every column block
(unstructured and block patterns) or of every group of ``m`` columns (``n:m``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from memkern import _validate
from memkern._pruning import call_model, check_pattern, check_sparsity, lowest, lowest_blocks
from memkern._replace import Layer

BLOCKSIZE = 128
PERCDAMP = 0.01


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype SparseGPT works in for ``weight``: float64 for float64 weights, else float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class Hessian:
    """Accumulates ``H = 2/N X^T X`` over the inputs given to :meth:`add` (``N`` tokens:
    every leading dimension of an input counts as tokens)."""

    def __init__(self, in_features: int, device: torch.device, dtype: torch.dtype) -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, self.in_features).to(device=self.sum.device, dtype=self.sum.dtype)
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        """``H``, in place of the running sum (it is the layer's largest buffer)."""
        return self.sum.mul_(2.0 / self.tokens) if self.tokens else self.sum


def hessian_of_inputs(op: str, calibration: object, weight: torch.Tensor) -> torch.Tensor:
    """``H`` of a layer with ``weight`` from ``calibration``: a tensor of its inputs
    ``(..., in_features)`` or an iterable of such tensors."""
    if calibration is None:
        raise ValueError(f"{op}: method 'sparsegpt' needs calibration inputs (..., {weight.shape[1]}), got None")
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    acc = Hessian(weight.shape[1], weight.device, compute_dtype(weight))
    for i, x in enumerate(batches):
        name = "calibration" if isinstance(calibration, torch.Tensor) else f"calibration[{i}]"
        _validate.check_tensor(op, name, x)
        if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"{op}: {name} must have in_features={weight.shape[1]} as its last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        acc.add(x)
    if acc.tokens == 0:
        raise ValueError(f"{op}: calibration holds no inputs (0 tokens)")
    return acc.result()


def _check_options(op: str, blocksize: object, percdamp: object) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{op}: blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"{op}: percdamp must be a number >= 0, got {percdamp!r}")


def _inverse_hessian_factor(op: str, hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of the dampened ``H^-1``; zeroes ``weight``'s dead columns.

    An input that is zero on every calibration token (``H_jj = 0``) says nothing about its
    weights: as in the reference implementation its diagonal becomes 1 and its weights 0
    (they contribute nothing to the calibration outputs). Dampening by
    ``percdamp * mean(diag(H))`` makes a rank-deficient ``H`` (fewer tokens than inputs,
    repeated inputs) invertible."""
    diag = hessian.diagonal()
    dead = diag == 0
    diag[dead] = 1
    weight[:, dead] = 0
    diag.add_(percdamp * diag.mean())
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info):
        raise ValueError(
            f"{op}: the calibration Hessian is not positive definite with percdamp={percdamp:g} "
            f"(leading minor {int(info)} fails); use a larger percdamp or more calibration tokens"
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    *,
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] = (64, 64),
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    overwrite_hessian: bool = False,
    op: str = "sparsegpt.prune_weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight. Returns ``(new_weight, keep_mask)``: the updated weight in
    ``weight``'s dtype, exactly 0 where ``keep_mask`` is False; ``weight`` is not changed.

    Args:
        weight: ``(out_features, in_features)`` float tensor.
        hessian: ``(in_features, in_features)`` ``H = 2/N X^T X`` of the layer's inputs
            (:class:`Hessian`, :func:`hessian_of_inputs`). ``overwrite_hessian=True`` lets
            the call use it as scratch space instead of copying it.
        sparsity, pattern, n, m, block: as :func:`memkern.prune.masks`.
        blocksize: columns per lazy-update block; rounded up to a multiple of ``m``
            (``n:m``) or of the block's width (``block``) so that no group or tile is split.
        percdamp: dampening ``lambda = percdamp * mean(diag(H))`` added to ``H``'s diagonal.

    Exactness: unstructured prunes ``round(sparsity * numel)`` weights in all, the lowest
    saliencies of each column block over all its rows (the block's share, rounded so the
    shares add up); ``n:m`` prunes ``m - n`` of every ``m`` columns of each row; ``block``
    prunes whole tiles in each column block, chosen by their mean saliency, as many as bring
    the weights pruned so far closest to ``sparsity`` of the columns visited so far, so the
    whole matrix comes within half a tile of the request.
    """
    _validate.check_tensor(op, "weight", weight)
    _validate.check_dim(op, "weight", weight, 2)
    _validate.check_dtype(op, "weight", weight, (*_validate.FLOAT_DTYPES, torch.float64))
    sparsity = check_sparsity(op, sparsity)
    block = check_pattern(op, weight.shape[1], sparsity, pattern, n, m, block)
    _check_options(op, blocksize, percdamp)
    rows, cols = weight.shape
    _validate.check_tensor(op, "hessian", hessian)
    if hessian.shape != (cols, cols):
        raise ValueError(f"{op}: hessian must have shape ({cols}, {cols}), got {tuple(hessian.shape)}")
    if weight.numel() == 0:
        return weight.detach().clone(), torch.ones_like(weight, dtype=torch.bool)
    dtype = compute_dtype(weight)
    w = weight.detach().to(dtype=dtype, copy=True)
    h = hessian.detach().to(device=w.device, dtype=dtype, copy=not overwrite_hessian)
    if not torch.isfinite(h).all():
        raise ValueError(f"{op}: hessian must be finite (are the calibration inputs finite?)")
    u = _inverse_hessian_factor(op, h, w, float(percdamp))
    del h
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    unit = m if pattern == "n:m" else block[1] if pattern == "block" else 1
    width = -(-blocksize // unit) * unit
    pruned_so_far = 0
    for start in range(0, cols, width):
        end = min(start + width, cols)
        w1, u1 = w[:, start:end], u[start:end, start:end]  # views: updated in place
        d = u1.diagonal()
        saliency = w1.square() / d.square()
        if pattern == "unstructured":
            count = round(sparsity * (rows * end)) - round(sparsity * (rows * start))
            pruned = lowest(saliency.reshape(1, -1), count).reshape(w1.shape)
        elif pattern == "block":
            pruned = ~lowest_blocks(saliency.to(torch.float64), block, sparsity * rows * end - pruned_so_far)
            pruned_so_far += int(pruned.sum())
        else:
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        errors = torch.zeros_like(w1)
        for j in range(end - start):
            if pattern == "n:m" and j % m == 0:
                group = w1[:, j : j + m].square() / d[j : j + m].square()
                pruned[:, j : j + m] = lowest(group, m - n)
            error = torch.where(pruned[:, j], w1[:, j], 0) / d[j]
            w1[:, j:] -= error[:, None] * u1[j, j:][None, :]
            w1[:, j].masked_fill_(pruned[:, j], 0)  # exactly 0, not w - (w / d) * d
            errors[:, j] = error
        w[:, end:] -= errors @ u[start:end, end:]
        keep[:, start:end] = ~pruned
    return w.to(weight.dtype), keep


# -- model level --------------------------------------------------------------------------------
def forward_order(model: nn.Module, layers: Sequence[Layer], calibration: Sequence[Any]) -> list[Layer]:
    """``layers`` in the order the model's forward first calls them on the first calibration
    batch; layers it does not call follow in module order."""
    seen: list[int] = []
    hooks = [
        layer.module.register_forward_hook(lambda module, inputs, output: seen.append(id(module))) for layer in layers
    ]
    try:
        with torch.no_grad():
            if calibration:
                call_model(model, calibration[0])
    finally:
        for hook in hooks:
            hook.remove()
    rank = {key: i for i, key in reversed(list(enumerate(seen)))}
    return sorted(layers, key=lambda layer: rank.get(id(layer.module), len(seen)))


@contextlib.contextmanager
def swapped_in(done: Sequence[tuple[Layer, nn.Module]]) -> Iterator[None]:
    """Within the block, every layer of ``done`` is replaced by its pruned module (so later
    layers are calibrated on pruned outputs); the model is restored on leaving, whatever happens."""
    try:
        for layer, pruned in done:
            for parent, attr in layer.slots:
                setattr(parent, attr, pruned)
        yield
    finally:
        for layer, _ in done:
            for parent, attr in layer.slots:
                setattr(parent, attr, layer.module)


def layer_hessian(op: str, model: nn.Module, layer: Layer, calibration: Iterable[Any]) -> torch.Tensor:
    """``H`` of ``layer`` from the inputs of all its calls while ``model`` runs ``calibration``."""
    weight = layer.module.weight
    acc = Hessian(weight.shape[1], weight.device, compute_dtype(weight))
    hook = layer.module.register_forward_hook(lambda module, inputs, output: acc.add(inputs[0]))
    try:
        with torch.no_grad():
            for batch in calibration:
                call_model(model, batch)
    finally:
        hook.remove()
    if acc.tokens == 0:
        raise ValueError(f"{op}: calibration never reached layer {layer.describe()}")
    return acc.result()


def with_weight(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` and ``linear``'s bias (shared), allocating nothing else."""
    stand_in = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    stand_in.weight = nn.Parameter(weight, requires_grad=False)
    stand_in.bias = linear.bias
    return stand_in


def prune_layer(
    op: str,
    model: nn.Module,
    layer: Layer,
    calibration: Iterable[Any],
    done: Sequence[tuple[Layer, nn.Module]],
    sparsity: float,
    pattern: str,
    **options: Any,
) -> tuple[nn.Linear, torch.Tensor]:
    """SparseGPT on ``layer`` of ``model``, calibrated with the layers of ``done`` already
    pruned: the layer with its updated weight (``layer.module`` is not changed) and its
    keep-mask. ``options`` are :func:`prune_weight`'s."""
    with swapped_in(done):
        hessian = layer_hessian(op, model, layer, calibration)
    weight, mask = prune_weight(layer.module.weight, hessian, sparsity, pattern, overwrite_hessian=True, **options)
    return with_weight(layer.module, weight), mask
