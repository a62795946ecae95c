"""Time and peak memory of a callable: the measurement both `memkern bench` and
`memkern demo` report. A leaf module: torch and the standard library only.

Time: on the CPU, wall time of repeated calls after warm-up; on CUDA, CUDA events through
``triton.testing.do_bench`` (which also flushes L2 between calls).
Peak memory: on the CPU, the rise of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) over the resident set at the start, with glibc told to
serve large blocks with mmap so freed memory leaves the process and cannot hide a peak
(pin_malloc_thresholds). On CUDA, ``torch.cuda.max_memory_allocated`` above what was
allocated at the start.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from typing import Any
from collections.abc import Callable, Sequence

import torch

MIB = 1024 * 1024


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


def time_cpu(
    fn: Callable[[], Any], *, warmup: int = 2, min_reps: int = 5, min_seconds: float = 0.3, max_reps: int = 200
) -> tuple[float, float, float]:
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


def release_freed_memory() -> None:
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

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
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


def peak_cuda(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory of one call of ``fn`` (called once before), in MiB."""
    fn()
    with PeakMemory("cuda") as peak:
        result = fn()
    del result
    return peak.peak_bytes / MIB


# -- decode conditions: last-level cache and DRAM bandwidth (memkern.benchmarks.decode) --
def llc_bytes() -> int:
    """Size of the last-level cache of CPU 0, from /sys/devices/system/cpu/cpu0/cache (the
    highest level listed; 32 MiB if the folder cannot be read)."""
    import glob

    best_level, best_size = 0, 32 * MIB
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1024, "M": MIB, "G": 1024 * MIB}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if level > best_level:
            best_level, best_size = level, size
    return best_size


class LlcEvictor:
    """Push everything out of the last-level cache by reading a buffer of ``factor`` x its
    size. The buffer is written once, at construction, and only read afterwards: a written
    buffer would leave dirty lines whose write-back lands inside the next timed call."""

    def __init__(self, factor: int = 4):
        self.buffer = torch.ones(factor * llc_bytes() // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def dram_read_gbps(threads: int, *, buffer_bytes: int | None = None, reps: int = 9) -> float:
    """Streaming read bandwidth of this machine in GB/s (1e9 bytes): median over ``reps``
    sums of a float32 buffer of 8 x the last-level cache (``buffer_bytes`` overrides), on
    ``threads`` threads. A sum reads each byte once and writes nothing."""
    buffer = torch.ones((buffer_bytes or 8 * llc_bytes()) // 4, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer.sum()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            buffer.sum()
            samples.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return buffer.numel() * 4 / statistics.median(samples) / 1e9
