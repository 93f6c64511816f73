"""`nnunet-ssl plan` and `nnunet-ssl split` through nnU-Net's own preprocessing, training and predictor code.

Marked ``e2e``: real nnU-Net planning, preprocessing and a short `nnUNetv2_train` on an appended fold.
"""
from __future__ import annotations

import json
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets
from nnunet_runner import NnUNet

pytestmark = pytest.mark.e2e

TRAINER = "SwinScratchTrainer_tiny_2epochs"
PLANS = "nnUNetSwinPlans"


def window(hu: np.ndarray, low: float = -175.0, high: float = 250.0) -> np.ndarray:
    """The paper's CT window mapped to [0, 1], by hand."""
    return (np.clip(hu, low, high) - low) / (high - low)


def write_ct_dataset(raw: Path, num_cases: int = 3) -> Path:
    """CT volumes already at 1.5 x 1.5 x 2 mm (x, y, z), so nnU-Net's resampling is the identity.

    HU values cover [-1000, 1000] everywhere (never exactly 0, so nnU-Net's crop keeps the whole
    volume); the label is a ball.
    """
    folder = raw / "Dataset601_WindowCT"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:24, :40, :36]
    ball = ((zz - 12) ** 2 + (yy - 20) ** 2 + (xx - 18) ** 2 < 64).astype(np.uint8)
    for i in range(num_cases):
        hu = rng.uniform(-1000, 1000, size=(24, 40, 36)).astype(np.float32)
        hu[hu == 0] = 1.0
        for array, path in ((hu, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"),
                            (ball, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.5, 1.5, 2.0))  # x, y, z
            sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "ball": 1},
        "numTraining": num_cases, "file_ending": ".nii.gz",
    }))
    return folder


@pytest.fixture(scope="module")
def window_ct(tmp_path_factory: pytest.TempPathFactory) -> NnUNet:
    root = tmp_path_factory.mktemp("window_ct")
    write_ct_dataset(root / "raw")
    runner = NnUNet(root, root / "raw", dataset="Dataset601_WindowCT")
    runner.run("nnunet-ssl", "plan", "-d", "601", "--preset", "tiny", "-np", "1")
    return runner


def test_plans_hold_the_paper_setup(window_ct: NnUNet) -> None:
    plans = json.loads((window_ct.preprocessed / f"{PLANS}.json").read_text(encoding="utf-8"))
    config = plans["configurations"]["3d_fullres"]
    assert list(plans["configurations"]) == ["3d_fullres"]
    assert config["spacing"] == [2.0, 1.5, 1.5]  # nnU-Net order z, y, x
    assert config["patch_size"] == [64, 64, 64] and config["batch_size"] == 2
    assert config["normalization_schemes"] == ["CTNormalization"]
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert (props["mean"], props["std"], props["percentile_00_5"], props["percentile_99_5"]) == (-175, 425, -175, 250)
    assert config["data_identifier"] == f"{PLANS}_3d_fullres"
    assert not (window_ct.preprocessed / "nnUNetPlans.json").exists()


def test_preprocessed_and_predict_time_intensities_are_the_window(window_ct: NnUNet) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = Path(window_ct.env["nnUNet_raw"]) / window_ct.dataset
    image_file = raw / "imagesTr" / "ct_001_0000.nii.gz"
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))).astype(np.float64)
    stored = blosc2.open(str(window_ct.preprocessed / f"{PLANS}_3d_fullres" / "ct_001.b2nd"), mode="r")[:]
    assert stored.shape == (1, *hu.shape)  # the right spacing order: nothing was resampled
    np.testing.assert_allclose(stored[0], window(hu), atol=1e-6)
    assert stored.min() == 0.0 and stored.max() == pytest.approx(1.0)

    # nnUNetv2_predict preprocesses raw images with the configuration's preprocessor.run_case
    plans = PlansManager(str(window_ct.preprocessed / f"{PLANS}.json"))
    configuration = plans.get_configuration("3d_fullres")
    preprocessor = configuration.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case([str(image_file)], None, plans, configuration, str(raw / "dataset.json"))
    np.testing.assert_allclose(data[0], window(hu), atol=1e-6)


def test_refuses_nnunets_own_and_foreign_plans_files(window_ct: NnUNet) -> None:
    result = window_ct.run("nnunet-ssl", "plan", "-d", "601", "--plans-name", "nnUNetPlans", check=False)
    assert result.returncode == 1 and "nnU-Net's own plans file" in result.stderr
    foreign = window_ct.preprocessed / "MyPlans.json"
    foreign.write_text(json.dumps({"experiment_planner_used": "ExperimentPlanner", "configurations": {}}))
    result = window_ct.run("nnunet-ssl", "plan", "-d", "601", "--plans-name", "MyPlans", check=False)
    assert result.returncode == 1 and "not `nnunet-ssl plan`" in result.stderr
    assert json.loads(foreign.read_text(encoding="utf-8"))["experiment_planner_used"] == "ExperimentPlanner"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> NnUNet:
    root = tmp_path_factory.mktemp("split")
    paths = write_phantom_datasets(root, PhantomConfig(num_train=7, num_test=1, num_unlabeled=0, shape=(40, 64, 64)))
    runner = NnUNet(root, paths.raw_root)
    return runner


def test_split_refuses_an_unpreprocessed_dataset(phantoms: NnUNet) -> None:
    result = phantoms.run("nnunet-ssl", "split", "-d", "501", "--shots", "2", check=False)
    assert result.returncode == 1 and "run `nnUNetv2_plan_and_preprocess" in result.stderr


def test_training_on_an_appended_fold_uses_exactly_its_cases(phantoms: NnUNet) -> None:
    phantoms.run("nnunet-ssl", "plan", "-d", "501", "--preset", "tiny", "-np", "1")
    out = phantoms.run("nnunet-ssl", "split", "-d", "501", "--shots", "2", "3", "--seeds", "0", "1").stdout
    assert "few_shot" in out
    manifest = json.loads((phantoms.preprocessed / "splits_manifest.json").read_text(encoding="utf-8"))
    entry = next(f for f in manifest["folds"] if f["size"] == 3 and f["seed"] == 1)
    assert entry["fold"] == 8  # after nnU-Net's five: (2, s0)=5, (3, s0)=6, (2, s1)=7, (3, s1)=8

    fold = str(entry["fold"])
    phantoms.run("nnUNetv2_train", "501", "3d_fullres", fold, "-tr", TRAINER, "-p", PLANS, "-device", "cpu")
    log = phantoms.training_log(TRAINER, entry["fold"], PLANS)
    assert f"fold {fold}: 3-shot fold (seed 1) from splits_manifest.json" in log
    assert f"fold {fold} training cases (3): {', '.join(sorted(entry['train']))}" in log
    assert "(as listed in splits_manifest.json)" in log
    validated = sorted(p.name.replace(".nii.gz", "")
                       for p in (phantoms.fold_dir(TRAINER, entry["fold"], PLANS) / "validation").glob("*.nii.gz"))
    assert validated == sorted(entry["val"])
    used_plans = json.loads((phantoms.fold_dir(TRAINER, entry["fold"], PLANS).parent / "plans.json").read_text(encoding="utf-8"))
    assert used_plans["plans_name"] == PLANS
