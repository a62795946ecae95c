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


# -- low-precision linear layers (memkern/ops/lowp.py) ------------------------------------
def _linear_epilogue(acc: torch.Tensor, col_scale: torch.Tensor | None, bias: torch.Tensor | None,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    out = acc.to(compute_dtype)
    if col_scale is not None:
        out = out * col_scale.to(compute_dtype)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 dynamic linear layer: ``x`` (M, K) float, ``w_q`` (N, K) int8, ``w_scale`` (N,).

    x is quantised per row exactly as :func:`quantize_rowwise`; the integer product
    ``acc = x_q @ w_q.T`` is exact (computed in float64, whose 53-bit mantissa holds every
    partial sum of K < 2^39 products of int8 values; int64 matmul does not exist on CUDA);
    the epilogue is ``acc * (x_scale[row] * w_scale[col]) + bias[col]`` in ``compute_dtype``
    (float32 in every kernel), then cast to ``out_dtype`` (default: x's dtype). The scales
    are multiplied first: their product is about |x|max * |w|max / 127^2, so the result
    overflows only where the true product does (huge bfloat16 activations give x_scale
    near 2.7e36, and acc * x_scale alone would overflow float32).
    """
    x_q, x_scale = quantize_rowwise(x)
    acc = x_q.double() @ w_q.double().t()
    scale = x_scale.to(compute_dtype)[:, None] * w_scale.to(compute_dtype)[None, :]
    out = acc.to(compute_dtype) * scale
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(out_dtype or x.dtype)


def int8_weight_only_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None,
                            compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A16 linear layer: ``(x @ w_q.T) * w_scale[col] + bias[col]``, accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype. The scale applies
    after the accumulation (the int8 weight widens exactly to any float type), so
    |x| * 127 * K must stay inside the compute dtype's range."""
    acc = x.to(compute_dtype) @ w_q.to(compute_dtype).t()
    return _linear_epilogue(acc, w_scale, bias, compute_dtype).to(x.dtype)


def fp16_linear(x: torch.Tensor, w_half: torch.Tensor, bias: torch.Tensor | None = None,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Linear layer with half-precision weights: ``x @ w_half.T + bias`` accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype."""
    acc = x.to(compute_dtype) @ w_half.to(compute_dtype).t()
    return _linear_epilogue(acc, None, bias, compute_dtype).to(x.dtype)
