"""One intensity mapping across both stages (issue 20): the pretraining settings that follow a plans file, and the
difference between the pretraining and fine-tuning mappings measured on the dataset's own images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.pretraining.data.preprocess import mr_intensity_range, nonzero_mask, scale_intensities, window_ct, zscore
from nnunet_ssl.weights.intensity import (
    MAX_MEAN_DIFFERENCE,
    ChannelMapping,
    intensity_report,
    intensity_warnings,
    map_like_plans,
    map_like_pretraining,
    plans_channel_mappings,
    pretraining_intensity,
    settings_like_plans,
    subsample,
)

SHAPE = (24, 40, 36)


def head(gain: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """T1-like head (fat 700, skull 60, CSF 120, grey 330, white 420) in Rician background noise; labels 1 white, 2 grey."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
               - np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2)
    r = np.sqrt((z / (SHAPE[0] * 0.42)) ** 2 + (y / (SHAPE[1] * 0.42)) ** 2 + (x / (SHAPE[2] * 0.42)) ** 2)
    image = np.zeros(SHAPE, np.float32)
    for radius, value in ((1.0, 700.0), (0.92, 60.0), (0.86, 120.0), (0.8, 330.0), (0.5, 420.0)):
        image[r < radius] = value
    label = np.where(r < 0.5, 1, np.where(r < 0.8, 2, 0)).astype(np.uint8)
    noise = rng.normal(0, 12.0, (2, *SHAPE)).astype(np.float32)
    return (gain * np.hypot(image + noise[0], noise[1])).astype(np.float32), label


def write_raw_dataset(folder: Path, cases: list[tuple[np.ndarray, np.ndarray]], channel_name: str) -> dict[str, Any]:
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, (image, label) in enumerate(cases):
        for array, path in ((image, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"case_{i:03d}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((1.5, 1.5, 2.0))
            sitk.WriteImage(itk, str(path))
    dataset_json = {"channel_names": {"0": channel_name}, "labels": {"background": 0, "white": 1, "grey": 2},
                    "numTraining": len(cases), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    return dataset_json


def plans_with(scheme: str, properties: dict[str, float] | None = None, use_mask: bool = False,
               modality: str | None = None) -> dict[str, Any]:
    """Minimal nnU-Net plans with one channel mapped by ``scheme`` (what PlansManager and the mappings read)."""
    plans: dict[str, Any] = {
        "dataset_name": "Dataset990_Heads", "plans_name": "nnUNetSwinPlans", "image_reader_writer": "SimpleITKIO",
        "foreground_intensity_properties_per_channel": {"0": properties or {}},
        "configurations": {"3d_fullres": {"patch_size": [64, 64, 64], "batch_size": 2,
                                          "normalization_schemes": [scheme], "use_mask_for_norm": [use_mask],
                                          "spacing": [2.0, 1.5, 1.5], "data_identifier": "x",
                                          "preprocessor_name": "DefaultPreprocessor",
                                          "architecture": {"network_class_name": "unused", "arch_kwargs": {},
                                                           "_kw_requires_import": []}}},
    }
    if modality:
        plans["nnunet_ssl"] = {"modalities": [modality]}
    return plans


def window_properties(low: float, high: float) -> dict[str, float]:
    """What ``nnunet-ssl plan`` writes for a window: CTNormalization with mean = low and std = high - low."""
    return {"mean": low, "std": high - low, "percentile_00_5": low, "percentile_99_5": high}


MR_PERCENTILES = pretraining_intensity("mr", [], (-500, 500), (5, 95))


@pytest.fixture
def several_sites(tmp_path: Path) -> tuple[Path, dict[str, Any], list[tuple[np.ndarray, np.ndarray]]]:
    """Three heads at gains 0.6, 1.0 and 1.8: one shared window cannot follow them."""
    cases = [head(gain, seed) for seed, gain in enumerate((0.6, 1.0, 1.8))]
    folder = tmp_path / "Dataset990_Heads"
    return folder, write_raw_dataset(folder, cases, "T1"), cases


def shared_window(cases: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The planner's shared window: the medians of the images' 5th and 95th percentiles."""
    bounds = np.array([np.percentile(image, [5, 95]) for image, _ in cases])
    return float(np.median(bounds[:, 0])), float(np.median(bounds[:, 1]))


def test_shared_mr_window_after_per_image_pretraining_warns_with_the_measured_difference(several_sites) -> None:
    folder, dataset_json, cases = several_sites
    low, high = shared_window(cases)
    plans = plans_with("CTNormalization", window_properties(low, high), modality="mr")
    # by scheme alone both map to [0, 1]: today's check is silent
    assert intensity_warnings(MR_PERCENTILES, plans_channel_mappings(plans, "3d_fullres")) == []
    report = intensity_report(MR_PERCENTILES, plans, "3d_fullres", dataset_json, folder)
    (warning,) = report.warnings
    # the same number by hand: per-image 5-95 % against the shared window, on the labelled voxels
    differences = []
    for image, label in cases:
        p5, p95 = np.percentile(image, [5, 95])
        exact = np.clip((image - p5) / (p95 - p5), 0, 1)
        shared = np.clip((image - low) / (high - low), 0, 1)
        differences.append(np.abs(exact - shared)[label > 0])
    expected = float(np.concatenate(differences).mean())
    assert expected > MAX_MEAN_DIFFERENCE
    assert f"mean |difference| {expected:.3f} on the labelled voxels of 3 training image(s)" in warning
    assert "far from the pretraining" in warning and "--intensity-like" in warning


def test_pretraining_like_the_plans_measures_no_difference(several_sites) -> None:
    folder, dataset_json, cases = several_sites
    low, high = shared_window(cases)
    plans = plans_with("CTNormalization", window_properties(low, high), modality="mr")
    like = settings_like_plans(plans_channel_mappings(plans, "3d_fullres"), ["mr"])
    assert like.data == {"intensity": "window", "mr_window": [low, high]}
    record = pretraining_intensity("mr", [], (-500, 500), (5, 95), like.data["intensity"], like.data["mr_window"])
    report = intensity_report(record, plans, "3d_fullres", dataset_json, folder)
    assert report.warnings == []
    (note,) = report.notes
    assert "mean |difference| 0.000" in note


def test_ct_windows_differ_by_the_hand_computed_amount(tmp_path: Path) -> None:
    # labelled organ at exactly 50 HU: [-500, 500] gives 0.55, [-175, 250] gives 225 / 425
    image = np.full(SHAPE, -1000.0, dtype=np.float32)
    image[4:20, 8:32, 8:28] = 50.0
    label = (image == 50.0).astype(np.uint8)
    folder = tmp_path / "Dataset990_Heads"
    dataset_json = write_raw_dataset(folder, [(image, label)], "CT")
    plans = plans_with("CTNormalization", window_properties(-175.0, 250.0), modality="ct")
    record = pretraining_intensity("ct", [], (-500.0, 500.0), (5, 95))
    report = intensity_report(record, plans, "3d_fullres", dataset_json, folder)
    assert report.warnings == []  # 0.021 < 0.1: the paper's two windows
    assert f"mean |difference| {abs(225 / 425 - 0.55):.3f} on the labelled voxels of 1" in report.notes[0]


def test_scheme_warning_carries_the_measurement(several_sites) -> None:
    folder, dataset_json, _ = several_sites
    zscored = pretraining_intensity("mr", [], (-500, 500), (5, 95), "zscore")
    plans = plans_with("RescaleTo01Normalization", modality="mr")
    (warning,) = intensity_report(zscored, plans, "3d_fullres", dataset_json, folder).warnings
    assert "pretraining z-scored each image" in warning and "; measured: mean |difference|" in warning


def test_nothing_measured_without_images_or_across_modalities(tmp_path: Path, several_sites) -> None:
    plans = plans_with("RescaleTo01Normalization", modality="mr")
    report = intensity_report(MR_PERCENTILES, plans, "3d_fullres", None, tmp_path / "missing")
    assert report.warnings == [] and "not measured" in report.notes[0] and "dataset.json" in report.notes[0]
    folder, dataset_json, _ = several_sites
    ct = pretraining_intensity("ct", [], (-500, 500), (5, 95))
    report = intensity_report(ct, plans, "3d_fullres", dataset_json, folder)
    assert "cross-modality" in report.warnings[0] and "cross-modality" in report.notes[0]
    assert "not measured" in intensity_report(None, plans, "3d_fullres", dataset_json, folder).notes[0]


def test_pretraining_mappings_are_those_of_the_cache() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(200.0, 80.0, (12, 14, 16)).astype(np.float32)
    image[:3] = 0.0
    np.testing.assert_allclose(map_like_pretraining(image, {"window": [-500, 500]}, "ct"),
                               window_ct(image, (-500, 500)), atol=1e-6)
    low, high = mr_intensity_range(image, (5.0, 95.0))
    np.testing.assert_allclose(map_like_pretraining(image, MR_PERCENTILES, "mr"), scale_intensities(image, low, high),
                               atol=1e-5)
    np.testing.assert_allclose(map_like_pretraining(image, {"mr_window": [0, 400]}, "mr"), window_ct(image, (0, 400)),
                               atol=1e-6)
    z = pretraining_intensity("mr", [], (-500, 500), (5, 95), "zscore")
    np.testing.assert_allclose(map_like_pretraining(image, z, "mr"), zscore(image, image.mean(), image.std()), atol=1e-4)
    inside = nonzero_mask(image)
    masked = pretraining_intensity("mr", [], (-500, 500), (5, 95), "zscore_nonzero")
    expected = np.where(inside, zscore(image, image[inside].mean(), image[inside].std()), 0.0)
    np.testing.assert_allclose(map_like_pretraining(image, masked, "mr"), expected, atol=1e-4)
    minmax = pretraining_intensity("mr", [], (-500, 500), (5, 95), "minmax")
    np.testing.assert_allclose(map_like_pretraining(image, minmax, "mr"), window_ct(image, (image.min(), image.max())),
                               atol=1e-6)


def test_plans_mappings_are_nnunets() -> None:
    image = np.full((10, 12, 12), 0.0, dtype=np.float32)
    image[2:8, 3:9, 3:9] = np.linspace(10, 110, 216, dtype=np.float32).reshape(6, 6, 6)
    window = ChannelMapping("CTNormalization", "mr", True, "w", properties=(20.0, 60.0, 20.0, 40.0))
    mapped, _, crop = map_like_plans(image, window)
    assert crop == (slice(2, 8), slice(3, 9), slice(3, 9))  # nnU-Net crops to the nonzero region first
    np.testing.assert_allclose(mapped, np.clip((image[crop] - 20.0) / 40.0, 0, 1), atol=1e-6)
    rescale, _, _ = map_like_plans(image, ChannelMapping("RescaleTo01Normalization", "mr", True, "r"))
    np.testing.assert_allclose(rescale, (image[crop] - 10.0) / 100.0, atol=1e-6)


def test_settings_like_plans_and_what_cannot_be_matched() -> None:
    def like(*mappings: ChannelMapping, modalities: list[str]) -> dict[str, Any]:
        return settings_like_plans(list(mappings), modalities).data

    ct = ChannelMapping("CTNormalization", "ct", True, "CT window", properties=(-175.0, 250.0, -175.0, 425.0))
    assert like(ct, modalities=["ct"]) == {"intensity": "window", "ct_window": [-175.0, 250.0]}
    assert like(ChannelMapping("RescaleTo01Normalization", "mr", True, "r"), modalities=["mr"]) == {"intensity": "minmax"}
    assert like(ChannelMapping("ZScoreNormalization", "mr", False, "z"), modalities=["mr"]) == {"intensity": "zscore"}
    assert like(ChannelMapping("ZScoreNormalization", "mr", False, "z", use_mask=True),
                modalities=["mr"]) == {"intensity": "zscore_nonzero"}
    nnunet_ct = ChannelMapping("CTNormalization", None, False, "CTNormalization", properties=(-958.0, 327.0, 99.5, 137.1))
    with pytest.raises(ValueError, match=r"dataset's statistics: clip to \[-958, 327\], then \(x - 99.5\) / 137.1"):
        like(nnunet_ct, modalities=["ct"])
    with pytest.raises(ValueError, match="different pretraining mappings"):
        like(ct, ChannelMapping("RescaleTo01Normalization", "mr", True, "r"), modalities=["ct", "mr"])
    other = ChannelMapping("CTNormalization", "mr", True, "w", properties=(0.0, 300.0, 0.0, 300.0))
    with pytest.raises(ValueError, match="MR channels use different windows"):
        like(other, ChannelMapping("CTNormalization", "mr", True, "w", properties=(0.0, 400.0, 0.0, 400.0)),
             modalities=["mr", "mr"])
    with pytest.raises(ValueError, match="no counterpart"):
        like(ChannelMapping("NoNormalization", "mr", False, "n"), modalities=["mr"])


def test_subsample_keeps_every_axis_and_the_budget() -> None:
    image = np.arange(60 * 70 * 80, dtype=np.float32).reshape(60, 70, 80)
    small, label = subsample(image, image > 5, max_voxels=20_000)
    assert small.size <= 20_000 and small.ndim == 3 and label is not None and label.shape == small.shape
    step = int(small[0, 0, 1] - small[0, 0, 0])
    assert step > 1 and small[0, 1, 0] == step * 80 and small[1, 0, 0] == step * 70 * 80  # one stride on every axis
