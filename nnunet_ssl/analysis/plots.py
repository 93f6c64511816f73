"""PNG figures for the analysis commands (matplotlib's Agg canvas; no pyplot, no global backend switch)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunet_ssl.analysis.stats import OVERALL

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _integer_ticks(axis: Axis) -> None:
    """Whole-number ticks (epochs) on ``axis``, whose default locator (``AutoLocator``) is a ``MaxNLocator``."""
    from matplotlib.ticker import MaxNLocator

    locator = axis.get_major_locator()
    if isinstance(locator, MaxNLocator):
        locator.set_params(integer=True)


def plot_cka_per_layer(layers: Sequence[str], values: Sequence[float], path: Path,
                       title: str = "CKA between pretrained and fine-tuned encoder, per layer") -> Path:
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
    matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path,
    title: str = "CKA between every pretrained and fine-tuned layer",
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


# --- transfer report (nnunet-ssl report) ---------------------------------------------------------------


def _trainer_colors(trainers: Sequence[str]) -> dict[str, object]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {trainer: palette(i % 10) for i, trainer in enumerate(dict.fromkeys(trainers))}


def plot_validation_dice(curves: Sequence, path: Path) -> Path:
    """Validation pseudo-Dice (nnU-Net's EMA) vs epoch: one line per run, one colour per trainer.

    Args:
        curves: ``TrainingCurves`` (``nnunet_ssl.analysis.curves``) of the runs to show.
    """
    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot()
    colors = _trainer_colors([c.trainer for c in curves])
    for run in curves:
        values = run.series["ema_fg_dice"]
        axes.plot(np.arange(len(values)), values, color=colors[run.trainer], label=f"{run.trainer} fold {run.fold}")
        raw = run.series["mean_fg_dice"]
        axes.plot(np.arange(len(raw)), raw, color=colors[run.trainer], alpha=0.25, linewidth=0.8)
    axes.set_xlabel("epoch")
    _integer_ticks(axes.xaxis)
    axes.set_ylabel("validation pseudo-Dice (EMA; faint: per epoch)")
    axes.set_title("Validation pseudo-Dice during training")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_losses(curves: Sequence, path: Path) -> Path:
    """Training and validation loss vs epoch, side by side, one colour per trainer."""
    figure = _new_figure(11.0, 4.5)
    colors = _trainer_colors([c.trainer for c in curves])
    for index, (key, title) in enumerate((("train_losses", "training loss"), ("val_losses", "validation loss"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for run in curves:
            values = run.series[key]
            axes.plot(np.arange(len(values)), values, color=colors[run.trainer], label=f"{run.trainer} fold {run.fold}")
        axes.set_xlabel("epoch")
        _integer_ticks(axes.xaxis)
        axes.set_ylabel(f"{title} (nnU-Net: CE + Dice, lower is better)")
        axes.set_title(title.capitalize())
        axes.grid(alpha=0.3)
        if curves and index == 1:
            axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_few_shot(rows: Sequence, path: Path) -> Path:
    """Mean Dice over seeds (error bars: std) vs training-set size, one panel per kind.

    Args:
        rows: ``FewShotRow`` (``nnunet_ssl.analysis.fewshot``) with ``structure == "overall"``.
    """
    kinds = list(dict.fromkeys(r.kind for r in rows)) or ["few_shot"]
    figure = _new_figure(5.5 * len(kinds), 4.5)
    colors = _trainer_colors([r.trainer for r in rows])
    for index, kind in enumerate(kinds):
        axes = figure.add_subplot(1, len(kinds), index + 1)
        for trainer in colors:
            points = sorted((r.size, r.stats.mean, r.stats.std) for r in rows if r.kind == kind and r.trainer == trainer)
            if points:
                sizes, means, stds = zip(*points, strict=True)
                axes.errorbar(sizes, means, yerr=np.nan_to_num(stds), marker="o", capsize=3, color=colors[trainer],
                              label=trainer)
        axes.set_xticks(sorted({r.size for r in rows if r.kind == kind}))
        axes.set_xlabel("training cases")
        axes.set_ylabel("mean Dice over seeds")
        axes.set_title(f"{kind.replace('_', '-')}: mean Dice vs training cases")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return Path(path)


def report_figures(report: Any, out_dir: Path) -> dict[str, str]:
    """The figures of a transfer report (also drawn by the experiment report for its runs).

    ``curves.png`` and ``losses.png`` show the ordinary folds' runs (every run when there are none);
    ``few_shot.png`` the mean Dice over structures vs training cases of the few-shot and data-limited
    folds.

    Args:
        report: ``nnunet_ssl.analysis.report.Report`` (its ``curves``, ``manifest`` and ``few_shot``).
        out_dir: Folder of the PNG files.

    Returns:
        Figure name (``curves``, ``losses``, ``few_shot``) -> file name relative to ``out_dir``.
    """
    figures: dict[str, str] = {}
    if report.curves:
        shown = [c for c in report.curves if c.fold not in report.manifest] or report.curves
        plot_validation_dice(shown, out_dir / "curves.png")
        plot_losses(shown, out_dir / "losses.png")
        figures.update(curves="curves.png", losses="losses.png")
    overall = [r for r in report.few_shot if r.structure == OVERALL and r.stats.n > 0]
    if overall:
        plot_few_shot(overall, out_dir / "few_shot.png")
        figures["few_shot"] = "few_shot.png"
    return figures
