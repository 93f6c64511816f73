"""``nnunet-ssl experiment report``: the paper's tables from whatever part of the grid has finished.

One table per setting (full data, each few-shot size, each data-limited size): arms as rows,
structures and their mean as columns, mean +/- sd over seeds (over folds for full data) of each
run's mean Dice. Beside it: the gap % to the best arm, the paired Wilcoxon p of each arm vs the best
arm and vs scratch (cases paired by id, a case's Dice averaged over the seeds that scored it, Holm
correction across arms), and the convergence: epochs to reach 90 % of the run's final EMA pseudo-Dice.
Where an arm has both, CKA per encoder stage between its few-shot (or data-limited) and full-data
fine-tuned encoders. Runs that are missing or unfinished are listed and never averaged in.

Scores come from the test-set predictions of ``experiment run`` when the experiment has a test set
(Dice by nnU-Net's evaluation), else from nnU-Net's ``validation/summary.json`` of each fold.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from nnunet_ssl.analysis import plots
from nnunet_ssl.analysis.curves import TrainingCurves, epochs_to_fraction, load_curves
from nnunet_ssl.analysis.fewshot import FewShotRow
from nnunet_ssl.analysis.report import markdown_table, summarise_method
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
    ALPHA,
    OVERALL,
    Comparison,
    Spread,
    compare_to_reference,
    format_p,
    holm,
    performance_gap,
    spread,
    structure_means,
)
from nnunet_ssl.analysis.testset import TestRunSettings, TestSet, find_test_set, score_existing_predictions
from nnunet_ssl.experiment.grid import SettingFolds
from nnunet_ssl.experiment.runner import STATUS_FILE, Prepared, prepare
from nnunet_ssl.experiment.spec import Experiment, trainer_name

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
    experiment: Experiment
    structures: list[str]
    evaluation: str
    tables: list[SettingTable]
    cka: list[CKARow]
    cka_note: str
    failed_jobs: dict[str, str]
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
        layout = ResultsLayout(paths.results_root(arm.name), paths.dataset_name, experiment.plans,
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
            for arm, adjusted in zip(available, holm(raw)):
                getattr(arm, target)[key] = adjusted


def _preprocessed_root() -> Path | None:
    value = os.environ.get("nnUNet_preprocessed")
    return Path(value) if value else None


def collect_cka(prepared: Prepared, tables: list[SettingTable], data: Path | None, device: str) -> tuple[list[CKARow], str]:
    """CKA per encoder stage between each arm's subset-setting folds and its first complete full-data fold."""
    from nnunet_ssl.analysis.cka_run import cka_between_folds

    full = next((t for t in tables if t.setting.kind == "full"), None)
    subsets = [t for t in tables if t.setting.kind != "full"]
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
            means = [sum(column) / len(column) for column in zip(*values)]
            rows.append(CKARow(arm.arm, table.setting.label, layers, means, len(values)))
    return rows, "" if rows else "no arm has both a complete full-data fold and a complete subset fold"


def build_experiment_report(prepared: Prepared, cka: bool = True, device: str = "cpu") -> ExperimentReport:
    """Collect every setting's table (and the CKA) from the files of a prepared experiment."""
    experiment, paths = prepared.experiment, prepared.paths
    layout = ResultsLayout(paths.results_root(experiment.arms[0].name), paths.dataset_name, experiment.plans,
                           experiment.configuration, _preprocessed_root())
    info = load_dataset_info(layout, [])
    test_set = None
    if prepared.test is not None:
        test_set = find_test_set(prepared.test[0], prepared.test[1], info.file_ending)
        evaluation = (f"test set: {len(test_set.cases)} cases ({prepared.test[0]}), nnUNetv2_predict outputs of "
                      "each fold scored with nnU-Net's evaluation")
    else:
        evaluation = "nnU-Net's validation of each fold (validation/summary.json)"
    tables = [collect_setting(prepared, s, info, test_set) for s in prepared.settings]
    rows, note = [], "skipped (--no-cka)"
    if cka:
        data = prepared.test[0] if prepared.test is not None else _raw_images(paths.dataset_name)
        rows, note = collect_cka(prepared, tables, data, device)
    failed = {}
    status_file = paths.output / STATUS_FILE
    if status_file.is_file():
        failed = {k: f"{v['status']}: {v['detail']}" for k, v in json.loads(status_file.read_text(encoding="utf-8")).items()
                  if v.get("status") in ("failed", "blocked")}
    return ExperimentReport(experiment, info.names, evaluation, tables, rows, note, failed)


def _raw_images(dataset_name: str) -> Path | None:
    """The raw dataset's imagesTr (CKA inputs when there is no test set), or None."""
    raw = os.environ.get("nnUNet_raw")
    folder = Path(raw) / dataset_name / "imagesTr" if raw else None
    return folder if folder is not None and folder.is_dir() else None


# ---------------------------------------------------------------------------- writing
def _cell(s: Spread) -> str:
    if s.n == 0:
        return "missing"
    return f"{s.mean:.3f}" if s.n == 1 or math.isnan(s.std) else f"{s.mean:.3f} ± {s.std:.3f}"


def _p(value: float | None) -> str:
    return "–" if value is None else format_p(value)


def setting_markdown(table: SettingTable, structures: list[str]) -> str:
    keys = [*structures, OVERALL]
    seeds_word = "folds" if table.setting.kind == "full" else "seeds"
    header = ["arm", *keys, "gap to best", "p vs best (Holm)", "p vs scratch (Holm)", "epochs to 90%", seeds_word]
    rows, notes = [], []
    for arm in table.arms:
        expected = len(table.setting.folds)
        label = arm.arm + (" ★" if arm.arm == table.best else "")
        if not arm.available:
            rows.append([label, *(["missing"] * len(keys)), "", "", "", "", f"0/{expected}"])
            continue
        gap = arm.gap_to_best.get(OVERALL, math.nan)
        convergence = "n/a" if arm.epochs_to_converge.n == 0 else f"{arm.epochs_to_converge.mean:.1f}"
        rows.append([
            label, *(_cell(arm.spread[k]) for k in keys), "best" if arm.arm == table.best else f"{gap:+.1f}%",
            _p(arm.p_best_holm.get(OVERALL)), _p(arm.p_scratch_holm.get(OVERALL)), convergence,
            f"{len(arm.complete_runs)}/{expected}",
        ])
        if arm.vs_best is not None and not arm.vs_best.tests[OVERALL].tested:
            notes.append(f"{arm.arm} vs {table.best}: no test, {arm.vs_best.tests[OVERALL].reason}")
    better = [a.arm for a in table.arms if a.arm != table.best and (a.p_best_holm.get(OVERALL) or 1.0) < ALPHA]
    if table.best is None:
        winner = "No arm has a complete run yet."
    else:
        winner = (
            f"★ best arm (highest mean {OVERALL} Dice)"
            + (f"; significantly better than {', '.join(better)}" if better else
               "; not significantly better than any other arm")
            + f" (two-sided paired Wilcoxon on per-case {OVERALL} Dice, Holm across arms, alpha {ALPHA})."
        )
    text = markdown_table(header, rows)
    text += (
        f"\n\n{table.setting.title}: folds {', '.join(map(str, table.setting.folds))}. Cells: mean ± sd over "
        f"{seeds_word} of each run's mean Dice ({OVERALL}: mean over structures). {winner} "
        f"Epochs to 90%: epochs until the EMA pseudo-Dice first reached 90 % of its final value, mean over runs."
    )
    missing = [f"{a.arm} fold {r.fold}: {r.status}: {r.reason}" for a in table.arms for r in a.runs if not r.complete]
    if missing:
        notes.append("not averaged in: " + "; ".join(missing))
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text + "\n"


def cka_markdown(report: ExperimentReport) -> str:
    if not report.cka:
        return f"CKA not computed: {report.cka_note}.\n"
    layers = report.cka[0].layers
    rows = [[r.arm, r.setting, *(f"{v:.3f}" for v in r.values), str(r.pairs)] for r in report.cka]
    return markdown_table(["arm", "setting", *layers, "runs"], rows) + (
        "\n\nLinear CKA (minibatch, unbiased HSIC) per encoder stage (its last block) between the fine-tuned "
        "encoder of each subset run and the arm's first complete full-data fold, mean over the subset's runs "
        "(1 = the same features).\n"
    )


def report_markdown(report: ExperimentReport, figures: dict[str, str]) -> str:
    e = report.experiment
    parts = [
        f"# Experiment report: {e.source.name}\n",
        f"- dataset {e.dataset}, plans {e.plans}, {e.configuration}; arms: {', '.join(a.name for a in e.arms)}",
        f"- evaluation: {report.evaluation}",
        "- missing and unfinished runs are listed under each table and never averaged in\n",
    ]
    for table in report.tables:
        parts += [f"## {table.setting.title}\n", setting_markdown(table, report.structures)]
    parts += ["## Feature reuse: CKA few-shot vs full-data encoders\n", cka_markdown(report)]
    if report.failed_jobs:
        parts += ["## Failed jobs\n", "\n".join(f"- {k}: {v}" for k, v in report.failed_jobs.items()) + "\n"]
    for name, title in (("subsets", "Mean Dice vs training cases"), ("curves", "EMA pseudo-Dice vs epoch")):
        if name in figures:
            parts.append(f"![{title}]({figures[name]})\n")
    parts.append("Files: `tables.csv`, `runs.csv`, `cka.csv`.\n")
    return "\n".join(parts)


def write_outputs(report: ExperimentReport, out: Path, prepared: Prepared) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    keys = [*report.structures, OVERALL]
    rows = []
    for table in report.tables:
        for arm in table.arms:
            for key in keys:
                s = arm.spread[key]
                test_best = arm.vs_best.tests[key].p_value if arm.vs_best else None
                test_scratch = arm.vs_scratch.tests[key].p_value if arm.vs_scratch else None
                rows.append([table.setting.kind, table.setting.size or "", arm.arm, arm.trainer, key, s.n,
                             len(table.setting.folds), s.mean, s.std, arm.gap_to_best.get(key, math.nan),
                             test_best, arm.p_best_holm.get(key), test_scratch, arm.p_scratch_holm.get(key),
                             arm.epochs_to_converge.mean, arm.arm == table.best])
    _write_csv(out / "tables.csv", ["setting", "size", "arm", "trainer", "structure", "n_runs", "n_expected", "mean",
                                    "sd", "gap_to_best_pct", "p_vs_best", "p_vs_best_holm", "p_vs_scratch",
                                    "p_vs_scratch_holm", "epochs_to_90pct", "best"], rows)
    rows = []
    for table in report.tables:
        for arm in table.arms:
            for run in arm.runs:
                means = structure_means(run.dice, report.structures) if run.complete else {}
                rows += [[table.setting.label, arm.arm, run.fold, table.setting.folds[run.fold], run.status, run.reason,
                          key, means.get(key, math.nan)] for key in keys]
    _write_csv(out / "runs.csv", ["setting", "arm", "fold", "seed", "status", "reason", "structure", "mean_dice"], rows)
    _write_csv(out / "cka.csv", ["arm", "setting", "layer", "cka", "runs"],
               [[r.arm, r.setting, layer, value, r.pairs] for r in report.cka for layer, value in zip(r.layers, r.values)])
    figures: dict[str, str] = {}
    subset_rows = [
        FewShotRow(t.setting.kind, t.setting.size, a.arm, OVERALL, {}, {}, a.spread[OVERALL], math.nan, math.nan)
        for t in report.tables if t.setting.kind != "full" for a in t.arms if a.available
    ]
    if subset_rows:
        plots.plot_few_shot(subset_rows, out / "dice_vs_cases.png")
        figures["subsets"] = "dice_vs_cases.png"
    curves: list[TrainingCurves] = []
    for table in report.tables:
        for arm in table.arms:
            for run in arm.complete_runs:
                loaded = load_curves(prepared.paths.fold_dir(arm.arm, arm.trainer, run.fold), arm.arm, run.fold)
                if loaded is not None:
                    curves.append(loaded)
    if curves:
        plots.plot_validation_dice(curves, out / "curves.png")
        figures["curves"] = "curves.png"
    return figures


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row]
                          for row in rows])


def make_experiment_report(experiment: Experiment, cka: bool = True, device: str = "cpu") -> ExperimentReport:
    """Build the tables and write ``report/`` (report.md, tables.csv, runs.csv, cka.csv, PNGs) in the output."""
    prepared = prepare(experiment)
    report = build_experiment_report(prepared, cka, device)
    out = prepared.paths.report
    figures = write_outputs(report, out, prepared)
    report.markdown = report_markdown(report, figures)
    (out / "report.md").write_text(report.markdown, encoding="utf-8")
    logger.info("experiment report: %s", out / "report.md")
    return report
