"""Argument checks and shape handling shared by the low-precision linear ops (int8, int8
weight-only, fp16, int4): x of shape (..., K) runs as a 2-D (M, K) matrix and the output
gets x's leading dimensions back."""

from __future__ import annotations

import math

import torch

from memkern import _validate

FLOAT_DTYPES = _validate.FLOAT_DTYPES


def check_x(op: str, x) -> None:
    _validate.check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., K), got a 0-D tensor")
    _validate.check_dtype(op, "x", x, FLOAT_DTYPES)


def check_bias(op: str, bias, n: int, n_source: str) -> None:
    if bias is None:
        return
    _validate.check_tensor(op, "bias", bias)
    _validate.check_dtype(op, "bias", bias, FLOAT_DTYPES)
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},) (N = {n_source}), got {tuple(bias.shape)}")


def check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of float32, float16, bfloat16 or None; got {out_dtype}")


def check_linear(op: str, x, weight, weight_name: str, weight_dtypes, bias) -> torch.Tensor:
    """Check x, the weight and bias; return x as a 2-D (M, K) view or copy."""
    check_x(op, x)
    _validate.check_tensor(op, weight_name, weight)
    _validate.check_dim(op, weight_name, weight, 2)
    _validate.check_dtype(op, weight_name, weight, weight_dtypes)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"{op}: x's last dimension (K) must equal {weight_name}.shape[1] = {k}, got x of shape {tuple(x.shape)}"
        )
    check_bias(op, bias, n, f"{weight_name}.shape[0]")
    return as_2d(x)


def as_2d(x: torch.Tensor) -> torch.Tensor:
    # A no-op reshape still costs a dispatch (~1 us); most calls pass 2-D x already.
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def check_scale(op: str, w_scale, w_q: torch.Tensor) -> None:
    _validate.check_tensor(op, "w_scale", w_scale)
    _validate.check_dtype(op, "w_scale", w_scale, (torch.float32,))
    n = w_q.shape[0]
    if tuple(w_scale.shape) != (n,):
        raise ValueError(
            f"{op}: w_scale must have shape ({n},) (one scale per output channel, "
            f"N = w_q.shape[0]), got {tuple(w_scale.shape)}"
        )


def restore_leading_dims(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])
