"""``nnunet-ssl experiment report``: the paper's tables from whatever part of the grid has finished.

One table per setting (full data, each few-shot size, each data-limited size): arms as rows,
structures and their mean as columns, mean +/- sd over seeds (over folds for full data) of each
run's mean Dice. Beside it: the gap % to the best arm, the paired Wilcoxon p of each arm vs the best
arm and vs scratch (cases paired by id, a case's Dice averaged over the seeds that scored it, Holm
correction across arms), and the convergence: epochs to reach 90 % of the run's final EMA pseudo-Dice.
Where an arm has both, CKA per encoder stage between its few-shot (or data-limited) and full-data
fine-tuned encoders. Runs that are missing or unfinished are listed and never averaged in.

Scores come from the test-set predictions of ``experiment run`` when the experiment has a test set
(Dice by nnU-Net's evaluation), else from nnU-Net's ``validation/summary.json`` of each fold. The
same runs also give the transfer report's tables (:mod:`nnunet_ssl.analysis.report`, the scratch arm
as reference: Dice per structure and case, gap % and Wilcoxon, few-shot spread, curves). This module
collects and computes; :mod:`nnunet_ssl.analysis.tables` renders and :mod:`nnunet_ssl.analysis.plots`
draws, as for ``nnunet-ssl report``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from nnunet_ssl.analysis import plots, tables
from nnunet_ssl.analysis.curves import epochs_to_fraction, load_curves
from nnunet_ssl.analysis.fewshot import manifest_by_fold
from nnunet_ssl.analysis.report import Report, ReportConfig, report_from_runs, summarise_method
from nnunet_ssl.analysis.results import (
    COMPLETE,
    DatasetInfo,
    ResultsLayout,
    RunResult,
    collect_validation_run,
    load_dataset_info,
    training_state,
)
from nnunet_ssl.analysis.stats import (
    OVERALL,
    Comparison,
    Spread,
    compare_to_reference,
    holm,
    performance_gap,
    spread,
    structure_means,
)
from nnunet_ssl.analysis.testset import TestRunSettings, TestSet, find_test_set, score_existing_predictions
from nnunet_ssl.experiment.grid import SettingFolds
from nnunet_ssl.experiment.runner import STATUS_FILE, Prepared, prepare
from nnunet_ssl.experiment.spec import Experiment, experiment_plans, trainer_name
from nnunet_ssl.splits import MANIFEST_FILE

logger = logging.getLogger(__name__)

#: Fraction of the final EMA pseudo-Dice that defines convergence.
CONVERGENCE_FRACTION = 0.9


@dataclass
class ArmResult:
    """One arm in one setting.

    Attributes:
        runs: Every fold of the setting (complete or not), ``trainer`` set to the arm's name.
        seeds: fold -> seed of the setting.
        spread: Per structure and overall: mean and sd over the complete runs' mean Dice.
        case_dice: Per case, the mean over the runs that scored it (for the paired tests).
        epochs_to_converge: Spread over complete runs of :func:`epochs_to_fraction` of the EMA pseudo-Dice.
    """

    arm: str
    trainer: str
    runs: list[RunResult]
    spread: dict[str, Spread]
    case_dice: dict[str, dict[str, float]]
    epochs_to_converge: Spread
    gap_to_best: dict[str, float] = field(default_factory=dict)
    vs_best: Comparison | None = None
    vs_scratch: Comparison | None = None
    p_best_holm: dict[str, float | None] = field(default_factory=dict)
    p_scratch_holm: dict[str, float | None] = field(default_factory=dict)

    @property
    def complete_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.complete]

    @property
    def available(self) -> bool:
        return bool(self.complete_runs)


@dataclass
class SettingTable:
    setting: SettingFolds
    arms: list[ArmResult]
    best: str | None
    scratch: str | None

    def arm(self, name: str) -> ArmResult:
        return next(a for a in self.arms if a.arm == name)


@dataclass
class CKARow:
    arm: str
    setting: str
    layers: list[str]
    values: list[float]
    pairs: int


@dataclass
class ExperimentReport:
    """The experiment's tables: per setting, arms as rows (``tables``), CKA rows, failed jobs.

    Attributes:
        transfer: The transfer report of the same runs (rows named after the arms, the scratch arm
            as reference): Mean Dice with gap and Wilcoxon per structure, per-case Dice, few-shot
            spread, convergence curves, as ``nnunet-ssl report`` writes them.
    """

    experiment: Experiment
    structures: list[str]
    evaluation: str
    tables: list[SettingTable]
    cka: list[CKARow]
    cka_note: str
    failed_jobs: dict[str, str]
    transfer: Report
    markdown: str = ""


# ---------------------------------------------------------------------------- collecting
def collect_setting(
    prepared: Prepared, setting: SettingFolds, info: DatasetInfo, test_set: TestSet | None,
) -> SettingTable:
    experiment, paths = prepared.experiment, prepared.paths
    structures = info.names
    results: list[ArmResult] = []
    for arm in experiment.arms:
        trainer = trainer_name(experiment, arm)
        layout = ResultsLayout(paths.results_root(arm.name), paths.dataset_name, paths.plans(arm.name),
                               experiment.configuration, _preprocessed_root())
        runs = []
        for fold in setting.folds:
            if test_set is None:
                run = collect_validation_run(layout, info, trainer, fold)
            else:
                status, reason = training_state(layout.fold_dir(trainer, fold))
                run = RunResult(trainer, fold, status, reason) if status != COMPLETE else score_existing_predictions(
                    paths.predictions(arm.name, fold), info, trainer, fold,
                    TestRunSettings(test_set, paths.output / "predictions", predict=False),
                )
            runs.append(replace(run, trainer=arm.name))
        complete = [r for r in runs if r.complete]
        fold_means = [structure_means(r.dice, structures) for r in complete]
        spreads = {key: spread([m[key] for m in fold_means]) for key in [*structures, OVERALL]}
        summary = summarise_method(arm.name, runs, {}, structures, set(setting.folds))
        convergence = []
        for run in complete:
            curves = load_curves(layout.fold_dir(trainer, run.fold), arm.name, run.fold)
            epochs = None if curves is None else epochs_to_fraction(curves.series["ema_fg_dice"], CONVERGENCE_FRACTION)
            convergence.append(math.nan if epochs is None else float(epochs))
        results.append(ArmResult(arm.name, trainer, runs, spreads, summary.dice, spread(convergence)))
    table = SettingTable(setting, results, None, experiment.scratch_arm.name if experiment.scratch_arm else None)
    compare_arms(table, structures)
    return table


def compare_arms(table: SettingTable, structures: list[str]) -> None:
    """Best arm (highest mean overall Dice), gaps to it, and Wilcoxon tests vs best and vs scratch with Holm."""
    keys = [*structures, OVERALL]
    available = [a for a in table.arms if a.available and not math.isnan(a.spread[OVERALL].mean)]
    if not available:
        return
    best = max(available, key=lambda a: a.spread[OVERALL].mean)
    table.best = best.arm
    scratch = next((a for a in available if a.arm == table.scratch), None)
    for arm in available:
        arm.gap_to_best = {k: performance_gap(arm.spread[k].mean, best.spread[k].mean) for k in keys}
        if arm is not best:
            arm.vs_best = compare_to_reference(arm.case_dice, best.case_dice, structures)
        if scratch is not None and arm is not scratch:
            arm.vs_scratch = compare_to_reference(arm.case_dice, scratch.case_dice, structures)
    for attribute, target in (("vs_best", "p_best_holm"), ("vs_scratch", "p_scratch_holm")):
        for key in keys:
            raw = [getattr(a, attribute).tests[key].p_value if getattr(a, attribute) is not None else None
                   for a in available]
            for arm, adjusted in zip(available, holm(raw), strict=True):
                getattr(arm, target)[key] = adjusted


def _preprocessed_root() -> Path | None:
    value = os.environ.get("nnUNet_preprocessed")
    return Path(value) if value else None


def collect_cka(prepared: Prepared, setting_tables: list[SettingTable], data: Path | None, device: str) -> tuple[list[CKARow], str]:
    """CKA per encoder stage between each arm's subset-setting folds and its first complete full-data fold."""
    from nnunet_ssl.analysis.cka.run import cka_between_folds

    full = next((t for t in setting_tables if t.setting.kind == "full"), None)
    subsets = [t for t in setting_tables if t.setting.kind != "full"]
    if full is None or not subsets:
        return [], "needs both a full-data setting and a few-shot or data-limited setting"
    if data is None:
        return [], "no images to compute it on (no test set and no nnUNet_raw imagesTr)"
    rows = []
    for table in subsets:
        for arm in table.arms:
            reference = next((r for r in full.arm(arm.arm).runs if r.complete), None)
            if reference is None or not arm.complete_runs:
                continue
            reference_dir = prepared.paths.fold_dir(arm.arm, arm.trainer, reference.fold)
            values, layers = [], []
            for run in arm.complete_runs:
                result = cka_between_folds(prepared.paths.fold_dir(arm.arm, arm.trainer, run.fold), reference_dir,
                                           data, patches_per_case=2, batch_size=4, device=device)
                layers = result.layers
                values.append([v for _, v in result.per_layer()])
            means = [sum(column) / len(column) for column in zip(*values, strict=True)]
            rows.append(CKARow(arm.arm, table.setting.label, layers, means, len(values)))
    return rows, "" if rows else "no arm has both a complete full-data fold and a complete subset fold"


def build_experiment_report(prepared: Prepared, cka: bool = True, device: str = "cpu") -> ExperimentReport:
    """Collect every setting's table (and the CKA) from the files of a prepared experiment."""
    experiment, paths = prepared.experiment, prepared.paths
    first = experiment.arms[0].name
    layout = ResultsLayout(paths.results_root(first), paths.dataset_name, paths.plans(first),
                           experiment.configuration, _preprocessed_root())
    info = load_dataset_info(layout, [])
    test_set = None
    if prepared.test is not None:
        test_set = find_test_set(prepared.test[0], prepared.test[1], info.file_ending)
        evaluation = (f"test set: {len(test_set.cases)} cases ({prepared.test[0]}), nnUNetv2_predict outputs of "
                      "each fold scored with nnU-Net's evaluation")
    else:
        evaluation = "nnU-Net's validation of each fold (validation/summary.json)"
    setting_tables = [collect_setting(prepared, s, info, test_set) for s in prepared.settings]
    rows: list[CKARow] = []
    note = "skipped (--no-cka)"
    if cka:
        data = prepared.test[0] if prepared.test is not None else _raw_images(paths.dataset_name)
        rows, note = collect_cka(prepared, setting_tables, data, device)
    failed = {}
    status_file = paths.output / STATUS_FILE
    if status_file.is_file():
        failed = {k: f"{v['status']}: {v['detail']}" for k, v in json.loads(status_file.read_text(encoding="utf-8")).items()
                  if v.get("status") in ("failed", "blocked")}
    transfer = transfer_report(prepared, setting_tables, info.names, evaluation)
    return ExperimentReport(experiment, info.names, evaluation, setting_tables, rows, note, failed, transfer)


def transfer_report(prepared: Prepared, setting_tables: list[SettingTable], structures: list[str], evaluation: str) -> Report:
    """The transfer report (``nnunet-ssl report``'s tables) of the runs the settings' tables collected.

    Rows are the arms (runs named after them, each arm's folds in order), the reference is the
    scratch arm (else the first arm); the few-shot tables use the split manifest's entries of the
    experiment's subset folds.
    """
    experiment, paths = prepared.experiment, prepared.paths
    arms = [arm.name for arm in experiment.arms]
    by_run = {(run.trainer, run.fold): run for table in setting_tables for arm in table.arms for run in arm.runs}
    runs = [by_run[key] for key in sorted(by_run, key=lambda key: (arms.index(key[0]), key[1]))]
    trainers = {arm.arm: arm.trainer for table in setting_tables for arm in table.arms}
    curves = [c for run in runs for c in [load_curves(paths.fold_dir(run.trainer, trainers[run.trainer], run.fold),
                                                      run.trainer, run.fold)] if c is not None]
    subset_folds = {fold for s in prepared.settings if s.kind != "full" for fold in s.folds}
    preprocessed = _preprocessed_root()
    manifest = {} if preprocessed is None else {
        fold: entry for fold, entry in manifest_by_fold(preprocessed / paths.dataset_name / MANIFEST_FILE).items()
        if fold in subset_folds
    }
    scratch = experiment.scratch_arm
    config = ReportConfig(
        dataset=experiment.dataset, trainers=tuple(arms), out_dir=paths.report, results_root=paths.output / "results",
        preprocessed_root=preprocessed, reference=scratch.name if scratch is not None else arms[0],
        plans=", ".join(experiment_plans(experiment)), configuration=experiment.configuration,
        folds=tuple(sorted({run.fold for run in runs})),
        test_images=prepared.test[0] if prepared.test else None, test_labels=prepared.test[1] if prepared.test else None,
        predictions=paths.output / "predictions" if prepared.test else None,
    )
    return report_from_runs(config, paths.dataset_name, structures, evaluation, runs, manifest, curves)


def _raw_images(dataset_name: str) -> Path | None:
    """The raw dataset's imagesTr (CKA inputs when there is no test set), or None."""
    raw = os.environ.get("nnUNet_raw")
    folder = Path(raw) / dataset_name / "imagesTr" if raw else None
    return folder if folder is not None and folder.is_dir() else None


# ---------------------------------------------------------------------------- writing
def make_experiment_report(experiment: Experiment, cka: bool = True, device: str = "cpu") -> ExperimentReport:
    """Build the tables and write ``report/`` in the output (report.md, CSV files, PNGs)."""
    prepared = prepare(experiment)
    report = build_experiment_report(prepared, cka, device)
    write_experiment_report(report, prepared.paths.report)
    logger.info("experiment report: %s", prepared.paths.report / "report.md")
    return report


def write_experiment_report(report: ExperimentReport, out: Path) -> None:
    """report.md, the arms' and the transfer tables' CSV files and the figures, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tables.write_arms_csvs(report, out)
    tables.write_transfer_csvs(report.transfer, out)
    figures = plots.report_figures(report.transfer, out)
    report.markdown = tables.experiment_markdown(report, figures)
    (out / "report.md").write_text(report.markdown, encoding="utf-8")
