"""Triton kernels for block-sparse and 2:4 weights: products that read only kept blocks
(block-sparse) or expand compressed 2:4 weights in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern.kernels.tiles import load_tile, matrix_strides, output_tile, scale_and_bias, store_tile

# Rows of x per program: 64 keeps a (64 x BN) fp32 accumulator in registers for BN <= 128.
BLOCK_M = 64


def _precision(dtype: torch.dtype) -> dict[str, bool]:
    # float32 products stay float32 (the fp32 tolerance is 1e-5; tf32 would give ~3e-4).
    # Triton 3.9's interpreter returns garbage from tl.dot on bfloat16 tiles (errors of
    # 1e10 on a 16x16 product), so under TRITON_INTERPRET=1 bf16 tiles are widened to fp32
    # first; compiled kernels keep bf16 tensor-core products.
    from memkern import _library

    return {"IEEE": dtype == torch.float32, "UPCAST": dtype == torch.bfloat16 and _library.triton_interpret()}


def _launch(kernel, grid, blocks: tuple[int, int, int], dtype: torch.dtype, *args, **constexprs):
    """Launch ``kernel`` on ``grid`` with tiles ``blocks`` = (BM, BN, BK) and the products'
    precision for activations of ``dtype``."""
    bm, bn, bk = blocks
    kernel[grid](*args, **constexprs, BM=bm, BN=bn, BK=bk, **_precision(dtype))


@triton.jit
def _mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _block_panel(index_ptr, BM: tl.constexpr, BP: tl.constexpr):
    """Of program (i, p): its BM rows of x, the BP columns of its panel p (a block row of
    the weight: output columns; or a block column: input columns) and the range
    [start, end) of the panel's kept blocks in ``index_ptr`` (crow, or ccol)."""
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    p = tl.program_id(1).to(tl.int64)
    return offs_m, p * BP + tl.arange(0, BP), tl.load(index_ptr + p), tl.load(index_ptr + p + 1)


@triton.jit
def _block_span(index_ptr, j, B: tl.constexpr):
    """The B rows (or columns) of the dense matrix that kept block ``j`` covers, from its
    block row (or column) in ``index_ptr``."""
    return tl.load(index_ptr + j) * B + tl.arange(0, B)


@triton.jit
def _kept_block(v_ptr, j, stride_vb, stride_vn, stride_vk, BN: tl.constexpr, BK: tl.constexpr):
    """Pointers to the (BN x BK) kept block ``j`` of the block values."""
    return v_ptr + j * stride_vb + tl.arange(0, BN)[:, None] * stride_vn + tl.arange(0, BK)[None, :] * stride_vk


@triton.jit
def _block_sparse_fwd_kernel(
    x_ptr,
    v_ptr,
    crow_ptr,
    col_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_vb,
    stride_vn,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m, offs_n, start, end = _block_panel(crow_ptr, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for j in range(start, end):  # kept blocks of this block row only
        kk = _block_span(col_ptr, j, BK)
        xt = load_tile(x_ptr, offs_m, kk, offs_m < M, kk < K, stride_xm, stride_xk)
        wt = tl.load(_kept_block(v_ptr, j, stride_vb, stride_vn, 1, BN, BK))
        acc += _mma(xt, tl.trans(wt), IEEE, UPCAST)
    out = scale_and_bias(acc, bias_ptr, bias_ptr, offs_n, offs_n < N, False, HAS_BIAS)
    store_tile(y_ptr, out, offs_m, offs_n, offs_m < M, offs_n < N, stride_ym, 1)


@triton.jit
def _block_sparse_dx_kernel(
    g_ptr,
    v_ptr,
    ccol_ptr,
    crow_of_ptr,
    cblock_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_dxm,
    stride_vb,
    stride_vn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m, offs_k, start, end = _block_panel(ccol_ptr, BM, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for j in range(start, end):  # kept blocks of this block column only
        nn = _block_span(crow_of_ptr, j, BN)
        gt = load_tile(g_ptr, offs_m, nn, offs_m < M, nn < N, stride_gm, stride_gn)
        wt = tl.load(_kept_block(v_ptr, tl.load(cblock_ptr + j), stride_vb, stride_vn, 1, BN, BK))
        acc += _mma(gt, wt, IEEE, UPCAST)
    store_tile(dx_ptr, acc, offs_m, offs_k, offs_m < M, offs_k < K, stride_dxm, 1)


@triton.jit
def _block_sparse_dw_kernel(
    g_ptr,
    x_ptr,
    row_ptr,
    col_ptr,
    dv_ptr,
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_xm,
    stride_xk,
    stride_vb,
    stride_vn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)  # one program per kept block
    nn = _block_span(row_ptr, j, BN)
    kk = _block_span(col_ptr, j, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM).to(tl.int64)
        m_ok = offs_m < M
        gt = load_tile(g_ptr, offs_m, nn, m_ok, nn < N, stride_gm, stride_gn)
        xt = load_tile(x_ptr, offs_m, kk, m_ok, kk < K, stride_xm, stride_xk)
        acc += _mma(tl.trans(gt), xt, IEEE, UPCAST)
    # Rows/columns past the matrix edge saw only zeros, so the padding is written as 0.
    tl.store(_kept_block(dv_ptr, j, stride_vb, stride_vn, 1, BN, BK), acc.to(dv_ptr.dtype.element_ty))


def _block_m(m: int) -> int:
    return max(16, min(BLOCK_M, triton.next_power_of_2(max(m, 1))))


def _unit_inner_stride(values):
    return values if values.stride(2) == 1 else values.contiguous()


def block_sparse_matmul(x, values, crow, col, n_out, bias):
    m, k = x.shape
    _, bn, bk = values.shape
    values = _unit_inner_stride(values)
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return y
    bm = _block_m(m)
    grid = (triton.cdiv(m, bm), crow.numel() - 1)
    args = (x, values, crow, col, bias if bias is not None else y, y, m, n_out, k, *matrix_strides(x))
    strides = (y.stride(0), values.stride(0), values.stride(1))
    _launch(_block_sparse_fwd_kernel, grid, (bm, bn, bk), x.dtype, *args, *strides, HAS_BIAS=bias is not None)
    return y


def block_sparse_matmul_backward(grad, x, values, crow, col, ccol, csc_row, csc_block):
    m, k = x.shape
    n_out = grad.shape[1]
    nnzb, bn, bk = values.shape
    values = _unit_inner_stride(values)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # The gradient takes the row-panel layout of memkern.ops.sparse_format.row_panel_layout.
    dv = torch.empty((bn, nnzb, bk), dtype=values.dtype, device=values.device).permute(1, 0, 2)
    blocks = (_block_m(m), bn, bk)
    if m > 0 and k > 0:
        grid = (triton.cdiv(m, blocks[0]), ccol.numel() - 1)
        args = (grad, values, ccol, csc_row, csc_block, dx, m, n_out, k, *matrix_strides(grad), dx.stride(0))
        _launch(_block_sparse_dx_kernel, grid, blocks, x.dtype, *args, values.stride(0), values.stride(1))
    if nnzb > 0:
        block_row = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
        args = (grad, x, block_row, col, dv, m, n_out, k, *matrix_strides(grad, x), dv.stride(0), dv.stride(1))
        _launch(_block_sparse_dw_kernel, (nnzb,), blocks, x.dtype, *args)
    return dx, dv


@triton.jit
def _expand_sparse24(v_ptr, meta_ptr, offs_n, offs_k, ok, stride_vn, stride_metan):
    """The dense (rows offs_n, columns offs_k) tile of a compressed 2:4 weight, zero outside
    ``ok``, expanded in registers: dense column k is group g = k // 4 at position
    p = k % 4; it takes kept value 2g if p == i0 and 2g + 1 if p == i1."""
    g = offs_k // 4
    p = (offs_k % 4).to(tl.int32)
    v0 = tl.load(v_ptr + offs_n[:, None] * stride_vn + 2 * g[None, :], mask=ok, other=0.0)
    v1 = tl.load(v_ptr + offs_n[:, None] * stride_vn + 2 * g[None, :] + 1, mask=ok, other=0.0)
    byte = tl.load(meta_ptr + offs_n[:, None] * stride_metan + g[None, :] // 2, mask=ok, other=0).to(tl.int32)
    code = (byte >> (4 * (g[None, :] % 2)).to(tl.int32)) & 15
    zero = tl.zeros_like(v0)
    return tl.where((code & 3) == p[None, :], v0, zero) + tl.where((code >> 2) == p[None, :], v1, zero)


@triton.jit
def _sparse24_fwd_kernel(
    x_ptr,
    v_ptr,
    meta_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_vn,
    stride_metan,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_m, offs_n, m_ok, n_ok = output_tile(M, N, BM, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = offs_k < K
        xt = load_tile(x_ptr, offs_m, offs_k, m_ok, k_ok, stride_xm, stride_xk)
        w = _expand_sparse24(v_ptr, meta_ptr, offs_n, offs_k, n_ok[:, None] & k_ok[None, :], stride_vn, stride_metan)
        acc += _mma(xt, tl.trans(w), IEEE, UPCAST)
    out = scale_and_bias(acc, bias_ptr, bias_ptr, offs_n, n_ok, False, HAS_BIAS)
    store_tile(y_ptr, out, offs_m, offs_n, m_ok, n_ok, stride_ym, 1)


def _sparse24_blocks(m: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BN, BK). fp32 "ieee" products run on the FMA units with their operand tiles in
    registers: 64 x 64 x 64 spilled ~10 KB a thread on sm_80 and sm_90 (ptxas), 32 x 64 x 16
    takes ~200 registers and spills nothing (bench/NOTES.md)."""
    if dtype == torch.float32:
        return min(_block_m(m), 32), 64, 16
    return _block_m(m), 64, 64


def sparse24_matmul(x, values, meta, bias):
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    blocks = _sparse24_blocks(m, x.dtype)
    grid = (triton.cdiv(m, blocks[0]), triton.cdiv(n, blocks[1]))
    args = (x, values, meta, bias if bias is not None else y, y, m, n, k, *matrix_strides(x))
    strides = (values.stride(0), meta.stride(0), y.stride(0))
    _launch(_sparse24_fwd_kernel, grid, blocks, x.dtype, *args, *strides, HAS_BIAS=bias is not None)
    return y


@triton.jit
def _sparse24_decompress_kernel(
    v_ptr, meta_ptr, w_ptr, N, K, stride_vn, stride_metan, BN: tl.constexpr, BK: tl.constexpr
):
    offs_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    ok = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = _expand_sparse24(v_ptr, meta_ptr, offs_n, offs_k, ok, stride_vn, stride_metan)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=ok)


def sparse24_decompress(values, meta, cols):
    n = values.shape[0]
    values, meta = values.contiguous(), meta.contiguous()
    w = torch.empty((n, cols), dtype=values.dtype, device=values.device)
    if n and cols:
        _sparse24_decompress_kernel[(triton.cdiv(n, 32), triton.cdiv(cols, 64))](
            values, meta, w, n, cols, values.stride(0), meta.stride(0), BN=32, BK=64
        )
    return w
