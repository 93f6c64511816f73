"""The main job, shortened: every stage of `nnunet-ssl demo` on tiny phantoms, then a resumed re-run.

The demo is an experiment file run by the experiment runner; its report is the experiment report.

Marked ``e2e``: real nnU-Net planning, training, prediction, report and CKA (a few minutes).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from short_trainers import with_test_trainers

from nnunet_ssl.data.phantoms import PhantomConfig
from nnunet_ssl.demo import Demo, DemoConfig
from nnunet_ssl.experiment.grid import SKIP, decide
from nnunet_ssl.experiment.spec import load_experiment

pytestmark = pytest.mark.e2e

#: The tests' own trainers (short_trainers): nnU-Net, the experiment file and cka find them through
#: nnUNet_extTrainer, which the fixtures set for this module (the demo keeps the folders it names).
SCRATCH = "SwinScratchTrainer_tiny_2epochs"
SMIT = "SwinSMITTrainer_tiny_2epochs"


@pytest.fixture(scope="module", autouse=True)
def test_trainers_found() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        for variable, value in with_test_trainers(os.environ).items():
            monkeypatch.setenv(variable, value)
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, test_trainers_found: None) -> tuple[Demo, Path]:
    config = DemoConfig(
        work_dir=tmp_path_factory.mktemp("demo"),
        scratch_trainer=SCRATCH,
        pretrained_trainer=SMIT,
        pretrain_steps=2,
        shots=3,
        phantoms=PhantomConfig(num_train=7, num_test=2, num_unlabeled=2, shape=(40, 64, 64)),
        processes=1,
    )
    runner = Demo(config)
    return runner, runner.run()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_demo_runs_every_stage_and_writes_report_and_cka(demo: tuple[Demo, Path]) -> None:
    runner, report = demo
    assert report == runner.root / "report" / "report.md" and report.is_file()
    text = report.read_text(encoding="utf-8")
    assert f"{SCRATCH} (reference)" in text and SMIT in text
    assert "few-shot, 3 training cases" in text
    manifest = json.loads((runner.preprocessed / runner.dataset_name / "splits_manifest.json").read_text(encoding="utf-8"))
    assert [(f["fold"], f["size"]) for f in manifest["folds"]] == [(5, 3)] and runner.fold == 5

    rows = read_csv(runner.root / "report" / "dice_per_case.csv")
    assert {(r["trainer"], r["fold"]) for r in rows} == {(SCRATCH, "5"), (SMIT, "5")}
    assert len({r["case"] for r in rows}) == 2
    assert all(r["run_status"] == "complete" for r in rows)
    for name in ("curves.png", "losses.png", "stats.csv", "few_shot.csv"):
        assert (runner.root / "report" / name).is_file(), name

    layers = read_csv(runner.root / "cka" / "cka_per_layer.csv")
    assert [r["layer"] for r in layers][0] == "embed" and len(layers) == 1 + 8  # tiny preset: 2-2-2-2 blocks
    assert all(-1.0 <= float(r["cka"]) <= 1.0 + 1e-6 for r in layers)
    assert (runner.root / "cka" / "cka_heatmap.png").is_file()

    for trainer in (SCRATCH, SMIT):  # nnU-Net's epoch progress, printed while each trained
        lines = runner.progress[trainer]
        assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], lines
        assert all(re.fullmatch(r"epoch \d/2: train loss -?\d+\.\d{3}, val loss -?\d+\.\d{3}, "
                                r"pseudo-Dice liver \d\.\d\d spleen \d\.\d\d \(\d+ s\)", line) for line in lines), lines

    smit_log = "\n".join(p.read_text(encoding="utf-8") for p in runner.fold_dir(SMIT).glob("training_log_*.txt"))
    assert "Pretrained weights loaded: method=smit preset=tiny" in smit_log and "(verified)" in smit_log
    assert "fold 5: 3-shot fold (seed 0)" in smit_log


def test_rerun_resumes_instead_of_starting_over(demo: tuple[Demo, Path], caplog: pytest.LogCaptureFixture) -> None:
    runner, report = demo
    checkpoints = {t: (runner.fold_dir(t) / "checkpoint_final.pth").stat().st_mtime_ns for t in (SCRATCH, SMIT)}
    first = json.loads((runner.root / "summary.json").read_text(encoding="utf-8"))
    with caplog.at_level(logging.INFO, logger="nnunet_ssl.demo"):
        assert runner.run() == report
    again = json.loads((runner.root / "summary.json").read_text(encoding="utf-8"))
    assert again["minutes"] >= 0.8 * first["minutes"] > again["this_run_minutes"]  # the work's time, not the resume's
    log = caplog.text
    for skipped in ("already pretrained", "already planned", "already exported", "already trained",
                    "predictions exist", "CKA exists"):
        assert skipped in log, skipped
    assert {t: (runner.fold_dir(t) / "checkpoint_final.pth").stat().st_mtime_ns for t in (SCRATCH, SMIT)} == checkpoints
    assert all(decide(job)[0] == SKIP for job in runner.prepared.jobs)  # the runner sees the experiment as done


def test_demo_is_an_experiment_file(demo: tuple[Demo, Path]) -> None:
    """The demo's experiment file is an ordinary one: its grid is the demo's jobs, its report the demo's report."""
    runner, report = demo
    experiment = load_experiment(runner.experiment_file)
    assert [a.name for a in experiment.arms] == [SCRATCH, SMIT] and experiment.output == runner.root
    assert [job.kind for job in runner.prepared.jobs] == ["export", "train", "predict", "train", "predict"]
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Experiment report: demo_experiment.yaml") and "## Arms: few-shot, 3 training cases" in text
    for name in ("tables.csv", "runs.csv", "dice_per_case.csv", "summary.csv"):
        assert f"`{name}`" in text and (runner.report_dir / name).is_file(), name
