"""quantize_rowwise against the eager composition users write: abs().amax + divide +
round + clamp (four full passes over the tensor and three temporaries of its size)."""

from __future__ import annotations

import torch

import memkern
from memkern.benchmarks.harness import Case, Provider, Work


def eager_quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(dim=1) / 127
    q = torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _providers() -> tuple[Provider, ...]:
    return (
        Provider("torch eager", lambda inp: lambda: eager_quantize_rowwise(inp["x"]), baseline=True),
        Provider("memkern", lambda inp: lambda: memkern.ops.quantize_rowwise(inp["x"])),
    )


def cases(quick: bool) -> list[Case]:
    shapes = [(2048, 4096)] if quick else [(4096, 4096), (16384, 4096)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out = []
    for rows, cols in shapes:
        for dtype in dtypes:

            def make_inputs(device, rows=rows, cols=cols, dtype=dtype):
                return {"x": torch.randn(rows, cols, device=device).to(dtype)}

            # x read, int8 q and fp32 scales written
            work = Work(bytes=rows * cols * (dtype.itemsize + 1) + 4 * rows)
            out.append(Case("quantize_rowwise", f"{rows}x{cols}", dtype, make_inputs, _providers(), work=work))
    return out
