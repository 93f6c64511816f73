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
from nnunet_runner import NnUNet

from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets

pytestmark = pytest.mark.e2e

TRAINER = "SwinScratchTrainer_tiny_2epochs"
PLANS = "nnUNetSwinPlans"


def window(hu: np.ndarray, low: float = -175.0, high: float = 250.0) -> np.ndarray:
    """The paper's CT window mapped to [0, 1], by hand."""
    return (np.clip(hu, low, high) - low) / (high - low)


def mr_image(rng: np.random.Generator, case: int) -> np.ndarray:
    """An MR-like channel: positive Rician-like tissue intensities and a few very bright voxels (fat)."""
    tissue = rng.gamma(4.0, 60.0, size=(24, 40, 36)) + 1.0
    tissue.reshape(-1)[rng.choice(tissue.size, 30, replace=False)] = 4000.0 * (case + 1)
    return tissue.astype(np.float32)


def percentile_window(images: list[np.ndarray]) -> tuple[float, float]:
    """The planner's stand-in for per-image 5-95 %, by hand: medians of the images' own percentiles."""
    bounds = np.array([np.percentile(image.astype(np.float64), [5, 95]) for image in images])
    return float(np.median(bounds[:, 0])), float(np.median(bounds[:, 1]))


def write_ct_dataset(raw: Path, num_cases: int = 3) -> Path:
    """CT + T1 volumes already at 1.5 x 1.5 x 2 mm (x, y, z), so nnU-Net's resampling is the identity.

    HU values cover [-1000, 1000] everywhere (never exactly 0) and MR values are positive, so
    nnU-Net's crop keeps the whole volume; the label is a ball.
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
                            (mr_image(rng, i), folder / "imagesTr" / f"ct_{i:03d}_0001.nii.gz"),
                            (ball, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.5, 1.5, 2.0))  # x, y, z
            sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T1"}, "labels": {"background": 0, "ball": 1},
        "numTraining": num_cases, "file_ending": ".nii.gz",
    }), encoding="utf-8")
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
    assert config["normalization_schemes"] == ["CTNormalization", "CTNormalization"]  # CT window, MR stand-in
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
    assert stored.shape == (2, *hu.shape)  # CT and T1; the right spacing order: nothing was resampled
    np.testing.assert_allclose(stored[0], window(hu), atol=1e-6)
    assert stored.min() == 0.0 and stored.max() == pytest.approx(1.0)

    # nnUNetv2_predict preprocesses raw images with the configuration's preprocessor.run_case
    plans = PlansManager(str(window_ct.preprocessed / f"{PLANS}.json"))
    configuration = plans.get_configuration("3d_fullres")
    preprocessor = configuration.preprocessor_class(verbose=False)
    mr_file = raw / "imagesTr" / "ct_001_0001.nii.gz"
    data, _, _ = preprocessor.run_case([str(image_file), str(mr_file)], None, plans, configuration,
                                       str(raw / "dataset.json"))
    np.testing.assert_allclose(data[0], window(hu), atol=1e-6)


def test_mr_channel_is_the_5_95_percentile_mapping_at_training_and_predict_time(window_ct: NnUNet) -> None:
    """MR: clip at the 5th/95th percentiles and map to [0, 1]; one window (the medians of the images' own
    percentiles), which nnU-Net's CTNormalization applies exactly; here every image has the same tissue
    distribution, so it equals each image's own 5-95 % mapping up to sampling noise."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ssl.plans.planner import percentile_map

    raw = Path(window_ct.env["nnUNet_raw"]) / window_ct.dataset
    files = sorted((raw / "imagesTr").glob("*_0001.nii.gz"))
    images = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.float64) for f in files]
    low, high = percentile_window(images)
    plans_file = window_ct.preprocessed / f"{PLANS}.json"
    plans_json = json.loads(plans_file.read_text(encoding="utf-8"))
    props = plans_json["foreground_intensity_properties_per_channel"]["1"]
    assert (props["percentile_00_5"], props["percentile_99_5"]) == pytest.approx((low, high))
    note = plans_json["nnunet_ssl"]["mr_normalization"]["1"]
    assert "per-image 5-95 % -> [0, 1] with one window" in note
    expected = np.clip((images[1] - low) / (high - low), 0, 1)
    stored = blosc2.open(str(window_ct.preprocessed / f"{PLANS}_3d_fullres" / "ct_001.b2nd"), mode="r")[:]
    np.testing.assert_allclose(stored[1], expected, atol=1e-6)
    assert np.abs(stored[1] - percentile_map(images[1], (5, 95))).mean() < 0.01  # close to the exact per-image map

    plans = PlansManager(str(plans_file))
    configuration = plans.get_configuration("3d_fullres")
    preprocessor = configuration.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case([str(raw / "imagesTr" / "ct_001_0000.nii.gz"), str(files[1])], None, plans,
                                       configuration, str(raw / "dataset.json"))
    np.testing.assert_allclose(data[1], expected, atol=1e-6)


def test_refuses_nnunets_own_and_foreign_plans_files(window_ct: NnUNet) -> None:
    result = window_ct.run("nnunet-ssl", "plan", "-d", "601", "--plans-name", "nnUNetPlans", check=False)
    assert result.returncode == 1 and "nnU-Net's own plans file" in result.stderr
    foreign = window_ct.preprocessed / "MyPlans.json"
    foreign.write_text(json.dumps({"experiment_planner_used": "ExperimentPlanner", "configurations": {}}), encoding="utf-8")
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
    phantoms.run("nnUNetv2_train", "501", "3d_fullres", fold, "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
                 env={"NNUNET_SSL_EPOCHS": "1"})  # one epoch shows which cases it trains and validates on
    log = phantoms.training_log(TRAINER, entry["fold"], PLANS)
    assert f"fold {fold}: 3-shot fold (seed 1) from splits_manifest.json" in log
    assert f"fold {fold} training cases (3): {', '.join(sorted(entry['train']))}" in log
    assert "(as listed in splits_manifest.json)" in log
    validated = sorted(p.name.replace(".nii.gz", "")
                       for p in (phantoms.fold_dir(TRAINER, entry["fold"], PLANS) / "validation").glob("*.nii.gz"))
    assert validated == sorted(entry["val"])
    used_plans = json.loads((phantoms.fold_dir(TRAINER, entry["fold"], PLANS).parent / "plans.json").read_text(encoding="utf-8"))
    assert used_plans["plans_name"] == PLANS
