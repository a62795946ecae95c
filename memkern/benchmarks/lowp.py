"""Low-precision linear layers against the layers users have today.

CPU: FP32 ``nn.Linear`` (the baseline) and, for W8A8, PyTorch's dynamic quantisation
(``torch.ao.quantization.quantize_dynamic``, fbgemm, per-tensor activation scales).
CUDA: FP16 ``nn.Linear`` (cuBLAS, the baseline) and, for W8A8, ``torch._int_mm`` with an
eager epilogue. Shapes K = N = 4096 (CPU) and 8192 (CUDA), M in {1, 16, 512} (M = 8192 too
on CUDA for the compute-bound W8A8 case).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import memkern
from memkern.benchmarks.harness import Case, Provider, Work, on_backend


def _no_grad(module: nn.Module, x: torch.Tensor):
    def call():
        with torch.no_grad():
            return module(x)

    return call


def _dense(dtype: torch.dtype, label: str) -> Provider:
    def build(inp):
        return _no_grad(inp["linear"].to(dtype), inp["x"].to(dtype))

    return Provider(label, build, baseline=True)


def _memkern(layer_type: type[nn.Module], x_dtype: torch.dtype, backend: str | None = None) -> Provider:
    """memkern's layer on its default backend, or forced onto ``backend``."""

    def build(inp):
        call = _no_grad(layer_type.from_linear(inp["linear"]), inp["x"].to(x_dtype))
        return call if backend is None else on_backend(backend, call)

    return Provider("memkern" if backend is None else f"memkern {backend}", build)


def _quantize_dynamic(inp):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice, not a measurement
        layer = torch.ao.quantization.quantize_dynamic(nn.Sequential(inp["linear"]), {nn.Linear}, dtype=torch.qint8)
    return _no_grad(layer, inp["x"])


def _int_mm_eager(inp):
    # What a user composes from PyTorch ops: quantise x per row, torch._int_mm, dequantise.
    w_q, w_scale = memkern.ops.quantize_rowwise(inp["linear"].weight.detach())
    w_t = w_q.t().contiguous()
    x, bias = inp["x"].half(), inp["linear"].bias.detach().half()

    def call():
        scale = x.abs().amax(dim=1, keepdim=True).float() / 127
        x_q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        return (torch._int_mm(x_q, w_t).float() * scale * w_scale + bias).half()

    return call


_WEIGHT_BYTES = {"int8_linear": 1, "int8_weight_only_linear": 1, "fp16_linear": 2}


def _inputs(m: int, k: int, n: int):
    # x Gaussian; the weight as nn.Linear initialises it (uniform in +-1/sqrt(k)), the
    # distribution the accuracy figures in README.md and bench/NOTES.md are quoted for.
    def make(device):
        return {"x": torch.randn(m, k, device=device), "linear": nn.Linear(k, n, device=device)}

    return make


def _work(m: int, k: int, n: int, x_dtype: torch.dtype, weight_bytes: int) -> Work:
    """x read, the low-precision weight (and its fp32 scales when int8) and the bias read,
    y written in x's dtype."""
    e = x_dtype.itemsize
    scales = 4 * n if weight_bytes == 1 else 0
    return Work(flops=2 * m * k * n, bytes=m * k * e + n * k * weight_bytes + scales + 4 * n + m * n * e)


def _case(op: str, m: int, k: int, n: int, dtype: torch.dtype, providers: tuple[Provider, ...], device: str) -> Case:
    work = _work(m, k, n, dtype, _WEIGHT_BYTES[op])
    return Case(op, f"{m}x{k}x{n}", dtype, _inputs(m, k, n), providers, devices=(device,), work=work)


def _weight_only_cases(
    rows: tuple[int, ...], k: int, n: int, dtype: torch.dtype, dense_label: str, device: str
) -> list[Case]:
    """W8A16 and fp16 weights beside the dense layer of x's dtype, at each of ``rows``."""
    return [
        _case(op, m, k, n, dtype, (_dense(dtype, dense_label), _memkern(layer, dtype)), device)
        for m in rows
        for op, layer in (
            ("int8_weight_only_linear", memkern.nn.Int8WeightOnlyLinear),
            ("fp16_linear", memkern.nn.Fp16Linear),
        )
    ]


def _cpu_cases(quick: bool) -> list[Case]:
    k = n = 4096
    out = []
    for m in (16,) if quick else (1, 16, 512):
        providers = (
            _dense(torch.float32, "fp32 nn.Linear"),
            Provider("quantize_dynamic", _quantize_dynamic),
            _memkern(memkern.nn.Int8Linear, torch.float32),
        )
        out.append(_case("int8_linear", m, k, n, torch.float32, providers, "cpu"))
    out += _weight_only_cases((1,) if quick else (1, 16, 512), k, n, torch.float32, "fp32 nn.Linear", "cpu")
    return out


def _cuda_cases(quick: bool) -> list[Case]:
    k = n = 8192
    out = []
    for m in (16, 8192) if quick else (1, 16, 512, 8192):
        # torch._int_mm takes only more than 16 rows on CUDA ("self.size(0) needs to be
        # greater than 16"), so it is no baseline for decode shapes.
        int_mm = (Provider("torch._int_mm eager", _int_mm_eager),) if m > 16 else ()
        providers = (
            _dense(torch.float16, "fp16 nn.Linear (cuBLAS)"),
            *int_mm,
            _memkern(memkern.nn.Int8Linear, torch.float16),  # Triton (wgmma on Hopper)
            _memkern(memkern.nn.Int8Linear, torch.float16, backend="cuda"),  # the .cu kernel (mma.sync)
        )
        out.append(_case("int8_linear", m, k, n, torch.float16, providers, "cuda"))
    out += _weight_only_cases(
        (1, 16) if quick else (1, 16, 512), k, n, torch.float16, "fp16 nn.Linear (cuBLAS)", "cuda"
    )
    return out


def cases(quick: bool) -> list[Case]:
    return _cpu_cases(quick) + _cuda_cases(quick)


def int8_linear_cases(quick: bool) -> list[Case]:
    return [c for c in cases(quick) if c.op == "int8_linear"]


def int8_weight_only_linear_cases(quick: bool) -> list[Case]:
    return [c for c in cases(quick) if c.op == "int8_weight_only_linear"]


def fp16_linear_cases(quick: bool) -> list[Case]:
    return [c for c in cases(quick) if c.op == "fp16_linear"]
