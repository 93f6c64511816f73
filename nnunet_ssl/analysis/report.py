"""The transfer report: Dice per method and structure, gap % and Wilcoxon p vs a reference, few-shot
tables and convergence curves, written as Markdown, CSV and PNG (``nnunet-ssl report``).

:func:`make_report` collects every (trainer, fold) asked for, computes the tables and writes
``report.md``, ``dice_per_case.csv``, ``summary.csv``, ``stats.csv``, ``few_shot.csv``,
``curves.csv`` and the figures into ``ReportConfig.out_dir``; :func:`headline_markdown` gives the
headline table as Markdown text.

Folds listed in ``splits_manifest.json`` (few-shot and data-limited) only feed the few-shot table;
every other fold ("ordinary": nnU-Net's cross-validation or a full-data run) feeds the headline.
"""
from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_ssl.analysis import plots
from nnunet_ssl.analysis.curves import TrainingCurves, curve_rows, load_curves
from nnunet_ssl.analysis.fewshot import (
    FewShotRow,
    few_shot_rows,
    manifest_by_fold,
)
from nnunet_ssl.analysis.results import (
    CHECKPOINTS,
    COMPLETE,
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
    format_p,
    structure_means,
    with_overall,
)
from nnunet_ssl.analysis.testset import TestRunSettings, collect_test_run, find_test_set
from nnunet_ssl.nnunet_paths import dataset_name as nnunet_dataset_name
from nnunet_ssl.splits import MANIFEST_FILE, FoldEntry

logger = logging.getLogger(__name__)

NEVER_AVERAGED = "incomplete and missing runs are listed below and never averaged in"


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
    hd95_means = structure_means(_finite_only(hd95), structures) if hd95 else {}
    return MethodSummary(
        trainer, [r.fold for r in used], not_used, dice, structure_means(dice, structures),
        case_counts(dice, structures), hd95_means=hd95_means,
    )


def _finite_only(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Infinite distances (a structure missed entirely) become NaN so they are skipped, not averaged in."""
    return {c: {s: (v if math.isfinite(v) else math.nan) for s, v in scores.items()} for c, scores in table.items()}


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
    trainers = config.all_trainers
    methods = compare_methods([summarise_method(t, runs, manifest, structures) for t in trainers], config, structures)
    settings = [Setting("nnU-Net folds", "ordinary", None, methods)] if any(r.fold not in manifest for r in runs) else []
    for (kind, size), group in manifest_groups(manifest, {r.fold for r in runs}).items():
        group_methods = [summarise_method(t, runs, manifest, structures, group) for t in trainers]
        title = f"{kind.replace('_', '-')}, {size} training cases (folds {', '.join(map(str, sorted(group)))})"
        settings.append(Setting(title, kind, size, compare_methods(group_methods, config, structures)))
    best_full = {
        key: max((m.means[key] for m in methods if m.available and not math.isnan(m.means[key])), default=math.nan)
        for key in [*structures, OVERALL]
    }
    few_shot = few_shot_rows(runs, manifest, trainers, config.reference_trainer, structures, best_full)
    curves = [
        c for r in runs if layout.fold_dir(r.trainer, r.fold).is_dir()
        for c in [load_curves(layout.fold_dir(r.trainer, r.fold), r.trainer, r.fold)] if c is not None
    ]
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


# --- Markdown ------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _gap(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.1f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_markdown(report: Report) -> str:
    """Methods x structures mean Dice, with gap % and Wilcoxon p vs the reference, per setting, as Markdown.

    One table for nnU-Net's ordinary folds and one per few-shot / data-limited size that was run.
    """
    if not report.settings:
        return setting_markdown(report, Setting("nnU-Net folds", "ordinary", None, report.methods))
    if len(report.settings) == 1:
        return setting_markdown(report, report.settings[0])
    return "\n".join(f"### {s.title}\n\n{setting_markdown(report, s)}" for s in report.settings)


def setting_markdown(report: Report, setting: Setting) -> str:
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


def report_markdown(report: Report, figures: dict[str, str]) -> str:
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
    parts += ["## Runs\n", runs_markdown(report)]
    if report.manifest:
        parts += ["## Few-shot and data-limited folds\n", few_shot_markdown(report)]
        if "few_shot" in figures:
            parts.append(f"![Mean Dice vs training cases]({figures['few_shot']})\n")
    parts.append("## Convergence\n")
    if "curves" in figures:
        parts.append(f"![Validation pseudo-Dice (EMA) vs epoch]({figures['curves']})\n")
        parts.append(f"![Training and validation loss vs epoch]({figures['losses']})\n")
        parts.append("Per-epoch values of every run (few-shot folds included) are in curves.csv.\n")
    else:
        parts.append("No checkpoint with training logs was found.\n")
    parts.append(
        "## Files\n\n`dice_per_case.csv`, `summary.csv`, `stats.csv`, `few_shot.csv`, `curves.csv`"
        + (", `predictions/`" if config.test_images is not None else "") + "\n"
    )
    return "\n".join(parts)


# --- CSV and figures -----------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows])
    return path


def write_csvs(report: Report, out_dir: Path) -> None:
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
    _write_csv(out_dir / "dice_per_case.csv", header, rows)

    rows = []
    for method in report.methods:
        folds = ";".join(str(f) for f in method.folds)
        status = COMPLETE if method.available else "missing"
        reason = "; ".join(f"fold {f}: {why}" for f, why in sorted(method.not_used.items()))
        for key in keys:
            rows.append([method.trainer, "pooled", folds, "ordinary", status, reason, key,
                         method.counts.get(key, 0) if method.available else 0, method.means.get(key, math.nan),
                         method.hd95_means.get(key, math.nan)])
    for run in report.runs:
        entry = report.manifest.get(run.fold)
        means = structure_means(run.dice, report.structures) if run.complete else {}
        counts = case_counts(run.dice, report.structures) if run.complete else {}
        hd95 = structure_means(_finite_only(run.hd95), report.structures) if run.complete and run.hd95 else {}
        for key in keys:
            rows.append([run.trainer, "fold", str(run.fold), "ordinary" if entry is None else entry.kind, run.status,
                         run.reason, key, counts.get(key, 0), means.get(key, math.nan), hd95.get(key, math.nan)])
    _write_csv(out_dir / "summary.csv", ["trainer", "scope", "folds", "kind", "status", "reason", "structure",
                                         "n_cases", "mean_dice", "mean_hd95"], rows)

    rows = []
    for setting in report.settings or [Setting("nnU-Net folds", "ordinary", None, report.methods)]:
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
    _write_csv(out_dir / "stats.csv", ["setting", "size", "trainer", "reference", "structure", "mean_dice",
                                       "reference_mean_dice", "gap_pct", "n_pairs", "n_nonzero",
                                       "wilcoxon_statistic", "p_value", "reason", "note"], rows)

    rows = [[r.kind, r.size, r.trainer, r.structure, r.stats.n, len(r.seeds) + len(r.missing), r.stats.mean,
             r.stats.std, r.stats.minimum, r.stats.maximum, r.gap_pct, r.gap_vs_best_full_pct,
             ";".join(f"{s}:{v:.6g}" for s, v in sorted(r.seeds.items())),
             "; ".join(f"fold {f}: {why}" for f, why in sorted(r.missing.items()))] for r in report.few_shot]
    _write_csv(out_dir / "few_shot.csv", ["kind", "size", "trainer", "structure", "n_seeds", "n_folds", "mean",
                                          "std", "min", "max", "gap_pct", "gap_vs_best_full_pct", "seed_means",
                                          "missing"], rows)

    curve_table = curve_rows(report.curves)
    curve_header = ["trainer", "fold", "epoch", "train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs"]
    _write_csv(out_dir / "curves.csv", curve_header, [[row[k] for k in curve_header] for row in curve_table])


def write_figures(report: Report, out_dir: Path) -> dict[str, str]:
    """PNG figures; returns name -> file name relative to ``out_dir``."""
    figures: dict[str, str] = {}
    if report.curves:
        shown = [c for c in report.curves if c.fold not in report.manifest] or report.curves
        plots.plot_validation_dice(shown, out_dir / "curves.png")
        plots.plot_losses(shown, out_dir / "losses.png")
        figures.update(curves="curves.png", losses="losses.png")
    overall = [r for r in report.few_shot if r.structure == OVERALL and r.stats.n > 0]
    if overall:
        plots.plot_few_shot(overall, out_dir / "few_shot.png")
        figures["few_shot"] = "few_shot.png"
    return figures


def write_report(report: Report) -> Path:
    """Write every output into ``report.config.out_dir``; returns the path of ``report.md``."""
    out_dir = report.config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csvs(report, out_dir)
    figures = write_figures(report, out_dir)
    path = out_dir / "report.md"
    path.write_text(report_markdown(report, figures), encoding="utf-8")
    return path


def make_report(config: ReportConfig) -> Report:
    """Build the report and write it (``config.out_dir/report.md`` and the CSVs and PNGs beside it)."""
    report = build_report(config)
    path = write_report(report)
    logger.info("report: %s", path)
    return report
