"""Render: a CKA matrix as the log's text table and the files of ``nnunet-ssl cka``.

Files, in the order they are written (``out`` is the command's ``--out``):

* ``cka_per_layer.csv``: ``layer,cka``, each layer against the same layer of the other network
  (the matrix's diagonal), 6 decimals;
* ``cka_matrix.csv``: every layer of the first network (rows) against every layer of the second
  (columns), 6 decimals;
* ``cka_per_layer.png`` and ``cka_heatmap.png``: the same two as figures;
* ``cka_settings.json``: the settings, counts and provenance of the run.

CSV files go through the reports' writer (:func:`nnunet_ssl.analysis.tables.write_csv`), figures
through :mod:`nnunet_ssl.analysis.plots`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_ssl.analysis.cka.compare import same_layer_cka
from nnunet_ssl.analysis.plots import plot_cka_heatmap, plot_cka_per_layer
from nnunet_ssl.analysis.tables import write_csv
from nnunet_ssl.io import atomic_json_dump


def format_table(per_layer: list[tuple[str, float]]) -> str:
    """A two-column text table for the log."""
    width = max(len("layer"), *(len(name) for name, _ in per_layer))
    lines = [f"{'layer':{width}s}  CKA", "-" * (width + 8)]
    lines += [f"{name:{width}s}  {value:.4f}" for name, value in per_layer]
    return "\n".join(lines)


def write_tables(out: Path, layers: Sequence[str], matrix: np.ndarray) -> list[Path]:
    """``cka_per_layer.csv`` and ``cka_matrix.csv`` in ``out``.

    Args:
        out: An existing folder.
        layers: Names of the ``L`` layers, rows and columns of ``matrix``.
        matrix: ``(L, L)`` CKA, first network's layers as rows.
    """
    per_layer = same_layer_cka(layers, matrix)
    return [
        write_csv(out / "cka_per_layer.csv", ["layer", "cka"], [[n, f"{v:.6f}"] for n, v in per_layer]),
        write_csv(
            out / "cka_matrix.csv",
            ["pretrained \\ fine-tuned", *layers],
            [[name, *(f"{v:.6f}" for v in row)] for name, row in zip(layers, matrix, strict=True)],
        ),
    ]


def write_figures(out: Path, layers: Sequence[str], matrix: np.ndarray, title: str) -> list[Path]:
    """``cka_per_layer.png`` and ``cka_heatmap.png`` in ``out``, both titled ``title``.

    Args:
        out: An existing folder.
        layers: Names of the ``L`` layers, rows and columns of ``matrix``.
        matrix: ``(L, L)`` CKA, first network's layers as rows.
        title: Title of both figures.
    """
    per_layer = same_layer_cka(layers, matrix)
    return [
        plot_cka_per_layer([n for n, _ in per_layer], [v for _, v in per_layer], out / "cka_per_layer.png", title),
        plot_cka_heatmap(matrix, layers, layers, out / "cka_heatmap.png", title),
    ]


def write_summary(out: Path, summary: Mapping[str, Any]) -> Path:
    """``cka_settings.json`` in ``out`` (indented, keys sorted, written atomically)."""
    return atomic_json_dump(summary, out / "cka_settings.json")
