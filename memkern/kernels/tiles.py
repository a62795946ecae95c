"""What the linear-layer kernels (int8, int4, block-sparse, 2:4) share: the launch over
output tiles (or rows, for the GEMV kernels), and the device functions for the tile (or
row) a program owns, its masked loads, its epilogue and its store.
Triton inlines device functions into each kernel, so a kernel compiles as if it spelled them out."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def matrix_strides(*matrices: torch.Tensor) -> tuple[int, ...]:
    """The row and column strides of each 2-D tensor, in order: a kernel's stride arguments."""
    return tuple(stride for t in matrices for stride in t.stride())


def launch_on_rows(kernel, out_shape: tuple[int, int], blocks: tuple[int, int], *args, **constexprs):
    """Launch the GEMV ``kernel`` with one program per row and BLOCK_N columns of an output
    of ``out_shape``; ``blocks`` is (BLOCK_N, BLOCK_K)."""
    (m, n), (bn, bk) = out_shape, blocks
    kernel[(m, triton.cdiv(n, bn))](*args, **constexprs, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)


def launch_on_tiles(kernel, out_shape: tuple[int, int], blocks: tuple[int, int, int, int], *args, **constexprs):
    """Launch ``kernel`` with one program per (BLOCK_M x BLOCK_N) tile of an output of
    ``out_shape``; ``blocks`` is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    (m, n), (bm, bn, bk, warps) = out_shape, blocks
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    kernel[grid](*args, **constexprs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of the (BLOCK_M x BLOCK_N) output tile of program (0, 1), and
    which of them lie inside the (M x N) output."""
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return rm, rn, rm < M, rn < N


@triton.jit
def output_row(N, BLOCK_N: tl.constexpr):
    """Of a GEMV program (m, j): its row m and its BLOCK_N output columns, and which of
    them lie inside the N columns of the output."""
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return tl.program_id(0).to(tl.int64), rn, rn < N


@triton.jit
def scale_and_bias(acc, ws_ptr, b_ptr, rn, n_ok, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``acc * w_scale[rn] + bias[rn]`` in float32, each term if its flag is set; ``acc``
    is a float32 row (BLOCK_N,) or tile (BLOCK_M, BLOCK_N) of output columns ``rn``."""
    out = acc
    if HAS_SCALE:
        out = out * tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    return out


@triton.jit
def store_tile(out_ptr, out, rm, rn, m_ok, n_ok, stride_om, stride_on):
    """Store the float32 tile ``out`` at rows ``rm``, columns ``rn`` in out's dtype."""
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def store_row(out_ptr, out, m, rn, n_ok, stride_om, stride_on):
    """Store the float32 row ``out`` at row ``m``, columns ``rn`` in out's dtype."""
    tl.store(out_ptr + m * stride_om + rn * stride_on, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def load_tile(ptr, rows, cols, row_ok, col_ok, stride_r, stride_c):
    """The tile ``ptr[rows, cols]``, zero outside ``row_ok`` x ``col_ok``."""
    return tl.load(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=row_ok[:, None] & col_ok[None, :], other=0
    )
