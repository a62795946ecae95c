"""Argument checks shared by every op: clear errors naming the argument, the expected and
the actual value, raised before any kernel runs."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def check_tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dim(op: str, name: str, t: torch.Tensor, dims: int | Iterable[int]) -> None:
    allowed = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{op}: {name} must be {want}, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype]) -> None:
    allowed = tuple(dtypes)
    if t.dtype not in allowed:
        want = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {want}; got {dtype_name(t.dtype)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
