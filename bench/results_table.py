"""Render a results CSV of `memkern bench` as the README's markdown table.

    python bench/results_table.py bench/results/cpu.csv [--device cpu]

For each case (op, mode, shape, dtype) and each provider other than the case's baseline
(memkern and any named peer): its median time and peak memory beside the baseline's, and
the rates of the case's least work at that time (TFLOP/s, GB/s; "-" where the case states
no such work or the rows predate the rates). The baseline is the first provider a case
lists; when a case was measured more than once, the last rows in the file win.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    values: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    order: list[tuple] = []
    with open(args.csv) as f:
        for r in csv.DictReader(f):
            if r["device"] != args.device:
                continue
            case = (r["op"], r["mode"], r["shape"], r["dtype"])
            if case not in values:
                order.append(case)
            values[case][r["provider"]][r["metric"]] = float(r["median"])
    print(
        "| op | mode | shape | dtype | provider | time ms | baseline | baseline ms | speedup | peak MiB "
        "| baseline MiB | TFLOP/s | GB/s |"
    )
    print("| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in order:
        providers = values[case]
        base, *others = providers  # insertion order: the baseline was listed first
        b = providers[base]
        for name in others:
            m = providers[name]
            speed = b["time_ms"] / m["time_ms"] if "time_ms" in m and "time_ms" in b else float("nan")
            print(
                f"| {case[0]} | {case[1]} | {case[2]} | {case[3]} | {name} | {m.get('time_ms', float('nan')):.2f} "
                f"| {base} | {b.get('time_ms', float('nan')):.2f} | {speed:.2f}x "
                f"| {m.get('peak_mib', float('nan')):.1f} | {b.get('peak_mib', float('nan')):.1f} "
                f"| {_rate(m, 'tflop_per_s')} | {_rate(m, 'gb_per_s')} |"
            )


def _rate(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name]:.3g}" if name in metrics else "-"


if __name__ == "__main__":
    main()
