"""The decode benchmark's conditions (memkern.measure's LLC and bandwidth helpers) and the
arithmetic of its table."""

from __future__ import annotations

import glob

import torch

from memkern import measure
from memkern.benchmarks import decode


def _sysfs_llc() -> int | None:
    # The last-level cache as sysfs lists it, read independently of measure.llc_bytes.
    found = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            level = int(open(f"{index}/level").read())
            size = open(f"{index}/size").read().strip()
        except (OSError, ValueError):
            continue
        assert size.endswith("K"), size  # what Linux writes
        found[level] = int(size[:-1]) * 1024
    return found[max(found)] if found else None


def test_llc_bytes_is_the_highest_cache_level():
    expected = _sysfs_llc()
    assert measure.llc_bytes() == (expected if expected is not None else 32 * measure.MIB)


def test_evictor_reads_four_times_the_llc():
    evictor = measure.LlcEvictor(factor=4)
    assert evictor.buffer.numel() * evictor.buffer.element_size() == 4 * measure.llc_bytes()
    evictor()  # reads only: the buffer stays as written
    assert evictor.buffer.min().item() == evictor.buffer.max().item() == 1.0


def test_dram_read_gbps_is_a_finite_positive_rate_and_keeps_the_thread_count():
    threads = torch.get_num_threads()
    rate = measure.dram_read_gbps(1, buffer_bytes=4 * measure.MIB, reps=3)
    assert 0 < rate < 10_000
    assert torch.get_num_threads() == threads


def test_table_puts_weight_bytes_over_time_against_the_bandwidth():
    # 1 ms for the int8 layer's 4096 x 4096 bytes plus 4096 float32 scales: 16.793 GB/s,
    # 84% of a 20 GB/s two-thread bandwidth; the int4 layer's 8 MiB of codes plus a float32
    # scale and zero per group of 128 (1 MiB) in 2 ms: 4.719 GB/s, 24%.
    name8, name4 = "memkern Int8Linear (W8A8)", "memkern Int4WeightOnlyLinear g128"
    results = {"bandwidth_gbps": {1: 10.0, 2: 20.0}, "threads": 2, "llc_bytes": 32 * measure.MIB}
    results[1, "cold", name8] = 1.0
    results[16, "warm", name4] = 2.0
    rows = {line.split("|")[3].strip(): line for line in decode.table(results).splitlines() if line.startswith("| 1")}
    int8_bytes = 4096 * 4096 + 4 * 4096
    int4_bytes = 4096 * 4096 // 2 + 4096 * 32 * 8
    assert f"| {int8_bytes / 1e6:.1f} | 84% |" in rows[name8]
    assert f"| {int4_bytes / 2e6:.1f} | 24% |" in rows[name4]
    assert f"| {int4_bytes / measure.MIB:.2f} |" in rows[name4]


def test_every_provider_builds_and_agrees_with_the_float_layer():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(256, 64), torch.randn(3, 256)
    with torch.no_grad():
        exact = (x.double() @ linear.weight.double().t() + linear.bias.double()).float()
        for layer in decode.LAYERS:
            out = layer.build(linear, x)().float()
            rel = ((out - exact).norm() / exact.norm()).item()
            assert rel < 0.15, (layer.name, rel)  # int4 groups of 128 and bf16 x: ~5%
