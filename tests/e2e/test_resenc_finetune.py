"""The ResEnc family end to end on tiny phantoms: plan -> Spark3D weights -> nnUNetv2_train (verified) -> predict.

One planned dataset (``nnunet-ssl plan --family resenc --preset resenc_tiny``), a weights file built from a seeded
``resenc_tiny`` encoder as ``nnunet-ssl export`` builds it, one 2-epoch fine-tuning through nnU-Net's own command
with ``-pretrained_weights`` and one ``nnUNetv2_predict``. That the same file also loads into the network nnU-Net's
plain ``nnUNetTrainer`` builds from these plans is checked with nnU-Net's loader, without another nnU-Net run.
Marked ``e2e``; about two minutes on 2 CPU cores.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_runner import NnUNet

from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets
from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet
from nnunet_ssl.weights import build_weights_file, load_weights_file, save_weights_file
from nnunet_ssl.weights.format import encoder_digest

pytestmark = pytest.mark.e2e

#: The tests' 2-epoch Spark3D trainer (tests/resenc_short_trainers.py), found through nnUNet_extTrainer.
TRAINER = "ResEncSpark3DTrainer_2epochs"
PLANS = "nnUNetResEncSSLPlans"
PRESET = "resenc_tiny"


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> NnUNet:
    """Five training phantoms and one test case, planned and preprocessed by `nnunet-ssl plan --family resenc`.

    At 1 mm the phantoms are about 96 x 72 x 72 voxels (z, y, x), so the tiny preset's 64^3 patch fits.
    """
    root = tmp_path_factory.mktemp("resenc")
    paths = write_phantom_datasets(root, PhantomConfig(num_train=5, num_test=1, num_unlabeled=0, shape=(48, 72, 72),
                                                       seed=7))
    runner = NnUNet(root, paths.raw_root)
    runner.run("nnunet-ssl", "plan", "-d", "501", "--family", "resenc", "--preset", PRESET, "-np", "1", timeout=900)
    return runner


def test_spark3d_weights_fine_tune_verified_and_predict(planned: NnUNet) -> None:
    plans = json.loads((planned.preprocessed / f"{PLANS}.json").read_text(encoding="utf-8"))
    config = plans["configurations"]["3d_fullres"]
    assert plans["experiment_planner_used"] == "ResEncSSLPlanner" and list(plans["configurations"]) == ["3d_fullres"]
    assert config["architecture"] == RESENC_PRESETS[PRESET].architecture()
    assert config["spacing"] == [1.0, 1.0, 1.0] and config["normalization_schemes"] == ["ZScoreNormalization"]
    assert config["patch_size"] == [64, 64, 64] and config["data_identifier"] == f"{PLANS}_3d_fullres"
    assert (planned.preprocessed / f"{PLANS}_3d_fullres").is_dir()

    # a Spark3D weights file for 1 channel and the phantoms' 5 outputs, from a seeded encoder
    torch.manual_seed(0)
    encoder = build_resenc_unet(RESENC_PRESETS[PRESET], 1, 2).encoder
    path = save_weights_file(build_weights_file(encoder.state_dict(), PRESET, 1, 5, method="spark3d"),
                             planned.root / "spark3d_tiny_501.pt")
    _, metadata = load_weights_file(path)
    digest = metadata["encoder_digest"]
    assert digest == encoder_digest(encoder.state_dict())

    # nnU-Net's plain nnUNetTrainer network from these plans takes the file with nnU-Net's own loader
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    plain = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 5, True)
    load_pretrained_weights(plain, str(path))
    assert encoder_digest(plain.encoder.state_dict()) == digest

    # fine-tune through nnU-Net's command: the weights checked before, verified at the start of training
    planned.run("nnUNetv2_train", "501", "3d_fullres", "0", "-p", PLANS, "-tr", TRAINER, "-device", "cpu",
                "-pretrained_weights", str(path))
    log = planned.training_log(TRAINER, plans=PLANS)
    assert f"pretrained weights verified: spark3d encoder digest {digest} (resenc preset 'resenc_tiny'" in log
    assert "freeze_encoder_epochs=1" in log and "Epoch 1: encoder unfrozen (decoder warm-up done)" in log
    fold = planned.fold_dir(TRAINER, plans=PLANS)
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 2
    trained = {k.removeprefix("encoder."): v for k, v in checkpoint["network_weights"].items() if k.startswith("encoder.")}
    assert encoder_digest(trained) != digest  # the encoder trained in epoch 1
    assert (fold / "validation" / "summary.json").is_file()

    # predict the test case with the fine-tuned network
    images = Path(planned.env["nnUNet_raw"]) / "Dataset501_Phantom" / "imagesTs"
    out = planned.root / "predictions"
    planned.run("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "501", "-c", "3d_fullres", "-p", PLANS,
                "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1")
    (image,) = sorted(images.glob("*_0000.nii.gz"))
    predicted = sitk.ReadImage(str(out / image.name.replace("_0000.nii.gz", ".nii.gz")))
    assert predicted.GetSize() == sitk.ReadImage(str(image)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2, 3, 4}


def test_spark3d_pretrain_export_and_a_grid_with_one_arm_of_each_family(planned: NnUNet) -> None:
    """The whole CNN path on the same dataset: `pretrain --method spark3d` (two steps) -> `export` (pretrained
    decoder) and `export --format nnssl` -> an experiment grid with a Swin arm and a Spark3D ResEnc arm on the same
    fold (the runner exports the run for the ResEnc plans, trains both, predicts the test case) -> `experiment
    report` -> `cka` per residual block between the fine-tuned ResEnc encoder and the pretraining run."""
    import yaml

    from nnunet_ssl.weights.nnssl import read_nnssl_checkpoint

    root, raw = planned.root, Path(planned.env["nnUNet_raw"]) / "Dataset501_Phantom"
    run = root / "spark3d_run"
    planned.run("nnunet-ssl", "pretrain", "--method", "spark3d", "--preset", PRESET, "--data", str(raw / "imagesTr"),
                "--out", str(run), "--cache-dir", str(root / "cache"), "--crop-size", "64", "--batch-size", "2",
                "--workers", "0", "--max-steps", "2", "--no-progress")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 and all(r["loss_masked_l2"] > 0 for r in records)
    recorded = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert recorded["engine"]["optimizer"] == "sgd" and recorded["engine"]["schedule"] == "poly"  # card 10's recipe
    assert recorded["data"]["intensity"] == "zscore" and recorded["data"]["spacing"] == [1.0, 1.0, 1.0]

    weights = root / "spark3d_501.pt"
    planned.run("nnunet-ssl", "export", str(run), "-d", "501", "-p", PLANS, "--out", str(weights))
    _, metadata = load_weights_file(weights)
    assert metadata["decoder"] == "pretrained" and metadata["family"] == "resenc" and metadata["preset"] == PRESET
    assert metadata["intensity"]["normalization"] == "zscore"
    nnssl_out = root / "to_nnssl" / "checkpoint_final.pth"
    nnssl_out.parent.mkdir()
    planned.run("nnunet-ssl", "export", str(run), "--format", "nnssl", "--out", str(nnssl_out))
    assert read_nnssl_checkpoint(nnssl_out).preset == PRESET

    planned.run("nnunet-ssl", "plan", "-d", "501", "--preset", "tiny", "-np", "1", timeout=900)  # Swin plans beside
    spec = {
        "dataset": 501, "plans": "nnUNetSwinPlans", "preset": "tiny", "device": "cpu", "seed": 0, "output": "grid",
        "env": {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"},
        "arms": [{"name": "swin_scratch", "trainer": "SwinScratchTrainer_tiny_2epochs"},
                 {"name": "resenc_spark3d", "method": "spark3d", "pretraining_run": str(run), "preset": PRESET,
                  "trainer": TRAINER}],
        "settings": {"full": {"folds": [0]}},
        "test_set": "imagesTs",
    }
    path = root / "both_families.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    planned.run("nnunet-ssl", "experiment", "run", str(path), "--no-progress", timeout=1800)
    grid = root / "grid"
    fold = grid / "results" / "resenc_spark3d" / "Dataset501_Phantom" / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    log = "\n".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))
    _, exported = load_weights_file(grid / "weights" / "resenc_spark3d.pt")
    assert f"pretrained weights verified: spark3d encoder digest {exported['encoder_digest']}" in log
    assert (grid / "results" / "swin_scratch" / "Dataset501_Phantom" / "SwinScratchTrainer_tiny_2epochs__nnUNetSwinPlans"
            "__3d_fullres" / "fold_0" / "checkpoint_final.pth").is_file()
    for arm in ("swin_scratch", "resenc_spark3d"):
        assert len(list((grid / "predictions" / arm / "fold_0").glob("*.nii.gz"))) == 1  # the one test case

    planned.run("nnunet-ssl", "experiment", "report", str(path), "--no-cka")
    report = (grid / "report" / "report.md").read_text(encoding="utf-8")
    assert "nnUNetSwinPlans, nnUNetResEncSSLPlans" in report
    with open(grid / "report" / "tables.csv", encoding="utf-8") as handle:
        overall = {r["arm"]: r for r in csv.DictReader(handle) if r["structure"] == "overall"}
    assert set(overall) == {"swin_scratch", "resenc_spark3d"} and all(r["n_runs"] == "1" for r in overall.values())

    cka = root / "cka"
    planned.run("nnunet-ssl", "cka", "--pretrained", str(run), "--finetuned", str(fold), "--data", str(raw / "imagesTs"),
                "--out", str(cka), "--patches-per-case", "4", "--batch-size", "4", "--device", "cpu")
    settings = json.loads((cka / "cka_settings.json").read_text(encoding="utf-8"))
    assert "resenc" in json.dumps(settings)
    with open(next(cka.glob("*.csv")), encoding="utf-8") as handle:
        layers = [row for row in csv.reader(handle)]
    assert any("stem" in cell for row in layers for cell in row) and any("stage6" in cell for row in layers for cell in row)
