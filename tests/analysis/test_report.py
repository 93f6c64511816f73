"""The transfer report: statistics against hand-computed values, a fake nnU-Net results tree, few-shot grouping,
prediction reuse, and the CLI."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ssl.analysis import stats
from nnunet_ssl.analysis.fewshot import few_shot_rows, manifest_by_fold
from nnunet_ssl.analysis.report import (
    ReportConfig,
    build_report,
    make_report,
)
from nnunet_ssl.analysis.results import (
    COMPLETE,
    INCOMPLETE,
    MISSING,
    ResultsLayout,
    RunResult,
    collect_validation_run,
    dataset_info,
)
from nnunet_ssl.analysis.tables import headline_markdown
from nnunet_ssl.analysis.testset import (
    SOURCE_FILE,
    cases_to_predict,
    checkpoint_source,
    collect_test_run,
    find_test_set,
    score_predictions,
)
from nnunet_ssl.analysis.testset import (
    TestRunSettings as RunSettings,
)
from nnunet_ssl.cli import main

DATASET = "Dataset501_Phantom"
DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "spleen": 2},
    "numTraining": 6,
    "file_ending": ".nii.gz",
}
STRUCTURES = ["liver", "spleen"]


# --- statistics ----------------------------------------------------------------------------------------


def test_performance_gap_hand_values() -> None:
    assert stats.performance_gap(0.9, 0.8) == pytest.approx(12.5)
    assert stats.performance_gap(0.6, 0.8) == pytest.approx(-25.0)
    assert math.isnan(stats.performance_gap(0.5, 0.0))
    assert math.isnan(stats.performance_gap(float("nan"), 0.8))


def exact_two_sided_p(differences: list[float]) -> tuple[float, float]:
    """(min(W+, W-), exact two-sided p) by enumerating every sign assignment of the ranks (no ties)."""
    ranks = {d: r for r, d in enumerate(sorted(differences, key=abs), start=1)}
    w_minus = sum(ranks[d] for d in differences if d < 0)
    w_plus = sum(ranks.values()) - w_minus
    statistic = min(w_plus, w_minus)
    n = len(differences)
    at_most = sum(1 for signs in itertools.product((0, 1), repeat=n)
                  if sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s) <= statistic)
    return statistic, min(1.0, 2 * at_most / 2**n)


def test_wilcoxon_matches_hand_enumeration_and_scipy_example() -> None:
    # scipy.stats.wilcoxon's documented example (Cheng & Wu): statistic 24, p = 0.041259765625
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    statistic, p = exact_two_sided_p(d)
    assert statistic == 24  # W- = rank(48) + rank(67) = 10 + 14
    reference = {f"case{i:02d}": 100.0 for i in range(len(d))}
    method = {f"case{i:02d}": 100.0 + v for i, v in enumerate(d)}
    result = stats.wilcoxon_paired(method, reference)
    assert result.statistic == 24
    assert result.p_value == pytest.approx(p) == pytest.approx(0.041259765625)
    assert result.n_pairs == 15 and result.note == ""


def test_wilcoxon_small_sample_by_hand() -> None:
    # differences 0.1, 0.2, -0.05, 0.3, 0.15: ranks 2, 4, 1, 5, 3 -> W- = 1, W+ = 14;
    # P(W- <= 1) = |{{}, {1}}| / 2^5, two-sided p = 2 * 2 / 32 = 0.125
    method = {"a": 0.8, "b": 0.7, "c": 0.6, "d": 0.9, "e": 0.75}
    reference = {"a": 0.7, "b": 0.5, "c": 0.65, "d": 0.6, "e": 0.6}
    result = stats.wilcoxon_paired(method, reference)
    assert result.statistic == 1.0
    assert result.p_value == pytest.approx(0.125)
    assert "cannot go below 0.0625" in result.note


def test_wilcoxon_not_applicable_cases_say_why() -> None:
    same = stats.wilcoxon_paired({"a": 0.5, "b": 0.6}, {"a": 0.5, "b": 0.6})
    assert not same.tested and same.describe() == "n/a (all 2 paired differences are zero)"
    disjoint = stats.wilcoxon_paired({"a": 0.5}, {"b": 0.6})
    assert not disjoint.tested and disjoint.reason == "no case scored by both"
    one = stats.wilcoxon_paired({"a": 0.5, "b": 0.6}, {"a": 0.5, "b": 0.7})
    assert not one.tested and "only 1 non-zero" in one.reason


def test_pairing_by_case_id_drops_unshared_and_nan_cases() -> None:
    from scipy.stats import wilcoxon

    method = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.95, "e": 0.6, "f": 0.99, "g": float("nan")}
    reference = {"e": 0.5, "d": 0.7, "c": 0.72, "b": 0.6, "a": 0.85, "g": 0.4, "h": 0.3}
    cases, a, b = stats.paired_values(method, reference)
    assert cases == ["a", "b", "c", "d", "e"]  # f only in method, h only in reference, g NaN
    result = stats.wilcoxon_paired(method, reference)
    assert result.n_pairs == 5
    assert result.p_value == pytest.approx(wilcoxon(a, b).pvalue)
    np.testing.assert_allclose(a - b, [0.05, 0.2, -0.02, 0.25, 0.1])


def test_compare_to_reference_per_structure_and_overall() -> None:
    method = {"a": {"liver": 0.9, "spleen": 0.6}, "b": {"liver": 0.9, "spleen": 0.6}, "x": {"liver": 0.1, "spleen": 0.1}}
    reference = {"a": {"liver": 0.8, "spleen": 0.5}, "b": {"liver": 0.8, "spleen": 0.5}}
    comparison = stats.compare_to_reference(method, reference, STRUCTURES)
    assert comparison.shared_cases == 2 and not comparison.same_cases  # case x is not paired
    assert comparison.gaps["liver"] == pytest.approx(12.5)
    assert comparison.gaps["spleen"] == pytest.approx(20.0)
    assert comparison.gaps[stats.OVERALL] == pytest.approx(100 * (0.75 - 0.65) / 0.65)
    assert set(comparison.tests) == {"liver", "spleen", stats.OVERALL}
    assert comparison.tests["liver"].n_pairs == 2


def test_structure_means_skip_nan_and_overall_is_mean_of_structures() -> None:
    table = {"a": {"liver": 0.8, "spleen": float("nan")}, "b": {"liver": 0.6, "spleen": 0.4}}
    means = stats.structure_means(table, STRUCTURES)
    assert means == pytest.approx({"liver": 0.7, "spleen": 0.4, stats.OVERALL: 0.55})
    assert stats.case_counts(table, STRUCTURES) == {"liver": 2, "spleen": 1, stats.OVERALL: 2}


def test_spread_over_seeds() -> None:
    result = stats.spread([0.5, 0.7, float("nan")])
    assert (result.n, result.mean, result.minimum, result.maximum) == (2, pytest.approx(0.6), 0.5, 0.7)
    assert result.std == pytest.approx(math.sqrt(0.02))  # sample std: ((0.1^2 + 0.1^2) / 1) ** 0.5
    assert math.isnan(stats.spread([0.5]).std)


# --- a fake nnU-Net results tree ---------------------------------------------------------------------------

# validation cases per fold in splits_final.json; folds 5-7 are few-shot folds sharing one validation set
SPLITS = [
    {"train": ["c3", "c4", "c5", "c6"], "val": ["c1", "c2"]},
    {"train": ["c1", "c2", "c5", "c6"], "val": ["c3", "c4"]},
    {"train": ["c1", "c2", "c3", "c4"], "val": ["c5", "c6"]},
    {"train": [], "val": []},
    {"train": [], "val": []},
    {"train": ["c3", "c4"], "val": ["c1", "c2"]},
    {"train": ["c5", "c6"], "val": ["c1", "c2"]},
    {"train": ["c3", "c4", "c5", "c6"], "val": ["c1", "c2"]},
]
MANIFEST = {
    "format": "nnunet-ssl-splits", "version": 1, "dataset": DATASET,
    "folds": [
        {"fold": 5, "kind": "few_shot", "size": 2, "seed": 0, "train": ["c3", "c4"], "val": ["c1", "c2"]},
        {"fold": 6, "kind": "few_shot", "size": 2, "seed": 1, "train": ["c5", "c6"], "val": ["c1", "c2"]},
        {"fold": 7, "kind": "few_shot", "size": 4, "seed": 0, "train": ["c3", "c4", "c5", "c6"], "val": ["c1", "c2"]},
    ],
}
# (trainer, fold) -> {case: (liver, spleen)}; None: the fold folder exists but has no validation summary
DICE = {
    ("Scratch", 0): {"c1": (0.80, 0.50), "c2": (0.70, 0.60)},
    ("Scratch", 1): {"c3": (0.90, 0.40), "c4": (0.60, 0.70)},
    ("Scratch", 2): {"c5": (0.75, 0.55), "c6": (0.65, 0.45)},
    ("Scratch", 5): {"c1": (0.50, 0.30), "c2": (0.40, 0.20)},
    ("Scratch", 6): {"c1": (0.60, 0.40), "c2": (0.50, 0.30)},
    ("Scratch", 7): {"c1": (0.70, 0.50), "c2": (0.60, 0.40)},
    ("SMIT", 0): {"c1": (0.85, 0.60), "c2": (0.80, float("nan"))},
    ("SMIT", 2): {"c5": (0.80, 0.60), "c6": (0.70, 0.50)},
    ("SMIT", 5): {"c1": (0.60, 0.40), "c2": (0.55, 0.35)},
    ("SMIT", 6): None,
}
LOGGING = {
    "train_losses": [0.5, 0.2, -0.1], "val_losses": [0.4, 0.1, -0.2], "mean_fg_dice": [0.1, 0.4, 0.6],
    "ema_fg_dice": [0.1, 0.13, 0.177], "lrs": [1e-3, 5e-4, 1e-5], "dice_per_class_or_region": [[0.1], [0.4], [0.6]],
    "epoch_start_timestamps": [0.0, 1.0, 2.0], "epoch_end_timestamps": [1.0, 2.0, 3.0],
}


def summary_json(scores: dict[str, tuple[float, float]], fold_dir: Path, preprocessed: Path) -> dict:
    """``validation/summary.json`` as nnU-Net's ``compute_metrics_on_folder`` writes it (keys sorted)."""
    cases = []
    for case, values in scores.items():
        metrics = {}
        for label, dice in zip(("1", "2"), values, strict=True):
            metrics[label] = {"Dice": dice, "FN": 3, "FP": 2, "IoU": dice / (2 - dice),
                              "TN": 1000, "TP": 10, "n_pred": 12, "n_ref": 13}
        cases.append({
            "metrics": metrics,
            "prediction_file": str(fold_dir / "validation" / f"{case}.nii.gz"),
            "reference_file": str(preprocessed / "gt_segmentations" / f"{case}.nii.gz"),
        })
    means = {label: {"Dice": float(np.nanmean([v[i] for v in scores.values()]))} for i, label in enumerate(("1", "2"))}
    return {"foreground_mean": {"Dice": float(np.mean([m["Dice"] for m in means.values()]))}, "mean": means,
            "metric_per_case": cases}


@pytest.fixture
def nnunet_tree(tmp_path: Path) -> tuple[Path, Path]:
    """$nnUNet_results and $nnUNet_preprocessed with trainers Scratch (all folds) and SMIT (fold 1 and 7 absent,
    fold 6 trained but never validated)."""
    results, preprocessed = tmp_path / "results", tmp_path / "preprocessed"
    dataset_dir = preprocessed / DATASET
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "dataset.json").write_text(json.dumps(DATASET_JSON), encoding="utf-8")
    (dataset_dir / "splits_final.json").write_text(json.dumps(SPLITS), encoding="utf-8")
    (dataset_dir / "splits_manifest.json").write_text(json.dumps(MANIFEST), encoding="utf-8")
    for (trainer, fold), scores in DICE.items():
        fold_dir = results / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
        (fold_dir / "validation").mkdir(parents=True)
        torch.save({"logging": LOGGING}, fold_dir / "checkpoint_final.pth")
        if scores is not None:
            summary = summary_json(scores, fold_dir, dataset_dir)
            (fold_dir / "validation" / "summary.json").write_text(json.dumps(summary, sort_keys=True, indent=4), encoding="utf-8")
    return results, preprocessed


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_validation_summary_is_read_per_case_and_checked_against_the_split(nnunet_tree: tuple[Path, Path]) -> None:
    results, preprocessed = nnunet_tree
    layout = ResultsLayout(results, DATASET, preprocessed_root=preprocessed)
    info = dataset_info(DATASET_JSON)
    run = collect_validation_run(layout, info, "SMIT", 0)
    assert run.status == COMPLETE
    assert run.dice["c1"] == {"liver": 0.85, "spleen": 0.60}
    assert math.isnan(run.dice["c2"]["spleen"])  # nnU-Net's NaN survives the JSON round trip
    # a summary lacking a validation case of the split is incomplete
    splits = json.loads((preprocessed / DATASET / "splits_final.json").read_text(encoding="utf-8"))
    splits[0]["val"].append("c9")
    (preprocessed / DATASET / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")
    run = collect_validation_run(layout, info, "SMIT", 0)
    assert run.status == INCOMPLETE and "lacks 1 of 3 cases (c9)" in run.reason
    assert collect_validation_run(layout, info, "SMIT", 6).reason.startswith("no validation/summary.json")
    assert collect_validation_run(layout, info, "SMIT", 1).status == MISSING
    assert collect_validation_run(layout, info, "Nobody", 0).reason.startswith("no results folder")


def test_report_from_fake_results_tree(nnunet_tree: tuple[Path, Path], tmp_path: Path) -> None:
    results, preprocessed = nnunet_tree
    out = tmp_path / "report"
    config = ReportConfig(dataset=DATASET, trainers=("SMIT",), reference="Scratch", out_dir=out,
                          results_root=results, preprocessed_root=preprocessed)
    report = make_report(config)
    for name in ("report.md", "dice_per_case.csv", "summary.csv", "stats.csv", "few_shot.csv", "curves.csv",
                 "curves.png", "losses.png", "few_shot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    runs = {(r.trainer, r.fold): r for r in report.runs}
    assert runs[("SMIT", 1)].status == MISSING and runs[("SMIT", 7)].status == MISSING
    assert runs[("SMIT", 6)].status == INCOMPLETE
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| SMIT | 1 | ordinary | missing | 0 |" in text and "no fold_1 folder (not trained)" in text
    assert "![Validation pseudo-Dice (EMA) vs epoch](curves.png)" in text

    # pooled means over the complete ordinary folds: SMIT folds 0 and 2 (fold 1 missing, never averaged in)
    pooled = {(r["trainer"], r["structure"]): r for r in read_csv(out / "summary.csv") if r["scope"] == "pooled"}
    smit_liver = np.mean([0.85, 0.80, 0.80, 0.70])
    smit_spleen = np.mean([0.60, 0.60, 0.50])  # c2's NaN skipped
    assert float(pooled[("SMIT", "liver")]["mean_dice"]) == pytest.approx(smit_liver)
    assert float(pooled[("SMIT", "spleen")]["mean_dice"]) == pytest.approx(smit_spleen)
    assert float(pooled[("SMIT", "overall")]["mean_dice"]) == pytest.approx((smit_liver + smit_spleen) / 2)
    assert pooled[("SMIT", "liver")]["folds"] == "0;2" and "fold 1: missing" in pooled[("SMIT", "liver")]["reason"]
    scratch_liver = np.mean([0.80, 0.70, 0.90, 0.60, 0.75, 0.65])
    assert float(pooled[("Scratch", "liver")]["mean_dice"]) == pytest.approx(scratch_liver)

    # gap and test on the 4 cases both scored (c1, c2, c5, c6)
    stat_rows = {r["structure"]: r for r in read_csv(out / "stats.csv") if r["setting"] == "ordinary"}
    paired_scratch_liver = np.mean([0.80, 0.70, 0.75, 0.65])
    assert float(stat_rows["liver"]["gap_pct"]) == pytest.approx(100 * (smit_liver - paired_scratch_liver)
                                                                   / paired_scratch_liver)
    assert stat_rows["liver"]["n_pairs"] == "4" and stat_rows["spleen"]["n_pairs"] == "3"
    # liver differences +0.05, +0.10, +0.05, +0.05 (ties up to float noise): tested, but p cannot reach 0.05
    assert float(stat_rows["liver"]["p_value"]) > 0.05 and "cannot go below 0.125" in stat_rows["liver"]["note"]
    headline = headline_markdown(report)
    assert "Scratch (reference)" in headline and "SMIT †" in headline

    per_case = read_csv(out / "dice_per_case.csv")
    assert {"trainer", "fold", "case", "structure", "dice"} <= set(per_case[0])
    assert len([r for r in per_case if r["trainer"] == "SMIT" and r["fold"] == "0"]) == 4
    curves = read_csv(out / "curves.csv")
    assert len(curves) == 3 * sum(1 for v in DICE.values()) and curves[2]["ema_fg_dice"] == "0.177"


def test_few_shot_grouping_mean_std_over_seeds(nnunet_tree: tuple[Path, Path], tmp_path: Path) -> None:
    results, preprocessed = nnunet_tree
    config = ReportConfig(dataset=DATASET, trainers=("Scratch", "SMIT"), out_dir=tmp_path / "r",
                          results_root=results, preprocessed_root=preprocessed)
    report = build_report(config)
    rows = {(r.size, r.trainer, r.structure): r for r in report.few_shot}
    # Scratch size 2: seed 0 (fold 5) overall = mean(0.45, 0.25) = 0.35; seed 1 (fold 6) = mean(0.55, 0.35) = 0.45
    scratch = rows[(2, "Scratch", "overall")]
    assert scratch.seeds == pytest.approx({0: 0.35, 1: 0.45})
    assert scratch.stats.mean == pytest.approx(0.40) and scratch.stats.std == pytest.approx(math.sqrt(0.005))
    assert (scratch.stats.minimum, scratch.stats.maximum) == pytest.approx((0.35, 0.45))
    smit = rows[(2, "SMIT", "overall")]
    assert smit.seeds == pytest.approx({0: (0.575 + 0.375) / 2}) and set(smit.missing) == {6}
    assert "no validation/summary.json" in smit.missing[6]
    assert smit.gap_pct == pytest.approx(100 * (0.475 - 0.40) / 0.40)
    assert rows[(4, "SMIT", "overall")].stats.n == 0
    assert rows[(4, "SMIT", "overall")].missing == {7: "missing: no fold_7 folder (not trained)"}
    # few-shot folds never enter the ordinary headline; each size gets its own table
    assert report.method("Scratch").folds == [0, 1, 2]
    titles = [setting.title for setting in report.settings]
    assert titles == ["nnU-Net folds", "few-shot, 2 training cases (folds 5, 6)",
                      "few-shot, 4 training cases (folds 7)"]
    two_shot = report.settings[1]
    # a case's Dice is its mean over the seeds: Scratch liver c1 (0.5+0.6)/2, c2 (0.4+0.5)/2; SMIT fold 5 only
    assert two_shot.method("Scratch").dice["c1"]["liver"] == pytest.approx(0.55)
    assert two_shot.method("SMIT").comparison.gaps["liver"] == pytest.approx(100 * (0.575 - 0.50) / 0.50)
    assert "### few-shot, 2 training cases" in headline_markdown(report)


def test_few_shot_rows_from_hand_written_manifest(tmp_path: Path) -> None:
    path = tmp_path / "splits_manifest.json"
    path.write_text(json.dumps(MANIFEST), encoding="utf-8")
    manifest = manifest_by_fold(path)
    assert (manifest[6].kind, manifest[6].size, manifest[6].seed) == ("few_shot", 2, 1)
    runs = [RunResult("A", 5, COMPLETE, "", {"c1": {"liver": 0.4}}), RunResult("A", 6, COMPLETE, "", {"c1": {"liver": 0.6}})]
    rows = few_shot_rows(runs, manifest, ["A"], "A", ["liver"])
    liver = next(r for r in rows if r.size == 2 and r.structure == "liver")
    assert liver.stats.mean == pytest.approx(0.5) and liver.gap_pct == 0.0
    assert next(r for r in rows if r.size == 4).missing == {7: "not run"}
    path.write_text(json.dumps({**MANIFEST, "version": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match="version 2"):
        manifest_by_fold(path)


def test_report_without_any_complete_run_marks_everything_missing(tmp_path: Path) -> None:
    results, preprocessed = tmp_path / "results", tmp_path / "preprocessed"
    (preprocessed / DATASET).mkdir(parents=True)
    (preprocessed / DATASET / "dataset.json").write_text(json.dumps(DATASET_JSON), encoding="utf-8")
    report = make_report(ReportConfig(dataset=DATASET, trainers=("A", "B"), out_dir=tmp_path / "r",
                                      results_root=results, preprocessed_root=preprocessed))
    assert [r.status for r in report.runs] == [MISSING, MISSING]
    text = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "A: no complete run" in text and "No checkpoint with training logs" in text


def test_config_rejects_inconsistent_options(tmp_path: Path) -> None:
    common = {"dataset": DATASET, "trainers": ("A",), "out_dir": tmp_path, "results_root": tmp_path}
    with pytest.raises(ValueError, match="go together"):
        ReportConfig(**common, test_images=tmp_path)
    with pytest.raises(ValueError, match="checkpoint best needs"):
        ReportConfig(**common, checkpoint="best")
    assert ReportConfig(**common, reference="B").all_trainers == ["A", "B"]


# --- test-set scoring and prediction reuse -------------------------------------------------------------


def write_volume(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(path))


def write_test_cases(root: Path, reference: np.ndarray, cases: tuple[str, ...] = ("t1", "t2")) -> tuple[Path, Path]:
    """imagesTs/labelsTs with blank images and ``reference`` as every case's label."""
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in cases:
        write_volume(np.zeros(reference.shape, np.float32), images / f"{case}_0000.nii.gz")
        write_volume(reference, labels / f"{case}.nii.gz")
    return images, labels


def test_existing_predictions_are_reused_not_predicted_again(
    nnunet_tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nnunet_ssl.nnunet_ext import ext_trainer_path

    monkeypatch.setenv("nnUNet_extTrainer", str(ext_trainer_path()))  # what the report would set
    results, preprocessed = nnunet_tree
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[1:3, 2:6, 2:6] = 1
    reference[1:3, 6:8, 6:8] = 2
    images, labels = write_test_cases(tmp_path, reference)
    write_volume(reference, labels / "orphan.nii.gz")  # no image: left out
    test_set = find_test_set(images, labels, ".nii.gz")
    assert test_set.cases == ["t1", "t2"]

    layout = ResultsLayout(results, DATASET, preprocessed_root=preprocessed)
    fold_dir = layout.fold_dir("Scratch", 0)
    out = tmp_path / "report" / "predictions" / "Scratch" / "fold_0"
    out.mkdir(parents=True)
    (out / SOURCE_FILE).write_text(json.dumps(checkpoint_source(fold_dir / "checkpoint_final.pth")), encoding="utf-8")
    prediction = reference.copy()
    prediction[1:3, 2:4, 2:6] = 0  # half the liver missed: Dice 2*16/(16+32) = 2/3
    write_volume(prediction, out / "t1.nii.gz")
    write_volume(reference, out / "t2.nii.gz")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # the fake checkpoint holds no network: predicting would fail, so a complete result proves reuse
    settings = RunSettings(test_set, tmp_path / "report" / "predictions", device="cpu")
    run = collect_test_run(layout, dataset_info(DATASET_JSON), "Scratch", 0, settings)
    assert run.status == COMPLETE, run.reason
    assert run.dice["t1"] == pytest.approx({"liver": 2 / 3, "spleen": 1.0})
    assert run.dice["t2"] == pytest.approx({"liver": 1.0, "spleen": 1.0})
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # predictions made from another checkpoint are stale: removed, and those cases predicted again
    (out / SOURCE_FILE).write_text(json.dumps({"checkpoint": "elsewhere", "size": 1, "mtime_ns": 1}), encoding="utf-8")
    source = checkpoint_source(fold_dir / "checkpoint_final.pth")
    assert cases_to_predict(out, test_set.cases, ".nii.gz", source) == ["t1", "t2"]
    assert not (out / "t1.nii.gz").exists()
    failed = collect_test_run(layout, dataset_info(DATASET_JSON), "Scratch", 0, settings)
    assert failed.status == INCOMPLETE and failed.reason.startswith("prediction failed")



def test_external_predictions_are_scored_as_they_are(nnunet_tree: tuple[Path, Path], tmp_path: Path) -> None:
    """``--predictions DIR``: nnUNetv2_predict outputs are scored, never deleted or re-made."""
    results, preprocessed = nnunet_tree
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[1:3, 2:6, 2:6] = 1
    test_set = find_test_set(*write_test_cases(tmp_path, reference), ".nii.gz")
    layout = ResultsLayout(results, DATASET, preprocessed_root=preprocessed)
    external = tmp_path / "nnunet_predict_outputs"
    out = external / "Scratch" / "fold_0"
    out.mkdir(parents=True)
    write_volume(reference, out / "t1.nii.gz")  # no prediction_source.json, as nnUNetv2_predict leaves it
    settings = RunSettings(test_set, external, device="cpu", predict=False)
    run = collect_test_run(layout, dataset_info(DATASET_JSON), "Scratch", 0, settings)
    assert run.status == INCOMPLETE and "no prediction for 1 of 2" in run.reason
    assert run.dice["t1"]["liver"] == pytest.approx(1.0)
    assert (out / "t1.nii.gz").is_file() and not (out / SOURCE_FILE).exists()
    write_volume(reference, out / "t2.nii.gz")
    assert collect_test_run(layout, dataset_info(DATASET_JSON), "Scratch", 0, settings).status == COMPLETE

def test_hd95_per_label_uses_spacing() -> None:
    pytest.importorskip("monai")
    from nnunet_ssl.analysis.distance import hd95_per_label

    reference = np.zeros((10, 10, 10), np.uint8)
    reference[2:5, 2:5, 2:5] = 1
    prediction = np.zeros_like(reference)
    prediction[3:6, 2:5, 2:5] = 1  # shifted one voxel along axis 0 (2 mm)
    distances = hd95_per_label(prediction, reference, [1, 2], spacing=(2.0, 1.0, 1.0))
    assert distances[1] == pytest.approx(2.0) and math.isnan(distances[2])


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_report_by_dataset_id(nnunet_tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    results, preprocessed = nnunet_tree
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    out = tmp_path / "cli_report"
    code = main(["report", "-d", "501", "--trainers", "Scratch", "SMIT", "-f", "0", "1", "--out", str(out)])
    assert code == 0
    assert (out / "report.md").is_file()
    printed = capsys.readouterr().out
    assert "| Scratch (reference) | folds 0,1 | 4 |" in printed and "| SMIT † | fold 0 (1 missing) | 2 |" in printed
    assert main(["report", "-d", "501", "--trainers", "A", "--checkpoint", "best", "--out", str(out)]) == 1


# --- Dice through nnU-Net's evaluation: regions and the ignore label ----------------------------------


def _nnunet_summary(labels: Path, predictions: Path, dataset_json: dict, tmp_path: Path) -> dict[str, dict]:
    """nnU-Net's own summary.json for the folder, as its validation writes it: case -> metrics by key."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    info = dataset_info(dataset_json)
    out = tmp_path / "summary.json"
    compute_metrics_on_folder(str(labels), str(predictions), str(out), SimpleITKIO(), ".nii.gz",
                              list(info.labels_or_regions), info.ignore_label, num_processes=1)
    summary = json.loads(out.read_text(encoding="utf-8"))
    return {Path(e["reference_file"]).name[:-7]: e["metrics"] for e in summary["metric_per_case"]}


def test_region_dataset_scored_per_region_as_nnunet(tmp_path: Path) -> None:
    """BraTS-style regions: 'whole' = labels 1 or 2, 'core' = label 2; Dice per region as nnU-Net's summary."""
    dataset_json = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2],
                    "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    info = dataset_info(dataset_json)
    assert info.structures == {"(1, 2)": "whole", "2": "core"} and info.label_values == {}
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[1:3, 2:6, 2:6] = 1
    reference[1:3, 3:5, 3:5] = 2  # 8 voxels core inside 32 voxels whole
    prediction = np.zeros_like(reference)
    prediction[1:3, 2:6, 2:6] = 2  # whole exactly right; core 32 predicted, 8 true
    images, labels = write_test_cases(tmp_path, reference, ("r1",))
    out = tmp_path / "pred"
    out.mkdir()
    write_volume(prediction, out / "r1.nii.gz")
    dice, _, missing = score_predictions(out, find_test_set(images, labels, ".nii.gz"), info)
    assert missing == []
    assert dice["r1"] == pytest.approx({"whole": 1.0, "core": 2 * 8 / (8 + 32)})
    nnunet = _nnunet_summary(labels, out, dataset_json, tmp_path)["r1"]
    assert dice["r1"] == pytest.approx({info.structures[k]: v["Dice"] for k, v in nnunet.items()})
    with pytest.raises(ValueError, match="regions"):
        score_predictions(out, find_test_set(images, labels, ".nii.gz"), info, hd95=True)


def test_ignore_label_voxels_are_not_scored(tmp_path: Path) -> None:
    dataset_json = {"labels": {"background": 0, "liver": 1, "spleen": 2, "ignore": 3},
                    "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}
    info = dataset_info(dataset_json)
    assert info.names == ["liver", "spleen"] and info.ignore_label == 3
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[1:3, 2:6, 2:6] = 1  # 32 liver voxels
    reference[1:3, 6:8, 6:8] = 2  # 8 spleen voxels
    reference[0, :, :] = 3  # a slice nobody annotated
    prediction = reference.copy()
    prediction[0, :, :] = 1  # liver predicted in the unannotated slice: must not count as false positives
    prediction[reference == 3] = np.where(np.arange(64).reshape(8, 8) % 2 == 0, 1, 2).ravel()
    prediction[1, 6:8, 6:8] = 0  # 4 spleen voxels missed
    images, labels = write_test_cases(tmp_path, reference, ("i1",))
    out = tmp_path / "pred"
    out.mkdir()
    write_volume(prediction, out / "i1.nii.gz")
    dice, _, _ = score_predictions(out, find_test_set(images, labels, ".nii.gz"), info)
    assert dice["i1"] == pytest.approx({"liver": 1.0, "spleen": 2 * 4 / (4 + 8)})
    nnunet = _nnunet_summary(labels, out, dataset_json, tmp_path)["i1"]
    assert dice["i1"] == pytest.approx({info.structures[k]: v["Dice"] for k, v in nnunet.items()})


def test_dataset_json_refused_by_nnunet_names_the_problem() -> None:
    with pytest.raises(ValueError, match="ignore label"):
        dataset_info({"labels": {"background": 0, "liver": 1, "ignore": 5, "spleen": 2}, "file_ending": ".nii.gz"})


def test_headline_counts_cases_per_structure_names_folds_and_explains_a_zero_reference(
    nnunet_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    results, preprocessed = nnunet_tree
    for fold in (0, 1, 2):  # the reference never finds the spleen
        fold_dir = results / DATASET / "Scratch__nnUNetPlans__3d_fullres" / f"fold_{fold}"
        scores = {case: (liver, 0.0) for case, (liver, _) in DICE[("Scratch", fold)].items()}
        summary = summary_json(scores, fold_dir, preprocessed / DATASET)
        (fold_dir / "validation" / "summary.json").write_text(json.dumps(summary, sort_keys=True, indent=4), encoding="utf-8")
    config = ReportConfig(dataset=DATASET, trainers=("SMIT",), reference="Scratch", out_dir=tmp_path / "r",
                          results_root=results, preprocessed_root=preprocessed, folds=(0, 1, 2))
    headline = headline_markdown(make_report(config))
    smit = next(line for line in headline.splitlines() if line.startswith("| SMIT"))
    cells = [c.strip() for c in smit.strip("|").split("|")]
    assert cells[1].startswith("folds 0,2")  # not "0,2" that reads as a count
    assert cells[2] == "4"  # SMIT scored 4 cases (c1, c2, c5, c6)
    assert "[3 cases]" in cells[4]  # c2 has no spleen Dice
    assert "gap n/a: reference Dice 0" in cells[4] and "n/a" not in cells[3]
    assert "the reference Scratch has mean Dice 0" in headline and "3 of 4 cases" in headline
    scratch = next(line for line in headline.splitlines() if line.startswith("| Scratch"))
    assert "| folds 0,1,2 | 6 |" in scratch
