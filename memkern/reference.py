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
