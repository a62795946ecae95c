"""Plain-PyTorch reference of memkern's 4-bit group-wise weight-only format
(memkern/ops/int4.py): packing, quantisation, dequantisation and the linear layer.

The format, decided here once:

* codes ``q[n, k]`` in [0, 15], two a byte: byte ``j`` of row ``n`` holds ``q[n, 2j]`` in
  its low nibble and ``q[n, 2j + 1]`` in its high nibble; ``w_int4`` is uint8
  ``(N, ceil(K / 2))``, and for odd K the last high nibble is padding (written 0, never
  read as a weight).
* groups of ``group_size`` consecutive inputs along K share one float32 scale and one
  float32 zero point: ``scales`` and ``zeros`` are ``(N, ceil(K / group_size))``. When K
  is not a multiple of the group size the last group is shorter (its missing inputs are
  padding), so any K works with any group size.
* ``W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]`` with ``g = k // group_size``.

Asymmetric (min/max) rather than symmetric (absmax): with 16 levels, a symmetric grid
spends codes on the side of zero a group does not reach (and -8..7 is lopsided), while
the min/max grid puts all 16 levels across the group's actual range; that is the choice
of GPTQ and torchao's int4 weight-only layouts, and on Gaussian weights it gives about
1.9 dB more output SQNR than absmax at group 128 (tests/test_int4.py). The zero point is
a float, not rounded to an integer code, so the range's ends are exact levels (torchao's
"float zero point" domain); an integer zero point loaded from a GPTQ checkpoint is a
special case of the same formula. Scales and zero points are float32 (0.5 byte a group
more than float16, 1/256 byte a weight at group 128), so no weight range is out of reach.
"""

from __future__ import annotations

import torch

INT4_LEVELS = 16
GROUP_MULTIPLE = 32
"""Group sizes are multiples of this: a 16-byte vector of packed codes (32 inputs) never
straddles two groups in the CPU kernel."""


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, K)`` in [0, 15] (any integer dtype) -> uint8 ``(N, ceil(K / 2))``, low
    nibble first."""
    n, k = q.shape
    q = q.to(torch.uint8)
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(w_int4: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``(N, ceil(K / 2))`` -> uint8 codes ``(N, K)``."""
    low, high = w_int4 & 15, w_int4 >> 4
    return torch.stack((low, high), dim=-1).reshape(w_int4.shape[0], 2 * w_int4.shape[1])[:, :in_features]


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) as (N, groups, group_size) padded with zeros, and the padding mask
    (groups, group_size)."""
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k))
    pad = torch.arange(groups * group_size, device=w.device) >= k
    return padded.view(n, groups, group_size), pad.view(groups, group_size)


# Candidate ranges per group: the min/max range shrunk about its middle by these factors.
# Clipping a group's few extreme weights buys a finer step for all the others; each group
# keeps the candidate with the least squared error (GPTQ's "mse" range search, coarser).
# Output SQNR, Gaussian x and weights, group 128: 20.10 dB with the plain min/max range,
# 20.50 dB with these 9 candidates, 20.51 dB with 17 (bench/NOTES.md, "int4").
RANGE_SHRINK = tuple(1.0 - 0.025 * i for i in range(9))


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantisation of ``weight`` (N, K) per group of ``group_size`` inputs:
    returns ``(w_int4, scales, zeros)`` as the module docstring lays out.

    Per group and range ``[lo, hi]``: ``scale = (hi - lo) / 15`` (1 for a constant
    group), ``zero = -lo / scale``, ``q = clamp(round_half_even(w / scale + zero), 0,
    15)``. The range is the group's ``[min, max]`` shrunk about its middle by the factor
    of :data:`RANGE_SHRINK` that gives the least squared error of the dequantised group
    (1, the plain min/max range, on ties). Runs on any device, including meta (no
    data-dependent Python control flow).
    """
    w = weight.detach().float()
    n, k = w.shape
    grouped, pad = _grouped(w, group_size)
    lo = torch.where(pad, torch.inf, grouped).amin(dim=2)
    hi = torch.where(pad, -torch.inf, grouped).amax(dim=2)
    middle, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for shrink in RANGE_SHRINK:
        scale = 2 * half * shrink / (INT4_LEVELS - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = -(middle - half * shrink) / scale
        q = torch.round(grouped / scale[:, :, None] + zero[:, :, None]).clamp_(0, INT4_LEVELS - 1)
        error = torch.where(pad, 0.0, (q - zero[:, :, None]) * scale[:, :, None] - grouped).square().sum(dim=2)
        if best is None:
            best = (error, q, scale, zero)
            continue
        better = error < best[0]
        best = (
            torch.where(better, error, best[0]),
            torch.where(better[:, :, None], q, best[1]),
            torch.where(better, scale, best[2]),
            torch.where(better, zero, best[3]),
        )
    _, q, scale, zero = best
    q = torch.where(pad, torch.zeros_like(q), q).view(n, -1)[:, :k]
    return pack_int4(q), scale.contiguous(), zero.contiguous()


def dequantize_int4(
    w_int4: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``(N, in_features)`` weight in ``dtype``: ``(q - zero) * scale`` per group,
    computed in float32 (float64 stays float64, for the tests' oracle)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_int4(w_int4, in_features).to(compute)
    expand = lambda t: t.to(compute).repeat_interleave(group_size, dim=1)[:, :in_features]  # noqa: E731
    return ((q - expand(zeros)) * expand(scales)).to(dtype)


def int4_weight_only_linear(
    x: torch.Tensor,
    w_int4: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantised as :func:`dequantize_int4`, accumulated in
    ``compute_dtype`` (float32 in every kernel), returned in x's dtype."""
    w = dequantize_int4(w_int4, scales, zeros, group_size, x.shape[-1], compute_dtype)
    out = x.to(compute_dtype) @ w.t()
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype)
