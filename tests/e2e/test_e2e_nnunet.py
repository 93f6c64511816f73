"""End to end through nnU-Net's own CLI on tiny phantoms: plan, train, validate, predict, pretrained weights.

Slow by nature (several minutes on 2 CPU cores); marked ``e2e``. Everything runs in subprocesses
with the nnU-Net variables set only for them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_runner import BIN, NnUNet
from short_trainers import EXT_FOLDER, SwinSMITTrainer_tiny_2epochs

from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets
from nnunet_ssl.weights import encoder_digest, load_weights_file
from nnunet_ssl.weights.export import load_run_encoder

pytestmark = pytest.mark.e2e

#: The tests' own trainers (short_trainers), found by nnU-Net through nnUNet_extTrainer.
SCRATCH = "SwinScratchTrainer_tiny_2epochs"
SMIT = "SwinSMITTrainer_tiny_2epochs"


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> NnUNet:
    config = PhantomConfig(num_train=5, num_test=2, num_unlabeled=2, shape=(40, 64, 64))
    return NnUNet.with_phantoms(tmp_path_factory.mktemp("nnunet"), config, "--verify_dataset_integrity")


@pytest.fixture(scope="module")
def trained_scratch(nnunet: NnUNet) -> Path:
    nnunet.run("nnUNetv2_train", "501", "3d_fullres", "0", "-tr", SCRATCH, "-device", "cpu")
    return nnunet.fold_dir(SCRATCH)


def test_train_writes_nnunet_outputs_with_fitted_patch(nnunet: NnUNet, trained_scratch: Path) -> None:
    assert (trained_scratch / "checkpoint_final.pth").is_file()
    summary = json.loads((trained_scratch / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["mean"]) == {"1", "2", "3", "4"}
    log = nnunet.training_log(SCRATCH)
    assert "training from scratch" in log
    assert "test-time mirroring is off" in log
    plans = json.loads((trained_scratch.parent / "plans.json").read_text(encoding="utf-8"))
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert all(n % 32 == 0 and n >= 64 for n in patch)
    checkpoint = torch.load(trained_scratch / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == SCRATCH
    assert checkpoint["current_epoch"] == 2
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # nnUNetv2_predict does not mirror either
    lrs = checkpoint["logging"]["lrs"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]  # warm-up then cosine


def test_val_only_revalidates(nnunet: NnUNet, trained_scratch: Path) -> None:
    summary = trained_scratch / "validation" / "summary.json"
    summary.unlink()
    nnunet.run("nnUNetv2_train", "501", "3d_fullres", "0", "-tr", SCRATCH, "-device", "cpu", "--val")
    assert summary.is_file()


def test_predict_uses_sliding_window_on_raw_images(nnunet: NnUNet, trained_scratch: Path) -> None:
    images = Path(nnunet.env["nnUNet_raw"]) / "Dataset501_Phantom" / "imagesTs"
    out = nnunet.root / "predictions"
    nnunet.run(
        "nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "501", "-c", "3d_fullres",
        "-tr", SCRATCH, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
    )
    for image in sorted(images.glob("*_0000.nii.gz")):
        prediction = out / image.name.replace("_0000.nii.gz", ".nii.gz")
        assert prediction.is_file(), prediction
        source, predicted = sitk.ReadImage(str(image)), sitk.ReadImage(str(prediction))
        assert predicted.GetSize() == source.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2, 3, 4}


@pytest.fixture(scope="module")
def weights_file(nnunet: NnUNet) -> tuple[Path, str]:
    """A real chain: pretrain SMIT briefly on the unlabeled phantoms, then `nnunet-ssl export` for dataset 501."""
    run_dir = nnunet.root / "smit_run"
    nnunet.run(
        "nnunet-ssl", "pretrain", "--method", "smit", "--data", str(nnunet.root / "unlabeled"), "--out", str(run_dir),
        "--preset", "tiny", "--crop-size", "64", "--batch-size", "1", "--workers", "0", "--max-steps", "2",
        "--no-progress", "--set", "out_dim=64", "head_hidden_dim=64", "head_bottleneck_dim=32",
    )
    path = nnunet.root / "smit_tiny_501.pt"
    nnunet.run("nnunet-ssl", "export", str(run_dir), "-d", "501", "-c", "3d_fullres", "--out", str(path))
    teacher, _, _ = load_run_encoder(run_dir, "teacher")
    _, metadata = load_weights_file(path)
    assert metadata["encoder_digest"] == encoder_digest(teacher)  # teacher exported by default
    assert metadata["in_channels"] == 1 and metadata["num_classes"] == 5
    return path, metadata["encoder_digest"]


def test_inspect_weights_checks_against_trainer(nnunet: NnUNet, weights_file: tuple[Path, str]) -> None:
    path, digest = weights_file
    ok = nnunet.run("nnunet-ssl", "inspect-weights", str(path), "--trainer", SMIT, "-d", "501")
    assert digest in ok.stdout and "OK: fits" in ok.stdout
    bad = nnunet.run("nnunet-ssl", "inspect-weights", str(path), "--trainer", "SwinSMITTrainer", "-d", "501", check=False)
    assert bad.returncode == 1
    assert "preset 'tiny'" in bad.stderr and "encoder.patch_embed" in bad.stderr


def test_mismatched_weights_fail_fast_with_a_clear_error(nnunet: NnUNet, weights_file: tuple[Path, str]) -> None:
    """Refused from the file's metadata and the plans, before nnU-Net creates the results folder: no traceback."""
    import time

    path, _ = weights_file
    start = time.monotonic()
    result = nnunet.run(
        "nnUNetv2_train", "501", "3d_fullres", "1", "-tr", "SwinSMITTrainer", "-device", "cpu",
        "-pretrained_weights", str(path), check=False, timeout=300,
    )
    seconds = time.monotonic() - start
    assert result.returncode == 1
    assert "does not fit SwinSMITTrainer" in result.stderr and "preset 'tiny'" in result.stderr
    assert "nothing was written" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert "Using device" not in result.stdout  # nnU-Net's trainer constructor never ran
    assert not nnunet.fold_dir("SwinSMITTrainer", 1).parent.exists()
    print(f"refused in {seconds:.1f} s")


def test_pretrained_trainer_without_weights_warns_loudly(nnunet: NnUNet) -> None:
    preprocessed = Path(nnunet.env["nnUNet_preprocessed"]) / "Dataset501_Phantom"
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text(encoding="utf-8"))
    dataset_json = json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))
    plans["continue_training"] = False
    previous = {k: os.environ.get(k) for k in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw")}
    os.environ.update({k: nnunet.env[k] for k in previous})
    try:
        trainer = SwinSMITTrainer_tiny_2epochs(plans, "3d_fullres", 2, dataset_json, torch.device("cpu"))
        trainer.initialize()
        trainer.log_weights_provenance()
        log = Path(trainer.log_file).read_text(encoding="utf-8", errors="replace")
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert "expects smit pretrained weights, but none were loaded" in log
    shutil.rmtree(nnunet.fold_dir(SMIT, 2), ignore_errors=True)


def add_second_channel(dataset_dir: Path) -> None:
    """Turn a phantom CT dataset into a 2-channel one (CT + a synthetic 'T2' with other contrast)."""
    dataset_json = json.loads((dataset_dir / "dataset.json").read_text(encoding="utf-8"))
    dataset_json["channel_names"] = {"0": "CT", "1": "T2"}
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    rng = np.random.default_rng(5)
    for image_file in sorted(dataset_dir.glob("images*/*_0000.nii.gz")):
        ct = sitk.ReadImage(str(image_file))
        hu = sitk.GetArrayFromImage(ct)
        t2 = (np.clip(400.0 - np.abs(hu - 30.0) * 4.0, 0, None) + rng.normal(0, 10, hu.shape)).astype(np.float32)
        second = sitk.GetImageFromArray(t2)
        second.CopyInformation(ct)
        sitk.WriteImage(second, str(image_file).replace("_0000.nii.gz", "_0001.nii.gz"))


def test_multichannel_dataset_trains_from_scratch(tmp_path: Path) -> None:
    paths = write_phantom_datasets(
        tmp_path, PhantomConfig(num_train=5, num_test=1, num_unlabeled=0, shape=(32, 64, 64), dataset_id=502, seed=3)
    )
    add_second_channel(paths.dataset_dir)
    runner = NnUNet(tmp_path, paths.raw_root)
    runner.run("nnUNetv2_plan_and_preprocess", "-d", "502", "-c", "3d_fullres", "-np", "1")
    runner.run("nnUNetv2_train", "502", "3d_fullres", "0", "-tr", SCRATCH, "-device", "cpu", env={"NNUNET_SSL_EPOCHS": "1"})
    fold = tmp_path / "results" / "Dataset502_Phantom" / f"{SCRATCH}__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["network_weights"]["encoder.patch_embed.weight"].shape[1] == 2
    assert checkpoint["network_weights"]["decoder.skip_blocks.0.conv1.conv.weight"].shape[1] == 2
    assert (fold / "validation" / "summary.json").is_file()


def test_report_scores_validation_and_test_set_and_reuses_predictions(nnunet: NnUNet, trained_scratch: Path) -> None:
    """`nnunet-ssl report` on a real nnU-Net run: validation summary, then the phantom test set (in-process
    prediction, the plugin's folder added to nnUNet_extTrainer by the report itself), then a re-run that predicts nothing."""
    import csv

    untrained = "SwinSimMIMTrainer_tiny_2epochs"
    raw = Path(nnunet.env["nnUNet_raw"]) / "Dataset501_Phantom"
    env = {**nnunet.env, "nnUNet_extTrainer": str(EXT_FOLDER)}  # the tests' trainers only: the report adds the plugin's

    def report(out: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [str(BIN / "nnunet-ssl"), "report", "-d", "501", "--trainers", SCRATCH, untrained, "-f", "0",
                   "--out", str(out), *extra]
        result = subprocess.run(command, check=False, env=env, capture_output=True, encoding="utf-8", errors="replace",
                                timeout=900)
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def rows(path: Path) -> list[dict[str, str]]:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    # nnU-Net's own validation (real validation/summary.json)
    validation = report(nnunet.root / "report_val")
    summary = json.loads((trained_scratch / "validation" / "summary.json").read_text(encoding="utf-8"))
    pooled = {r["structure"]: r for r in rows(nnunet.root / "report_val" / "summary.csv")
              if r["trainer"] == SCRATCH and r["scope"] == "pooled"}
    labels = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))["labels"]
    for name in ("liver", "spleen", "kidney", "lesion"):
        expected_mean = summary["mean"][str(labels[name])]["Dice"]
        assert pooled[name]["mean_dice"] == "" if np.isnan(expected_mean) else \
            float(pooled[name]["mean_dice"]) == pytest.approx(expected_mean)
    assert f"| {untrained} | 0 | ordinary | missing |" in (nnunet.root / "report_val" / "report.md").read_text(encoding="utf-8")
    assert f"| {SCRATCH} (reference) | fold 0 |" in validation.stdout

    # the labelled test set, predicted in-process
    out = nnunet.root / "report_test"
    test_args = ("--test-images", str(raw / "imagesTs"), "--test-labels", str(raw / "labelsTs"), "--device", "cpu")
    first = report(out, *test_args, "--hd95")
    predictions = out / "predictions" / SCRATCH / "fold_0"
    cases = sorted(p.name for p in (raw / "labelsTs").glob("*.nii.gz"))
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == cases
    per_case = [r for r in rows(out / "dice_per_case.csv") if r["trainer"] == SCRATCH]
    assert len(per_case) == len(cases) * 4 and {r["structure"] for r in per_case} == {"liver", "spleen", "kidney", "lesion"}
    case = cases[0].removesuffix(".nii.gz")
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / cases[0])))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / cases[0])))
    from nnunet_ssl.analysis.metrics import dice_per_label

    expected = dice_per_label(predicted, reference, [labels[n] for n in ("liver", "spleen", "kidney", "lesion")])
    for row in (r for r in per_case if r["case"] == case):
        value = expected[labels[row["structure"]]]
        assert (row["dice"] == "" and np.isnan(value)) or float(row["dice"]) == pytest.approx(value)
        assert "hd95" in row
    assert any(r["dice"] and 0.0 <= float(r["dice"]) <= 1.0 for r in per_case)
    pooled = {r["structure"]: r for r in rows(out / "summary.csv") if r["trainer"] == SCRATCH and r["scope"] == "pooled"}
    assert pooled["overall"]["status"] == "complete" and 0.0 <= float(pooled["overall"]["mean_dice"]) <= 1.0
    assert f"{SCRATCH} (reference)" in first.stdout and "test set: 2 cases" in (out / "report.md").read_text(encoding="utf-8")
    assert "2 test case(s) predicted now, 0 reused" in first.stderr
    from nnunet_ssl.nnunet_ext import ext_trainer_path

    assert f"nnUNet_extTrainer={EXT_FOLDER}{os.pathsep}{ext_trainer_path()}" in first.stderr

    # a re-run reuses every prediction
    before = {p.name: p.stat().st_mtime_ns for p in predictions.glob("*.nii.gz")}
    second = report(out, *test_args)
    assert "0 test case(s) predicted now, 2 reused" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in predictions.glob("*.nii.gz")} == before
