"""Dense float32 products on the CPU: oneDNN where this torch build has it, ATen otherwise
(GPU tensors and other dtypes: ATen).

Why not plain ``x @ w.t()``: ATen sends float32 CPU matmuls to MKL, whose kernels reached
only 110-150 GFLOP/s on the (256-512) x 1024 x 32000 lm_head products of the fused-linear
KD loss on the 2-core AVX-512 EPYC of bench/NOTES.md, against 195-210 GFLOP/s for oneDNN's
(``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU backend emits for linear
layers) on the same shapes, with no copy of the weight (it reads a transposed view as it is).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _onednn_linear():
    """oneDNN's linear op, or None when this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # not registered in this build
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x`` (M, K) and ``weight`` (N, K); ``weight`` may be
    any strided view (``w.t()`` for a product with ``w`` itself)."""
    op = _onednn_linear()
    fp32 = all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (x, weight, bias))
    if op is not None and fp32 and x.dim() == 2 and x.shape[0] > 0:
        return op(x, weight, bias, "none", [], "")
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
