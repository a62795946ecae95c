"""Triton kernel of the block-sparse int8 linear layer (memkern/ops/sparse_int8.py).

One program computes a (BM x BN) tile of the output for one block row, visiting only that
block row's kept blocks, as the float block-sparse forward of kernels/sparse.py does:

* W8A8: x quantised per row by the quantize_rowwise kernel; each kept block adds an
  int8 x int8 -> int32 tl.dot (int64 past EXACT_CHUNK_K inputs, exact for any K); the
  epilogue ``acc * (x_scale * w_scale) + bias`` runs in float32 before the one store.
* W8A16: the int8 block widened to x's dtype in registers (exact), float32 accumulation,
  ``acc * w_scale + bias``.

Every index into a tensor is computed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern.kernels.int8 import EXACT_CHUNK_K, dequantize_products
from memkern.kernels.quantize import quantize_rowwise
from memkern.kernels.sparse import _block_m, _block_panel, _block_span, _kept_block, _launch, _mma
from memkern.kernels.tiles import load_tile, matrix_strides, scale_and_bias, store_tile


@triton.jit
def _block_sparse_int8_kernel(
    a_ptr,
    xs_ptr,
    v_ptr,
    crow_ptr,
    col_ptr,
    ws_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_ym,
    stride_yn,
    stride_vb,
    stride_vn,
    stride_vk,
    HAS_BIAS: tl.constexpr,
    WEIGHT_ONLY: tl.constexpr,
    LONG_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m, offs_n, start, end = _block_panel(crow_ptr, BM, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if WEIGHT_ONLY:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    elif LONG_K:
        acc = tl.zeros((BM, BN), dtype=tl.int64)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    for j in range(start, end):  # kept blocks of this block row only
        kk = _block_span(col_ptr, j, BK)
        a = load_tile(a_ptr, offs_m, kk, m_ok, kk < K, stride_am, stride_ak)
        # the block's row offsets in int64: in int32, ptxas spills more on sm_80 (fp32 x)
        w = tl.load(_kept_block(v_ptr, j, stride_vb, stride_vn.to(tl.int64), stride_vk, BN, BK))
        if WEIGHT_ONLY:
            # int8 -> x's dtype is exact; through float32, since Triton's interpreter turns a
            # direct int8 -> bfloat16 cast into garbage (kernels/int8.py).
            acc += _mma(a, tl.trans(w).to(tl.float32).to(a.dtype), IEEE, UPCAST)
        elif LONG_K:
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32).to(tl.int64)  # one block: <= 128 products
        else:
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
    if WEIGHT_ONLY:
        out = scale_and_bias(acc, ws_ptr, bias_ptr, offs_n, n_ok, True, HAS_BIAS)
    else:
        out = dequantize_products(acc, xs_ptr, ws_ptr, offs_m, offs_n, m_ok, n_ok)
        out = scale_and_bias(out, ws_ptr, bias_ptr, offs_n, n_ok, False, HAS_BIAS)
    store_tile(y_ptr, out, offs_m, offs_n, m_ok, n_ok, stride_ym, stride_yn)


def block_sparse_int8_linear(x, values, scales, crow, col, bias, weight_only: bool) -> torch.Tensor:
    """``x @ (W_q * scales[:, None]).T + bias`` over the kept int8 blocks, in x's dtype."""
    m, k = x.shape
    n = scales.shape[0]
    _, bn, bk = values.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if weight_only:
        a, x_scale = x, scales  # x_scale is not read
    else:
        a, x_scale = quantize_rowwise(x)
    bm = _block_m(m)
    grid = (triton.cdiv(m, bm), crow.numel() - 1)
    bias_or_y = bias.contiguous() if bias is not None else y  # y is never read as a bias
    args = (a, x_scale, values, crow, col, scales.contiguous(), bias_or_y, y, m, n, k, *matrix_strides(a, y))
    flags = dict(HAS_BIAS=bias is not None, WEIGHT_ONLY=weight_only, LONG_K=-(-k // bk) * bk > EXACT_CHUNK_K)
    _launch(_block_sparse_int8_kernel, grid, (bm, bn, bk), x.dtype, *args, *values.stride(), **flags)
    return y
