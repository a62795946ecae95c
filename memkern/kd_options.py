"""The scalar options of the distillation losses and their checks: a leaf module, imported by
the ops (memkern.ops.kd, memkern.ops.kd_ops), the kernels (memkern.kernels.kd,
memkern.kernels.kd_chunks) and the modules alike."""

from __future__ import annotations

import math
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
# The keyword options of every distillation loss and module, in their signatures' order, and
# those of kd_loss / linear_kd_loss besides (normalizer, a per-call value, is in neither).
CORE_OPTIONS = ("alpha", "temperature", "divergence", "beta", "ignore_index", "reduction", "soft_loss_scale")
_SCALES, _CAPS = ("student_logit_scale", "teacher_logit_scale"), ("student_softcap", "teacher_softcap")
EXTRA_OPTIONS = (*_SCALES, *_CAPS, "shared_vocab", "chunk_size", "return_components")


class KDOptions(reference.RowOptions):
    """The scalar options of a call, checked: the fields of the per-row references
    (memkern.reference.RowOptions); ``kd_scale`` is T^2 or 1."""

    __slots__ = ()

    @property
    def divergence_id(self) -> int:
        return DIVERGENCES.index(self.divergence)

    def divergence_alone(self) -> KDOptions:
        """alpha 0 and k 1: a kernel's loss is then D itself and its row weight D's weight
        (how the options path gets the two terms apart from the per-row kernels)."""
        return KDOptions(0.0, self.temperature, self.divergence, self.beta, self.ignore_index, 1.0)

    def reference_options(self) -> dict:
        """The keyword arguments of reference.kd_loss_rows and kd_loss_rows_grad."""
        return self._asdict()


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


# -- the options that reshape the objective (docs/numerics.md, "Distillation options") -------
@dataclass(frozen=True)
class KDExtras:
    """Logit transforms, shared vocabulary, chunk size and whether the terms come back apart,
    checked. In the operators' schemas: a scale of 1.0 and a cap, shared_vocab or chunk_size
    of 0 mean off / the default."""

    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float = 0.0
    teacher_softcap: float = 0.0
    shared_vocab: int = 0
    chunk_size: int = 0
    return_components: bool = False

    @property
    def transform(self) -> list[float]:
        """The four transform numbers as the operators take them."""
        return [self.student_logit_scale, self.student_softcap, self.teacher_logit_scale, self.teacher_softcap]

    @property
    def needs_options_path(self) -> bool:
        """Whether a call must run the operators that implement these options."""
        return self != KDExtras()


def _positive_finite(op: str, name: str, value, *, what: str = "a positive finite float"):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be {what} or None, got {type(value).__name__}")
    if not (0.0 < value < math.inf):  # comparisons only: NaN fails
        raise ValueError(f"{op}: {name} must be {what} or None, got {value}")
    return value


def _positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be a positive int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be a positive int or None, got {value}")
    return value


def check_extras(op: str, given: dict) -> KDExtras:
    """``given``: a call's EXTRA_OPTIONS by name (None, or False for return_components: off)."""
    scales = {name: 1.0 if given[name] is None else float(_positive_finite(op, name, given[name])) for name in _SCALES}
    caps = {name: 0.0 if given[name] is None else float(_positive_finite(op, name, given[name])) for name in _CAPS}
    if not isinstance(given["return_components"], bool):
        raise TypeError(f"{op}: return_components must be a bool, got {type(given['return_components']).__name__}")
    counts = {
        name: 0 if given[name] is None else _positive_int(op, name, given[name])
        for name in ("shared_vocab", "chunk_size")
    }
    return KDExtras(**scales, **caps, **counts, return_components=given["return_components"])


def check_vocabularies(op: str, student_vocab: int, teacher_vocab: int, shared_vocab: int, what: str) -> None:
    """Same vocabulary size, or shared_vocab (n > 0) within both. ``what`` names the tensors."""
    if shared_vocab == 0:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"{op}: student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab} "
                f"({what}); memkern does not pad or truncate vocabularies (pass shared_vocab=n to distil "
                "over the first n entries of both)"
            )
        return
    if shared_vocab > min(student_vocab, teacher_vocab):
        raise ValueError(
            f"{op}: shared_vocab must be <= both vocabulary sizes (student {student_vocab}, teacher "
            f"{teacher_vocab}), got {shared_vocab}"
        )


def check_normalizer(op: str, normalizer, reduction: str):
    """None, a positive finite number, or a 0-dim real tensor on any device. A tensor off the
    CPU is checked on its device (no host sync): a bad value fails there, asynchronously."""
    if normalizer is None:
        return None
    if reduction == "none":
        raise ValueError(
            f"{op}: normalizer divides the summed loss, so it needs reduction='mean' or 'sum'; got reduction='none'"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(
                f"{op}: normalizer must be a number or a 0-dim real tensor, got a "
                f"{_validate.dtype_name(normalizer.dtype)} tensor of shape {tuple(normalizer.shape)}"
            )
        if normalizer.requires_grad:
            raise ValueError(f"{op}: normalizer must not require grad (it is a count, not a parameter)")
        if normalizer.device.type == "cpu" and not torch.compiler.is_compiling():
            value = normalizer.item()
            if not (0.0 < value < math.inf):
                raise ValueError(f"{op}: normalizer must be positive and finite, got {value}")
        else:
            ok = (normalizer > 0) & torch.isfinite(normalizer)  # in its own dtype: MPS has no float64
            torch._assert_async(ok, f"{op}: normalizer must be positive and finite")
        return normalizer
    return _positive_finite(op, "normalizer", normalizer, what="a positive finite number, a 0-dim tensor")


def divide_by_normalizer(loss: torch.Tensor, normalizer) -> torch.Tensor:
    """sum_i l_i / normalizer (loss holds the sum); autograd divides the gradients too."""
    if isinstance(normalizer, torch.Tensor):
        return loss / normalizer.to(device=loss.device, dtype=loss.dtype)
    return loss / float(normalizer)
