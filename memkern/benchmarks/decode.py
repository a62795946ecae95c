"""Decode as a real model runs it: low-precision linear layers at M = 1 and M = 16 rows,
K = N = 4096, with the weight warm in the caches and with the last-level cache evicted
before every call.

Why eviction matters: a decoder layer's weights are read once per token, and by the time
the same layer runs again the other layers' weights (hundreds of MiB) have passed through
the cache. A benchmark that calls one 16 MiB layer in a loop keeps it in a 32 MiB L3 and
measures L3 bandwidth, not the DRAM bandwidth a model sees. The cold condition reads a
buffer of 4 x the LLC (memkern.measure.LlcEvictor) between timed calls. That was chosen
over rotating several weight copies because it treats every provider alike (a rotation
big enough for the 64 MiB float32 layer would need > 128 MiB per provider), it also
evicts x and the output (as the other layers of a model do), and reading (not writing)
leaves no dirty lines whose write-back would be timed.

Providers, interleaved round by round so machine load hits them alike: fp32 nn.Linear,
``torch.ao.quantization.quantize_dynamic`` (int8, fbgemm), memkern Int8Linear (W8A8),
memkern Int8WeightOnlyLinear (W8A16), memkern Int4WeightOnlyLinear (group 128), and
PyTorch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``) fed bfloat16 activations,
the dtype it has a vectorised path for (float32 x is 5-25x slower in torch 2.13,
bench/NOTES.md). Each layer's time is put beside the bytes of weight it must stream
(scales and zero points included, the bias not) as a fraction of this machine's DRAM read
bandwidth (memkern.measure.dram_read_gbps).

``memkern bench --ops decode_linear`` measures the warm condition through the ordinary
harness; ``python -m memkern.benchmarks.decode`` runs the full study (both conditions,
bandwidth, ratios) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import memkern
from memkern import measure
from memkern.benchmarks.harness import Case, Provider, Work
from memkern.benchmarks.int4 import GROUP, torchao_scheme
from memkern.benchmarks.lowp import _no_grad

K = N = 4096
ROWS = (1, 16)


@dataclass(frozen=True)
class Layer:
    """A provider of the study: its label, how to build the timed call from an
    ``nn.Linear`` and x (float32), and the weight bytes it streams per call."""

    name: str
    build: Callable[[nn.Linear, torch.Tensor], Callable[[], torch.Tensor]]
    weight_bytes: Callable[[int, int], int]


def _module(factory: Callable[[nn.Linear], nn.Module]):
    return lambda linear, x: _no_grad(factory(linear), x)


def _quantize_dynamic(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)


def _aten_int4_bf16(linear: nn.Linear, x: torch.Tensor):
    q, scales_and_zeros = torchao_scheme(linear.weight, GROUP)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    xb, bias, sz = x.bfloat16(), linear.bias.detach().bfloat16(), scales_and_zeros.bfloat16()
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, sz) + bias


def _int4_bytes(k: int, n: int, scale_bytes: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 2 * scale_bytes  # codes + a scale and a zero per group


LAYERS: tuple[Layer, ...] = (
    Layer("fp32 nn.Linear", _module(lambda lin: lin), lambda k, n: 4 * k * n),
    Layer("quantize_dynamic (int8)", _module(_quantize_dynamic), lambda k, n: k * n + 4),
    Layer("memkern Int8Linear (W8A8)", _module(memkern.nn.Int8Linear.from_linear), lambda k, n: k * n + 4 * n),
    Layer(
        "memkern Int8WeightOnlyLinear", _module(memkern.nn.Int8WeightOnlyLinear.from_linear), lambda k, n: k * n + 4 * n
    ),
    Layer(
        "memkern Int4WeightOnlyLinear g128",
        _module(lambda lin: memkern.nn.Int4WeightOnlyLinear.from_linear(lin, group_size=GROUP)),
        lambda k, n: _int4_bytes(k, n, 4),
    ),
    Layer("torch int4 (aten, bf16 x) g128", _aten_int4_bf16, lambda k, n: _int4_bytes(k, n, 2)),
)


def _time_one(fn: Callable[[], object], evict: Callable[[], None] | None) -> float:
    if evict is not None:
        evict()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def study(rows: tuple[int, ...] = ROWS, rounds: int = 30, warm_calls: int = 5, seed: int = 0) -> dict:
    """Median ms per (M, condition, provider) over ``rounds`` interleaved rounds, and the
    DRAM read bandwidth at 1 and 2 threads. Warm: per round, one untimed call, then the
    median of ``warm_calls`` timed calls. Cold: per round, the LLC evicted before one
    timed call."""
    torch.manual_seed(seed)
    evictor = measure.LlcEvictor()
    bandwidth = {t: measure.dram_read_gbps(t) for t in (1, 2)}
    results: dict = {"bandwidth_gbps": bandwidth, "threads": torch.get_num_threads(), "llc_bytes": measure.llc_bytes()}
    for m in rows:
        linear, x = nn.Linear(K, N), torch.randn(m, K)
        calls = {layer.name: layer.build(linear, x) for layer in LAYERS}
        samples: dict = {(cond, name): [] for cond in ("warm", "cold") for name in calls}
        for fn in calls.values():
            fn()
        for _ in range(rounds):
            for name, fn in calls.items():
                fn()
                samples["warm", name].append(statistics.median(_time_one(fn, None) for _ in range(warm_calls)))
                samples["cold", name].append(_time_one(fn, evictor))
        for (cond, name), s in samples.items():
            results[m, cond, name] = statistics.median(s)
        del calls
    return results


def table(results: dict) -> str:
    bw = results["bandwidth_gbps"][2] if results["threads"] >= 2 else results["bandwidth_gbps"][1]
    lines = [
        f"DRAM read bandwidth: {results['bandwidth_gbps'][1]:.1f} GB/s (1 thread), "
        f"{results['bandwidth_gbps'][2]:.1f} GB/s (2 threads); LLC {results['llc_bytes'] // measure.MIB} MiB; "
        f"{results['threads']} threads; K = N = {K}, float32 x (bf16 for aten int4)",
        "",
        "| M | condition | provider | weight MiB | median ms | weight GB/s | of DRAM bw |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, ms in results.items():
        if not isinstance(key, tuple):
            continue
        m, cond, name = key
        nbytes = next(layer for layer in LAYERS if layer.name == name).weight_bytes(K, N)
        gbps = nbytes / (ms * 1e-3) / 1e9
        lines.append(
            f"| {m} | {cond} | {name} | {nbytes / measure.MIB:.2f} | {ms:.3f} | {gbps:.1f} | {gbps / bw:.0%} |"
        )
    return "\n".join(lines)


# -- the warm condition in `memkern bench` ---------------------------------------------
def cases(quick: bool) -> list[Case]:
    def inputs(m: int):
        return lambda device: {"x": torch.randn(m, K, device=device), "linear": nn.Linear(K, N, device=device)}

    def provider(layer: Layer, baseline: bool = False) -> Provider:
        return Provider(layer.name, lambda inp: layer.build(inp["linear"], inp["x"]), baseline=baseline)

    return [
        Case(
            "decode_linear",
            f"{m}x{K}x{N}",
            torch.float32,
            inputs(m),
            tuple(provider(layer, baseline=i == 0) for i, layer in enumerate(LAYERS)),
            devices=("cpu",),
            work=Work(flops=2 * m * K * N, bytes=K * N + 4 * N),  # the int8 weight and its scales
        )
        for m in ((1,) if quick else ROWS)
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(table(study(tuple(args.rows), rounds=args.rounds)))
