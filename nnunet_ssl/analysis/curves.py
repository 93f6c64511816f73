"""Training curves from nnU-Net checkpoints (the ``logging`` entry nnU-Net saves in every checkpoint)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: nnU-Net's per-epoch lists in ``checkpoint["logging"]`` (``nnunetv2/training/logging/nnunet_logger.py``).
SERIES = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs")
#: Checkpoints to read, finished run first; ``checkpoint_latest.pth`` covers a run still going.
CHECKPOINT_FILES = ("checkpoint_final.pth", "checkpoint_latest.pth")


@dataclass(frozen=True)
class TrainingCurves:
    """Per-epoch values of one run (epoch ``i`` at index ``i``; NaN where nnU-Net logged nothing).

    Attributes:
        source: The checkpoint file they were read from.
        series: Name in :data:`SERIES` -> values per epoch.
    """

    trainer: str
    fold: int
    source: Path
    series: dict[str, list[float]]

    @property
    def epochs(self) -> int:
        return max((len(v) for v in self.series.values()), default=0)


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
            return TrainingCurves(trainer, fold, path, series)
    return None


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def curve_rows(curves: list[TrainingCurves]) -> list[dict[str, object]]:
    """Long table: one row per (trainer, fold, epoch) with every series."""
    rows = []
    for run in curves:
        for epoch in range(run.epochs):
            row: dict[str, object] = {"trainer": run.trainer, "fold": run.fold, "epoch": epoch}
            for key in SERIES:
                values = run.series[key]
                row[key] = values[epoch] if epoch < len(values) else math.nan
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
