"""4-bit group-wise weight-only linear layers against what users have on the CPU.

Providers, float32 activations, K = N = 4096, group 128, M in {1, 16}:
FP32 ``nn.Linear`` (the baseline), memkern's int8 weight-only layer, PyTorch's own int4
CPU kernel (``aten._weight_int4pack_mm_for_cpu`` on a weight packed by
``aten._convert_weight_to_int4pack_for_cpu``, torchao's layout and quantisation), torchao's
``int4_weight_only`` where torchao is installed (the provider is left out otherwise), and
memkern's :class:`Int4WeightOnlyLinear`.

``python -m memkern.benchmarks.int4`` prints the quality side: output SQNR against the
float64 product and weight bytes against float32, for memkern and torchao's scheme
(computed from its formula, so it needs no torchao).
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

import memkern
from memkern.benchmarks.harness import Case, Provider, Work
from memkern.benchmarks.lowp import _dense, _memkern, _no_grad

GROUP = 128


def _inputs(m: int, k: int, n: int):
    def make(device):
        return {"x": torch.randn(m, k, device=device), "linear": nn.Linear(k, n, device=device)}

    return make


def torchao_scheme(weight: torch.Tensor, group_size: int):
    """torchao's int4 weight-only quantisation (tinygemm layout), from its formula: per
    group min/max, ``scale = (max - min) / 15`` (at least 1e-6), ``zero = min + 8 *
    scale``, ``q = clamp(round((w - min) / scale), 0, 15)``, ``w = (q - 8) * scale +
    zero``. Returns the codes (N, K) int32 and scales_and_zeros (K / group, N, 2) in
    float32 (torchao stores them in bfloat16, which only loses; PyTorch's CPU kernel takes
    x's dtype)."""
    n, k = weight.shape
    g = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    zero = lo + 8 * scale
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.stack((scale.squeeze(2), zero.squeeze(2)), dim=2).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def _torchao_dequantized(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    scale = scales_and_zeros[..., 0].t().repeat_interleave(group_size, dim=1)
    zero = scales_and_zeros[..., 1].t().repeat_interleave(group_size, dim=1)
    return (q.float() - 8) * scale + zero


def _aten_int4(inp):
    linear = inp["linear"]
    q, scales_and_zeros = torchao_scheme(linear.weight, GROUP)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x, bias = inp["x"], linear.bias.detach()

    def call():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros) + bias

    return call


def _torchao(inp):
    from torchao.quantization import int4_weight_only, quantize_

    model = nn.Sequential(inp["linear"])
    quantize_(model, int4_weight_only(group_size=GROUP))
    return _no_grad(model, inp["x"])


def _providers() -> tuple[Provider, ...]:
    found = [_dense(torch.float32, "fp32 nn.Linear"), _memkern(memkern.nn.Int8WeightOnlyLinear, torch.float32)]
    found[1] = Provider("memkern int8 weight-only", found[1].build)
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        found.append(Provider("torch int4 (aten)", _aten_int4))
    if importlib.util.find_spec("torchao") is not None:  # optional: never a requirement
        found.append(Provider("torchao int4_weight_only", _torchao))

    def build(inp):
        layer = memkern.nn.Int4WeightOnlyLinear.from_linear(inp["linear"], group_size=GROUP)
        return _no_grad(layer, inp["x"])

    return (*found, Provider("memkern", build))


def _work(m: int, k: int, n: int) -> Work:
    """x read, the 4-bit weight with its float32 scales and zero points and the bias read,
    y written, float32 activations."""
    weight = n * k // 2 + n * math.ceil(k / GROUP) * 8
    return Work(flops=2 * m * k * n, bytes=m * k * 4 + weight + 4 * n + m * n * 4)


def cases(quick: bool) -> list[Case]:
    k = n = 4096
    return [
        Case(
            "int4_weight_only_linear",
            f"{m}x{k}x{n}-g{GROUP}",
            torch.float32,
            _inputs(m, k, n),
            _providers(),
            devices=("cpu",),
            work=_work(m, k, n),
        )
        for m in ((1,) if quick else (1, 16))
    ]


def quality(k: int = 4096, n: int = 4096, m: int = 16, group_size: int = GROUP, seed: int = 0) -> dict[str, float]:
    """Output SQNR (dB) against the float64 product of an ``nn.Linear``'s weight (Kaiming
    uniform) and Gaussian x, for memkern and torchao's scheme; and memkern's weight bytes
    (scales and zero points included) over float32's."""
    torch.manual_seed(seed)
    linear, x = nn.Linear(k, n, bias=False), torch.randn(m, k)
    exact = x.double() @ linear.weight.double().t()

    def sqnr(out: torch.Tensor) -> float:
        return 20 * math.log10(exact.norm().item() / (out.double() - exact).norm().item())

    layer = memkern.nn.Int4WeightOnlyLinear.from_linear(linear, group_size=group_size)
    q, scales_and_zeros = torchao_scheme(linear.weight, group_size)
    weight_bytes = sum(t.numel() * t.element_size() for t in (layer.weight, layer.weight_scale, layer.weight_zero))
    with torch.no_grad():
        return {
            "memkern_sqnr_db": sqnr(layer(x)),
            "torchao_scheme_sqnr_db": sqnr(x @ _torchao_dequantized(q, scales_and_zeros, group_size).t()),
            "weight_bytes_over_fp32": weight_bytes / (4 * k * n),
        }


if __name__ == "__main__":
    for name, value in quality().items():
        print(f"{name}: {value:.4f}")
