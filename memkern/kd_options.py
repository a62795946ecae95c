"""The scalar options of the distillation losses and their checks: a leaf module, imported by
the ops (memkern.ops.kd, memkern.ops.kd_ops), the kernels (memkern.kernels.kd,
memkern.kernels.kd_chunks) and the modules alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memkern import _validate, reference

DIVERGENCES = reference.KD_DIVERGENCES
REDUCTIONS = reference.KD_REDUCTIONS
SOFT_LOSS_SCALES = ("t2", "none")
KD_DTYPES = (*_validate.FLOAT_DTYPES, torch.float64)  # float64 for gradcheck and oracles
# Temperatures T accepted. Above 100, the float32 statistics lose the soft term: the
# softened distributions differ by O(logit gap / T), so KL(p || q) ~ (gap / T)^2 comes out of
# a cancellation between terms ~gap / T, and T^2 * KL of N(0, 3^2) logits was off by 1e-4
# relative at T = 100, 1e-2 at 1e3 and 70% at 1e4 (every backend, against float64). Below
# 1e-4, exp(-gap / T) underflows float32 for every gap above 0.01, so both distributions are
# one-hot and the T^2-scaled soft term vanishes below float32's resolution.
TEMPERATURE_RANGE = (1e-4, 100.0)


@dataclass(frozen=True)
class KDOptions:
    """The scalar options of a call, checked. ``kd_scale`` is T^2 or 1."""

    alpha: float
    temperature: float
    divergence: str
    beta: float
    ignore_index: int
    kd_scale: float

    @property
    def divergence_id(self) -> int:
        return DIVERGENCES.index(self.divergence)

    def reference_options(self) -> dict:
        """The keyword arguments of reference.kd_loss_rows and kd_loss_rows_grad."""
        return dict(
            alpha=self.alpha,
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            ignore_index=self.ignore_index,
            kd_scale=self.kd_scale,
        )


def check_options(
    op: str,
    *,
    has_labels: bool,
    alpha: float,
    temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    soft_loss_scale: str,
) -> KDOptions:
    for name, value in (("alpha", alpha), ("temperature", temperature), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{op}: alpha must be in [0, 1], got {alpha}")
    low, high = TEMPERATURE_RANGE
    if not (low <= temperature <= high):  # comparisons only: NaN fails, and a SymFloat traces
        raise ValueError(
            f"{op}: temperature must be in [{low:g}, {high:g}] (where float32 statistics "
            f"stay meaningful), got {temperature}"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"{op}: divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if divergence == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(
            f"{op}: beta must be in (0, 1) for divergence='jsd' (at 0 and 1 the "
            f"generalised JSD is identically 0), got {beta}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if soft_loss_scale not in SOFT_LOSS_SCALES:
        raise ValueError(f"{op}: soft_loss_scale must be 't2' or 'none', got {soft_loss_scale!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not has_labels and alpha != 0.0:
        raise ValueError(f"{op}: labels=None means the soft loss alone, so alpha must be 0; got alpha={alpha}")
    kd_scale = float(temperature) ** 2 if soft_loss_scale == "t2" else 1.0
    return KDOptions(float(alpha), float(temperature), divergence, float(beta), ignore_index, kd_scale)


def check_labels(
    op: str, labels: torch.Tensor | None, lead: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    if labels is None:
        return None
    _validate.check_tensor(op, "labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must have dtype int64 or int32; got {_validate.dtype_name(labels.dtype)}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"{op}: labels must have shape {lead} (the rows of the logits), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels must be on {device}, got {labels.device}")
    return labels.long()


def check_label_range(op: str, labels: torch.Tensor | None, vocab: int, ignore_index: int) -> None:
    """Labels must be ignore_index or in [0, vocab). Runs inside the operator (it reads
    values, which torch.compile cannot trace), before any kernel."""
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{op}: labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {first} ({int(bad.sum())} such labels)"
        )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_scale(labels: torch.Tensor | None, rows: int, opts: KDOptions) -> tuple[int, float]:
    """(N, 1 / max(N, 1)) with N the rows that count (a host sync on GPUs, once a call)."""
    n = rows if labels is None else int((labels != opts.ignore_index).sum())
    return n, 1.0 / max(n, 1)


def kept_rows(labels: torch.Tensor | None, opts: KDOptions) -> torch.Tensor | None:
    """Indices of the rows whose label counts, or None when every row counts. The fused-linear
    paths run only these rows: padding is often a large share of a batch, and an ignored row
    contributes nothing (at 10% padding this saves 10% of the matmuls)."""
    if labels is None:
        return None
    counts = labels != opts.ignore_index
    return None if bool(counts.all()) else counts.nonzero().squeeze(1)
