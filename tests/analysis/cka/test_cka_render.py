"""Rendering a CKA matrix (``analysis/cka/render.py``): the log table, the CSV tables, the figures, the settings file."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from nnunet_ssl.analysis.cka.render import format_table, write_figures, write_summary, write_tables

LAYERS = ["embed", "stage1.block1"]


def test_log_table_aligns_names_and_rounds_to_four_decimals() -> None:
    assert format_table([("embed", 0.123456), ("stage1.block1", 1.0)]).splitlines() == [
        "layer          CKA",
        "---------------------",
        "embed          0.1235",
        "stage1.block1  1.0000",
    ]


def test_csv_tables_have_six_decimals_pretrained_rows_and_nan_kept(tmp_path: Path) -> None:
    matrix = np.array([[0.5, 0.25], [1 / 3, math.nan]])
    paths = write_tables(tmp_path, LAYERS, matrix)
    assert [p.name for p in paths] == ["cka_per_layer.csv", "cka_matrix.csv"]
    assert (tmp_path / "cka_per_layer.csv").read_bytes() == b"layer,cka\r\nembed,0.500000\r\nstage1.block1,nan\r\n"
    assert (tmp_path / "cka_matrix.csv").read_text(encoding="utf-8").splitlines() == [
        "pretrained \\ fine-tuned,embed,stage1.block1",
        "embed,0.500000,0.250000",
        "stage1.block1,0.333333,nan",
    ]


def test_figures_and_settings_are_written(tmp_path: Path) -> None:
    paths = write_figures(tmp_path, LAYERS, np.eye(2), "title")
    assert [p.name for p in paths] == ["cka_per_layer.png", "cka_heatmap.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    path = write_summary(tmp_path, {"examples": 8, "cases": ["b", "a"]})
    assert path.name == "cka_settings.json"
    assert path.read_text(encoding="utf-8") == json.dumps({"cases": ["b", "a"], "examples": 8}, indent=2) + "\n"
