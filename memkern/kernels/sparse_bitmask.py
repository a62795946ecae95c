"""Triton kernels of the bitmask weight (memkern.ops.sparse_bitmask): expanding it to dense,
and the product ``x @ W^T + bias`` that reads the bits and kept values a tile at a time.

Both find each kept value's index in ``values`` from the number of set bits before its
block of columns in its row (``block_starts``, computed once per call) plus a prefix sum
of the block's bits. The product never builds the dense weight: one program computes a
(BM x BN) tile of the output and, for each block of BK columns, expands the (BN x BK) tile
of the weight in registers (BK / 8 bytes of bits per row) and adds its product with x's
tile in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkern.kernels.sparse import _block_m, _launch, _mma
from memkern.kernels.tiles import load_tile, matrix_strides, scale_and_bias, store_tile

BLOCK_K = 128  # columns per program of the expansion: 16 bytes of bits
MATMUL_BLOCK_N = 64  # weight rows (outputs) per program of the product
MATMUL_BLOCK_K = 32  # columns per step of the product: one 32-bit word of bits per row
_POPCOUNT = [bin(b).count("1") for b in range(256)]


@triton.jit
def _bitmask_decompress_kernel(v_ptr, bits_ptr, start_ptr, w_ptr, K, BYTES, NBLK, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BK + tl.arange(0, BK)
    ok = offs < K
    byte = tl.load(bits_ptr + row * BYTES + offs // 8, mask=ok, other=0).to(tl.int32)
    bit = (byte >> (offs % 8).to(tl.int32)) & 1
    before = tl.cumsum(bit, axis=0) - bit  # kept values before this column inside the block
    base = tl.load(start_ptr + row * NBLK + blk)
    v = tl.load(v_ptr + base + before, mask=ok & (bit != 0), other=0.0)
    tl.store(w_ptr + row * K + offs, v, mask=ok)


@triton.jit
def _bitmask_matmul_kernel(
    x_ptr,
    v_ptr,
    bits_ptr,
    start_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    BYTES,
    NBLK,
    NVALUES,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # The tile's rows and columns as output_tile's, but widened to int64 before the
    # multiply: with output_tile's order ptxas spills 16 bytes a thread on sm_80 (fp32), not 4.
    offs_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for blk in range(0, NBLK):
        offs_k = blk * BK + tl.arange(0, BK)
        k_ok = offs_k < K
        tile_ok = n_ok[:, None] & k_ok[None, :]
        byte = tl.load(bits_ptr + offs_n[:, None] * BYTES + (offs_k // 8)[None, :], mask=tile_ok, other=0)
        bit = (byte.to(tl.int32) >> (offs_k % 8).to(tl.int32)[None, :]) & 1  # (BN, BK)
        # index in values of each kept weight: the row's kept values before this block,
        # plus those before it inside the block
        base = tl.load(start_ptr + offs_n * NBLK + blk, mask=n_ok, other=0)
        index = base[:, None] + (tl.cumsum(bit, axis=1) - bit)
        # index < NVALUES: even bits that keep more weights than values holds stay inside it
        w = tl.load(v_ptr + index, mask=(bit != 0) & (index < NVALUES), other=0.0)
        a = load_tile(x_ptr, offs_m, offs_k, m_ok, k_ok, stride_xm, stride_xk)
        acc += _mma(a, tl.trans(w).to(a.dtype), IEEE, UPCAST)
    out = scale_and_bias(acc, bias_ptr, bias_ptr, offs_n, n_ok, False, HAS_BIAS)
    store_tile(y_ptr, out, offs_m, offs_n, m_ok, n_ok, stride_ym, stride_yn)


def block_starts(bits: torch.Tensor, block: int = BLOCK_K) -> tuple[torch.Tensor, int]:
    """``(rows, ceil(cols / block))`` int64: the index in ``values`` of each block's first
    kept value; and the number of kept values."""
    rows, nbytes = bits.shape
    per_block = block // 8
    nblk = -(-nbytes // per_block)
    counts = torch.zeros(rows, nblk * per_block, dtype=torch.int64, device=bits.device)
    counts[:, :nbytes] = torch.tensor(_POPCOUNT, device=bits.device)[bits.long()]
    totals = counts.reshape(rows, nblk, per_block).sum(-1).reshape(-1)
    ends = totals.cumsum(0)
    return (ends - totals).reshape(rows, nblk), int(ends[-1]) if ends.numel() else 0


def _checked_starts(op: str, values: torch.Tensor, bits: torch.Tensor, block: int) -> torch.Tensor:
    starts, kept = block_starts(bits, block)
    if kept != values.numel():  # a wrong count would read past values
        raise ValueError(f"{op}: bits keep {kept} weights, values holds {values.numel()}")
    return starts


def bitmask_decompress(values: torch.Tensor, bits: torch.Tensor, cols: int) -> torch.Tensor:
    values, bits = values.contiguous(), bits.contiguous()
    return decompress_from_starts(values, bits, _checked_starts("bitmask_decompress", values, bits, BLOCK_K), cols)


def decompress_from_starts(values, bits, starts, cols: int) -> torch.Tensor:
    """:func:`bitmask_decompress` given ``block_starts(bits, BLOCK_K)`` (already checked)."""
    rows = bits.shape[0]
    w = torch.empty((rows, cols), dtype=values.dtype, device=values.device)
    if rows and cols:
        _bitmask_decompress_kernel[(rows, starts.shape[1])](
            values, bits, starts, w, cols, bits.shape[1], starts.shape[1], BK=BLOCK_K
        )
    return w


def bitmask_matmul(x: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, bias) -> torch.Tensor:
    """``x @ W^T + bias`` in x's dtype (float32 accumulation), W never expanded beyond a
    (BN x BK) tile in registers. x ``(M, K)`` float32, float16 or bfloat16."""
    values, bits = values.contiguous(), bits.contiguous()
    starts = _checked_starts("bitmask_matmul", values, bits, MATMUL_BLOCK_K)
    return matmul_from_starts(x, values, bits, starts, bias)


def matmul_from_starts(x, values, bits, starts, bias) -> torch.Tensor:
    """:func:`bitmask_matmul` given ``block_starts(bits, MATMUL_BLOCK_K)`` (already checked)."""
    m, k = x.shape
    n = bits.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    blocks = (_block_m(m), MATMUL_BLOCK_N, MATMUL_BLOCK_K)
    grid = (triton.cdiv(m, blocks[0]), triton.cdiv(n, MATMUL_BLOCK_N))
    bias_or_y = bias.contiguous() if bias is not None else y  # y is never read as a bias
    args = (x, values, bits, starts, bias_or_y, y, m, n, k, bits.shape[1], starts.shape[1], values.numel())
    _launch(_bitmask_matmul_kernel, grid, blocks, x.dtype, *args, *matrix_strides(x, y), HAS_BIAS=bias is not None)
    return y
