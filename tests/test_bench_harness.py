"""The benchmark harness measures what it says: memory probe, CSV schema, CLI."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from memkern import measure
from memkern.benchmarks import harness, registry, report
from memkern.benchmarks.harness import Case, Provider

MIB = 2**20


def test_peak_rss_probe_sees_a_known_allocation():
    # 64 MiB written and freed inside the call: the probe must see it, within the noise of
    # a few MiB of interpreter allocations.
    def allocate():
        t = torch.ones(16 * MIB, dtype=torch.float32)
        return t.sum()

    peak = measure.peak_rss_above_inputs(allocate) / MIB
    assert 60 <= peak <= 72, peak


def test_memory_is_measured_per_provider_in_a_fresh_process(monkeypatch):
    cases = registry.all_cases(quick=True, ops=["quantize_rowwise"])
    case = cases[0]
    rows, cols = (int(v) for v in case.shape.split("x"))
    peak = harness.peak_cpu_in_subprocess(case, "memkern", quick=True)
    out_mib = rows * cols / MIB  # the int8 output the op must allocate
    assert out_mib * 0.95 <= peak <= out_mib * 1.5 + 4, peak


def _tiny_case() -> Case:
    return Case(
        op="toy",
        shape="64x64",
        dtype=torch.float32,
        make_inputs=lambda device: {"x": torch.randn(64, 64, device=device)},
        providers=(
            Provider("baseline", lambda inp: lambda: inp["x"] @ inp["x"], baseline=True),
            Provider("candidate", lambda inp: lambda: inp["x"] * 2),
            Provider("broken", lambda inp: (_ for _ in ()).throw(RuntimeError("boom"))),
        ),
    )


def test_run_reports_failures_without_stopping_and_writes_tidy_csv(tmp_path):
    results = harness.run([_tiny_case()], "cpu", quick=True, memory=False, progress=False)
    assert [m.provider for m in results] == ["baseline", "candidate", "broken"]
    assert results[2].error and "boom" in results[2].error
    for m in results[:2]:
        med, p20, p80 = m.time_ms
        assert 0 < p20 <= med <= p80
    path = tmp_path / "r.csv"
    report.append_csv(str(path), report.rows(results, "9.9", date="2026-01-02"))
    report.append_csv(str(path), report.rows(results[:1], "9.9", date="2026-01-02"))
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(report.CSV_FIELDS)
    assert [r["provider"] for r in table] == ["baseline", "candidate", "baseline"]
    assert {r["metric"] for r in table} == {"time_ms"}
    assert all(r["version"] == "9.9" and r["device"] == "cpu" and r["op"] == "toy" for r in table)


def test_rates_are_the_work_over_each_time_in_the_csv(tmp_path):
    case = dataclasses.replace(_tiny_case(), work=harness.Work(flops=2 * 64**3, bytes=3 * 64 * 64 * 4))
    results = harness.run([case], "cpu", quick=True, memory=False, progress=False)
    table = report.rows(results, "9.9", date="2026-01-02")
    for m in results[:2]:
        med, p20, p80 = m.time_ms
        got = {r["metric"]: r for r in table if r["provider"] == m.provider}
        flops, gbs = got["tflop_per_s"], got["gb_per_s"]
        assert flops["median"] == pytest.approx(2 * 64**3 / (med * 1e-3) / 1e12)
        assert gbs["median"] == pytest.approx(3 * 64 * 64 * 4 / (med * 1e-3) / 1e9)
        # the slow end of the time is the low end of the rate
        assert flops["p20"] == pytest.approx(2 * 64**3 / (p80 * 1e-3) / 1e12)
        assert flops["p20"] <= flops["median"] <= flops["p80"]
    # a case without work reports no rates
    assert not [
        r
        for r in report.rows(harness.run([_tiny_case()], "cpu", quick=True, memory=False, progress=False), "9.9")
        if r["metric"] != "time_ms"
    ]


def test_every_case_has_one_baseline_and_a_memkern_provider():
    for case in registry.all_cases(quick=True) + registry.all_cases(quick=False):
        assert sum(p.baseline for p in case.providers) == 1, case.id
        assert case.providers[0].baseline, f"{case.id}: list the baseline first (results tables rely on it)"
        assert any(p.name.startswith("memkern") for p in case.providers), case.id
        assert case.work is not None and (case.work.flops > 0 or case.work.bytes > 0), f"{case.id}: no work"
    with pytest.raises(ValueError, match="unknown op"):
        registry.all_cases(quick=True, ops=["nope"])


def test_each_measurement_reaches_on_result_before_the_next_is_taken():
    seen: list[tuple[str, int]] = []
    calls = {"n": 0}

    def counting(inp):
        def call():
            calls["n"] += 1
            return inp["x"] * 2

        return call

    case = dataclasses.replace(
        _tiny_case(), providers=(Provider("baseline", counting, baseline=True), Provider("candidate", counting))
    )
    # on_result runs before the next provider is measured: it sees the call count of the
    # providers measured so far, not of the whole run.
    results = harness.run(
        [case],
        "cpu",
        quick=True,
        memory=False,
        progress=False,
        on_result=lambda m: seen.append((m.provider, calls["n"])),
    )
    assert [p for p, _ in seen] == ["baseline", "candidate"]
    assert 0 < seen[0][1] < seen[1][1]
    assert [m.provider for m in results] == ["baseline", "candidate"]


def test_table_prints_without_rich(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_rich(name, *args, **kwargs):
        if name == "rich" or name.startswith("rich."):
            raise ImportError("no rich here")
        return real_import(name, *args, **kwargs)

    results = harness.run([_tiny_case()], "cpu", quick=True, memory=False, progress=False)
    monkeypatch.setattr(builtins, "__import__", no_rich)
    report.print_table(results, "cpu")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == " | ".join(report.TABLE_COLUMNS)
    rows = [line.split(" | ") for line in lines[2:]]
    assert [r[4] for r in rows] == ["baseline", "candidate", "broken"]
    assert rows[0][6] == "1.00x" and rows[2][5].startswith("failed: RuntimeError: boom")


def test_cli_bench_match_selects_cases_and_streams_csv(tmp_path, capsys):
    from memkern import cli

    path = tmp_path / "r.csv"
    rc = cli.main(
        ["bench", "--quick", "--no-memory", "--ops", "quantize_rowwise", "--match", "float32", "--csv", str(path)]
    )
    assert rc == 0
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert table and {r["dtype"] for r in table} == {"float32"}
    assert {r["provider"] for r in table} == {"torch eager", "memkern"}
    assert cli.main(["bench", "--quick", "--no-memory", "--ops", "quantize_rowwise", "--match", "nope"]) == 2
    assert "no case id contains 'nope'" in capsys.readouterr().err


def test_int_mm_is_no_baseline_below_17_rows_on_cuda():
    # torch._int_mm refuses M <= 16 on CUDA; listing it there made every GPU run exit 1.
    for case in registry.all_cases(quick=False, ops=["int8_linear"], device="cuda"):
        m = int(case.shape.split("x")[0])
        names = {p.name for p in case.providers}
        assert ("torch._int_mm eager" in names) == (m > 16), case.id
