"""Measure a case's providers side by side: median time and peak memory.

Time and memory come from memkern.measure. On the CPU each provider's peak memory is
taken in a fresh subprocess (memkern.benchmarks.probe) that builds the inputs, warms up
and measures one call, so no other provider's allocations can hide or inflate its peak;
on CUDA it is taken in this process. Results are written by memkern.benchmarks.report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterable

import torch

from memkern import measure as _measure
from memkern._validate import dtype_name


@dataclass(frozen=True)
class Provider:
    """One way of computing a case: memkern's op or a baseline users have today."""

    name: str
    build: Callable[[dict[str, Any]], Callable[[], Any]]
    """Given the case's inputs, return the zero-argument callable that is measured."""
    baseline: bool = False


@dataclass(frozen=True)
class Work:
    """The least a case must do, to put a time beside the hardware's limits: ``flops``,
    the arithmetic of the products it must compute (2 per multiply-add, integer or
    floating point), and ``bytes``, what it must move at least (each input read once and
    each output written once, in memkern's formats). The rates reported are this work over
    each provider's median time: a baseline that moves more bytes (an FP32 weight) is
    credited with memkern's bytes, so compare providers by time and read the rates against
    the machine's peaks."""

    flops: float = 0.0
    bytes: float = 0.0


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    """A readable label of the problem size, e.g. ``2048x4096``."""
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], dict[str, Any]]
    providers: tuple[Provider, ...]
    mode: str = "fwd"
    """``fwd`` or ``fwd+bwd``."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    work: Work | None = None
    interleaved: bool = False
    """On the CPU, time the providers in turns (one call each per round) instead of one
    after the other, so drifts of the shared machine's speed fall on all of them alike."""

    @property
    def id(self) -> str:
        return f"{self.op}/{self.mode}/{self.shape}/{dtype_name(self.dtype)}"

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"case {self.id} has no provider {name!r}")

    @property
    def baseline(self) -> Provider:
        return next(p for p in self.providers if p.baseline)


@dataclass
class Measurement:
    case: Case
    provider: str
    device: str
    time_ms: tuple[float, float, float]  # median, p20, p80
    peak_mib: float | None
    error: str | None = None


def on_backend(backend: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with every memkern op (and its backward) forced onto ``backend``: a
    provider for a memkern path other than the default one."""
    import memkern

    def call(*args: Any, **kwargs: Any) -> Any:
        with memkern.use_backend(backend):
            return fn(*args, **kwargs)

    return call


def rates(m: Measurement) -> dict[str, tuple[float, float, float]]:
    """TFLOP/s and GB/s of the case's work at the median, p20 and p80 times (p20 of the
    time is the faster end: it gives the higher rate, listed as the rate's p80)."""
    work = m.case.work
    if work is None:
        return {}
    med, p20, p80 = (t * 1e-3 for t in m.time_ms)
    out = {}
    if work.flops:
        out["tflop_per_s"] = (work.flops / med / 1e12, work.flops / p80 / 1e12, work.flops / p20 / 1e12)
    if work.bytes:
        out["gb_per_s"] = (work.bytes / med / 1e9, work.bytes / p80 / 1e9, work.bytes / p20 / 1e9)
    return out


def peak_cpu_in_subprocess(case: Case, provider: str, quick: bool) -> float:
    cmd = [sys.executable, "-m", "memkern.benchmarks.probe", case.id, provider, "1" if quick else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {case.id} {provider}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / _measure.MIB


# -- running ---------------------------------------------------------------------------
def measure(case: Case, provider: Provider, device: str, *, quick: bool, memory: bool = True) -> Measurement:
    inputs = case.make_inputs(torch.device(device))
    try:
        fn = provider.build(inputs)
        if device == "cuda":
            t = _measure.time_cuda(fn)
            peak = _measure.peak_cuda(fn) if memory else None
        else:
            t = _measure.time_cpu(fn, min_seconds=0.2 if quick else 1.0)
            del fn, inputs
            _measure.release_freed_memory()
            peak = peak_cpu_in_subprocess(case, provider.name, quick) if memory else None
    except Exception as exc:  # a failing provider is reported, not fatal to the run
        return Measurement(case, provider.name, device, (float("nan"),) * 3, None, f"{type(exc).__name__}: {exc}")
    return Measurement(case, provider.name, device, t, peak)


def measure_interleaved(case: Case, device: str, *, quick: bool, memory: bool = True) -> list[Measurement]:
    """Every provider of ``case`` timed in turns on the CPU (rounds of one call each, the
    order rotated per round), then each one's peak memory as :func:`measure` takes it."""
    samples: dict[str, list[float]] = {p.name: [] for p in case.providers}
    try:
        inputs = case.make_inputs(torch.device(device))
        fns = {p.name: p.build(inputs) for p in case.providers}
        for fn in fns.values():  # warm-up
            fn(), fn()
        names, start, rounds = list(fns), time.perf_counter(), 0
        while rounds < 5 or (time.perf_counter() - start < (0.2 if quick else 1.0) * len(names) and rounds < 200):
            for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        del fns, inputs
    except Exception as exc:  # reported, not fatal to the run (as measure does)
        error = f"{type(exc).__name__}: {exc}"
        return [Measurement(case, name, device, (float("nan"),) * 3, None, error) for name in samples]
    _measure.release_freed_memory()
    out = []
    for name, times in samples.items():
        peak = peak_cpu_in_subprocess(case, name, quick) if memory else None
        out.append(Measurement(case, name, device, _measure._quantiles(times), peak))
    return out


def run(
    cases: Iterable[Case],
    device: str,
    *,
    quick: bool,
    memory: bool = True,
    progress: bool = True,
    on_result: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Measure every provider of every case. ``on_result`` sees each measurement as soon as
    it is taken (the CLI appends its CSV rows there), so a run cut short keeps what it measured."""
    jobs = [(c, p) for c in cases for p in c.providers]
    results: list[Measurement] = []

    def one(case: Case, provider: Provider) -> None:
        if case.interleaved and device == "cpu":
            # The whole case at its first provider, the others' rows with it.
            if provider is not case.providers[0]:
                return
            ms = measure_interleaved(case, device, quick=quick, memory=memory)
        else:
            ms = [measure(case, provider, device, quick=quick, memory=memory)]
        for m in ms:
            results.append(m)
            if on_result is not None:
                on_result(m)

    bar = _progress_bar() if progress else None
    if bar is None:
        for case, provider in jobs:
            one(case, provider)
        return results
    with bar:
        task = bar.add_task("benchmarking", total=len(jobs))
        for case, provider in jobs:
            bar.update(task, description=f"{case.id} [{provider.name}]")
            one(case, provider)
            bar.advance(task)
    return results


def _progress_bar():
    """A rich progress bar, or None where rich is not installed (it is optional)."""
    try:
        from rich.progress import Progress
    except ImportError:
        return None
    return Progress(transient=True)
