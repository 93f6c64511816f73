"""Every CSV row and every listed file of a transfer report agrees with its report.md, read back from the files.

The reports are built from fake nnU-Net results (fold folders with ``validation/summary.json`` and a
checkpoint holding nnU-Net's training log), as ``test_report`` fakes them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import test_report
import torch
from report_markdown import cell, files_listed, mean_dice_tables, read_csv, sections, tables
from test_report import DATASET, DATASET_JSON, LOGGING, MANIFEST, SPLITS, summary_json, write_test_cases

from nnunet_ssl.analysis.report import ReportConfig, make_report
from nnunet_ssl.nnunet_ext import ext_trainer_path

#: test_report's fake results tree: Scratch on every fold, SMIT with fold 1 and 7 absent and fold 6 unvalidated.
nnunet_tree = test_report.nnunet_tree

STRUCTURES = ["liver", "spleen"]
KEYS = [*STRUCTURES, "overall"]


def _trainer(label: str) -> str:
    return label.replace(" (reference)", "").replace(" †", "")


def _number(text: str) -> float:
    return math.nan if text == "" else float(text)


def check_report_files(out: Path) -> str:
    """Assert that every file beside report.md, and every row of its CSV files, says what report.md says.

    Returns the report's text (for further checks).
    """
    text = (out / "report.md").read_text(encoding="utf-8")
    # Files: exactly what is there, nothing more, nothing less
    there = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != "report.md")
    assert sorted(files_listed(text)) == there
    for name in ("curves.png", "losses.png", "few_shot.png"):
        assert (f"]({name})" in text) == (name in there), name  # embedded exactly when written

    summary = read_csv(out / "summary.csv")
    fold_rows = [r for r in summary if r["scope"] == "fold"]
    setting_rows = [r for r in summary if r["scope"] in ("pooled", "seeds")]
    assert {r["scope"] for r in summary} <= {"fold", "pooled", "seeds"}

    # "runs: X complete of Y" and the Runs table: one fold row per run and structure
    runs = tables(sections(text)["Runs"])[0]
    complete = sum(r["status"] == "complete" for r in runs)
    assert f"- runs: {complete} complete of {len(runs)} (trainer x fold)" in text
    assert len(fold_rows) == len(KEYS) * len(runs)
    by_run = {(r["trainer"], r["folds"], r["structure"]): r for r in fold_rows}
    for run in runs:
        for key in KEYS:
            row = by_run[(run["trainer"], run["fold"], key)]
            assert row["status"] == run["status"] and row["reason"] == run["reason"]
            kind = run["kind"].split(" ")[0]
            assert row["kind"] == kind
            if kind != "ordinary":  # e.g. "few_shot n=2 seed=1"
                assert run["kind"] == f"{kind} n={row['size']} seed={row['seed']}"
            if run["status"] == "complete":
                assert f"{float(row['mean_dice']):.3f}" == run[key]
            else:
                assert run[key] == "-" and row["mean_dice"] == "" and row["n_cases"] == "0"

    # Mean Dice tables: one pooled (nnU-Net's folds) or seeds (a few-shot size) row per method and structure
    headline = mean_dice_tables(text)
    assert {(r["setting"], r["trainer"]) for r in setting_rows} == {
        (title, _trainer(row["method"])) for title, rows in headline.items() for row in rows}
    assert len(setting_rows) == len(KEYS) * sum(len(rows) for rows in headline.values())
    by_setting = {(r["setting"], r["trainer"], r["structure"]): r for r in setting_rows}
    stats = {(r["setting"], r["size"], r["trainer"], r["structure"]): r for r in read_csv(out / "stats.csv")}
    for title, rows in headline.items():
        for row in rows:
            trainer = _trainer(row["method"])
            first = by_setting[(title, trainer, KEYS[0])]
            assert first["scope"] == ("pooled" if first["kind"] == "ordinary" else "seeds")
            if row["fold(s)"] == "missing":
                assert all(by_setting[(title, trainer, k)]["status"] == "missing" for k in KEYS)
                continue
            assert first["status"] == ("partial" if "(" in row["fold(s)"] else "complete")
            folds = row["fold(s)"].split(" (")[0].split(" ", 1)[1]
            assert first["folds"] == folds.replace(",", ";")
            assert row["cases"] == str(max(int(by_setting[(title, trainer, k)]["n_cases"]) for k in STRUCTURES))
            for key in KEYS:
                parsed = cell(row[key])
                csv_row = by_setting[(title, trainer, key)]
                assert parsed["value"] == f"{_number(csv_row['mean_dice']):.3f}".replace("nan", "n/a"), (title, key)
                if parsed["cases"] is not None:
                    assert parsed["cases"] == csv_row["n_cases"]
                test = stats.get((first["kind"], first["size"], trainer, key))
                assert (parsed["gap"] is not None) == (test is not None), (title, trainer, key)
                if test is not None and parsed["gap"].endswith("%"):
                    assert parsed["gap"] == f"{float(test['gap_pct']):+.1f}%"
                    assert f"{float(test['mean_dice']):.3f}" == parsed["value"]
    assert {(r["setting"], r["size"]) for r in stats.values()} <= {
        (r["kind"], r["size"]) for r in setting_rows}

    # few-shot table vs few_shot.csv (overall rows), per-case Dice vs the Runs table's case counts
    few_shot = [r for r in read_csv(out / "few_shot.csv") if r["structure"] == "overall"]
    if "Few-shot and data-limited folds" in sections(text):
        table = tables(sections(text)["Few-shot and data-limited folds"])[0]
        assert [(r["kind"], r["size"], r["method"], r["seeds"], r["mean Dice"]) for r in table] == [
            (r["kind"], r["size"], r["trainer"], f"{r['n_seeds']}/{r['n_folds']}",
             f"{_number(r['mean']):.3f}".replace("nan", "n/a")) for r in few_shot]
    else:
        assert few_shot == []
    per_case = read_csv(out / "dice_per_case.csv")
    for run in runs:
        rows = [r for r in per_case if (r["trainer"], r["fold"]) == (run["trainer"], run["fold"])]
        assert len(rows) == len(STRUCTURES) * int(run["cases"])
        assert all(r["run_status"] == run["status"] for r in rows)
    return text


def test_full_report_files_agree_with_report_md(nnunet_tree: tuple[Path, Path], tmp_path: Path) -> None:
    """nnU-Net's folds (one SMIT fold missing), few-shot sizes 2 and 4 (one SMIT seed unvalidated, one absent)."""
    results, preprocessed = nnunet_tree
    out = tmp_path / "report"
    make_report(ReportConfig(dataset=DATASET, trainers=("Scratch", "SMIT"), out_dir=out, results_root=results,
                             preprocessed_root=preprocessed))
    text = check_report_files(out)
    assert "- runs: 9 complete of 12" in text
    summary = read_csv(out / "summary.csv")
    pooled = {(r["setting"], r["trainer"]): r["status"] for r in summary if r["scope"] != "fold"}
    assert pooled == {
        ("nnU-Net folds", "Scratch"): "complete", ("nnU-Net folds", "SMIT"): "partial",
        ("few-shot, 2 training cases (folds 5, 6)", "Scratch"): "complete",
        ("few-shot, 2 training cases (folds 5, 6)", "SMIT"): "partial",
        ("few-shot, 4 training cases (folds 7)", "Scratch"): "complete",
        ("few-shot, 4 training cases (folds 7)", "SMIT"): "missing",
    }
    # the pooled numbers of the 2-shot table: a case's Dice is its mean over the seeds (Scratch folds 5, 6)
    two_shot = {r["structure"]: r for r in summary
                if (r["setting"], r["trainer"]) == ("few-shot, 2 training cases (folds 5, 6)", "Scratch")}
    assert float(two_shot["liver"]["mean_dice"]) == pytest.approx((0.55 + 0.45) / 2)
    assert two_shot["liver"]["size"] == "2" and two_shot["liver"]["folds"] == "5;6"
    curves = read_csv(out / "curves.csv")
    assert {(r["trainer"], r["fold"]) for r in curves} == {("Scratch", f) for f in "012567"} | {
        ("SMIT", f) for f in "0256"}
    assert "predictions/" not in files_listed(text)


def write_fold(results: Path, preprocessed: Path, trainer: str, fold: int, scores: dict[str, tuple[float, float]]) -> None:
    """A finished fold with its validation summary and nnU-Net's training log (with per-structure pseudo-Dice)."""
    fold_dir = results / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}"
    (fold_dir / "validation").mkdir(parents=True)
    log = {**LOGGING, "dice_per_class_or_region": [[0.2, 0.0], [0.6, 0.0], [0.9, 0.0]]}
    torch.save({"logging": log}, fold_dir / "checkpoint_final.pth")
    summary = summary_json(scores, fold_dir, preprocessed / DATASET)
    (fold_dir / "validation" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def test_few_shot_only_report_has_no_missing_rows(tmp_path: Path) -> None:
    """The demo's shape: one few-shot fold, both methods complete, no nnU-Net fold trained: nothing is missing."""
    results, preprocessed = tmp_path / "results", tmp_path / "preprocessed"
    (preprocessed / DATASET).mkdir(parents=True)
    (preprocessed / DATASET / "dataset.json").write_text(json.dumps(DATASET_JSON), encoding="utf-8")
    (preprocessed / DATASET / "splits_final.json").write_text(json.dumps(SPLITS[:6]), encoding="utf-8")
    manifest = {**MANIFEST, "folds": MANIFEST["folds"][:1]}
    (preprocessed / DATASET / "splits_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    write_fold(results, preprocessed, "Scratch", 5, {"c1": (0.91, 0.0), "c2": (0.92, 0.0)})
    write_fold(results, preprocessed, "SMIT", 5, {"c1": (0.90, 0.0), "c2": (0.92, 0.0)})
    out = tmp_path / "report"
    make_report(ReportConfig(dataset=DATASET, trainers=("Scratch", "SMIT"), out_dir=out, results_root=results,
                             preprocessed_root=preprocessed))
    text = check_report_files(out)
    assert "- runs: 2 complete of 2" in text
    summary = read_csv(out / "summary.csv")
    assert {r["status"] for r in summary} == {"complete"}
    assert {r["kind"] for r in summary} == {"few_shot"} and {r["scope"] for r in summary} == {"fold", "seeds"}
    assert sorted(files_listed(text)) == ["curves.csv", "curves.png", "dice_per_case.csv", "few_shot.csv",
                                          "few_shot.png", "losses.png", "stats.csv", "summary.csv"]
    curves = read_csv(out / "curves.csv")  # nnU-Net's per-structure pseudo-Dice, one column per structure
    assert [r["pseudo_dice_liver"] for r in curves if r["trainer"] == "Scratch"] == ["0.2", "0.6", "0.9"]
    assert {r["pseudo_dice_spleen"] for r in curves} == {"0.0"}


def test_predictions_folder_is_listed_only_when_there(nnunet_tree: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_extTrainer", str(ext_trainer_path()))
    results, preprocessed = nnunet_tree
    reference = np.zeros((4, 8, 8), np.uint8)
    reference[1:3, 2:6, 2:6] = 1
    images, labels = write_test_cases(tmp_path, reference)
    common = {"dataset": DATASET, "results_root": results, "preprocessed_root": preprocessed,
              "test_images": images, "test_labels": labels, "device": "cpu"}
    # no run to predict with (fold 1 of SMIT was never trained): nothing predicted, no predictions/ listed
    empty = tmp_path / "empty"
    make_report(ReportConfig(trainers=("SMIT",), folds=(1,), out_dir=empty, **common))
    assert not (empty / "predictions").exists()
    check_report_files(empty)
    # a run to predict with: its predictions folder is made (the fake checkpoint holds no network, so the
    # run stays incomplete) and listed
    made = tmp_path / "made"
    make_report(ReportConfig(trainers=("Scratch",), folds=(0,), out_dir=made, **common))
    assert (made / "predictions" / "Scratch" / "fold_0").is_dir()
    assert "predictions/" in files_listed(check_report_files(made))
