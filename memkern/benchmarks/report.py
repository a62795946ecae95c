"""Results of `memkern bench`: tidy CSV rows and the printed table."""

from __future__ import annotations

import csv
import datetime as _dt
import os
from typing import Any
from collections.abc import Iterable

from memkern.benchmarks.harness import Measurement, dtype_name, rates

CSV_FIELDS = ("op", "provider", "mode", "shape", "dtype", "device", "metric", "median", "p20", "p80", "version", "date")


def rows(results: Iterable[Measurement], version: str, date: str | None = None) -> list[dict[str, Any]]:
    date = date or _dt.date.today().isoformat()
    out = []
    for m in results:
        if m.error is not None:
            continue
        base = {
            "op": m.case.op,
            "provider": m.provider,
            "mode": m.case.mode,
            "shape": m.case.shape,
            "dtype": dtype_name(m.case.dtype),
            "device": m.device,
            "version": version,
            "date": date,
        }
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


TABLE_COLUMNS = (
    "op",
    "mode",
    "shape",
    "dtype",
    "provider",
    "time ms (p20-p80)",
    "speedup",
    "peak MiB",
    "memory ratio",
    "TFLOP/s",
    "GB/s",
)


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
    title = title or (
        f"memkern bench on {device}: median time and peak memory, ratios against the case's "
        "dense baseline; TFLOP/s and GB/s: the case's least work over each provider's time"
    )
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
