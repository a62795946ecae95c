"""Sparse int8 layers beside the layers they compose: ``nn.Linear`` (float32),
``SparseLinear`` (pruned, float32), ``Int8Linear`` (dense, W8A8, the baseline) and
``SparseInt8Linear`` (pruned, W8A8), at 4096 x 4096 with 50% and 90% of the 64 x 64 blocks
pruned, for M = 1, 16 and 512 rows. The providers are timed in turns
(``Case.interleaved``), and each provider's name carries the bytes of its layer's weights
(values, scales, index, bias), since what a pruned int8 layer is for is holding fewer of
them. ``torch.ops.memkern.sparse_int8_kernel_path()`` says which C++ path a CPU runs
(AVX512-VNNI or AVX2).
"""

from __future__ import annotations

import torch
from torch import nn

from memkern import prune
from memkern.benchmarks.harness import Case, Provider, Work
from memkern.benchmarks.lowp import _no_grad
from memkern.nn import Int8Linear, SparseInt8Linear, SparseLinear

BLOCK = (64, 64)
SPARSITIES = (0.5, 0.9)


def _weight_bytes(n: int, k: int, sparsity: float) -> dict[str, int]:
    """Bytes of each layer's weights, by arithmetic (prune.masks keeps exactly the fraction
    1 - sparsity of the blocks)."""
    n_block_rows, n_block_cols = -(-n // BLOCK[0]), -(-k // BLOCK[1])
    kept = round(n_block_rows * n_block_cols * (1 - sparsity))
    index = 8 * (n_block_rows + 1 + n_block_cols + 1 + 3 * kept)  # crow, ccol; col, csc_row, csc_block
    values = kept * BLOCK[0] * BLOCK[1]
    bias, scales = 4 * n, 4 * n
    return {  # the baseline first
        "Int8Linear": n * k + scales + bias,
        "SparseInt8Linear": values + scales + index + bias,
        "nn.Linear": 4 * n * k + bias,
        "SparseLinear": 4 * values + index + bias,
    }


def _inputs(m: int, k: int, n: int, sparsity: float):
    def make(device):
        linear = nn.Linear(k, n, device=device)
        mask = prune.masks(torch.randn(n, k, device=device), sparsity, "block", block=BLOCK)
        sparse = SparseLinear.from_dense(linear, mask, block=BLOCK)
        return {
            "x": torch.randn(m, k, device=device),
            "nn.Linear": linear,
            "SparseLinear": sparse,
            "Int8Linear": Int8Linear.from_linear(linear),
            "SparseInt8Linear": SparseInt8Linear.from_sparse(sparse),
        }

    return make


def _provider(layer: str, weight_bytes: int) -> Provider:
    def build(inp):
        return _no_grad(inp[layer], inp["x"])

    owner = "fp32" if layer == "nn.Linear" else "memkern"
    # The dense int8 layer is the baseline: what pruning saves on top of quantisation.
    return Provider(f"{owner} {layer} ({weight_bytes / 2**20:.2f} MiB weights)", build, baseline=layer == "Int8Linear")


def cases(quick: bool) -> list[Case]:
    k = n = 2048 if quick else 4096
    out = []
    for sparsity in SPARSITIES[:1] if quick else SPARSITIES:
        weight_bytes = _weight_bytes(n, k, sparsity)
        for m in (16,) if quick else (1, 16, 512):
            out.append(
                Case(
                    "sparse_int8_linear",
                    f"{m}x{k}x{n} block{BLOCK[0]} s{sparsity}",
                    torch.float32,
                    _inputs(m, k, n, sparsity),
                    tuple(_provider(layer, b) for layer, b in weight_bytes.items()),
                    devices=("cpu",),
                    # The pruned int8 layer's least work: its kept products, x read, its weights read, y written.
                    work=Work(
                        flops=2 * m * k * n * (1 - sparsity),
                        bytes=4 * m * k + weight_bytes["SparseInt8Linear"] + 4 * m * n,
                    ),
                    interleaved=True,
                )
            )
    return out
