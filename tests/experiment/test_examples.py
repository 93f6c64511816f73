"""Every example experiment file in examples/ loads and emits its grid through the CLI (no nnU-Net training).

Each example is copied beside the files it names (weights, pretraining runs), with a fake preprocessed
dataset under the id it uses (plans file, case files, dataset.json) and a raw test set, and run through
``nnunet-ssl experiment emit`` in both formats.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nnunet_ssl.cli import main
from nnunet_ssl.experiment.runner import prepare
from nnunet_ssl.experiment.spec import load_experiment

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
README = Path(__file__).resolve().parents[2] / "README.md"


def fake_dataset(root: Path, name: str, plans: str, cases: int) -> None:
    """nnUNet_preprocessed/<name> as nnU-Net lays it out (plans file, blosc2 case files, dataset.json) and
    nnUNet_raw/<name>/imagesTs + labelsTs with two test cases."""
    folder = root / "preprocessed" / name
    data = folder / f"{plans}_3d_fullres"
    data.mkdir(parents=True)
    (folder / f"{plans}.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"data_identifier": data.name}}}), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}),
        encoding="utf-8")
    for index in range(cases):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (data / f"case_{index:03d}{suffix}").write_bytes(b"")
    raw = root / "raw" / name
    for folder_name, file_name in (("imagesTs", "test_{:03d}_0000.nii.gz"), ("labelsTs", "test_{:03d}.nii.gz")):
        (raw / folder_name).mkdir(parents=True)
        for index in range(2):
            (raw / folder_name / file_name.format(index)).write_bytes(b"")


def emit(example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, cases: int,
         files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> tuple[list, str, str]:
    """Copy ``example`` into a work folder with the files and folders it names, emit both formats via the CLI.

    Returns (the grid's jobs, the commands script, the SLURM script).
    """
    work = tmp_path / "work"
    work.mkdir()
    path = work / example
    shutil.copy(EXAMPLES / example, path)
    for name in files:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(b"weights")
    for name in folders:
        (work / name).mkdir(parents=True)
    experiment = load_experiment(path)
    fake_dataset(tmp_path, dataset, experiment.plans, cases)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.delenv("nnUNet_results", raising=False)
    commands = work / "jobs.sh"
    assert main(["experiment", "emit", str(path), "--format", "commands", "--out", str(commands)]) == 0
    slurm = work / "jobs.sbatch"
    assert main(["experiment", "emit", str(path), "--format", "slurm", "--out", str(slurm)]) == 0
    jobs = prepare(load_experiment(path)).jobs  # the folds exist now: the same jobs the CLI emitted
    script, array = commands.read_text(encoding="utf-8"), slurm.read_text(encoding="utf-8")
    lines = [line for line in script.splitlines() if line.startswith("{ ")]  # one job a line, in grid order
    assert len(lines) == len(jobs) and all(f"{job.id}: already done" in line for job, line in zip(jobs, lines, strict=True))
    assert all(job.id in array for job in jobs if job.kind == "train")  # every training has its array task
    return jobs, script, array


def env(job: object) -> dict[str, str]:
    return dict(job.env)  # type: ignore[attr-defined]


def test_every_example_is_commented_and_tested() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert names == ["cpu_smoke.yaml", "data_limited.yaml", "paper_few_shot.yaml"]
    for name in names:
        lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# ") and sum(line.lstrip().startswith("#") or " # " in line for line in lines) > 10
    assert "examples/" in README.read_text(encoding="utf-8")


def test_cpu_smoke_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phantoms, preset tiny: the CPU-trial trainers with their own 16 epochs (no epochs override), on the CPU."""
    jobs, script, slurm = emit("cpu_smoke.yaml", tmp_path, monkeypatch, "Dataset501_Phantom", 12,
                               folders=("runs/smit_tiny",))
    assert [job.id for job in jobs] == ["export-smit", "train-scratch-few_shot5-fold5", "predict-scratch-few_shot5-fold5",
                                        "train-smit-few_shot5-fold5", "predict-smit-few_shot5-fold5"]
    export, train_scratch, _, train_smit, predict_smit = jobs
    assert export.command[:3] == ("nnunet-ssl", "export", str(tmp_path / "work" / "runs" / "smit_tiny"))
    assert export.command[export.command.index("--from") + 1] == "student"
    assert train_scratch.command[train_scratch.command.index("-tr") + 1] == "SwinScratchTrainer_tiny_16epochs"
    assert train_smit.command[train_smit.command.index("-tr") + 1] == "SwinSMITTrainer_tiny_16epochs"
    assert train_smit.command[-2:] == ("-pretrained_weights", str(export.done[0]))
    assert all(job.command[job.command.index("-device") + 1] == "cpu" for job in jobs if job.kind != "export")
    assert all("NNUNET_SSL_EPOCHS" not in env(job) for job in jobs)  # the trainers' 16 epochs, not 3000
    assert env(train_scratch)["nnUNet_n_proc_DA"] == "1"
    assert len(predict_smit.done) == 2  # both test cases
    assert "#SBATCH --array=0-1" in slurm and "cpu_smoke_out" in script  # one array task per training


def test_paper_few_shot_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's 5 folds and 5/10/20 shots x 3 seeds for 4 arms: 56 trainings with the paper's named trainers."""
    jobs, _, slurm = emit("paper_few_shot.yaml", tmp_path, monkeypatch, "Dataset501_Phantom", 30,
                          files=("weights/smit_501.pt",), folders=("runs/simmim", "runs/dino"))
    trains = [job for job in jobs if job.kind == "train"]
    assert len(trains) == (5 + 3 * 3) * 4 == 56
    assert [job.id for job in jobs if job.kind == "export"] == ["export-simmim", "export-dino"]
    trainers = {job.arm: job.command[job.command.index("-tr") + 1] for job in trains}
    assert trainers == {"scratch": "SwinScratchTrainer", "smit": "SwinSMITTrainer", "simmim": "SwinSimMIMTrainer",
                        "dino": "SwinDINOTrainer"}
    assert {job.setting for job in trains} == {"full", "few_shot5", "few_shot10", "few_shot20"}
    assert all("NNUNET_SSL_EPOCHS" not in env(job) for job in trains)  # the recipe's 1000 / 3000 epochs
    assert sum(job.kind == "predict" for job in jobs) == 56
    assert "#SBATCH --array=0-55" in slurm  # one array task per training
    manifest = json.loads((tmp_path / "preprocessed" / "Dataset501_Phantom" / "splits_manifest.json")
                          .read_text(encoding="utf-8"))
    assert sorted((f["size"], f["seed"]) for f in manifest["folds"]) == [(s, seed) for s in (5, 10, 20)
                                                                         for seed in (0, 1, 2)]


def test_data_limited_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """20/40/80 cases x 3 seeds with a drawn validation set of 20, plus nnU-Net's fold 0, for 3 arms."""
    jobs, _, _ = emit("data_limited.yaml", tmp_path, monkeypatch, "Dataset502_Fake", 100,
                      files=("weights/smit_502.pt", "weights/simmim_502.pt"))
    trains = [job for job in jobs if job.kind == "train"]
    assert len(trains) == (1 + 3 * 3) * 3 and not [job for job in jobs if job.kind == "export"]
    manifest = json.loads((tmp_path / "preprocessed" / "Dataset502_Fake" / "splits_manifest.json")
                          .read_text(encoding="utf-8"))
    folds = manifest["folds"]
    assert {f["kind"] for f in folds} == {"data_limited"}
    assert sorted((f["size"], f["seed"]) for f in folds) == [(s, seed) for s in (20, 40, 80) for seed in (0, 1, 2)]
    assert all(len(f["val"]) == 20 and f["val"] == folds[0]["val"] for f in folds)
    assert all(len(f["train"]) == f["size"] and not set(f["train"]) & set(f["val"]) for f in folds)
    assert all("NNUNET_SSL_EPOCHS" not in env(job) for job in trains)
