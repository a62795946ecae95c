"""Plain-PyTorch reference of every memkern op: the test oracle and last-resort fallback.

Each function here states the op's semantics in the most direct PyTorch; kernels must match
it (bit-exactly for integer outputs, within the dtype tolerances of tests/conftest.py for
floating outputs).
"""
from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantisation of each row of a 2-D tensor.

    scale = max|x_row| / 127 (fp32); q = round_half_to_even(x / scale) clamped to
    [-127, 127]. A row whose scale is 0 (all zeros) gets scale 1 and q 0. A row holding
    NaN or +-inf gets scale NaN and q 0.
    """
    xf = x.float()
    rows, cols = xf.shape
    if cols == 0:
        return torch.empty_like(xf, dtype=torch.int8), torch.ones(rows, dtype=torch.float32, device=x.device)
    finite = torch.isfinite(xf).all(dim=1)
    absmax = xf.abs().amax(dim=1)
    scale = absmax / INT8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(xf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    return q.to(torch.int8).contiguous(), scale


# -- sparse: block-sparse and 2:4 weights (memkern/ops/sparse.py) ------------------------
def block_sparse_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n_out: int,
                          n_in: int) -> torch.Tensor:
    """The dense (n_out, n_in) weight held by kept blocks ``values`` (nnzb, BN, BK) at
    block rows given by ``crow`` (BSR row pointer) and block columns ``col``; blocks not
    listed are zero and the padding of edge blocks is cut off."""
    nnzb, bn, bk = values.shape
    n_block_rows, n_block_cols = -(-n_out // bn), -(-n_in // bk)
    rows = torch.repeat_interleave(torch.arange(n_block_rows, device=values.device), crow.diff())
    grid = values.new_zeros(n_block_rows, n_block_cols, bn, bk)
    grid[rows, col] = values
    return grid.permute(0, 2, 1, 3).reshape(n_block_rows * bn, n_block_cols * bk)[:n_out, :n_in]


def block_sparse_matmul(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                        n_out: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W the dense weight of the kept blocks (x: (M, K)), computed
    in float32 (float64 stays float64) and returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = block_sparse_to_dense(values.to(acc), crow, col, n_out, x.shape[1])
    y = x.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def sparse24_compress(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 compression of ``weight * mask`` (every group of 4 columns keeps <= 2 values).

    Returns values (rows, cols/2): group g's kept values, in column order, at columns 2g and
    2g+1; and meta (rows, ceil(cols/8)) uint8: group g's code i0 | (i1 << 2) (its kept
    positions, i0 < i1) in byte g // 2 at bit 4 * (g % 2). Free slots of a group keeping
    fewer than 2 values take the lowest unused positions with value 0.
    """
    rows, cols = weight.shape
    groups = cols // 4
    m = mask.reshape(rows, groups, 4)
    # Rank positions: kept ones first (in column order), then the free ones (in column order).
    order = torch.argsort((~m).to(torch.int8) * 4 + torch.arange(4, device=m.device), dim=-1)
    pos = order[..., :2].sort(dim=-1).values
    w = (weight * mask).reshape(rows, groups, 4)
    values = torch.gather(w, 2, pos).reshape(rows, cols // 2)
    code = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int32)
    if groups % 2:
        code = torch.cat([code, code.new_zeros(rows, 1)], dim=1)
    code = code.reshape(rows, -1, 2)
    meta = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8)
    return values.contiguous(), meta.contiguous()


def sparse24_decompress(values: torch.Tensor, meta: torch.Tensor, cols: int) -> torch.Tensor:
    """The dense (rows, cols) weight of 2:4 ``values`` and ``meta`` (see sparse24_compress)."""
    rows = values.shape[0]
    groups = cols // 4
    byte = meta.to(torch.int32).repeat_interleave(2, dim=1)[:, :groups]
    code = (byte >> (4 * (torch.arange(groups, device=meta.device) % 2))) & 15
    pos = torch.stack([code & 3, code >> 2], dim=-1).to(torch.int64)
    w = values.new_zeros(rows, groups, 4)
    w.scatter_add_(2, pos, values.reshape(rows, groups, 2))
    return w.reshape(rows, cols)


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W the dense weight of a 2:4 compressed one, computed in
    float32 (float64 stays float64) and returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = sparse24_decompress(values.to(acc), meta, x.shape[1])
    y = x.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
