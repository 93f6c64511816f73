"""The report's figures say what they plot: Dice axes span 0 to 1, every quantity is named on its axis, and
each structure gets its own panel where the logs have it (checked on the matplotlib objects the functions return)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from nnunet_ssl.analysis import plots
from nnunet_ssl.analysis.curves import TrainingCurves
from nnunet_ssl.analysis.stats import OVERALL, spread


def panels(figure: object) -> list:
    return list(figure.axes)  # type: ignore[attr-defined]


def assert_dice_axis(axes: object) -> None:
    bottom, top = axes.get_ylim()  # type: ignore[attr-defined]
    assert -0.05 <= bottom <= 0.0 and 1.0 <= top <= 1.05, (axes.get_title(), bottom, top)  # type: ignore[attr-defined]


def few_shot_row(trainer: str, size: int, structure: str, values: list[float]) -> SimpleNamespace:
    """A ``FewShotRow`` as the plot reads it: mean and sd over the seeds' values."""
    return SimpleNamespace(kind="few_shot", size=size, trainer=trainer, structure=structure, stats=spread(values))


def test_few_shot_axis_spans_0_to_1_so_a_0001_difference_looks_small(tmp_path: Path) -> None:
    """The demo's case: one size, one seed, 0.4568 vs 0.4559 (auto-scaling once filled the axis with it)."""
    rows = [few_shot_row("scratch", 5, OVERALL, [0.4568]), few_shot_row("smit", 5, OVERALL, [0.4559])]
    structure_rows = [few_shot_row(t, 5, s, [v]) for t, values in (("scratch", (0.9136, 0.0)), ("smit", (0.9118, 0.0)))
                      for s, v in zip(("liver", "spleen"), values, strict=True)]
    figure = plots.plot_few_shot(rows, tmp_path / "few_shot.png", structure_rows, ["liver", "spleen"])
    assert (tmp_path / "few_shot.png").read_bytes()[:4] == b"\x89PNG"
    mean, liver, spleen = panels(figure)
    for axes in (mean, liver, spleen):
        assert_dice_axis(axes)
        assert axes.get_xlabel() == "training cases (log scale)" and axes.get_xscale() == "log"
    assert mean.get_ylabel().startswith("Dice, mean over structures") and "one seed" in mean.get_ylabel()
    assert liver.get_ylabel().startswith("Dice of liver") and spleen.get_title() == "few-shot: spleen"
    # the two means are 0.0009 apart: under 0.1 % of the axis height
    low, high = mean.get_ylim()
    assert (0.4568 - 0.4559) / (high - low) < 0.001
    assert sorted(t.get_text() for t in mean.texts) == ["0.456", "0.457"]  # each point labelled with its value
    assert sorted(t.get_text() for t in liver.texts) == ["0.912", "0.914"]
    # methods at one size are drawn side by side, not on top of each other
    xs = sorted(float(container.lines[0].get_xdata()[0]) for container in mean.containers)
    assert len(xs) == 2 and xs[0] < 5 < xs[1]


def test_few_shot_over_seeds_names_the_spread(tmp_path: Path) -> None:
    rows = [few_shot_row("scratch", size, OVERALL, [0.3 + size / 100, 0.35 + size / 100]) for size in (5, 10, 20)]
    figure = plots.plot_few_shot(rows, tmp_path / "few_shot.png")
    (axes,) = panels(figure)  # no per-structure rows: one panel
    assert_dice_axis(axes)
    assert "mean over seeds; bars: sd" in axes.get_ylabel()
    assert list(axes.get_xticks()) == [5, 10, 20]


def curves(trainer: str, fold: int, per_structure: list[list[float]]) -> TrainingCurves:
    epochs = len(per_structure)
    mean = [sum(e) / len(e) for e in per_structure]
    ema = [mean[0]]
    for value in mean[1:]:
        ema.append(0.9 * ema[-1] + 0.1 * value)  # nnU-Net's EMA of the mean
    series = {"ema_fg_dice": ema, "mean_fg_dice": mean, "train_losses": [1.0 - i / epochs for i in range(epochs)],
              "val_losses": [1.1 - i / epochs for i in range(epochs)], "lrs": [0.01] * epochs}
    return TrainingCurves(trainer, fold, Path("checkpoint_final.pth"), series, per_structure)


def test_validation_dice_has_the_mean_and_each_structure(tmp_path: Path) -> None:
    """The demo's case: liver near 0.9, spleen at 0: the mean panel says it is a mean, each structure has a panel."""
    liver_spleen = [[0.1, 0.0], [0.6, 0.0], [0.88, 0.0], [0.9, 0.0]]
    runs = [curves("scratch", 5, liver_spleen), curves("smit", 5, [[v * 0.9, 0.0] for v, _ in liver_spleen]),
            curves("smit", 6, [[v * 0.8, 0.0] for v, _ in liver_spleen])]
    figure = plots.plot_validation_dice(runs, tmp_path / "curves.png", ["liver", "spleen"])
    mean, liver, spleen = panels(figure)
    for axes in (mean, liver, spleen):
        assert_dice_axis(axes)
        assert axes.get_xlabel() == "epoch"
    assert mean.get_ylabel() == "validation pseudo-Dice, mean over structures"
    assert "EMA" in mean.get_title() and "faint: per epoch" in mean.get_title()
    assert liver.get_ylabel() == "validation pseudo-Dice of liver" and spleen.get_ylabel().endswith("of spleen")
    assert [list(line.get_ydata()) for line in liver.lines][0] == [0.1, 0.6, 0.88, 0.9]
    assert all(set(line.get_ydata()) == {0.0} for line in spleen.lines)
    assert [list(line.get_ydata()) for line in mean.lines][0] == pytest.approx(runs[0].series["ema_fg_dice"])
    # one legend entry per trainer, naming its folds
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["scratch (fold 5)", "smit (folds 5, 6)"]


def test_validation_dice_without_per_structure_logs_says_so(tmp_path: Path) -> None:
    run = curves("scratch", 0, [[0.2, 0.4], [0.5, 0.7]])
    old = TrainingCurves(run.trainer, run.fold, run.source, run.series)  # a log without per-structure values
    (axes,) = panels(plots.plot_validation_dice([old], tmp_path / "a.png", ["liver", "spleen"]))
    assert "no per-structure values" in axes.get_title()
    assert axes.get_ylabel() == "validation pseudo-Dice, mean over structures"
    (single,) = panels(plots.plot_validation_dice([run], tmp_path / "b.png", ["liver"]))
    assert single.get_ylabel() == "validation pseudo-Dice of liver"  # one structure: the mean is that structure
    assert_dice_axis(single)


def test_losses_name_nnunets_loss(tmp_path: Path) -> None:
    figure = plots.plot_losses([curves("scratch", 0, [[0.2], [0.5]])], tmp_path / "losses.png")
    train, val = panels(figure)
    assert "CE + (-soft Dice)" in train.get_ylabel() and "lower is better" in val.get_ylabel()
    assert not math.isclose(*train.get_ylim())
