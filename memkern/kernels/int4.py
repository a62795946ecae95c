"""Triton kernels of the 4-bit group-wise weight-only linear layer (memkern/ops/int4.py;
format in memkern/reference_int4.py).

Each program reads packed bytes ``(BLOCK_N, BLOCK_K / 2)``, splits them into the low
nibbles (even k) and the high nibbles (odd k), dequantises both halves with the group's
scale and zero point in registers, and multiplies them with the even and the odd columns
of x: two products per step and no interleaving of the codes. ``BLOCK_K`` divides the
group size, so one scale and one zero point per weight row serve a whole step. A GEMV
kernel runs the decode case (few rows: the weight is streamed once), a tiled GEMM
otherwise. Float32 accumulation; every index is computed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern.kernels.int8 import GEMV_MAX_ROWS
from memkern.kernels.tiles import (
    launch_on_rows,
    launch_on_tiles,
    output_row,
    output_tile,
    scale_and_bias,
    store_row,
    store_tile,
)


@triton.jit
def _dequantized_halves(w_ptr, s_ptr, z_ptr, rn, n_ok, kb, kb_ok, g, stride_wn, stride_sn):
    """The dequantised weights of bytes ``kb`` of rows ``rn``: (even k, odd k), float32."""
    b = tl.load(w_ptr + rn[:, None] * stride_wn + kb[None, :], mask=n_ok[:, None] & kb_ok[None, :], other=0)
    b = b.to(tl.int32)
    s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)[:, None]
    z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)[:, None]
    low = ((b & 15).to(tl.float32) - z) * s
    high = ((b >> 4).to(tl.float32) - z) * s
    return low, high


@triton.jit
def _int4_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    GROUP,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm, rn, m_ok, n_ok = output_tile(M, N, BLOCK_M, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + rb  # byte index; inputs 2 kb (low nibble) and 2 kb + 1 (high)
        even_ok = 2 * kb < K
        odd_ok = 2 * kb + 1 < K
        low, high = _dequantized_halves(w_ptr, s_ptr, z_ptr, rn, n_ok, kb, even_ok, k0 // GROUP, stride_wn, stride_sn)
        x_row = x_ptr + rm[:, None] * stride_xm
        x_even = tl.load(x_row + (2 * kb)[None, :] * stride_xk, mask=m_ok[:, None] & even_ok[None, :], other=0.0)
        x_odd = tl.load(x_row + (2 * kb + 1)[None, :] * stride_xk, mask=m_ok[:, None] & odd_ok[None, :], other=0.0)
        if DOT_FP32:
            # float32 activations: IEEE products (no tf32 rounding of x).
            acc += tl.dot(x_even.to(tl.float32), tl.trans(low), input_precision="ieee")
            acc += tl.dot(x_odd.to(tl.float32), tl.trans(high), input_precision="ieee")
        else:
            # half activations: the dequantised weight rounded to x's type, tensor cores.
            acc += tl.dot(x_even, tl.trans(low).to(x_even.dtype))
            acc += tl.dot(x_odd, tl.trans(high).to(x_odd.dtype))
    out = scale_and_bias(acc, s_ptr, b_ptr, rn, n_ok, False, HAS_BIAS)
    store_tile(out_ptr, out, rm, rn, m_ok, n_ok, stride_om, stride_on)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    GROUP,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_sn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: one row of x against BLOCK_N weight rows, reduced along K in fp32.
    m, rn, n_ok = output_row(N, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + rb
        even_ok = 2 * kb < K
        odd_ok = 2 * kb + 1 < K
        low, high = _dequantized_halves(w_ptr, s_ptr, z_ptr, rn, n_ok, kb, even_ok, k0 // GROUP, stride_wn, stride_sn)
        x_even = tl.load(x_ptr + m * stride_xm + 2 * kb * stride_xk, mask=even_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + m * stride_xm + (2 * kb + 1) * stride_xk, mask=odd_ok, other=0.0).to(tl.float32)
        acc += tl.sum(low * x_even[None, :] + high * x_odd[None, :], axis=1)
    out = scale_and_bias(acc, s_ptr, b_ptr, rn, n_ok, False, HAS_BIAS)
    store_row(out_ptr, out, m, rn, n_ok, stride_om, stride_on)


def _block_k(group_size: int, largest: int) -> int:
    """The largest power of two up to ``largest`` that divides the group size (>= 32, as
    group sizes are multiples of 32)."""
    block = largest
    while group_size % block:
        block //= 2
    return block


def int4_weight_only_linear(x, w_int4, scales, zeros, group_size: int, bias) -> torch.Tensor:
    """memkern.ops.int4_weight_only_linear on 2-D x (its checks done), in x's dtype."""
    M, K = x.shape
    N = w_int4.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    w_int4, scales, zeros = w_int4.contiguous(), scales.contiguous(), zeros.contiguous()
    bias = bias.contiguous() if bias is not None else None
    on_gpu = x.device.type == "cuda"
    args = (x, w_int4, scales, zeros, bias if bias is not None else out, out)
    strides = (x.stride(0), x.stride(1), w_int4.stride(0), scales.stride(0), out.stride(0), out.stride(1))
    if M <= GEMV_MAX_ROWS:
        blocks = (64, _block_k(group_size, 128)) if on_gpu else (32, _block_k(group_size, 64))
        launch_on_rows(_int4_gemv_kernel, (M, N), blocks, *args, N, K, group_size, *strides, HAS_BIAS=bias is not None)
        return out
    # Triton's interpreter (CPU tensors) returns garbage from a bfloat16 tl.dot; float32
    # products of the same values are exact there.
    dot_fp32 = x.dtype == torch.float32 or not on_gpu
    if on_gpu:
        # float32: the FMA units with operand tiles in registers, kept small (see
        # kernels/int8.py's _gemm_blocks on register spills); halves: tensor-core tiles.
        blocks = (64, 64, 32, 4) if dot_fp32 else (128, 128, _block_k(group_size, 64), 8)
    else:
        blocks = 32, 32, 32, 4  # the interpreter: few, larger tiles
    flags = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_fp32)
    launch_on_tiles(_int4_gemm_kernel, (M, N), blocks, *args, M, N, K, group_size, *strides, **flags)
    return out
