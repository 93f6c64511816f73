"""Training curves from nnU-Net checkpoints (the ``logging`` entry nnU-Net saves in every checkpoint)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: nnU-Net's per-epoch lists in ``checkpoint["logging"]`` (``nnunetv2/training/logging/nnunet_logger.py``).
SERIES = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs")
#: nnU-Net's per-epoch list of the pseudo-Dice of each foreground label (or region), in its label order.
PER_STRUCTURE = "dice_per_class_or_region"
#: Checkpoints to read, finished run first; ``checkpoint_latest.pth`` covers a run still going.
CHECKPOINT_FILES = ("checkpoint_final.pth", "checkpoint_latest.pth")


@dataclass(frozen=True)
class TrainingCurves:
    """Per-epoch values of one run (epoch ``i`` at index ``i``; NaN where nnU-Net logged nothing).

    Attributes:
        source: The checkpoint file they were read from.
        series: Name in :data:`SERIES` -> values per epoch (``mean_fg_dice`` and ``ema_fg_dice`` are
            means over the structures).
        per_structure: Per epoch, the validation pseudo-Dice of each foreground label or region in
            nnU-Net's order (:data:`PER_STRUCTURE`; nnU-Net logs no EMA of these); empty when the log
            has none.
    """

    trainer: str
    fold: int
    source: Path
    series: dict[str, list[float]]
    per_structure: list[list[float]] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return max([len(v) for v in self.series.values()] + [len(self.per_structure)])

    def structure_series(self, structures: list[str]) -> dict[str, list[float]]:
        """Structure name -> per-epoch pseudo-Dice, when every logged epoch has one value per structure.

        ``structures`` are the dataset's foreground names in nnU-Net's label (or region) order, as
        :class:`~nnunet_ssl.analysis.results.DatasetInfo` lists them. Empty when the log has no
        per-structure values or their count differs (then the series cannot be named).
        """
        if not self.per_structure or any(len(epoch) != len(structures) for epoch in self.per_structure):
            return {}
        return {name: [epoch[i] for epoch in self.per_structure] for i, name in enumerate(structures)}


def load_curves(fold_dir: Path, trainer: str, fold: int) -> TrainingCurves | None:
    """Curves from ``checkpoint_final.pth`` (else ``checkpoint_latest.pth``); None without a checkpoint.

    Raises:
        ValueError: the checkpoint cannot be read, or holds objects other than the tensors, plain values
            and numpy scalars nnU-Net stores (:func:`~nnunet_ssl.checkpoints.load_nnunet_checkpoint`;
            nothing in it is run).
    """
    from nnunet_ssl.checkpoints import load_nnunet_checkpoint

    for name in CHECKPOINT_FILES:
        path = fold_dir / name
        if path.is_file():
            log = load_nnunet_checkpoint(path).get("logging") or {}
            if not isinstance(log, dict) or not all(isinstance(log.get(key, []), list) for key in SERIES):
                logger.warning("%s: 'logging' is not nnU-Net's per-epoch log; no curves for this run", path)
                return None
            series = {key: [_float(v) for v in log.get(key, [])] for key in SERIES}
            per_structure = log.get(PER_STRUCTURE, [])
            if not isinstance(per_structure, list) or not all(isinstance(e, (list, tuple)) for e in per_structure):
                per_structure = []
            return TrainingCurves(trainer, fold, path, series, [[_float(v) for v in e] for e in per_structure])
    return None


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def structure_column(structure: str) -> str:
    """The ``curves.csv`` column of one structure's per-epoch pseudo-Dice."""
    return f"pseudo_dice_{structure}"


def curve_rows(curves: list[TrainingCurves], structures: list[str] | None = None) -> list[dict[str, object]]:
    """Long table: one row per (trainer, fold, epoch) with every series.

    With ``structures`` (the dataset's foreground names in nnU-Net's order), each row also has the
    per-structure pseudo-Dice in :func:`structure_column` columns (NaN where the run logged none).
    """
    rows = []
    for run in curves:
        per_structure = run.structure_series(structures) if structures else {}
        for epoch in range(run.epochs):
            row: dict[str, object] = {"trainer": run.trainer, "fold": run.fold, "epoch": epoch}
            for key in SERIES:
                values = run.series[key]
                row[key] = values[epoch] if epoch < len(values) else math.nan
            for name in structures or []:
                values = per_structure.get(name, [])
                row[structure_column(name)] = values[epoch] if epoch < len(values) else math.nan
            rows.append(row)
    return rows


def epochs_to_fraction(values: list[float], fraction: float = 0.9) -> int | None:
    """Epochs a run needed to first reach ``fraction`` of its final value (1 = after the first epoch).

    NaN epochs never count as reaching it; None when the final value is NaN or not positive.
    """
    if not values or not math.isfinite(values[-1]) or values[-1] <= 0:
        return None
    target = fraction * values[-1]
    return next(i + 1 for i, v in enumerate(values) if math.isfinite(v) and v >= target)
