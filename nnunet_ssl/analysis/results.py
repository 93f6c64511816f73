"""Find nnU-Net training runs and read their validation Dice.

A run is one (trainer, fold) in ``$nnUNet_results/<Dataset>/<Trainer>__<plans>__<configuration>/fold_N/``.
Every run asked for gets a :class:`RunResult`; runs that cannot be scored are ``missing`` or
``incomplete`` with the reason, so reports can list them instead of dropping them.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_ssl.analysis.stats import nan_mean
from nnunet_ssl.case_ids import check_case_id, check_file_ending

logger = logging.getLogger(__name__)

COMPLETE = "complete"
INCOMPLETE = "incomplete"
MISSING = "missing"

#: ``--checkpoint`` choice -> nnU-Net's file name.
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


@dataclass
class RunResult:
    """Per-case scores of one (trainer, fold), or why there are none.

    Attributes:
        status: ``complete``, ``incomplete`` or ``missing``.
        reason: Why the run is not complete (empty when complete).
        dice: ``{case_id: {structure: Dice}}`` (NaN: structure absent from prediction and reference).
        hd95: Same layout for the 95th-percentile Hausdorff distance in mm, when computed.
    """

    trainer: str
    fold: int
    status: str
    reason: str = ""
    dice: dict[str, dict[str, float]] = field(default_factory=dict)
    hd95: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE


@dataclass(frozen=True)
class ResultsLayout:
    """Where one dataset's nnU-Net files are."""

    results_root: Path
    dataset_name: str
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    preprocessed_root: Path | None = None

    def model_dir(self, trainer: str) -> Path:
        return self.results_root / self.dataset_name / f"{trainer}__{self.plans}__{self.configuration}"

    def fold_dir(self, trainer: str, fold: int) -> Path:
        return self.model_dir(trainer) / f"fold_{fold}"

    @property
    def preprocessed_dir(self) -> Path | None:
        return None if self.preprocessed_root is None else self.preprocessed_root / self.dataset_name


@dataclass(frozen=True)
class DatasetInfo:
    """What the report needs from ``dataset.json``, read through nnU-Net's ``LabelManager``.

    Attributes:
        structures: nnU-Net's summary key (``"1"``, or ``"(1, 2)"`` for a region) -> structure name,
            foreground only (no background, no ignore label), in nnU-Net's evaluation order.
        label_values: Structure name -> integer label (plain labels only; empty for region datasets).
        labels_or_regions: What nnU-Net's evaluation scores: the foreground labels, or the foreground
            regions of a region-based dataset (``nnunetv2.evaluation.compute_metrics``).
        ignore_label: The dataset's ignore label (voxels excluded from every metric), or None.
    """

    structures: dict[str, str]
    label_values: dict[str, int]
    file_ending: str
    dataset_json: dict
    labels_or_regions: tuple[int | tuple[int, ...], ...] = ()
    ignore_label: int | None = None

    @property
    def names(self) -> list[str]:
        return list(self.structures.values())


def dataset_info(dataset_json: dict) -> DatasetInfo:
    """Structure names and keys from nnU-Net's ``dataset.json`` content, as nnU-Net's validation scores them.

    Raises:
        ValueError: when nnU-Net's label handling refuses the labels (no background, misplaced ignore
            label, regions without ``regions_class_order``, ...).
    """
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise ValueError("dataset.json has no 'labels' mapping")
    try:
        manager = LabelManager(labels, dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError) as error:
        raise ValueError(f"dataset.json labels: {error}") from error
    evaluated = list(manager.foreground_regions if manager.has_regions else manager.foreground_labels)
    names: dict[object, str] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if manager.has_regions:
            names.setdefault(tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value), name)
        else:
            for label in value if isinstance(value, (list, tuple)) else [value]:
                names.setdefault(int(label), name)
    structures = {label_or_region_to_key(r): names.get(r, label_or_region_to_key(r)) for r in evaluated}
    label_values = {} if manager.has_regions else {names.get(r, str(r)): int(r) for r in evaluated}
    return DatasetInfo(
        structures, label_values, dataset_json["file_ending"], dataset_json, tuple(evaluated), manager.ignore_label,
    )


def load_dataset_info(layout: ResultsLayout, trainers: list[str]) -> DatasetInfo:
    """``dataset.json`` from nnUNet_preprocessed, else from the first trainer's results folder that has one.

    Raises:
        FileNotFoundError: when neither exists.
    """
    candidates = [] if layout.preprocessed_dir is None else [layout.preprocessed_dir / "dataset.json"]
    candidates += [layout.model_dir(t) / "dataset.json" for t in trainers]
    for path in candidates:
        if path.is_file():
            try:
                dataset_json = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
            if isinstance(dataset_json, dict) and "file_ending" in dataset_json:  # predictions are named after it
                check_file_ending(dataset_json["file_ending"], path)
            try:
                return dataset_info(dataset_json)
            except (ValueError, KeyError) as error:
                raise ValueError(f"{path}: {error}") from error
    raise FileNotFoundError(
        f"no dataset.json for {layout.dataset_name}: looked in {', '.join(str(p) for p in candidates)}"
    )


def discover_folds(layout: ResultsLayout, trainers: list[str]) -> list[int]:
    """Every ``fold_N`` folder of any of the trainers (so one trainer's fold shows as missing for the others)."""
    folds: set[int] = set()
    for trainer in trainers:
        model_dir = layout.model_dir(trainer)
        if model_dir.is_dir():
            for path in model_dir.iterdir():
                match = re.fullmatch(r"fold_(\d+)", path.name)
                if match and path.is_dir():
                    folds.add(int(match.group(1)))
    return sorted(folds)


def training_state(fold_dir: Path, checkpoint: str = "final") -> tuple[str, str]:
    """(status, reason) of a training run from its files.

    Complete needs ``checkpoint_final.pth`` (nnU-Net writes it when training ends) and, for
    ``checkpoint="best"``, ``checkpoint_best.pth`` too.
    """
    if not fold_dir.parent.is_dir():
        return MISSING, f"no results folder {fold_dir.parent}"
    if not fold_dir.is_dir():
        return MISSING, f"no {fold_dir.name} folder (not trained)"
    if not (fold_dir / CHECKPOINTS["final"]).is_file():
        if (fold_dir / "checkpoint_latest.pth").is_file():
            return INCOMPLETE, "training not finished (checkpoint_latest.pth, no checkpoint_final.pth)"
        return INCOMPLETE, "no checkpoint_final.pth (training not finished or failed)"
    if not (fold_dir / CHECKPOINTS[checkpoint]).is_file():
        return INCOMPLETE, f"no {CHECKPOINTS[checkpoint]}"
    return COMPLETE, ""


def case_id(path: str, file_ending: str) -> str:
    """Case id from a file path: the base name without ``file_ending``."""
    name = Path(path).name
    return name[: -len(file_ending)] if file_ending and name.endswith(file_ending) else name


def read_validation_summary(path: Path, info: DatasetInfo) -> dict[str, dict[str, float]]:
    """Per-case Dice per structure from nnU-Net's ``validation/summary.json``.

    The file (``nnunetv2/evaluation/evaluate_predictions.py``) holds ``metric_per_case``: a list of
    ``{"reference_file", "prediction_file", "metrics": {"1": {"Dice": ..., "IoU": ..., ...}, ...}}``;
    metric keys are labels (``"1"``) or regions (``"(1, 2)"``). JSON ``NaN`` is read as NaN.

    Raises:
        ValueError: when a structure of ``dataset.json`` is missing from a case's metrics; CaseIdError when
            a reference file's name is not a plain case identifier.
    """
    summary = json.loads(path.read_text(encoding="utf-8"))
    scores: dict[str, dict[str, float]] = {}
    for index, entry in enumerate(summary["metric_per_case"]):
        case = check_case_id(case_id(entry["reference_file"], info.file_ending), path,
                             f"'metric_per_case' entry {index}")
        metrics = entry["metrics"]
        missing = [key for key in info.structures if key not in metrics]
        if missing:
            raise ValueError(f"{path}: case {case} has no metrics for label(s) {missing}")
        scores[case] = {
            name: _as_float(metrics[key].get("Dice")) for key, name in info.structures.items()
        }
    return scores


def _as_float(value: object) -> float:
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def expected_validation_cases(layout: ResultsLayout, fold: int) -> list[str] | None:
    """Validation cases of ``fold`` from ``splits_final.json``, or None when that file or fold is not there.

    Raises:
        SplitError / CaseIdError (ValueErrors): when the split file is malformed or names an unsafe case.
    """
    from nnunet_ssl.splits import SPLITS_FILE, read_splits

    if layout.preprocessed_dir is None:
        return None
    path = layout.preprocessed_dir / SPLITS_FILE
    if not path.is_file():
        return None
    splits = read_splits(path)
    return list(splits[fold]["val"]) if fold < len(splits) else None


def collect_validation_run(layout: ResultsLayout, info: DatasetInfo, trainer: str, fold: int) -> RunResult:
    """A run scored by nnU-Net's own validation (``validation/summary.json``, final checkpoint)."""
    fold_dir = layout.fold_dir(trainer, fold)
    status, reason = training_state(fold_dir)
    if status != COMPLETE:
        return RunResult(trainer, fold, status, reason)
    summary = fold_dir / "validation" / "summary.json"
    if not summary.is_file():
        return RunResult(trainer, fold, INCOMPLETE, "no validation/summary.json (run nnUNetv2_train ... --val)")
    dice = read_validation_summary(summary, info)
    expected = expected_validation_cases(layout, fold)
    if expected is not None:
        absent = sorted(set(expected) - set(dice))
        if absent:
            return RunResult(
                trainer, fold, INCOMPLETE,
                f"validation summary lacks {len(absent)} of {len(expected)} cases ({', '.join(absent[:5])})", dice,
            )
    if not dice:
        return RunResult(trainer, fold, INCOMPLETE, "validation summary has no cases")
    return RunResult(trainer, fold, COMPLETE, "", dice)


def mean_over_runs(runs: list[RunResult], attribute: str = "dice") -> dict[str, dict[str, float]]:
    """Per case and structure, the mean over the runs that scored it (NaN skipped).

    With nnU-Net's cross-validation each case is scored by exactly one fold, so this is that score;
    on a shared test set it is the mean over folds.
    """
    collected: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for case, scores in getattr(run, attribute).items():
            for structure, value in scores.items():
                collected.setdefault(case, {}).setdefault(structure, []).append(value)
    return {
        case: {s: nan_mean(values) for s, values in scores.items()} for case, scores in collected.items()
    }
