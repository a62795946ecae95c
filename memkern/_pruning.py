"""What every pruning method shares: the argument checks of a sparsity pattern, choosing
which weights a mask prunes from their scores (the lowest per row, the lowest-scoring whole
blocks) and running calibration batches through a model."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from memkern.ops.sparse_format import check_block

PATTERNS = ("unstructured", "n:m", "block")


def check_sparsity(op: str, sparsity: object) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"{op}: sparsity must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


def check_pattern(op: str, in_features: int, sparsity: float, pattern: object, n: object, m: object, block: object):
    """Raise a clear error unless ``pattern`` (with its ``n``, ``m`` or ``block``) can prune
    ``sparsity`` of a weight with ``in_features`` columns; returns the checked block."""
    if pattern not in PATTERNS:
        raise ValueError(f"{op}: pattern must be one of {', '.join(PATTERNS)}; got {pattern!r}")
    if pattern == "n:m":
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
            raise ValueError(f"{op}: n:m needs integers 0 < n <= m, got n={n!r}, m={m!r}")
        if in_features % m:
            raise ValueError(f"{op}: n:m with m={m} needs in_features divisible by {m}, got {in_features}")
        if not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
            raise ValueError(
                f"{op}: pattern {n}:{m} prunes exactly {1 - n / m:g} of the weights; got sparsity {sparsity:g}"
            )
    return check_block(op, block) if pattern == "block" else None


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (last dim) of the ``count`` lowest scores per row; ties go to the lower index."""
    order = torch.argsort(scores, dim=-1, stable=True)
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned.scatter_(-1, order[..., :count], True)
    return pruned


def lowest_blocks(score: torch.Tensor, block: tuple[int, int], pruned_weights: float) -> torch.Tensor:
    """Bool keep-mask of ``score`` (2-D) that prunes whole ``block``-sized tiles, lowest mean
    score first, as many as bring the pruned weights closest to ``pruned_weights``.

    Blocks cut by the matrix edge hold fewer weights. Scored by their sum they would go
    first and count little (a 70 x 50 weight in 32 x 16 blocks at 0.5 lost 12% of its
    weights), so blocks are scored by their mean over the weights they hold and counted by
    those weights. Ties in score prune the lower index first; ties in distance prune fewer.
    """
    rows_total, cols_total = score.shape
    bn, bk = block
    nbr, nbc = -(-rows_total // bn), -(-cols_total // bk)
    padded = score.new_zeros(nbr * bn, nbc * bk)
    padded[:rows_total, :cols_total] = score
    rows = (rows_total - torch.arange(nbr, device=score.device) * bn).clamp(max=bn)
    cols = (cols_total - torch.arange(nbc, device=score.device) * bk).clamp(max=bk)
    held = (rows[:, None] * cols[None, :]).reshape(-1)
    block_score = padded.reshape(nbr, bn, nbc, bk).sum(dim=(1, 3)).reshape(-1) / held
    order = torch.argsort(block_score, stable=True)
    cumulative = torch.cat([held.new_zeros(1), held[order].cumsum(0)]).to(torch.float64)
    count = int((cumulative - pruned_weights).abs().argmin())  # first minimum: ties prune fewer
    pruned = torch.zeros(nbr * nbc, dtype=torch.bool, device=score.device)
    pruned[order[:count]] = True
    keep = (~pruned).reshape(nbr, nbc).repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    return keep[:rows_total, :cols_total].contiguous()


def call_model(model: nn.Module, batch: Any) -> None:
    """Run one calibration batch: a tensor, a tuple of positional args or a dict of keyword args."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)
