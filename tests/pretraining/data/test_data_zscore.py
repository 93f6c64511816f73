"""Per-image z-scoring of the cached volumes (DataConfig.intensity = "zscore"), its cache keys and its record."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_data_helpers import config, ct_volume, image_from_array, mr_volume, write

from nnunet_ssl.pretraining.data import build_cache, make_loader, open_array, resample_to_spacing
from nnunet_ssl.pretraining.data.preprocess import zscore, zscore_statistics
from nnunet_ssl.weights.intensity import ChannelMapping, intensity_warnings, pretraining_intensity


def test_zscore_by_hand() -> None:
    values = np.array([1.0, 2.0, 3.0, 6.0], dtype=np.float32)
    mean, std = zscore_statistics(values)
    assert (mean, std) == pytest.approx((3.0, np.sqrt(3.5)))  # population std: (4 + 1 + 0 + 9) / 4
    np.testing.assert_allclose(zscore(values, mean, std), [-2 / np.sqrt(3.5), -1 / np.sqrt(3.5), 0, 3 / np.sqrt(3.5)],
                               rtol=1e-6)
    np.testing.assert_array_equal(zscore(np.full(3, 5.0), 5.0, 0.0), [0.0, 0.0, 0.0])  # max(std, 1e-8), as nnU-Net
    assert zscore(np.array([1e4]), 0.0, 1.0)[0] == 1e4  # never clipped


def test_ct_slabs_are_z_scored_over_the_whole_image(tmp_path) -> None:
    # Slabs of 6 slices at the target spacing (no interpolation); the body (HU > -500) spans all of them
    hus = [0, -1000, 500, -500, 1000, 250]
    arr = np.concatenate([np.full((6, 32, 32), hu, dtype=np.int16) for hu in hus])
    write(image_from_array(arr, (1.5, 1.5, 2.0)), tmp_path / "in" / "slabs.nii.gz")
    entry = build_cache(config([tmp_path / "in"], tmp_path / "cache", intensity="zscore")).entries[0]
    mean = sum(hus) / 6
    std = np.sqrt(sum((hu - mean) ** 2 for hu in hus) / 6)
    assert entry.stats["zscore_mean"] == pytest.approx(mean) and entry.stats["zscore_std"] == pytest.approx(std)
    assert "low" not in entry.stats and entry.stats["mean"] == pytest.approx(0.0, abs=1e-3)
    cached = open_array(str(tmp_path / "cache" / entry.cache_file))[...]
    assert cached.shape == (36, 32, 32) and cached.dtype == np.float16
    expected = np.concatenate([np.full(6, (hu - mean) / std) for hu in hus])
    np.testing.assert_allclose(cached[:, 16, 16], expected, rtol=2e-3)  # float16
    assert cached.max() > 1.0 and cached.min() < 0.0  # not clipped to [0, 1]


def test_mr_is_z_scored_before_the_body_crop(tmp_path) -> None:
    image = mr_volume(seed=4)
    write(image, tmp_path / "in" / "mr.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache", modality="mr", intensity="zscore", body_margin=0)
    entry = build_cache(cfg).entries[0]
    resampled = sitk.GetArrayFromImage(resample_to_spacing(image, cfg.spacing))
    box = tuple(slice(a, b) for a, b in entry.bbox)
    assert resampled[box].shape != resampled.shape  # the body crop removed background
    mean, std = resampled.mean(dtype=np.float64), resampled.std(dtype=np.float64)
    cached = open_array(str(tmp_path / "cache" / entry.cache_file))[...].astype(np.float32)
    np.testing.assert_allclose(cached, (resampled[box] - mean) / std, rtol=2e-3, atol=2e-3)


#: Cache keys of the default settings before ``intensity`` existed (existing caches must stay valid).
WINDOW_KEYS = {"ct": "e8c906abcb1ae832", "mr": "1be77c88a543f8b5", "auto": "647d002d792ca2a0"}  # auto: detection v2


def test_cache_keys_change_only_for_zscore(tmp_path) -> None:
    window = config(["x"], tmp_path, crop_size=96, region_size=128, num_workers=2)
    assert {m: window.params_key(m) for m in WINDOW_KEYS} == WINDOW_KEYS
    assert "intensity" not in window.preprocessing_params("ct")
    zscored = config(["x"], tmp_path, intensity="zscore")
    assert zscored.preprocessing_params("ct")["intensity"] == "zscore"
    assert all(zscored.params_key(m) != key for m, key in WINDOW_KEYS.items())
    # the CT window does not change a z-scored array; the MR percentiles still set the body threshold
    assert config(["x"], tmp_path, intensity="zscore", ct_window=(-100, 100)).params_key("ct") == zscored.params_key("ct")
    assert config(["x"], tmp_path, intensity="zscore", mr_percentiles=(1, 99)).params_key("mr") != zscored.params_key("mr")
    with pytest.raises(ValueError, match="intensity must be one of window, zscore, zscore_nonzero, minmax, got 'bogus'"):
        config(["x"], tmp_path, intensity="bogus")


def test_switching_to_zscore_rebuilds_and_pads_crops_with_the_mean(tmp_path) -> None:
    write(ct_volume(seed=1), tmp_path / "in" / "a.nii.gz")  # 27 x 32 x 60 voxels at the default spacing
    window = build_cache(config([tmp_path / "in"], tmp_path / "cache"))
    cfg = config([tmp_path / "in"], tmp_path / "cache", intensity="zscore", crop_size=64, region_size=64)
    zscored = build_cache(cfg)
    assert window.entries[0].params_key != zscored.entries[0].params_key
    array = open_array(zscored.array_path(zscored.entries[0]))[...]
    assert array.min() < -0.5  # air below the mean: z-scores, not [0, 1]
    view = next(make_loader(zscored, cfg, 1, 1, seed=0))["views"][0, 0, 0].numpy()
    assert min(array.shape) < 64
    # along every axis shorter than the crop, the volume lies whole in the view and 0 fills the rest
    for axis, size in enumerate(array.shape):
        if size < 64:
            empty = np.all(np.moveaxis(view, axis, 0).reshape(64, -1) == 0.0, axis=1)
            assert empty.sum() == 64 - size


def test_the_intensity_record_says_zscore() -> None:
    record = pretraining_intensity("mr", [], (-500, 500), (5, 95), "zscore")
    assert record == {"modality": "MR", "normalization": "zscore", "scheme": "ZScoreNormalization", "per_image": True}
    assert pretraining_intensity(None, ["ct", "mr"], (-500, 500), (5, 95), "zscore")["modality"] == "mixed"
    # the window records are those of before (version 1 runs are read back the same way)
    assert pretraining_intensity("ct", [], (-500, 500), (5, 95)) == {"modality": "CT", "window": [-500, 500],
                                                                     "range": [0.0, 1.0]}
    with pytest.raises(ValueError, match="unknown pretraining intensity mapping 'bogus'"):
        pretraining_intensity("ct", [], (-500, 500), (5, 95), "bogus")


def test_zscore_pretraining_matches_only_zscore_plans() -> None:
    record = pretraining_intensity("mr", [], (-500, 500), (5, 95), "zscore")
    zscore_mr = ChannelMapping("ZScoreNormalization", "mr", False, "ZScoreNormalization (not mapped to [0, 1])")
    ct_window = ChannelMapping("CTNormalization", "ct", True, "CT window [-175, 250] -> [0, 1]")
    ct_dataset = ChannelMapping("CTNormalization", None, False, "CTNormalization (nnU-Net's dataset percentiles, then z-score)")
    assert intensity_warnings(record, [zscore_mr]) == []
    (warning,) = intensity_warnings(record, [ct_window])
    assert "pretraining z-scored each image (MR per-image z-score (ZScoreNormalization))" in warning
    assert "ZScoreNormalization" in intensity_warnings(record, [ct_dataset])[0]
    zscore_ct = ChannelMapping("ZScoreNormalization", "ct", False, "ZScoreNormalization")
    assert "cross-modality" in intensity_warnings(record, [zscore_ct])[0]
    # a [0, 1] pretraining still warns about z-scored plans, as before
    window = pretraining_intensity("mr", [], (-500, 500), (5, 95))
    assert "mapped intensities to [0, 1]" in intensity_warnings(window, [zscore_mr])[0]
