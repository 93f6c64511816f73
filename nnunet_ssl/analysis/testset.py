"""Score runs on a labelled test set: predict with nnU-Net's predictor (reusing earlier predictions), then Dice.

Predictions go to ``REPORT_DIR/predictions/<trainer>/fold_N/<case><file_ending>``. A file
``prediction_source.json`` there records the checkpoint they came from (path, size, mtime); when the
checkpoint changes (training continued, retrained) the old predictions are removed and made again,
otherwise existing predictions are reused and only missing cases are predicted. Each case is written
to ``.partial/`` first and moved into place when complete, so an interrupted run leaves no
half-written prediction behind. A prediction from elsewhere (``nnUNetv2_predict``, which writes in
place) counts only when it reads back whole with its label's shape
(:func:`nnunet_ssl.analysis.prediction_files.read_problem`): one that does not is predicted again
here, and refused by :func:`score_predictions` with a message naming the file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_ssl.analysis.prediction_files import UnreadablePredictionError, read_problem
from nnunet_ssl.analysis.results import (
    CHECKPOINTS,
    COMPLETE,
    INCOMPLETE,
    DatasetInfo,
    ResultsLayout,
    RunResult,
    training_state,
)
from nnunet_ssl.case_ids import check_case_ids
from nnunet_ssl.checkpoints import load_nnunet_checkpoint
from nnunet_ssl.io import atomic_json_dump
from nnunet_ssl.nnunet_ext import ext_trainer_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SOURCE_FILE = "prediction_source.json"


@dataclass(frozen=True)
class TestSet:
    """Test cases with images and a reference label map.

    Attributes:
        images: case id -> channel files (``<case>_0000<ending>``, ``<case>_0001<ending>``, ...), sorted.
        labels: case id -> label file (``<case><ending>``).
    """

    images: dict[str, list[Path]]
    labels: dict[str, Path]

    @property
    def cases(self) -> list[str]:
        return sorted(self.images)


def find_test_set(images_dir: Path, labels_dir: Path, file_ending: str) -> TestSet:
    """Pair nnU-Net-style images (``CASE_XXXX<ending>``) with labels (``CASE<ending>``).

    Cases with images but no label (or a label but no images) are logged and left out.

    Raises:
        FileNotFoundError: when a folder is missing or no case has both images and a label.
        CaseIdError: when a case identifier is not a plain file name (e.g. starts with '.').
    """
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"test folder {folder} does not exist")
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(file_ending))
    images: dict[str, list[Path]] = {}
    for path in sorted(images_dir.iterdir()):
        match = pattern.fullmatch(path.name)
        if match:
            images.setdefault(match.group(1), []).append(path)
    labels = {
        path.name[: -len(file_ending)]: path for path in sorted(labels_dir.iterdir()) if path.name.endswith(file_ending)
    }
    check_case_ids(images, images_dir)  # predictions are written as <case><file_ending>
    check_case_ids(labels, labels_dir)
    unlabeled, imageless = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
    if unlabeled:
        logger.warning("test images without a label (not scored): %s", ", ".join(unlabeled))
    if imageless:
        logger.warning("test labels without images (not scored): %s", ", ".join(imageless))
    cases = sorted(set(images) & set(labels))
    if not cases:
        raise FileNotFoundError(f"no test case has both images in {images_dir} and a label in {labels_dir}")
    return TestSet({c: images[c] for c in cases}, {c: labels[c] for c in cases})


def resolve_device(name: str | None) -> torch.device:
    """``torch.device``: the one asked for, else CUDA when available, else CPU.

    Raises:
        ValueError: when CUDA is asked for but not available.
    """
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    return torch.device(name)


def ensure_ext_trainer_path() -> None:
    """Put the plugin's trainer folder into ``nnUNet_extTrainer`` (nnU-Net reads it at each lookup)."""
    folder = str(ext_trainer_path())
    current = os.environ.get("nnUNet_extTrainer", "")
    if folder not in current.split(os.pathsep):
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(p for p in (current, folder) if p)
        logger.info("nnUNet_extTrainer=%s", os.environ["nnUNet_extTrainer"])


def checkpoint_source(checkpoint_file: Path) -> dict[str, object]:
    """What identifies a checkpoint file's content well enough to know when predictions are stale."""
    stat = checkpoint_file.stat()
    return {"checkpoint": str(checkpoint_file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cases_to_predict(
    out_dir: Path, cases: list[str], file_ending: str, source: dict[str, object],
    references: dict[str, Path] | None = None,
) -> list[str]:
    """Cases without a usable prediction in ``out_dir``; stale predictions (other checkpoint) are removed.

    With ``references`` (case -> its label), a prediction that does not read back whole with the
    label's shape is removed too (logged with the file and why), so it is predicted again.
    """
    marker = out_dir / SOURCE_FILE
    if out_dir.is_dir():
        recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        if recorded != source:
            stale = [p for p in out_dir.iterdir() if p.is_file() and p.name.endswith(file_ending)]
            if stale:
                logger.warning(
                    "%s: %d prediction(s) made from %s, not %s: predicting again",
                    out_dir, len(stale), (recorded or {}).get("checkpoint", "an unknown checkpoint"),
                    source["checkpoint"],
                )
            for path in stale:
                path.unlink()
    if references is not None:
        for case in cases:
            path = out_dir / f"{case}{file_ending}"
            problem = read_problem(path, references.get(case)) if path.is_file() else None
            if problem is not None:
                logger.warning("%s %s: removed, predicting it again", path, problem)
                path.unlink()
    return [c for c in cases if not (out_dir / f"{c}{file_ending}").is_file()]


def predict_cases(
    model_dir: Path, fold: int, checkpoint: str, test_set: TestSet, cases: list[str], out_dir: Path,
    file_ending: str, device: torch.device,
) -> None:
    """Predict ``cases`` with nnU-Net's predictor (in this process, sliding window as ``nnUNetv2_predict``).

    nnU-Net's progress messages go to ``out_dir/predict.log``.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ensure_ext_trainer_path()
    staging = out_dir / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with open(out_dir / "predict.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
            perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            str(model_dir), use_folds=(fold,), checkpoint_name=CHECKPOINTS[checkpoint]
        )
        for case in cases:
            logger.info("predicting %s with %s fold %d", case, model_dir.name, fold)
            predictor.predict_from_files_sequential(
                [[str(p) for p in test_set.images[case]]], [str(staging / case)], save_probabilities=False,
                overwrite=True,
            )
            os.replace(staging / f"{case}{file_ending}", out_dir / f"{case}{file_ending}")
    shutil.rmtree(staging, ignore_errors=True)


def score_predictions(
    prediction_dir: Path, test_set: TestSet, info: DatasetInfo, hd95: bool = False
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[str]]:
    """Dice (and HD95) per case and structure for the predictions present.

    Dice comes from nnU-Net's own evaluation (``nnunetv2.evaluation.evaluate_predictions.compute_metrics``)
    with the dataset's labels or regions and its ignore label, so it equals what nnU-Net's
    ``summary.json`` would hold for the same files.

    Returns:
        (dice, hd95, cases without a prediction).

    Raises:
        UnreadablePredictionError: naming every prediction that does not read back whole with its
            label's shape (cut short: SimpleITK would score its missing part as background).
        ValueError: when HD95 is asked for on a region-based dataset (only plain labels).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, label_or_region_to_key
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
    )

    if hd95 and len(info.label_values) != len(info.structures):
        raise ValueError("HD95 supports plain labels only; this dataset.json defines regions")
    labels = list(info.label_values.values())
    names = {value: name for name, value in info.label_values.items()}
    reader = None
    dice: dict[str, dict[str, float]] = {}
    distances: dict[str, dict[str, float]] = {}
    missing: list[str] = []
    problems: dict[Path, str] = {}
    for case in test_set.cases:  # every file is checked before any is scored: a cut one is refused, never scored
        prediction_file = prediction_dir / f"{case}{info.file_ending}"
        if not prediction_file.is_file():
            missing.append(case)
        elif (problem := read_problem(prediction_file, test_set.labels[case])) is not None:
            problems[prediction_file] = problem
    if problems:
        raise UnreadablePredictionError(problems, "Delete them and predict again (`nnunet-ssl experiment run` "
                                        "and `nnunet-ssl report` redo such files themselves)")
    for case in test_set.cases:
        prediction_file = prediction_dir / f"{case}{info.file_ending}"
        if case in missing:
            continue
        if reader is None:
            reader = determine_reader_writer_from_dataset_json(
                info.dataset_json, str(test_set.labels[case]), verbose=False
            )()
        metrics = compute_metrics(
            str(test_set.labels[case]), str(prediction_file), reader, list(info.labels_or_regions), info.ignore_label,
        )["metrics"]
        by_key = {label_or_region_to_key(r): values for r, values in metrics.items()}
        dice[case] = {name: float(by_key[key]["Dice"]) for key, name in info.structures.items()}
        if hd95:
            from nnunet_ssl.analysis.distance import hd95_per_label

            reference, properties = reader.read_seg(str(test_set.labels[case]))
            prediction, _ = reader.read_seg(str(prediction_file))
            values = hd95_per_label(prediction[0], reference[0], labels, properties["spacing"])
            distances[case] = {names[k]: v for k, v in values.items()}
    return dice, distances, missing


@dataclass(frozen=True)
class TestRunSettings:
    """How test-set runs are scored."""

    test_set: TestSet
    predictions_root: Path
    checkpoint: str = "final"
    device: str | None = None
    hd95: bool = False
    predict: bool = True  # False: score the files in predictions_root as they are (nnUNetv2_predict outputs)


def collect_test_run(
    layout: ResultsLayout, info: DatasetInfo, trainer: str, fold: int, settings: TestRunSettings
) -> RunResult:
    """Predict what is missing for one run and score it on the test set.

    Raises:
        ValueError: the checkpoint to predict with holds objects other than tensors, plain values and
            numpy scalars (refused before nnU-Net's predictor would unpickle it).
    """
    fold_dir = layout.fold_dir(trainer, fold)
    status, reason = training_state(fold_dir, settings.checkpoint)
    if status != COMPLETE:
        return RunResult(trainer, fold, status, reason)
    out_dir = settings.predictions_root / trainer / f"fold_{fold}"
    if not settings.predict:
        return score_existing_predictions(out_dir, info, trainer, fold, settings)
    source = checkpoint_source(fold_dir / CHECKPOINTS[settings.checkpoint])
    todo = cases_to_predict(out_dir, settings.test_set.cases, info.file_ending, source, settings.test_set.labels)
    reused = len(settings.test_set.cases) - len(todo)
    if todo:
        # nnU-Net's predictor unpickles the checkpoint with weights_only=False: read it safely first, so
        # a file holding anything but tensors, plain values and numpy scalars is refused, never run
        load_nnunet_checkpoint(fold_dir / CHECKPOINTS[settings.checkpoint], mmap=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_json_dump(source, out_dir / SOURCE_FILE)
        try:
            predict_cases(
                layout.model_dir(trainer), fold, settings.checkpoint, settings.test_set, todo, out_dir,
                info.file_ending, resolve_device(settings.device),
            )
        except Exception as error:  # one failed run must not hide the others: report it
            logger.exception("prediction failed for %s fold %d", trainer, fold)
            try:
                dice, _, _ = score_predictions(out_dir, settings.test_set, info)
            except UnreadablePredictionError:
                dice = {}
            return RunResult(trainer, fold, INCOMPLETE, f"prediction failed: {error}", dice)
    logger.info(
        "%s fold %d: %d test case(s) predicted now, %d reused from %s", trainer, fold, len(todo), reused, out_dir
    )
    return score_existing_predictions(out_dir, info, trainer, fold, settings)


def score_existing_predictions(
    out_dir: Path, info: DatasetInfo, trainer: str, fold: int, settings: TestRunSettings
) -> RunResult:
    """Score the predictions in ``out_dir``; a case without one, or with one that does not read back whole,
    makes the run incomplete (the reason names the file)."""
    try:
        dice, distances, missing = score_predictions(out_dir, settings.test_set, info, settings.hd95)
    except UnreadablePredictionError as error:
        logger.warning("%s fold %d: %s", trainer, fold, error)
        return RunResult(trainer, fold, INCOMPLETE, str(error))
    if missing:
        return RunResult(
            trainer, fold, INCOMPLETE,
            f"no prediction for {len(missing)} of {len(settings.test_set.cases)} test cases ({', '.join(missing[:5])})",
            dice, distances,
        )
    return RunResult(trainer, fold, COMPLETE, "", dice, distances)
