"""The experiment report's files agree with its report.md: the demo's shape (a few-shot fold, both arms complete)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_markdown import cell, files_listed, mean_dice_tables, read_csv, sections, tables
from test_experiment import _fake_fold, write_experiment
from test_splits import fake_preprocessed_dataset

from nnunet_ssl.experiment.report import make_experiment_report
from nnunet_ssl.experiment.runner import prepare
from nnunet_ssl.experiment.spec import load_experiment

TRAINERS = {"scratch": "SwinScratchTrainer_tiny_16epochs", "smit": "SwinSMITTrainer_tiny_16epochs"}


def test_few_shot_experiment_report_lists_what_is_there_and_nothing_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "pre"
    folder = fake_preprocessed_dataset(root)
    (folder / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}), encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    path = write_experiment(tmp_path, dataset="Dataset777_Fake", preset="tiny",
                            arms=[{"name": "scratch"}, {"name": "smit", "method": "smit", "weights": "smit.pt"}],
                            settings={"few_shot": {"shots": [3], "seeds": [0]}})
    experiment = load_experiment(path)
    prepared = prepare(experiment)
    (fold,) = prepared.settings[0].folds
    val = json.loads((folder / "splits_final.json").read_text(encoding="utf-8"))[fold]["val"]
    for arm, liver in (("scratch", 0.91), ("smit", 0.90)):
        _fake_fold(prepared.paths.fold_dir(arm, TRAINERS[arm], fold), val,
                   {c: (liver + 0.01 * i, 0.0) for i, c in enumerate(val)}, [0.1, 0.3, 0.32])
    make_experiment_report(experiment, cka=False)
    out = prepared.paths.report
    text = (out / "report.md").read_text(encoding="utf-8")

    there = sorted(p.name for p in out.iterdir() if p.name != "report.md")
    assert sorted(files_listed(text)) == there
    assert {"curves.png", "few_shot.png", "tables.csv", "summary.csv"} <= set(there)
    assert "predictions/" not in text.split("## Files")[1]

    summary = read_csv(out / "summary.csv")
    assert {r["status"] for r in summary} == {"complete"}  # no 'pooled,,ordinary,missing' rows
    assert {(r["scope"], r["kind"]) for r in summary} == {("fold", "few_shot"), ("seeds", "few_shot")}
    (title, rows), = mean_dice_tables(text).items()
    for row in rows:
        arm = row["method"].replace(" (reference)", "")
        for key in ("liver", "spleen", "overall"):
            (csv_row,) = [r for r in summary if (r["scope"], r["setting"], r["trainer"], r["structure"])
                          == ("seeds", title, arm, key)]
            assert cell(row[key])["value"] == f"{float(csv_row['mean_dice']):.3f}"
    arms = tables(sections(text)[f"Arms: {prepared.settings[0].title}"])[0]
    assert [(r["arm"].rstrip(" ★"), r["seeds"]) for r in arms] == [("scratch", "1/1"), ("smit", "1/1")]
    assert {r["status"] for r in read_csv(out / "runs.csv")} == {"complete"}
