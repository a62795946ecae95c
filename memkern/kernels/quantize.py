"""Triton kernel for symmetric absmax int8 quantisation per row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A constexpr: the compiler refuses a kernel that reads a plain Python float global (the
# interpreter does not mind, so only compiling for a GPU shows it).
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _round_half_even(v):
    # libdevice.rint has no interpreter implementation, so round half to even is written
    # out: floor, then break exact .5 ties towards the even neighbour. Exact for |v| < 2^23.
    f = tl.floor(v)
    frac = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & f_is_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _quantize_rowwise_kernel(x_ptr, q_ptr, scale_ptr, n_cols, stride_xr, stride_xc, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    q_row = q_ptr + row * n_cols

    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        v = tl.load(x_row + cols * stride_xc, mask=cols < n_cols, other=0.0).to(tl.float32)
        a = tl.abs(v)
        nonfinite = nonfinite | (~(a <= FLT_MAX)).to(tl.int32)  # inf or NaN
        absmax = tl.maximum(absmax, a)
    bad = tl.max(nonfinite, axis=0) > 0
    scale = tl.math.div_rn(tl.max(absmax, axis=0), 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(scale_ptr + row, tl.where(bad, float("nan"), scale))
    scale = tl.where(bad, 1.0, scale)

    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < n_cols
        v = tl.load(x_row + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(bad, 0.0, v)  # a non-finite row stores q = 0 (its scale is NaN)
        q = _round_half_even(tl.math.div_rn(v, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + cols, q.to(tl.int8), mask=mask)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    # One program per row; a 1024-wide block keeps rows of LLM width (4096) to 4 trips. The
    # interpreter (CPU tensors) pays per operation, not per element: 16384-wide blocks.
    widest = 1024 if x.device.type == "cuda" else 16384
    block = min(widest, max(16, triton.next_power_of_2(cols)))
    _quantize_rowwise_kernel[(rows,)](x, q, scale, cols, x.stride(0), x.stride(1), BLOCK=block)
    return q, scale
