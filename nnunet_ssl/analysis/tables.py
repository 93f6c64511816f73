"""Every table of the reports, as Markdown and CSV: the one module that renders tables.

Two reports share it:

- the transfer report (``nnunet-ssl report``, :mod:`nnunet_ssl.analysis.report`): per setting, methods x
  structures mean Dice with gap % and paired Wilcoxon p vs a reference; runs, few-shot and HD95
  tables; ``dice_per_case.csv``, ``summary.csv``, ``stats.csv``, ``few_shot.csv``, ``curves.csv``;
- the experiment report (``nnunet-ssl experiment report``, :mod:`nnunet_ssl.experiment.report`): the
  transfer tables of its runs (reference: the scratch arm) plus, per setting, arms as rows with
  mean +/- sd over seeds, gap to the best arm, Holm-corrected p, convergence; CKA rows;
  ``tables.csv``, ``runs.csv``, ``cka.csv``.

The functions read the report objects those modules build (attributes named in each docstring) and
import neither, so the front ends depend on this module, not the other way round. Figures are
:mod:`nnunet_ssl.analysis.plots`.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from nnunet_ssl.analysis.curves import curve_rows, structure_column
from nnunet_ssl.analysis.results import COMPLETE
from nnunet_ssl.analysis.stats import (
    ALPHA,
    OVERALL,
    Spread,
    case_counts,
    finite_or_nan,
    format_p,
    structure_means,
)

#: Transfer report (``analysis.report``): ``Report``, ``Setting``; experiment report: ``ExperimentReport``,
#: ``SettingTable`` (``experiment.report``). Rendered by attribute, so not imported here.
Report: TypeAlias = Any
HeadlineSetting: TypeAlias = Any
ExperimentReport: TypeAlias = Any
SettingTable: TypeAlias = Any

NEVER_AVERAGED = "incomplete and missing runs are listed below and never averaged in"


# --- shared ------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _gap(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.1f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (a ``|`` in a cell becomes ``/``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A CSV file with a header row; NaN and None are written as empty cells."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row]
                          for row in rows])
    return Path(path)


# --- transfer report (nnunet-ssl report; also part of the experiment report) --------------------------------


def headline_markdown(report: Report) -> str:
    """Methods x structures mean Dice, with gap % and Wilcoxon p vs the reference, per setting, as Markdown.

    One table for nnU-Net's ordinary folds and one per few-shot / data-limited size that was run.
    """
    if len(report.settings) == 1:
        return headline_setting_markdown(report, report.settings[0])
    return "\n".join(f"### {s.title}\n\n{headline_setting_markdown(report, s)}" for s in report.settings)


def headline_setting_markdown(report: Report, setting: HeadlineSetting) -> str:
    """The headline table of one setting."""
    keys = [*report.structures, OVERALL]
    reference = report.config.reference_trainer
    header = ["method", "fold(s)", "cases", *keys]
    rows, notes = [], []
    reference_means = setting.method(reference).means if setting.method(reference).available else {}
    for method in setting.methods:
        label = f"{method.trainer} (reference)" if method.trainer == reference else method.trainer
        if not method.available:
            reasons = "; ".join(f"fold {f}: {why}" for f, why in sorted(method.not_used.items())) or "no runs"
            rows.append([label, "missing", "0", *(["missing"] * len(keys))])
            notes.append(f"{method.trainer}: no complete run ({reasons})")
            continue
        folds = ("fold " if len(method.folds) == 1 else "folds ") + ",".join(str(f) for f in method.folds)
        if method.not_used:
            folds += " (" + ", ".join(f"{f} {why.split(':')[0]}" for f, why in sorted(method.not_used.items())) + ")"
        cells = []
        cases = max(method.counts[key] for key in report.structures) if report.structures else method.counts[OVERALL]
        for key in keys:
            cell = _fmt(method.means[key])
            if key != OVERALL and method.counts[key] < cases:
                cell += f" [{method.counts[key]} cases]"
                notes.append(f"{method.trainer} {key}: scored on the {method.counts[key]} of {cases} cases that "
                             "have the structure in the reference or the prediction")
            comparison = method.comparison
            if comparison is not None:
                test = comparison.tests[key]
                p = f"p={format_p(test.p_value)}" if test.tested else "p n/a"
                gap = comparison.gaps[key]
                if math.isnan(gap) and reference_means.get(key) == 0:
                    cell += f" (gap n/a: reference Dice 0, {p})"
                    notes.append(f"{method.trainer} {key}: no gap %, the reference {reference} has mean Dice 0 "
                                 "(100*(acc - 0)/0 is undefined)")
                else:
                    cell += f" ({_gap(gap)}, {p})"
                if not test.tested:
                    notes.append(f"{method.trainer} {key}: no Wilcoxon test, {test.reason}")
                elif test.note:
                    notes.append(f"{method.trainer} {key}: {test.note}")
            cells.append(cell)
        if method.comparison is not None and not method.comparison.same_cases:
            label += " †"
            notes.append(
                f"† {method.trainer} and {reference} scored different cases: gap and p use the "
                f"{method.comparison.shared_cases} cases both scored"
            )
        rows.append([label, folds, str(cases), *cells])
    if not setting.method(reference).available:
        notes.append(f"the reference {reference} has no complete run: no gaps or tests")
    text = markdown_table(header, rows)
    text += (
        f"\n\n{setting.title}. Mean Dice over cases ({OVERALL}: mean over structures"
        + ("" if setting.kind == "ordinary" else "; a case's Dice is its mean over the seeds")
        + "). In brackets: performance gap "
        f"100*(acc - acc_ref)/acc_ref vs {reference}, and the two-sided paired Wilcoxon signed-rank p "
        "on the per-case Dice (pairs by case id)."
    )
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes))
    return text + "\n"


def runs_markdown(report: Report) -> str:
    keys = [*report.structures, OVERALL]
    rows = []
    for run in sorted(report.runs, key=lambda r: (r.fold, r.trainer)):
        entry = report.manifest.get(run.fold)
        kind = "ordinary" if entry is None else f"{entry.kind} n={entry.size} seed={entry.seed}"
        if run.complete:
            means = structure_means(run.dice, report.structures)
            values = [_fmt(means[k]) for k in keys]
        else:
            values = ["-"] * len(keys)
        rows.append([run.trainer, str(run.fold), kind, run.status, str(len(run.dice)), *values, run.reason])
    return markdown_table(["trainer", "fold", "kind", "status", "cases", *keys, "reason"], rows) + "\n"


def few_shot_markdown(report: Report) -> str:
    rows = []
    for row in (r for r in report.few_shot if r.structure == OVERALL):
        expected = len(row.seeds) + len(row.missing)
        spread_text = "n/a" if row.stats.n == 0 else (
            f"{_fmt(row.stats.std)} [{_fmt(row.stats.minimum)}-{_fmt(row.stats.maximum)}]"
        )
        missing = "; ".join(f"fold {f}: {why}" for f, why in sorted(row.missing.items()))
        rows.append([
            row.kind, str(row.size), row.trainer, f"{row.stats.n}/{expected}", _fmt(row.stats.mean), spread_text,
            _gap(row.gap_pct), _gap(row.gap_vs_best_full_pct), missing,
        ])
    header = ["kind", "size", "method", "seeds", "mean Dice", "std [min-max]", "gap vs ref", "gap vs best full",
              "missing"]
    return markdown_table(header, rows) + (
        f"\n\nMean over seeds of each fold's mean Dice ({OVERALL}); std is the sample std over seeds. "
        f"Gap vs ref: vs {report.config.reference_trainer} at the same size. Gap vs best full: vs the best "
        "method's mean Dice on the ordinary folds (the paper's few-to-many-shot gap). Per-structure rows "
        "are in few_shot.csv.\n"
    )


def hd95_markdown(report: Report) -> str:
    keys = [*report.structures, OVERALL]
    rows = [[m.trainer, *(_fmt(m.hd95_means.get(k, math.nan), 2) for k in keys)] for m in report.methods if m.hd95_means]
    return markdown_table(["method", *keys], rows) + (
        "\n\nMean 95th-percentile Hausdorff distance in mm (MONAI), over cases where both prediction and "
        "reference contain the structure.\n"
    )


def transfer_markdown(report: Report, figures: dict[str, str], extra_files: Sequence[str] = ()) -> str:
    """``report.md`` of ``nnunet-ssl report``.

    Args:
        report: ``analysis.report.Report``.
        figures: Figure name (``curves``, ``losses``, ``few_shot``) -> file name beside report.md, for
            the figures that were written.
        extra_files: Other entries beside report.md to list under Files (``predictions/`` when the report
            predicted the test set there).
    """
    config = report.config
    complete = sum(r.complete for r in report.runs)
    parts = [
        f"# Transfer report: {report.dataset_name}\n",
        f"- results: `{config.results_root / report.dataset_name}` ({config.plans}, {config.configuration})",
        f"- evaluation: {report.evaluation}",
        f"- reference: {config.reference_trainer}",
        f"- runs: {complete} complete of {len(report.runs)} (trainer x fold); {NEVER_AVERAGED}\n",
        "## Mean Dice\n",
        headline_markdown(report),
    ]
    if any(m.hd95_means for m in report.methods):
        parts += ["## HD95\n", hd95_markdown(report)]
    parts += ["## Runs\n", runs_markdown(report), *few_shot_and_convergence(report, figures)]
    parts += ["## Files\n", files_markdown([*TRANSFER_FILES, *figures.values(), *extra_files])]
    return "\n".join(parts)


#: CSV files of the transfer tables (:func:`write_transfer_csvs`).
TRANSFER_FILES = ("dice_per_case.csv", "summary.csv", "stats.csv", "few_shot.csv", "curves.csv")
#: Test-set predictions the transfer report made itself (``<trainer>/fold_N/<case><ending>``).
PREDICTIONS_FOLDER = "predictions/"

#: What each file of a report holds (the Files section of report.md).
FILE_DESCRIPTIONS = {
    "tables.csv": "the Arms tables: per setting, arm and structure, mean and sd over seeds, gap, p values",
    "runs.csv": "each run of the Arms tables: setting, arm, fold, seed, status, mean Dice per structure",
    "cka.csv": "CKA per arm, setting and encoder stage (only a header when not computed)",
    "dice_per_case.csv": "Dice per run, case and structure",
    "summary.csv": "mean Dice per method and structure of each Mean Dice table (scope pooled: nnU-Net's folds; "
                   "seeds: a few-shot or data-limited size) and of each run (scope fold)",
    "stats.csv": "gap % and Wilcoxon test vs the reference, per Mean Dice table, method and structure",
    "few_shot.csv": "few-shot and data-limited mean, sd and range over seeds, per structure",
    "curves.csv": "per-epoch losses, pseudo-Dice (mean over structures, its EMA, each structure) and "
                  "learning rate of every run",
    "curves.png": "validation pseudo-Dice vs epoch: mean over structures, and each structure",
    "losses.png": "training and validation loss vs epoch",
    "few_shot.png": "Dice vs training cases: mean over structures, and each structure",
    PREDICTIONS_FOLDER: "the test-set predictions this report made, predictions/<trainer>/fold_N/",
}


def files_markdown(names: Sequence[str]) -> str:
    """The Files section: each file written beside report.md (and nothing else), with what it holds."""
    return "\n".join(f"- `{name}`: {FILE_DESCRIPTIONS.get(name, '')}".rstrip(": ") for name in names) + "\n"


def few_shot_and_convergence(report: Report, figures: dict[str, str]) -> list[str]:
    """The few-shot section (when the report has manifest folds) and the convergence section."""
    parts = []
    if report.manifest:
        parts += ["## Few-shot and data-limited folds\n", few_shot_markdown(report)]
        if "few_shot" in figures:
            parts.append(f"![Dice vs training cases: mean over structures, and each structure]({figures['few_shot']})\n")
    parts.append("## Convergence\n")
    if "curves" in figures:
        parts.append(f"![Validation pseudo-Dice (EMA) vs epoch]({figures['curves']})\n")
        parts.append(f"![Training and validation loss vs epoch]({figures['losses']})\n")
        ordinary = any(c.fold not in report.manifest for c in report.curves)
        shown = "the runs of nnU-Net's folds" if ordinary and len(report.manifest) else "every run"
        parts.append(
            f"The figures show {shown}. Pseudo-Dice is nnU-Net's Dice on validation patches during training "
            f"(the first panel: the mean over structures, its EMA solid), not the tables' Dice on whole cases. "
            "Per-epoch values of every run (few-shot folds included) are in curves.csv.\n"
        )
    else:
        parts.append("No checkpoint with training logs was found.\n")
    return parts


SUMMARY_HEADER = ("trainer", "scope", "setting", "kind", "size", "seed", "folds", "status", "reason", "structure",
                  "n_cases", "mean_dice", "mean_hd95")
#: ``status`` of a pooled summary row whose method has complete and incomplete (or missing) folds.
PARTIAL = "partial"


def summary_rows(report: Report) -> list[list[object]]:
    """The rows of summary.csv (:data:`SUMMARY_HEADER`).

    One row per structure for each method of each Mean Dice table of report.md (``report.settings``),
    with its numbers and ``setting`` = the table's title: scope ``pooled`` for nnU-Net's folds (each
    case scored by its fold), scope ``seeds`` for a few-shot or data-limited size (each case's Dice its
    mean over the seeds); status ``complete``, ``partial`` (some folds not complete, listed in
    ``reason``) or ``missing``. A setting that report.md has no table for has no rows. Scope ``fold``:
    one row per structure for each run of the Runs table, with its status and reason.
    """
    keys = [*report.structures, OVERALL]
    rows: list[list[object]] = []
    for setting in report.settings:
        for method in setting.methods:
            status = (COMPLETE if not method.not_used else PARTIAL) if method.available else "missing"
            reason = "; ".join(f"fold {f}: {why}" for f, why in sorted(method.not_used.items()))
            for key in keys:
                scope = "pooled" if setting.kind == "ordinary" else "seeds"
                rows.append([method.trainer, scope, setting.title, setting.kind, setting.size, None,
                             ";".join(str(f) for f in method.folds), status, reason, key,
                             method.counts.get(key, 0) if method.available else 0, method.means.get(key, math.nan),
                             method.hd95_means.get(key, math.nan)])
    for run in report.runs:
        entry = report.manifest.get(run.fold)
        means = structure_means(run.dice, report.structures) if run.complete else {}
        counts = case_counts(run.dice, report.structures) if run.complete else {}
        hd95 = structure_means(finite_or_nan(run.hd95), report.structures) if run.complete and run.hd95 else {}
        for key in keys:
            rows.append([run.trainer, "fold", None, "ordinary" if entry is None else entry.kind,
                         None if entry is None else entry.size, None if entry is None else entry.seed, str(run.fold),
                         run.status, run.reason, key, counts.get(key, 0), means.get(key, math.nan),
                         hd95.get(key, math.nan)])
    return rows


def write_transfer_csvs(report: Report, out_dir: Path) -> None:
    """dice_per_case.csv, summary.csv, stats.csv, few_shot.csv and curves.csv of a transfer report."""
    keys = [*report.structures, OVERALL]
    with_hd95 = report.config.hd95
    rows = []
    for run in report.runs:
        for case in sorted(run.dice):
            for structure in report.structures:
                row: list[object] = [run.trainer, run.fold, case, structure, run.dice[case][structure], run.status]
                if with_hd95:
                    row.append(run.hd95.get(case, {}).get(structure, math.nan))
                rows.append(row)
    header = ["trainer", "fold", "case", "structure", "dice", "run_status"] + (["hd95"] if with_hd95 else [])
    write_csv(out_dir / "dice_per_case.csv", header, rows)

    write_csv(out_dir / "summary.csv", SUMMARY_HEADER, summary_rows(report))

    rows = []
    for setting in report.settings:
        for method in setting.methods:
            if method.comparison is None:
                continue
            c = method.comparison
            for key in keys:
                t = c.tests[key]
                rows.append([setting.kind, "" if setting.size is None else setting.size, method.trainer,
                             report.config.reference_trainer, key, c.means[key], c.reference_means[key],
                             c.gaps[key], t.n_pairs, t.n_nonzero, "" if t.statistic is None else t.statistic,
                             "" if t.p_value is None else t.p_value, t.reason, t.note])
    write_csv(out_dir / "stats.csv", ["setting", "size", "trainer", "reference", "structure", "mean_dice",
                                       "reference_mean_dice", "gap_pct", "n_pairs", "n_nonzero",
                                       "wilcoxon_statistic", "p_value", "reason", "note"], rows)

    rows = [[r.kind, r.size, r.trainer, r.structure, r.stats.n, len(r.seeds) + len(r.missing), r.stats.mean,
             r.stats.std, r.stats.minimum, r.stats.maximum, r.gap_pct, r.gap_vs_best_full_pct,
             ";".join(f"{s}:{v:.6g}" for s, v in sorted(r.seeds.items())),
             "; ".join(f"fold {f}: {why}" for f, why in sorted(r.missing.items()))] for r in report.few_shot]
    write_csv(out_dir / "few_shot.csv", ["kind", "size", "trainer", "structure", "n_seeds", "n_folds", "mean",
                                          "std", "min", "max", "gap_pct", "gap_vs_best_full_pct", "seed_means",
                                          "missing"], rows)

    curve_table = curve_rows(report.curves, report.structures)
    curve_header = ["trainer", "fold", "epoch", "train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs",
                    *(structure_column(name) for name in report.structures)]
    write_csv(out_dir / "curves.csv", curve_header, [[row[k] for k in curve_header] for row in curve_table])


# --- experiment report (nnunet-ssl experiment report) --------------------------------------------------------


def _cell(s: Spread) -> str:
    if s.n == 0:
        return "missing"
    return f"{s.mean:.3f}" if s.n == 1 or math.isnan(s.std) else f"{s.mean:.3f} ± {s.std:.3f}"


def _p(value: float | None) -> str:
    return "–" if value is None else format_p(value)


def arms_setting_markdown(table: SettingTable, structures: list[str]) -> str:
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
    groups: dict[tuple[str, ...], list[Any]] = {}  # one table per layer list: a Swin arm has 4 stages, ResEnc-L 6
    for row in report.cka:
        groups.setdefault(tuple(row.layers), []).append(row)
    tables = [markdown_table(["arm", "setting", *layers, "runs"],
                             [[r.arm, r.setting, *(f"{v:.3f}" for v in r.values), str(r.pairs)] for r in rows])
              for layers, rows in groups.items()]
    return "\n\n".join(tables) + (
        "\n\nLinear CKA (minibatch, unbiased HSIC) per encoder stage (its last block) between the fine-tuned "
        "encoder of each subset run and the arm's first complete full-data fold, mean over the subset's runs "
        "(1 = the same features); one table per encoder layout when the arms' networks differ.\n"
    )


def experiment_markdown(report: ExperimentReport, figures: dict[str, str]) -> str:
    """``report.md`` of ``nnunet-ssl experiment report``.

    Args:
        report: ``experiment.report.ExperimentReport``; its ``transfer`` (an ``analysis.report.Report``
            of the same runs, the scratch arm as reference) gives the Mean Dice, few-shot and
            convergence sections.
        figures: As for :func:`transfer_markdown`.
    """
    e, transfer = report.experiment, report.transfer
    parts = [
        f"# Experiment report: {e.source.name}\n",
        f"- dataset {e.dataset}, plans {transfer.config.plans}, {e.configuration}; arms: {', '.join(a.name for a in e.arms)}",
        f"- evaluation: {report.evaluation}",
        f"- reference of the Mean Dice tables: {transfer.config.reference_trainer}",
        "- missing and unfinished runs are listed under each table and never averaged in\n",
        "## Mean Dice\n",
        headline_markdown(transfer),
    ]
    for table in report.tables:
        parts += [f"## Arms: {table.setting.title}\n", arms_setting_markdown(table, report.structures)]
    parts += ["## Feature reuse: CKA few-shot vs full-data encoders\n", cka_markdown(report)]
    parts += few_shot_and_convergence(transfer, figures)
    if report.failed_jobs:
        parts += ["## Failed jobs\n", "\n".join(f"- {k}: {v}" for k, v in report.failed_jobs.items()) + "\n"]
    parts += ["## Files\n", files_markdown([*ARMS_FILES, *TRANSFER_FILES, *figures.values()])]
    return "\n".join(parts)


#: CSV files of the arms tables (:func:`write_arms_csvs`).
ARMS_FILES = ("tables.csv", "runs.csv", "cka.csv")


def write_arms_csvs(report: ExperimentReport, out: Path) -> None:
    """tables.csv, runs.csv and cka.csv of an experiment report."""
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
    write_csv(out / "tables.csv", ["setting", "size", "arm", "trainer", "structure", "n_runs", "n_expected", "mean",
                                    "sd", "gap_to_best_pct", "p_vs_best", "p_vs_best_holm", "p_vs_scratch",
                                    "p_vs_scratch_holm", "epochs_to_90pct", "best"], rows)
    rows = []
    for table in report.tables:
        for arm in table.arms:
            for run in arm.runs:
                means = structure_means(run.dice, report.structures) if run.complete else {}
                rows += [[table.setting.label, arm.arm, run.fold, table.setting.folds[run.fold], run.status, run.reason,
                          key, means.get(key, math.nan)] for key in keys]
    write_csv(out / "runs.csv", ["setting", "arm", "fold", "seed", "status", "reason", "structure", "mean_dice"], rows)
    write_csv(out / "cka.csv", ["arm", "setting", "layer", "cka", "runs"],
               [[r.arm, r.setting, layer, value, r.pairs] for r in report.cka for layer, value in zip(r.layers, r.values, strict=True)])
