"""masked_matmul against what users have for a pruned weight: the dense product with the
masked weight materialised (the baseline), and ``torch.sparse`` CSR / BSR products; on
CUDA also the 2:4 weights against dense and PyTorch's semi-structured sparse path."""

from __future__ import annotations

import warnings

import torch

import memkern
from memkern import prune
from memkern.benchmarks.harness import Case, Provider, Work
from memkern.ops import BlockSparseWeight, Sparse24Weight

BLOCK = (64, 64)


def _block_inputs(m: int, k: int, n: int, sparsity: float, dtype: torch.dtype, backward: bool):
    def make_inputs(device):
        w = torch.randn(n, k, device=device)
        mask = prune.masks(w, sparsity, "block", block=BLOCK)
        wm = (w * mask).to(dtype)
        x = torch.randn(m, k, device=device).to(dtype)
        weight = BlockSparseWeight.from_dense(wm, mask, BLOCK)
        if backward:
            x.requires_grad_(True)
            wm.requires_grad_(True)
            weight.values.requires_grad_(True)
        return {"x": x, "wm": wm, "mask": mask, "weight": weight, "grad": torch.randn(m, n, device=device).to(dtype)}

    return make_inputs


def _sparse_layout(wm: torch.Tensor, layout: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return wm.detach().to_sparse_csr() if layout == "csr" else wm.detach().to_sparse_bsr(BLOCK)


def _fwd_providers() -> tuple[Provider, ...]:
    def sparse(layout):
        def build(inp):
            s = _sparse_layout(inp["wm"], layout)
            return lambda: torch.nn.functional.linear(inp["x"], s)

        return build

    return (
        Provider("dense (masked W)", lambda inp: lambda: inp["x"] @ inp["wm"].t(), baseline=True),
        Provider("memkern", lambda inp: lambda: memkern.ops.masked_matmul(inp["x"], inp["weight"])),
        Provider("torch.sparse CSR", sparse("csr")),
        Provider("torch.sparse BSR", sparse("bsr")),
    )


def _fwd_bwd_providers() -> tuple[Provider, ...]:
    def dense(inp):
        x, wm, mask, grad = inp["x"], inp["wm"], inp["mask"], inp["grad"]

        def step():
            # What the masked dense recipe does per step: full product, full dW, re-mask.
            (x @ wm.t()).backward(grad)
            dw = wm.grad.mul_(mask)
            x.grad = wm.grad = None
            return dw

        return step

    def sparse(inp):
        x, weight, grad = inp["x"], inp["weight"], inp["grad"]

        def step():
            memkern.ops.masked_matmul(x, weight).backward(grad)
            dv = weight.values.grad
            x.grad = weight.values.grad = None
            return dv

        return step

    return (Provider("dense (masked W)", dense, baseline=True), Provider("memkern", sparse))


def _s24_inputs(m: int, k: int, n: int, dtype: torch.dtype):
    def make_inputs(device):
        w = torch.randn(n, k, device=device).to(dtype)
        mask = prune.masks(w, 0.5, "n:m")
        return {
            "x": torch.randn(m, k, device=device).to(dtype),
            "wm": w * mask,
            "weight": Sparse24Weight.from_dense(w, mask),
        }

    return make_inputs


def _s24_providers() -> tuple[Provider, ...]:
    def semi_structured(inp):
        from torch.sparse import to_sparse_semi_structured

        s = to_sparse_semi_structured(inp["wm"])
        return lambda: torch.nn.functional.linear(inp["x"], s)

    return (
        Provider("dense (masked W)", lambda inp: lambda: inp["x"] @ inp["wm"].t(), baseline=True),
        Provider("memkern 2:4", lambda inp: lambda: memkern.ops.masked_matmul(inp["x"], inp["weight"])),
        Provider("torch semi-structured", semi_structured),
    )


def _work(m: int, k: int, n: int, kept: float, dtype: torch.dtype, backward: bool) -> Work:
    """The products over the kept weights only. Forward: x and the kept values read, y
    written; backward adds dx = grad @ W and d values = grad^T @ x over the kept blocks,
    grad read, dx and d values written."""
    e = dtype.itemsize
    values = n * k * kept * e
    fwd = Work(flops=2 * m * n * k * kept, bytes=m * k * e + values + m * n * e)
    if not backward:
        return fwd
    return Work(flops=3 * fwd.flops, bytes=fwd.bytes + m * n * e + m * k * e + values)


def _block_case(shape: str, m: int, k: int, n: int, sparsity: float, dtype, providers, device: str, backward=False):
    """masked_matmul of an (n x k) weight keeping 1 - sparsity of its BLOCK blocks."""
    return Case(
        "masked_matmul",
        shape,
        dtype,
        _block_inputs(m, k, n, sparsity, dtype, backward),
        providers,
        mode="fwd+bwd" if backward else "fwd",
        devices=(device,),
        work=_work(m, k, n, 1 - sparsity, dtype, backward),  # prune.masks keeps 1 - sparsity of the blocks
    )


def cases(quick: bool) -> list[Case]:
    out = []
    # --quick keeps to ~20 s on 2 CPU cores: a quarter-size problem, no torch.sparse (its CPU
    # products take seconds per call at this size) and no backward.
    m, k, n = (512, 2048, 2048) if quick else (2048, 4096, 4096)
    # The GPU shape is the full one, quick or not: smaller products leave an H100-class GPU
    # launch-bound, and the GPU check (bench/device_check.sh) runs the quick set.
    gm, gk, gn = 2048, 4096, 4096
    cpu_fwd = _fwd_providers()[:2] if quick else _fwd_providers()
    for sparsity in (0.5, 0.9):
        shape = f"{m}x{k}@{n}x{k} block{BLOCK[0]} s{sparsity}"
        out.append(_block_case(shape, m, k, n, sparsity, torch.float32, cpu_fwd, "cpu"))
        if not quick:
            out.append(_block_case(shape, m, k, n, sparsity, torch.float32, _fwd_bwd_providers(), "cpu", True))
        gpu_shape = f"{gm}x{gk}@{gn}x{gk} block{BLOCK[0]} s{sparsity}"
        out.append(_block_case(gpu_shape, gm, gk, gn, sparsity, torch.bfloat16, _fwd_providers()[:2], "cuda"))
    out.append(
        Case(
            "masked_matmul",
            f"{gm}x{gk}@{gn}x{gk} 2:4",
            torch.bfloat16,
            _s24_inputs(gm, gk, gn, torch.bfloat16),
            _s24_providers(),
            devices=("cuda",),
            work=_work(gm, gk, gn, 0.5, torch.bfloat16, False),
        )
    )
    return out
