"""Every figure has a title and labelled y axes; pretraining loss legends use readable names; no numexpr chatter."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nnunet_ssl.analysis import plots
from nnunet_ssl.pretraining.metrics_log import loss_label


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Figures the plot functions save, captured instead of written."""
    from matplotlib.figure import Figure

    figures: list = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    return figures


def test_every_report_and_cka_figure_has_titles_and_y_labels(saved_figures: list, tmp_path: Path) -> None:
    series = {"ema_fg_dice": [0.1, 0.2], "mean_fg_dice": [0.1, 0.3], "train_losses": [1.0, 0.5], "val_losses": [1.1, 0.6]}
    curves = [SimpleNamespace(trainer="A", fold=0, series=series)]
    stats = SimpleNamespace(mean=0.5, std=0.1)
    rows = [SimpleNamespace(kind="few_shot", size=s, trainer="A", stats=stats) for s in (5, 10)]
    plots.plot_validation_dice(curves, tmp_path / "a.png")
    plots.plot_losses(curves, tmp_path / "b.png")
    plots.plot_few_shot(rows, tmp_path / "c.png")
    plots.plot_cka_per_layer(["embed", "stage1"], [0.9, 0.8], tmp_path / "d.png")
    plots.plot_cka_heatmap(np.eye(2), ["embed", "stage1"], ["embed", "stage1"], tmp_path / "e.png")
    assert len(saved_figures) == 5
    for figure in saved_figures:
        for axes in (a for a in figure.axes if a.get_label() != "<colorbar>"):
            assert axes.get_title(), figure
            assert axes.get_ylabel(), (figure, axes.get_title())


def test_pretraining_loss_legend_names() -> None:
    assert loss_label("loss_mip") == "masked image prediction (mip)"
    assert loss_label("loss_mpd") == "masked patch distillation (mpd)"
    assert loss_label("loss") == "total loss"
    assert loss_label("loss_new_term") == "new_term"


def test_cli_keeps_numexpr_quiet() -> None:
    from nnunet_ssl.cli import main

    assert main(["ext-path"]) == 0
    assert not logging.getLogger("numexpr.utils").isEnabledFor(logging.INFO)
    assert main(["-v", "ext-path"]) == 0
    assert logging.getLogger("numexpr.utils").isEnabledFor(logging.INFO)
