"""Attention heat-maps: which source tokens each output token looked at.

Drawn with matplotlib's Agg backend on a private Figure (no pyplot, no display needed), and written
atomically: a temp file beside the target, renamed into place once complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from transformer_mt.files import atomic_writer

INCHES_PER_TOKEN = 0.35
MIN_INCHES = 4.0


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(weights, dtype=np.float32)
    expected = (len(output_tokens), len(source_tokens))
    if matrix.shape != expected:
        raise ValueError(f"attention weights of shape {matrix.shape}, labels for {expected}")
    width = max(MIN_INCHES, INCHES_PER_TOKEN * len(source_tokens) + 2.0)
    height = max(MIN_INCHES, INCHES_PER_TOKEN * len(output_tokens) + 1.5)
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(source_tokens)), labels=list(source_tokens), rotation=60, ha="right")
    axes.set_yticks(range(len(output_tokens)), labels=list(output_tokens))
    axes.set_xlabel("source")
    axes.set_ylabel("output")
    if title:
        axes.set_title(title)
    figure.colorbar(image, ax=axes, label="attention weight")
    with atomic_writer(path, binary=True) as handle:
        figure.savefig(handle, format="png")
    return matrix
