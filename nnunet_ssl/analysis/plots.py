"""PNG figures for the analysis commands (matplotlib's Agg canvas; no pyplot, no global backend switch)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_cka_per_layer(layers: Sequence[str], values: Sequence[float], path: Path, title: str = "") -> Path:
    """Line plot of CKA(pretrained layer, same fine-tuned layer) over the encoder's depth."""
    figure = _new_figure(max(6.0, 0.45 * len(layers)), 4.0)
    axes = figure.add_subplot()
    positions = np.arange(len(layers))
    axes.plot(positions, values, marker="o")
    axes.set_xticks(positions, list(layers), rotation=60, ha="right")
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("linear CKA (pretrained vs fine-tuned)")
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title)
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_cka_heatmap(
    matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Heatmap of CKA between every pretrained layer (rows) and every fine-tuned layer (columns)."""
    size = max(5.0, 0.4 * max(len(rows), len(columns)) + 2.0)
    figure = _new_figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    axes.set_xticks(np.arange(len(columns)), list(columns), rotation=60, ha="right")
    axes.set_yticks(np.arange(len(rows)), list(rows))
    axes.set_xlabel("fine-tuned layer")
    axes.set_ylabel("pretrained layer")
    figure.colorbar(image, ax=axes, label="linear CKA")
    if title:
        axes.set_title(title)
    figure.savefig(path, dpi=120)
    return Path(path)
