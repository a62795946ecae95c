"""Triton kernel expanding a bitmask weight (memkern.ops.sparse_bitmask) to dense: each
program expands one block of columns of one row, finding each kept value's position from
the number of set bits before its block (computed once per call) plus a prefix sum inside
the block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 128  # columns per program: 16 bytes of bits
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


def bitmask_decompress(values: torch.Tensor, bits: torch.Tensor, cols: int) -> torch.Tensor:
    values, bits = values.contiguous(), bits.contiguous()
    starts, kept = block_starts(bits)
    if kept != values.numel():  # a wrong count would read past values
        raise ValueError(f"bitmask_decompress: bits keep {kept} weights, values holds {values.numel()}")
    rows = bits.shape[0]
    w = torch.empty((rows, cols), dtype=values.dtype, device=values.device)
    if rows and cols:
        _bitmask_decompress_kernel[(rows, starts.shape[1])](
            values, bits, starts, w, cols, bits.shape[1], starts.shape[1], BK=BLOCK_K
        )
    return w
