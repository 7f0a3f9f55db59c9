"""Validation BLEU against wall-clock minutes of training, one line per run (minutes-to-BLEU).

    python scripts/plot_minutes_to_bleu.py result/cpu-de-en result/cpu-en-de \\
        --out docs/img/cpu_minutes_to_bleu.png

Reads each run's `metrics.csv`; the x axis is the running sum of `epoch_seconds` (training and
validation of every epoch, start-up not counted), the y axis `val_bleu` after each epoch.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from transformer_mt.files import atomic_writer


def read_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(minutes at the end of each epoch, validation BLEU after it) of one run folder."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    minutes, bleu, elapsed = [], [], 0.0
    for row in rows:
        elapsed += float(row["epoch_seconds"])
        minutes.append(elapsed / 60)
        bleu.append(float(row["val_bleu"]))
    return minutes, bleu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="result/<run> folders")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--title", default="Multi30k validation BLEU (greedy) vs. training time")
    args = parser.parse_args()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in args.runs:
        minutes, bleu = read_curve(run)
        axes.plot(minutes, bleu, marker=".", label=run.name)
        print(
            f"{run.name}: {len(bleu)} epochs, {minutes[-1]:.1f} min, best val BLEU {max(bleu):.2f}"
        )
    axes.set_xlabel("wall-clock minutes (training + validation)")
    axes.set_ylabel("validation BLEU")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend()
    with atomic_writer(args.out, binary=True) as handle:
        figure.savefig(handle, format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
