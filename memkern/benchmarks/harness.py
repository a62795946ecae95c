"""Measure a case's providers side by side: median time and peak memory.

Time: on the CPU, wall time of repeated calls after warm-up; on CUDA, CUDA events through
``triton.testing.do_bench`` (which also flushes L2 between calls).
Peak memory: on the CPU, each provider runs in a fresh subprocess that builds the inputs,
warms up, then reports the rise of its peak resident set (VmHWM, reset through
/proc/self/clear_refs) over the resident set just before the measured call; glibc is told
to serve large blocks with mmap so freed memory leaves the process and cannot hide a
peak (pin_malloc_thresholds). On CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before.
"""
from __future__ import annotations

import csv
import datetime as _dt
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

MIB = 1024 * 1024
CSV_FIELDS = ("op", "provider", "mode", "shape", "dtype", "device", "metric",
              "median", "p20", "p80", "version", "date")


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


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def rates(m: "Measurement") -> dict[str, tuple[float, float, float]]:
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


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


# -- time ------------------------------------------------------------------------------
def time_cpu(fn: Callable[[], Any], *, warmup: int = 2, min_reps: int = 5,
             min_seconds: float = 0.3, max_reps: int = 200) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < min_seconds and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def time_cuda(fn: Callable[[], Any]) -> tuple[float, float, float]:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


# -- peak memory -----------------------------------------------------------------------
def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_malloc_thresholds() -> None:
    """Make glibc serve every block over 64 KiB with its own mmap and return it on free.

    By default glibc raises its mmap threshold after large frees, so later tensors reuse
    heap memory that is already resident and a peak can hide in it; a fixed threshold
    makes the resident set follow live memory. (The same as MALLOC_MMAP_THRESHOLD_=65536.)
    """
    libc = _libc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 65536)
        libc.mallopt(m_trim_threshold, 65536)


def _release_freed_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting point while the ``with`` block runs, in bytes.

    CPU: rise of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) over the resident set at entry; call pin_malloc_thresholds()
    once first for honest numbers. CUDA: torch.cuda.max_memory_allocated above what was
    allocated at entry.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        _release_freed_memory()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._start = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_bytes("VmHWM")
        self.peak_bytes = max(0, peak - self._start)


def peak_rss_above_inputs(fn: Callable[[], Any]) -> int:
    """Rise of this process's peak RSS during one call of ``fn`` (called once before)."""
    fn()
    with PeakMemory("cpu") as peak:
        result = fn()
    del result
    return peak.peak_bytes


def peak_cpu_in_subprocess(case: Case, provider: str, quick: bool) -> float:
    cmd = [sys.executable, "-m", "memkern.benchmarks.harness", case.id, provider, "1" if quick else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {case.id} {provider}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / MIB


def peak_cuda(fn: Callable[[], Any]) -> float:
    fn()
    with PeakMemory("cuda") as peak:
        result = fn()
    del result
    return peak.peak_bytes / MIB


# -- running ---------------------------------------------------------------------------
def measure(case: Case, provider: Provider, device: str, *, quick: bool, memory: bool = True) -> Measurement:
    inputs = case.make_inputs(torch.device(device))
    try:
        fn = provider.build(inputs)
        if device == "cuda":
            t = time_cuda(fn)
            peak = peak_cuda(fn) if memory else None
        else:
            t = time_cpu(fn, min_seconds=0.2 if quick else 1.0)
            del fn, inputs
            _release_freed_memory()
            peak = peak_cpu_in_subprocess(case, provider.name, quick) if memory else None
    except Exception as exc:  # a failing provider is reported, not fatal to the run
        return Measurement(case, provider.name, device, (float("nan"),) * 3, None, f"{type(exc).__name__}: {exc}")
    return Measurement(case, provider.name, device, t, peak)


def run(cases: Iterable[Case], device: str, *, quick: bool, memory: bool = True,
        progress: bool = True, on_result: Callable[[Measurement], None] | None = None) -> list[Measurement]:
    """Measure every provider of every case. ``on_result`` sees each measurement as soon as
    it is taken (the CLI appends its CSV rows there), so a run cut short keeps what it measured."""
    jobs = [(c, p) for c in cases for p in c.providers]
    results: list[Measurement] = []

    def one(case: Case, provider: Provider) -> None:
        m = measure(case, provider, device, quick=quick, memory=memory)
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


# -- reporting -------------------------------------------------------------------------
def rows(results: Iterable[Measurement], version: str, date: str | None = None) -> list[dict[str, Any]]:
    date = date or _dt.date.today().isoformat()
    out = []
    for m in results:
        if m.error is not None:
            continue
        base = {"op": m.case.op, "provider": m.provider, "mode": m.case.mode, "shape": m.case.shape,
                "dtype": dtype_name(m.case.dtype), "device": m.device, "version": version, "date": date}
        med, p20, p80 = m.time_ms
        out.append({**base, "metric": "time_ms", "median": med, "p20": p20, "p80": p80})
        if m.peak_mib is not None:
            out.append({**base, "metric": "peak_mib", "median": m.peak_mib, "p20": m.peak_mib, "p80": m.peak_mib})
        for metric, (r_med, r_p20, r_p80) in rates(m).items():
            out.append({**base, "metric": metric, "median": r_med, "p20": r_p20, "p80": r_p80})
    return out


def append_csv(path: str, table_rows: list[dict[str, Any]]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in table_rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


TABLE_COLUMNS = ("op", "mode", "shape", "dtype", "provider", "time ms (p20-p80)", "speedup", "peak MiB",
                 "memory ratio", "TFLOP/s", "GB/s")


def table_rows(results: list[Measurement]) -> list[list[list[str]]]:
    """The printed table's cells, one group of rows per case (TABLE_COLUMNS)."""
    by_case: dict[str, list[Measurement]] = {}
    for m in results:
        by_case.setdefault(m.case.id, []).append(m)
    groups = []
    for ms in by_case.values():
        case = ms[0].case
        head = [case.op, case.mode, case.shape, dtype_name(case.dtype)]
        base = next((m for m in ms if m.provider == case.baseline.name and m.error is None), None)
        group = []
        for m in ms:
            if m.error is not None:
                group.append([*head, m.provider, f"failed: {m.error[:60]}", "", "", "", "", ""])
                continue
            med, p20, p80 = m.time_ms
            speed = f"{base.time_ms[0] / med:.2f}x" if base else "-"
            mem = f"{m.peak_mib:.1f}" if m.peak_mib is not None else "-"
            mem_ratio = "-"
            if base and base.peak_mib and m.peak_mib is not None:
                mem_ratio = f"{m.peak_mib / base.peak_mib:.2f}"
            rate = rates(m)
            flops = f"{rate['tflop_per_s'][0]:.3g}" if "tflop_per_s" in rate else "-"
            gbs = f"{rate['gb_per_s'][0]:.3g}" if "gb_per_s" in rate else "-"
            group.append([*head, m.provider, f"{med:.3f} ({p20:.3f}-{p80:.3f})", speed, mem, mem_ratio, flops, gbs])
        groups.append(group)
    return groups


def print_table(results: list[Measurement], device: str, title: str | None = None) -> None:
    title = title or (f"memkern bench on {device}: median time and peak memory, ratios against the case's "
                      "dense baseline; TFLOP/s and GB/s: the case's least work over each provider's time")
    groups = table_rows(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain columns, one line a row
        print(title)
        print(" | ".join(TABLE_COLUMNS))
        for group in groups:
            for row in group:
                print(" | ".join(row))
        return
    table = Table(title=title)
    for i, col in enumerate(TABLE_COLUMNS):
        table.add_column(col, justify="left" if i < 5 else "right", no_wrap=True)
    for group in groups:
        for row in group:
            table.add_row(*row[:5], *(f"[red]{c}" if c.startswith("failed") else c for c in row[5:]))
        table.add_section()
    Console(width=max(180, Console().width)).print(table)


def _probe_main(argv: list[str]) -> None:
    """Subprocess entry: print the peak memory of one provider of one case as JSON."""
    case_id, provider_name, quick = argv[0], argv[1], argv[2] == "1"
    from memkern.benchmarks import registry

    pin_malloc_thresholds()
    case = registry.find(case_id, quick=quick)
    torch.manual_seed(0)
    inputs = case.make_inputs(torch.device("cpu"))
    fn = case.provider(provider_name).build(inputs)
    print(json.dumps({"peak_bytes": peak_rss_above_inputs(fn)}))


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
