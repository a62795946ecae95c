"""Triton kernels of the low-precision linear layers.

* ``int8_linear``: activations quantised per row by the quantize_rowwise kernel, then an
  int8 x int8 -> int32 GEMM (int64 past EXACT_CHUNK_K inputs) whose epilogue
  ``acc * x_scale[row] * w_scale[col] + bias`` runs in float32 in registers before the
  one store.
* ``scaled_linear``: ``x @ w.T * w_scale + bias`` for an int8 (W8A16) or half-precision
  weight, widened inside the kernel, float32 accumulation; a GEMV kernel for the decode
  case (few rows: the weight is streamed once) and a tiled GEMM otherwise.

Every index into a tensor is computed in int64, so tensors past 2^31 elements are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern.kernels.quantize import quantize_rowwise
from memkern.kernels.tiles import (
    launch_on_rows,
    launch_on_tiles,
    load_tile,
    matrix_strides,
    output_row,
    output_tile,
    scale_and_bias,
    store_row,
    store_tile,
)

# Rows of x up to which scaled_linear runs the GEMV kernel: tl.dot needs tiles of at
# least 16 rows, so below that the GEMM would compute mostly padding.
GEMV_MAX_ROWS = 8

# The longest stretch of K whose int8 x int8 products always sum inside int32: quantised
# activations are at most 127 in magnitude and weights at most 128 (-128 is accepted), and
# 2^17 * 127 * 128 < 2^31. Longer rows add int32 partial sums over stretches of this length
# in int64, so the exact sum rounds once to float32, as in the reference. The same length
# as kExactChunkK in csrc/cpu/int8_linear.cpp and csrc/cuda/int8_gemm.cuh.
EXACT_CHUNK_K = 1 << 17


@triton.jit
def _operand_tiles(
    x_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K: tl.constexpr
):
    """The tiles x[rm, k0:k0 + BLOCK_K] and w[rn, k0:k0 + BLOCK_K].T, zero past M, N and K."""
    kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    k_ok = kk < K
    a = load_tile(x_ptr, rm, kk, m_ok, k_ok, stride_xm, stride_xk)
    return a, load_tile(w_ptr, kk, rn, k_ok, n_ok, stride_wk, stride_wn)


@triton.jit
def _int8_block_product(
    xq_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K: tl.constexpr
):
    # x_q[rm, k0:k0 + BLOCK_K] @ w[rn, k0:k0 + BLOCK_K].T in int32, zero past M, N and K.
    a, b = _operand_tiles(xq_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K)
    return tl.dot(a, b, out_dtype=tl.int32)


@triton.jit
def dequantize_products(acc, xs_ptr, ws_ptr, rm, rn, m_ok, n_ok):
    """The int8 x int8 sums ``acc`` of rows ``rm``, columns ``rn`` times x_scale[rm] and
    w_scale[rn], in float32, the two scales multiplied first (as in reference.py)."""
    xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    return acc.to(tl.float32) * (xs[:, None] * ws[None, :])


@triton.jit
def _int8_gemm_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    LONG_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_K: tl.constexpr,
):
    rm, rn, m_ok, n_ok = output_tile(M, N, BLOCK_M, BLOCK_N)
    if LONG_K:
        # K > CHUNK_K: int32 sums over CHUNK_K (a multiple of BLOCK_K), added in int64.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            part += _int8_block_product(
                xq_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K
            )
            if (k0 + BLOCK_K) % CHUNK_K == 0:
                acc += part.to(tl.int64)
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc += part.to(tl.int64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            acc += _int8_block_product(
                xq_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K
            )
    out = dequantize_products(acc, xs_ptr, ws_ptr, rm, rn, m_ok, n_ok)
    out = scale_and_bias(out, ws_ptr, b_ptr, rn, n_ok, False, HAS_BIAS)
    store_tile(out_ptr, out, rm, rn, m_ok, n_ok, stride_om, stride_on)


@triton.jit
def _scaled_gemm_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm, rn, m_ok, n_ok = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, b = _operand_tiles(
            x_ptr, w_ptr, rm, rn, m_ok, n_ok, k0, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K
        )
        if DOT_FP32:
            # float32 activations, or a half weight of the other half type: widen both
            # (IEEE fp32 products, no tf32 rounding of x).
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            # int8 and same-type half weights convert exactly to x's half type: tensor cores.
            # The detour through fp32 is exact and costs nothing on the GPU; Triton's
            # interpreter turns a direct int8 -> bfloat16 cast into garbage.
            acc += tl.dot(a, b.to(tl.float32).to(a.dtype))
    out = scale_and_bias(acc, ws_ptr, b_ptr, rn, n_ok, HAS_SCALE, HAS_BIAS)
    store_tile(out_ptr, out, rm, rn, m_ok, n_ok, stride_om, stride_on)


@triton.jit
def _scaled_gemv_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: one row of x against BLOCK_N weight rows, reduced along K in fp32.
    m, rn, n_ok = output_row(N, BLOCK_N)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + kk[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0
        ).to(tl.float32)
        acc += tl.sum(w * a[None, :], axis=1)
    out = scale_and_bias(acc, ws_ptr, b_ptr, rn, n_ok, HAS_SCALE, HAS_BIAS)
    store_row(out_ptr, out, m, rn, n_ok, stride_om, stride_on)


def _gemm_blocks(
    device: torch.device, k_block: int, fp32_x: bool = False, long_k: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    if device.type == "cuda":
        if fp32_x:
            # fp32 activations make fp32 "ieee" products, on the FMA units with operand
            # tiles in registers: at 128 x 128 x 32 (8 warps) ptxas spilled ~10 KB a thread
            # on sm_80 and sm_90, at 64 x 64 x 32 ~0.6 KB; 64 x 64 x 16 (4 warps) takes ~230
            # registers and spills nothing (bench/NOTES.md, Triton kernels compiled for
            # sm_80 / sm_90). Half activations with a weight of the other half type keep
            # the large tiles: 250 registers, no spill.
            return 64, 64, 16, 4
        if long_k:
            # An int64 sum beside the int32 one: at 128 x 128 x 128 ptxas took 255
            # registers and spilled 592 bytes a thread on sm_90 (Triton 3.9); at 64 x 128,
            # 187 registers (sm_80: 254) and no spill.
            return 64, 128, k_block, 8
        return 128, 128, k_block, 8
    # The interpreter runs each program as numpy array operations: few, larger tiles are
    # quicker than many small ones. Rows longer than EXACT_CHUNK_K step K 4096 at a time in
    # the smallest tiles tl.dot takes: 32 x 32 x 32 took ~30 s for one 1 x 140,000 x 2
    # int8_linear, 16 x 16 x 4096 ~2 s.
    return (16, 16, 4096, 4) if long_k else (32, 32, 32, 4)


def int8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    M, K = x.shape
    N = w_q.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    x_q, x_scale = quantize_rowwise(x)
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    long_k = K > EXACT_CHUNK_K
    blocks = _gemm_blocks(x.device, 128, long_k=long_k)
    assert EXACT_CHUNK_K % blocks[2] == 0, "int32 partial sums must end on a block boundary"
    args = (x_q, x_scale, w_q, w_scale, bias if bias is not None else w_scale, out, M, N, K)
    flags = dict(HAS_BIAS=bias is not None, LONG_K=long_k, CHUNK_K=EXACT_CHUNK_K)
    launch_on_tiles(_int8_gemm_kernel, (M, N), blocks, *args, *matrix_strides(x_q, w_q, out), **flags)
    return out


def scaled_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ w.T (* w_scale) (+ bias)`` in float32, returned in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    w_scale = w_scale.contiguous() if w_scale is not None else None
    bias = bias.contiguous() if bias is not None else None
    dummy = out  # never read: the HAS_* flags are off
    common = dict(HAS_SCALE=w_scale is not None, HAS_BIAS=bias is not None)
    args = (x, w, w_scale if w_scale is not None else dummy, bias if bias is not None else dummy, out)
    if M <= GEMV_MAX_ROWS:
        blocks = (64, 128) if x.device.type == "cuda" else (32, 64)
        launch_on_rows(_scaled_gemv_kernel, (M, N), blocks, *args, N, K, *matrix_strides(x, w, out), **common)
        return out
    dot_fp32 = x.dtype == torch.float32 or (w.dtype != torch.int8 and w.dtype != x.dtype)
    # Triton's interpreter (CPU tensors) returns garbage from a bfloat16 tl.dot; widening
    # to fp32 computes the same products exactly (a bf16 x bf16 product fits fp32).
    dot_fp32 = dot_fp32 or (x.device.type != "cuda" and x.dtype == torch.bfloat16)
    blocks = _gemm_blocks(x.device, 32 if dot_fp32 else 64, x.dtype == torch.float32)
    strides = matrix_strides(x, w, out)
    launch_on_tiles(_scaled_gemm_kernel, (M, N), blocks, *args, M, N, K, *strides, **common, DOT_FP32=dot_fp32)
    return out
