"""pytest-benchmark entry point over the very cases `memkern bench` runs.

    pytest bench --benchmark-only                 # quick cases on the CPU
    MEMKERN_BENCH_FULL=1 pytest bench --benchmark-only --benchmark-group-by=param:case

Time only; peak memory comes from `memkern bench`, which measures each provider in a fresh
process.
"""

from __future__ import annotations

import os

import pytest
import torch

from memkern.benchmarks import registry

DEVICE = os.environ.get("MEMKERN_BENCH_DEVICE", "cpu")
QUICK = os.environ.get("MEMKERN_BENCH_FULL", "0") != "1"

JOBS = [
    pytest.param(case, provider, id=f"{case.id}[{provider.name}]")
    for case in registry.all_cases(quick=QUICK, device=DEVICE)
    for provider in case.providers
]


@pytest.mark.parametrize("case, provider", JOBS)
def test_case(benchmark, case, provider):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("MEMKERN_BENCH_DEVICE=cuda but no CUDA device")
    torch.manual_seed(0)
    fn = provider.build(case.make_inputs(torch.device(DEVICE)))
    benchmark.group = case.id
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, provider=provider.name)
    if DEVICE == "cuda":

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)
