"""PNG figures for the analysis commands (matplotlib's Agg canvas; no pyplot, no global backend switch)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunet_ssl.analysis.stats import OVERALL

if TYPE_CHECKING:
    from matplotlib.axes import Axes
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

#: Every Dice axis spans 0 to 1, so that a difference of 0.001 looks as small as it is; the small margin
#: keeps a structure at exactly 0 (or 1) visible instead of hidden under the axis line.
DICE_LIMITS = (-0.02, 1.02)
#: Panels per row of the multi-panel figures.
PANELS_PER_ROW = 3


def _trainer_colors(trainers: Sequence[str]) -> dict[str, object]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {trainer: palette(i % 10) for i, trainer in enumerate(dict.fromkeys(trainers))}


def _panel_grid(figure: Figure, groups: Sequence[int], per_row: int = PANELS_PER_ROW) -> list[list[Axes]]:
    """Axes for ``groups`` of panels, each group starting on a new row of at most ``per_row`` panels."""
    columns = max(min(per_row, max(groups, default=1)), 1)
    rows = sum(-(-count // columns) for count in groups) or 1
    grid = figure.add_gridspec(rows, columns)
    panels, row = [], 0
    for count in groups:
        axes = [figure.add_subplot(grid[row + i // columns, i % columns]) for i in range(count)]
        panels.append(axes)
        row += -(-count // columns)
    return panels


def _figure_legend(figure: Figure, axes: Axes) -> None:
    """One legend for the whole figure, below the panels (the runs are the same in every panel)."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), fontsize="small")


def _dice_axis(axes: Axes, label: str) -> None:
    axes.set_ylim(*DICE_LIMITS)
    axes.set_yticks(np.linspace(0.0, 1.0, 6))
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)


def _run_labels(curves: Sequence) -> list[str | None]:
    """Legend label of each run: its trainer with all its folds on the trainer's first run, none on the others.

    Every run of a trainer has the trainer's colour, so the legend names each trainer once.
    """
    folds: dict[str, list[str]] = {}
    for run in curves:
        folds.setdefault(run.trainer, []).append(str(run.fold))
    labels: list[str | None] = []
    seen: set[str] = set()
    for run in curves:
        names = folds[run.trainer]
        label = f"{run.trainer} ({'fold' if len(names) == 1 else 'folds'} {', '.join(names)})"
        labels.append(None if run.trainer in seen else label)
        seen.add(run.trainer)
    return labels


def plot_validation_dice(curves: Sequence, path: Path, structures: Sequence[str] = ()) -> Figure:
    """Validation pseudo-Dice vs epoch: the mean over structures, then one panel per structure.

    The first panel is what nnU-Net logs as ``ema_fg_dice`` (solid) and ``mean_fg_dice`` (faint): the
    mean over the foreground structures, so one structure at 0 halves it. With more than one
    structure, each structure's per-epoch pseudo-Dice (``dice_per_class_or_region``; nnU-Net keeps no
    EMA of it) gets its own panel, as the training log prints it. Every Dice axis spans 0 to 1.

    Args:
        curves: ``TrainingCurves`` (``nnunet_ssl.analysis.curves``) of the runs to show.
        path: The PNG file.
        structures: The dataset's foreground names in nnU-Net's order (no per-structure panels when empty,
            or when no run logged per-structure values; the first panel's title then says so).

    Returns:
        The figure (saved to ``path``).
    """
    per_structure = {id(run): run.structure_series(list(structures)) for run in curves} if structures else {}
    shown = list(structures) if len(structures) > 1 and any(per_structure.values()) else []
    panels = 1 + len(shown)
    figure = _new_figure(max(6.5, min(PANELS_PER_ROW, panels) * 5.0), 3.6 * -(-panels // PANELS_PER_ROW) + 1.2)
    (mean_axes, *structure_axes), = _panel_grid(figure, [panels])
    colors = _trainer_colors([c.trainer for c in curves])
    for run, label in zip(curves, _run_labels(curves), strict=True):
        values = run.series["ema_fg_dice"]
        mean_axes.plot(np.arange(len(values)), values, color=colors[run.trainer], label=label)
        raw = run.series["mean_fg_dice"]
        mean_axes.plot(np.arange(len(raw)), raw, color=colors[run.trainer], alpha=0.3, linewidth=0.8)
        for axes, name in zip(structure_axes, shown, strict=True):
            values = per_structure[id(run)].get(name, [])
            axes.plot(np.arange(len(values)), values, color=colors[run.trainer], linewidth=1.0, alpha=0.85)
    if len(structures) == 1:
        _dice_axis(mean_axes, f"validation pseudo-Dice of {structures[0]}")
        title = structures[0]
    else:
        _dice_axis(mean_axes, "validation pseudo-Dice, mean over structures")
        title = "Mean over structures" + ("" if shown or not structures else
                                          " (the logs hold no per-structure values)")
    mean_axes.set_title(title + "\nsolid: EMA, as nnU-Net logs it; faint: per epoch", fontsize="medium")
    for axes, name in zip(structure_axes, shown, strict=True):
        _dice_axis(axes, f"validation pseudo-Dice of {name}")
        axes.set_title(f"{name}\nper epoch (nnU-Net logs no EMA per structure)", fontsize="medium")
    for axes in (mean_axes, *structure_axes):
        axes.set_xlabel("epoch")
        _integer_ticks(axes.xaxis)
    figure.suptitle("Validation pseudo-Dice during training\n(nnU-Net's, on validation patches; "
                    "the report's tables score whole cases)", fontsize="medium")
    _figure_legend(figure, mean_axes)
    figure.savefig(path, dpi=120)
    return figure


def plot_losses(curves: Sequence, path: Path) -> Figure:
    """Training and validation loss vs epoch, side by side, one colour per trainer.

    nnU-Net's loss is cross-entropy plus the negative soft Dice, so it goes below 0 as the Dice grows.

    Returns:
        The figure (saved to ``path``).
    """
    figure = _new_figure(11.0, 4.8)
    colors = _trainer_colors([c.trainer for c in curves])
    (train_axes, val_axes), = _panel_grid(figure, [2], per_row=2)
    for axes, (key, title) in zip((train_axes, val_axes), (("train_losses", "training loss"),
                                                           ("val_losses", "validation loss")), strict=True):
        for run, label in zip(curves, _run_labels(curves), strict=True):
            values = run.series[key]
            axes.plot(np.arange(len(values)), values, color=colors[run.trainer], label=label)
        axes.set_xlabel("epoch")
        _integer_ticks(axes.xaxis)
        axes.set_ylabel(f"{title}: CE + (-soft Dice), lower is better")
        axes.set_title(f"{title.capitalize()} (nnU-Net's loss; below 0 is normal)", fontsize="medium")
        axes.grid(alpha=0.3)
    _figure_legend(figure, train_axes)
    figure.savefig(path, dpi=120)
    return figure


#: Few-shot panels label each point with its value up to this many points (beyond, the tables have them).
LABELLED_POINTS = 4


def _size_axis(axes: Axes, sizes: Sequence[int]) -> None:
    """Training cases on a log2 axis (5, 10, 20 equally spaced), ticks at the sizes that were run."""
    from matplotlib.ticker import NullLocator

    axes.set_xscale("log", base=2)
    if sizes:
        axes.set_xlim(sizes[0] / 2 ** 0.5, sizes[-1] * 2 ** 0.5)
        axes.set_xticks(list(sizes), [str(s) for s in sizes])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("training cases (log scale)")


def plot_few_shot(rows: Sequence, path: Path, structure_rows: Sequence = (), structures: Sequence[str] = ()) -> Figure:
    """Dice vs training cases, mean over seeds (error bars: sample sd): the mean over structures, then each structure.

    One row of panels per kind (few-shot, data-limited). Methods at the same size are drawn side by
    side, each point labelled with its value; every Dice axis spans 0 to 1.

    Args:
        rows: ``FewShotRow`` (``nnunet_ssl.analysis.fewshot``) of the mean over structures
            (``structure == "overall"``), each with at least one complete seed: the first panel of each kind.
        path: The PNG file.
        structure_rows: ``FewShotRow`` of single structures (at least one complete seed each).
        structures: Structures that get their own panel, from ``structure_rows`` (none when fewer than two).

    Returns:
        The figure (saved to ``path``).
    """
    keys = [OVERALL, *(structures if len(structures) > 1 else [])]
    by_key = {OVERALL: list(rows), **{name: [r for r in structure_rows if r.structure == name] for name in keys[1:]}}
    kinds = list(dict.fromkeys(r.kind for r in rows)) or ["few_shot"]
    columns = min(PANELS_PER_ROW, len(keys))
    figure = _new_figure(4.6 * columns, 3.8 * len(kinds) * -(-len(keys) // columns) + 0.9)
    panels = _panel_grid(figure, [len(keys)] * len(kinds))
    colors = _trainer_colors([r.trainer for r in rows])
    one_seed = all(math.isnan(r.stats.std) for r in rows)  # a single seed has no sample sd
    for kind, kind_axes in zip(kinds, panels, strict=True):
        sizes = sorted({r.size for r in rows if r.kind == kind})
        dodge = min(0.08, 0.6 / max(len(colors), 1))  # log2 units between methods at one size
        for key, axes in zip(keys, kind_axes, strict=True):
            series = {trainer: sorted((r.size, r.stats.mean, r.stats.std) for r in by_key[key]
                                      if (r.kind, r.trainer) == (kind, trainer)) for trainer in colors}
            labelled = sum(map(len, series.values())) <= LABELLED_POINTS
            for index, (trainer, points) in enumerate(series.items()):
                if not points:
                    continue
                factor = 2 ** ((index - (len(colors) - 1) / 2) * dodge)
                x = [size * factor for size, _, _ in points]
                means = [mean for _, mean, _ in points]
                errors = np.nan_to_num([std for _, _, std in points])
                axes.errorbar(x, means, yerr=errors, marker="o", capsize=3, color=colors[trainer],
                              linestyle="-" if len(points) > 1 else "none", label=trainer)
                for xi, mean, error in zip(x, means, errors, strict=True) if labelled else ():
                    above = mean + error < 0.8
                    axes.annotate(f"{mean:.3f}", (xi, mean + error if above else mean - error),
                                  xytext=(0, 6 if above else -6), textcoords="offset points", rotation=90,
                                  ha="center", va="bottom" if above else "top", fontsize=7, color=colors[trainer])
            name = "mean over structures" if key == OVERALL else key
            _dice_axis(axes, ("Dice, mean over structures" if key == OVERALL else f"Dice of {key}")
                       + ("\n(one seed: no sd)" if one_seed else "\n(mean over seeds; bars: sd)"))
            axes.set_title(f"{kind.replace('_', '-')}: {name}", fontsize="medium")
            _size_axis(axes, sizes)
    figure.suptitle("Dice vs training cases (whole cases, as in the report's tables)", fontsize="medium")
    _figure_legend(figure, panels[0][0])
    figure.savefig(path, dpi=120)
    return figure


def report_figures(report: Any, out_dir: Path) -> dict[str, str]:
    """The figures of a transfer report (also drawn by the experiment report for its runs).

    ``curves.png`` and ``losses.png`` show the ordinary folds' runs (every run when there are none);
    ``few_shot.png`` the Dice vs training cases of the few-shot and data-limited folds, the mean over
    structures and each structure.

    Args:
        report: ``nnunet_ssl.analysis.report.Report`` (its ``curves``, ``manifest``, ``few_shot`` and
            ``structures``).
        out_dir: Folder of the PNG files.

    Returns:
        Figure name (``curves``, ``losses``, ``few_shot``) -> file name relative to ``out_dir``; only
        the figures written.
    """
    figures: dict[str, str] = {}
    if report.curves:
        shown = [c for c in report.curves if c.fold not in report.manifest] or report.curves
        plot_validation_dice(shown, out_dir / "curves.png", report.structures)
        plot_losses(shown, out_dir / "losses.png")
        figures.update(curves="curves.png", losses="losses.png")
    complete = [r for r in report.few_shot if r.stats.n > 0]
    overall = [r for r in complete if r.structure == OVERALL]
    if overall:
        plot_few_shot(overall, out_dir / "few_shot.png", [r for r in complete if r.structure != OVERALL],
                      report.structures)
        figures["few_shot"] = "few_shot.png"
    return figures
