"""The demo's report: a table on the terminal, the same rows as CSV, and a PNG plot."""

from __future__ import annotations

import csv
import os

from memkern.demo.pipeline import DemoResult

COLUMNS = (
    "stage",
    "parameters",
    "weight_mib",
    "weights_by_dtype",
    "peak_mib",
    "peak_of",
    "val_perplexity",
    "bits_per_byte",
    "tokens_per_s",
    "note",
)


def print_table(result: DemoResult) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = result.config
    table = Table(
        title=f"memkern demo on {cfg.device}: {result.train_tokens:,} training tokens, "
        f"seed {cfg.seed}, {result.seconds:.0f} s"
    )
    for col, justify in (
        ("stage", "left"),
        ("params", "right"),
        ("weights MiB", "right"),
        ("by dtype", "left"),
        ("peak MiB", "right"),
        ("peak of", "left"),
        ("val ppl", "right"),
        ("bits/byte", "right"),
        ("tokens/s", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)
    for s in result.stages:
        dtypes = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(s.weight_bytes_by_dtype.items()))
        table.add_row(
            s.name,
            f"{s.parameters:,}",
            f"{s.weight_bytes / 2**20:.2f}",
            dtypes,
            f"{s.peak_mib:.1f}",
            s.peak_of,
            f"{s.perplexity:.2f}",
            f"{s.bits_per_byte:.3f}",
            f"{s.tokens_per_s:,.0f}",
        )
    console = Console(width=max(140, Console().width))
    console.print(table)
    for s in result.stages:
        if s.note:
            console.print(f"  {s.name}: {s.note}")


def write_csv(result: DemoResult, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for s in result.stages:
            writer.writerow(s.row())


def plot(result: DemoResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    markers = "osD^vP*X"
    for ax, label, value in (
        (axes[0], "weights (MiB)", lambda s: s.weight_bytes / 2**20),
        (axes[1], "peak memory of the stage (MiB)", lambda s: s.peak_mib),
    ):
        for i, s in enumerate(result.stages):
            ax.scatter(value(s), s.perplexity, s=60, marker=markers[i % len(markers)], label=s.name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation perplexity")
    # Stages often sit on top of each other (quantising barely moves perplexity): a legend
    # stays readable where labels next to the points would overlap.
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
    fig.suptitle(f"memkern demo ({result.config.device}): memory vs perplexity per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: DemoResult, out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path, png_path = os.path.join(out_dir, "demo.csv"), os.path.join(out_dir, "demo.png")
    write_csv(result, csv_path)
    plot(result, png_path)
    return csv_path, png_path
