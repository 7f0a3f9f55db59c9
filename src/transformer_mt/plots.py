"""The two pictures a run draws: an attention heat-map and the loss/BLEU curves.

Drawn with matplotlib's Agg backend on a private Figure (no pyplot, no display needed), and written
atomically: a temp file beside the target, renamed into place once complete. Both are redrawn every
epoch, so their margins are set from the labels' lengths rather than by a layout engine, which
measures every artist by drawing the figure once more (it doubled the time of each picture).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from transformer_mt.files import atomic_writer

INCHES_PER_TOKEN = 0.35
MIN_INCHES = 4.0
FONT_INCHES = 10 / 72  # matplotlib's default font size, 10 points
CHAR_INCHES = 0.62 * FONT_INCHES  # DejaVu Sans characters average about 0.6 em in width
LABEL_INCHES = 0.45  # an axis label and the gap beside it
TICK_INCHES = 0.1
X_LABEL_ANGLE = 60  # degrees: source tokens are written slanted


def plot_attention(
    weights: np.ndarray,
    source_tokens: Sequence[str],
    output_tokens: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> np.ndarray:
    """Save a heat-map of `weights` (rows: output tokens, columns: source tokens) as a PNG.

    Returns the matrix drawn, shape (len(output_tokens), len(source_tokens)).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only once a picture is asked for
    from matplotlib.figure import Figure

    matrix = np.asarray(weights, dtype=np.float32)
    expected = (len(output_tokens), len(source_tokens))
    if matrix.shape != expected:
        raise ValueError(f"attention weights of shape {matrix.shape}, labels for {expected}")
    # Margins, in inches, that hold the tick labels: the longest output token on the left, the
    # longest source token (slanted) below, the title above and the colour bar on the right.
    angle = math.radians(X_LABEL_ANGLE)
    left = LABEL_INCHES + TICK_INCHES + _text_inches(output_tokens)
    bottom = (
        LABEL_INCHES
        + TICK_INCHES
        + _text_inches(source_tokens) * math.sin(angle)
        + FONT_INCHES * math.cos(angle)
    )
    top = 0.45 if title else 0.15
    right = 1.1  # the colour bar, its ticks and its label
    width = max(MIN_INCHES, INCHES_PER_TOKEN * len(source_tokens) + left + right)
    height = max(MIN_INCHES, INCHES_PER_TOKEN * len(output_tokens) + bottom + top)
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes(
        (left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height)
    )
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(
        range(len(source_tokens)),
        labels=list(source_tokens),
        rotation=X_LABEL_ANGLE,
        ha="right",
        rotation_mode="anchor",
    )
    axes.set_yticks(range(len(output_tokens)), labels=list(output_tokens))
    axes.set_xlabel("source")
    axes.set_ylabel("output")
    if title:
        axes.set_title(title)
    bar = figure.add_axes(
        ((width - right + 0.15) / width, bottom / height, 0.15 / width, 1 - (bottom + top) / height)
    )
    figure.colorbar(image, cax=bar, label="attention weight")
    _save_png(figure, path)
    return matrix


def plot_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss (train and validation) and validation BLEU over epochs or steps, side by side, as a PNG.

    `rows` are metrics rows (`epoch`, `step`, `train_loss`, `val_loss`, `val_bleu`); None is
    drawn as a gap. When two rows share an epoch (validations every N steps), steps are the axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x_name = "epoch" if len({row["epoch"] for row in rows}) == len(rows) else "step"
    xs = [row[x_name] for row in rows]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.92, wspace=0.25)
    loss_ax, bleu_ax = figure.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_ax.plot(xs, [_gap(row[key]) for row in rows], marker="o", label=label)
    loss_ax.set(xlabel=x_name, ylabel="loss per target token", title="Loss")
    loss_ax.legend()
    bleu_ax.plot(xs, [_gap(row["val_bleu"]) for row in rows], marker="o", color="tab:green")
    bleu_ax.set(xlabel=x_name, ylabel="BLEU", title="Validation BLEU")
    for ax in (loss_ax, bleu_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save_png(figure, path)


def _text_inches(labels: Sequence[str]) -> float:
    return CHAR_INCHES * max((len(label) for label in labels), default=1)


def _gap(value: float | None) -> float:
    return math.nan if value is None else value


def _save_png(figure, path: str | os.PathLike) -> None:
    with atomic_writer(path, binary=True) as handle:
        figure.savefig(handle, format="png")
