"""The transfer report: Dice per method and structure, gap % and Wilcoxon p vs a reference, few-shot
tables and convergence curves (``nnunet-ssl report``; its tables are also part of ``nnunet-ssl
experiment report``).

:func:`make_report` collects every (trainer, fold) asked for (:func:`build_report`), computes the
tables (:func:`report_from_runs`) and writes ``report.md``, ``dice_per_case.csv``, ``summary.csv``,
``stats.csv``, ``few_shot.csv``, ``curves.csv`` and the figures into ``ReportConfig.out_dir``. This
module collects and computes; :mod:`nnunet_ssl.analysis.tables` renders every table (its
``headline_markdown`` gives the headline as Markdown text) and :mod:`nnunet_ssl.analysis.plots`
draws every figure.

Folds listed in ``splits_manifest.json`` (few-shot and data-limited) only feed the few-shot table;
every other fold ("ordinary": nnU-Net's cross-validation or a full-data run) feeds the headline.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_ssl.analysis import plots, tables
from nnunet_ssl.analysis.curves import TrainingCurves, load_curves
from nnunet_ssl.analysis.fewshot import (
    FewShotRow,
    few_shot_rows,
    manifest_by_fold,
)
from nnunet_ssl.analysis.results import (
    CHECKPOINTS,
    ResultsLayout,
    RunResult,
    collect_validation_run,
    discover_folds,
    load_dataset_info,
    mean_over_runs,
)
from nnunet_ssl.analysis.stats import (
    OVERALL,
    Comparison,
    case_counts,
    compare_to_reference,
    finite_or_nan,
    structure_means,
    with_overall,
)
from nnunet_ssl.analysis.testset import TestRunSettings, collect_test_run, find_test_set
from nnunet_ssl.nnunet_paths import dataset_name as nnunet_dataset_name
from nnunet_ssl.splits import MANIFEST_FILE, FoldEntry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """What to report on.

    Attributes:
        dataset: nnU-Net dataset id or name.
        trainers: Trainer class names (the reference is added when not among them).
        out_dir: Report folder.
        results_root: ``$nnUNet_results``.
        preprocessed_root: ``$nnUNet_preprocessed`` (splits and manifest); None skips both.
        reference: Trainer the others are compared with (default: the first of ``trainers``).
        folds: Folds to report (default: every ``fold_N`` folder found, plus the manifest's folds).
        test_images, test_labels: Score on this labelled test set instead of nnU-Net's validation.
        checkpoint: ``final`` or ``best`` (``best`` only with a test set: nnU-Net validates the final one).
        device: Prediction device (default: CUDA when available, else CPU).
        hd95: Also compute the 95th-percentile Hausdorff distance (test set; needs MONAI).
        predictions: Score existing test-set predictions (e.g. from ``nnUNetv2_predict``) laid out as
            ``predictions/<trainer>/fold_N/<case><ending>`` instead of predicting; a missing case
            makes the run incomplete.
    """

    dataset: str
    trainers: tuple[str, ...]
    out_dir: Path
    results_root: Path
    preprocessed_root: Path | None = None
    reference: str | None = None
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    folds: tuple[int, ...] | None = None
    test_images: Path | None = None
    test_labels: Path | None = None
    checkpoint: str = "final"
    device: str | None = None
    hd95: bool = False
    predictions: Path | None = None

    def __post_init__(self) -> None:
        if self.predictions is not None and self.test_images is None:
            raise ValueError("--predictions needs --test-labels and --test-images (to pair cases with labels)")
        if self.predictions is not None and self.checkpoint != "final":
            raise ValueError("--predictions scores files as they are; --checkpoint does not apply")
        if not self.trainers:
            raise ValueError("name at least one trainer")
        if (self.test_images is None) != (self.test_labels is None):
            raise ValueError("--test-images and --test-labels go together")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {sorted(CHECKPOINTS)}, got {self.checkpoint!r}")
        if self.checkpoint != "final" and self.test_images is None:
            raise ValueError(
                "--checkpoint best needs --test-images/--test-labels: nnU-Net's validation summary is "
                "computed with the final checkpoint"
            )
        if self.hd95 and self.test_images is None:
            raise ValueError("--hd95 needs --test-images/--test-labels (nnU-Net's validation has no HD95)")
        if self.hd95:
            from nnunet_ssl.analysis.distance import hd95_available

            if not hd95_available():
                raise ValueError("--hd95 needs MONAI (pip install monai)")

    @property
    def reference_trainer(self) -> str:
        return self.reference or self.trainers[0]

    @property
    def all_trainers(self) -> list[str]:
        return list(dict.fromkeys([*self.trainers, self.reference_trainer]))


@dataclass
class MethodSummary:
    """A method's headline numbers over its complete ordinary folds.

    Attributes:
        folds: Complete ordinary folds used; ``not_used`` holds the others with their reason.
        dice: Per case and structure (mean over the folds that scored the case), with :data:`OVERALL`.
        comparison: Against the reference (None for the reference itself or without data).
    """

    trainer: str
    folds: list[int]
    not_used: dict[int, str]
    dice: dict[str, dict[str, float]]
    means: dict[str, float]
    counts: dict[str, int]
    comparison: Comparison | None = None
    hd95_means: dict[str, float] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return bool(self.folds)


@dataclass
class Setting:
    """One headline table: nnU-Net's ordinary folds, or one (kind, size) of the split manifest.

    In a few-shot setting each case's Dice is the mean over the seeds' folds that scored it, so the
    paired test compares methods on the same cases.
    """

    title: str
    kind: str
    size: int | None
    methods: list[MethodSummary]

    def method(self, trainer: str) -> MethodSummary:
        return next(m for m in self.methods if m.trainer == trainer)


@dataclass
class Report:
    """Everything the written report shows."""

    config: ReportConfig
    dataset_name: str
    structures: list[str]
    evaluation: str
    runs: list[RunResult]
    manifest: dict[int, FoldEntry]
    methods: list[MethodSummary]
    few_shot: list[FewShotRow]
    curves: list[TrainingCurves]
    settings: list[Setting] = field(default_factory=list)

    @property
    def ordinary_folds(self) -> list[int]:
        return sorted({r.fold for r in self.runs if r.fold not in self.manifest})

    def method(self, trainer: str) -> MethodSummary:
        return next(m for m in self.methods if m.trainer == trainer)


def collect_runs(config: ReportConfig, layout: ResultsLayout, manifest: dict[int, FoldEntry]) -> tuple[
    list[RunResult], list[str], str
]:
    """Score every (trainer, fold) asked for. Returns (runs, structure names, evaluation description)."""
    trainers = config.all_trainers
    info = load_dataset_info(layout, trainers)
    folds = list(config.folds) if config.folds is not None else sorted(
        set(discover_folds(layout, trainers)) | set(manifest)
    )
    if not folds:
        logger.warning("no fold_N folder found for any trainer under %s", layout.results_root / layout.dataset_name)
        folds = [0]
    settings = None
    if config.test_images is not None and config.test_labels is not None:
        test_set = find_test_set(config.test_images, config.test_labels, info.file_ending)
        settings = TestRunSettings(
            test_set, config.predictions or config.out_dir / "predictions", config.checkpoint, config.device,
            config.hd95, predict=config.predictions is None,
        )
        evaluation = (
            f"test set: {len(test_set.cases)} cases ({config.test_images}), predicted with nnU-Net's "
            f"predictor from {CHECKPOINTS[config.checkpoint]} of each fold"
        )
    else:
        evaluation = "nnU-Net's validation of each fold (validation/summary.json, checkpoint_final.pth)"
    runs = []
    for trainer in trainers:
        for fold in folds:
            if settings is None:
                run = collect_validation_run(layout, info, trainer, fold)
            else:
                run = collect_test_run(layout, info, trainer, fold, settings)
            detail = f"{len(run.dice)} cases" if run.complete else run.reason
            logger.info("%-40s fold %-3d %-10s %s", trainer, fold, run.status, detail)
            runs.append(run)
    return runs, info.names, evaluation


def summarise_method(
    trainer: str, runs: list[RunResult], manifest: dict[int, FoldEntry], structures: list[str],
    folds: set[int] | None = None,
) -> MethodSummary:
    """Headline numbers of one trainer over its complete folds of one setting.

    ``folds`` None means nnU-Net's ordinary folds (every fold the manifest does not list).
    """
    selected = [r for r in runs if r.trainer == trainer
                and (r.fold not in manifest if folds is None else r.fold in folds)]
    used = [r for r in selected if r.complete]
    not_used = {r.fold: f"{r.status}: {r.reason}" for r in selected if not r.complete}
    dice = with_overall(mean_over_runs(used), structures) if used else {}
    hd95 = mean_over_runs(used, "hd95") if used else {}
    hd95_means = structure_means(finite_or_nan(hd95), structures) if hd95 else {}
    return MethodSummary(
        trainer, [r.fold for r in used], not_used, dice, structure_means(dice, structures),
        case_counts(dice, structures), hd95_means=hd95_means,
    )


def build_report(config: ReportConfig) -> Report:
    """Collect runs and compute every table (writes predictions when scoring a test set)."""
    dataset_name = nnunet_dataset_name(config.dataset)
    layout = ResultsLayout(config.results_root, dataset_name, config.plans, config.configuration, config.preprocessed_root)
    manifest: dict[int, FoldEntry] = {}
    if layout.preprocessed_dir is not None:
        manifest = manifest_by_fold(layout.preprocessed_dir / MANIFEST_FILE)
        if manifest:
            logger.info("few-shot manifest: %d fold(s) (%s)", len(manifest), layout.preprocessed_dir / MANIFEST_FILE)
    runs, structures, evaluation = collect_runs(config, layout, manifest)
    curves = [
        c for r in runs if layout.fold_dir(r.trainer, r.fold).is_dir()
        for c in [load_curves(layout.fold_dir(r.trainer, r.fold), r.trainer, r.fold)] if c is not None
    ]
    return report_from_runs(config, dataset_name, structures, evaluation, runs, manifest, curves)


def report_from_runs(
    config: ReportConfig, dataset_name: str, structures: list[str], evaluation: str, runs: list[RunResult],
    manifest: dict[int, FoldEntry], curves: list[TrainingCurves],
) -> Report:
    """Every table of the report from scored runs (``run.trainer`` names the row).

    ``nnunet-ssl report`` collects the runs from one results folder (:func:`build_report`);
    ``nnunet-ssl experiment report`` from its arms' folders, each arm's runs named after the arm.
    """
    trainers = config.all_trainers
    methods = compare_methods([summarise_method(t, runs, manifest, structures) for t in trainers], config, structures)
    settings = [Setting("nnU-Net folds", "ordinary", None, methods)] if any(r.fold not in manifest for r in runs) else []
    for (kind, size), group in manifest_groups(manifest, {r.fold for r in runs}).items():
        group_methods = [summarise_method(t, runs, manifest, structures, group) for t in trainers]
        title = f"{kind.replace('_', '-')}, {size} training cases (folds {', '.join(map(str, sorted(group)))})"
        settings.append(Setting(title, kind, size, compare_methods(group_methods, config, structures)))
    if not settings:  # nothing collected: one ordinary table that lists every method as missing
        settings = [Setting("nnU-Net folds", "ordinary", None, methods)]
    best_full = {
        key: max((m.means[key] for m in methods if m.available and not math.isnan(m.means[key])), default=math.nan)
        for key in [*structures, OVERALL]
    }
    few_shot = few_shot_rows(runs, manifest, trainers, config.reference_trainer, structures, best_full)
    return Report(config, dataset_name, structures, evaluation, runs, manifest, methods, few_shot, curves, settings)


def compare_methods(methods: list[MethodSummary], config: ReportConfig, structures: list[str]) -> list[MethodSummary]:
    """Attach each method's comparison with the reference (same setting)."""
    reference = next(m for m in methods if m.trainer == config.reference_trainer)
    for method in methods:
        if method is not reference and method.available and reference.available:
            method.comparison = compare_to_reference(method.dice, reference.dice, structures)
    return methods


def manifest_groups(manifest: dict[int, FoldEntry], collected: set[int]) -> dict[tuple[str, int], set[int]]:
    """(kind, size) -> the manifest folds that were collected, in manifest order."""
    groups: dict[tuple[str, int], set[int]] = {}
    for entry in sorted(manifest.values(), key=lambda e: (e.kind, e.size, e.fold)):
        if entry.fold in collected:
            groups.setdefault((entry.kind, entry.size), set()).add(entry.fold)
    return groups


def write_report(report: Report) -> Path:
    """Write every output into ``report.config.out_dir``; returns the path of ``report.md``.

    Its Files section lists what was written: the CSV files, the figures that had data, and
    ``predictions/`` only when this report predicted the test set into it (with ``--predictions`` the
    predictions stay where they are; without a test set there are none).
    """
    out_dir = report.config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tables.write_transfer_csvs(report, out_dir)
    figures = plots.report_figures(report, out_dir)
    predicted_here = report.config.test_images is not None and report.config.predictions is None
    extra = [tables.PREDICTIONS_FOLDER] if predicted_here and (out_dir / tables.PREDICTIONS_FOLDER).is_dir() else []
    path = out_dir / "report.md"
    path.write_text(tables.transfer_markdown(report, figures, extra), encoding="utf-8")
    return path


def make_report(config: ReportConfig) -> Report:
    """Build the report and write it (``config.out_dir/report.md`` and the CSVs and PNGs beside it)."""
    report = build_report(config)
    path = write_report(report)
    logger.info("report: %s", path)
    return report
