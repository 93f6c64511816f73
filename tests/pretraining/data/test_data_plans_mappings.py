"""The pretraining mappings that reproduce nnU-Net plans (issue 20): a fixed MR window (the shared window the
planner writes with CTNormalization), per-image min-max (RescaleTo01Normalization) and the z-score inside the
nonzero region (ZScoreNormalization with use_mask_for_norm); their cache keys and their records."""
from __future__ import annotations

import numpy as np
import pytest
from test_data_helpers import config, image_from_array, write

from nnunet_ssl.pretraining.data import build_cache, open_array
from nnunet_ssl.pretraining.data.preprocess import nonzero_mask
from nnunet_ssl.weights.intensity import intensity_record, pretraining_intensity

#: Slabs of 6 slices at the target spacing 1.5 x 1.5 x 2 mm (no interpolation along z), as in the z-score tests.
SPACING = (1.5, 1.5, 2.0)


def slabs(values: list[float], size: int = 32) -> np.ndarray:
    return np.concatenate([np.full((6, size, size), v, dtype=np.float32) for v in values])


def cached(tmp_path, entry) -> np.ndarray:
    return open_array(str(tmp_path / "cache" / entry.cache_file))[...].astype(np.float32)


def test_mr_window_maps_every_image_with_one_window(tmp_path) -> None:
    values = [0.0, 100.0, 300.0, 500.0, 200.0, 50.0]
    write(image_from_array(slabs(values), SPACING), tmp_path / "in" / "mr.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache", modality="mr", mr_window=(0.0, 400.0), body_margin=40)
    entry = build_cache(cfg).entries[0]
    assert entry.stats["low"] == 0.0 and entry.stats["high"] == 400.0
    np.testing.assert_allclose(cached(tmp_path, entry)[:, 16, 16], np.repeat(np.clip(np.array(values) / 400, 0, 1), 6),
                               atol=1e-3)  # float16


def test_minmax_uses_the_source_extremes(tmp_path) -> None:
    values = [-20.0, 100.0, 300.0, 700.0, 200.0, 50.0]
    array = slabs(values)
    array[3, 5, 5] = 1000.0  # a single bright voxel sets the maximum, as in nnU-Net's RescaleTo01Normalization
    write(image_from_array(array, SPACING), tmp_path / "in" / "mr.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache", modality="mr", intensity="minmax", body_margin=40)
    entry = build_cache(cfg).entries[0]
    assert (entry.stats["low"], entry.stats["high"]) == (-20.0, 1000.0)
    expected = (np.array(values) + 20.0) / 1020.0
    np.testing.assert_allclose(cached(tmp_path, entry)[:, 16, 16], np.repeat(expected, 6), atol=1e-3)


def test_zscore_nonzero_uses_the_nonzero_region_and_leaves_the_rest_zero(tmp_path) -> None:
    array = np.zeros((36, 32, 32), dtype=np.float32)
    array[6:30, 6:26, 6:26] = 100.0
    array[6:30, 6:26, 16:26] = 300.0
    array[14:20, 12:18, 12:18] = 0.0  # an enclosed hole: inside the mask (nnU-Net fills holes)
    write(image_from_array(array, SPACING), tmp_path / "in" / "brain.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache", modality="mr", intensity="zscore_nonzero", body_margin=40)
    entry = build_cache(cfg).entries[0]
    inside = np.zeros(array.shape, dtype=bool)
    inside[6:30, 6:26, 6:26] = True
    mean, std = float(array[inside].mean()), float(array[inside].std())
    assert entry.stats["zscore_mean"] == pytest.approx(mean) and entry.stats["zscore_std"] == pytest.approx(std)
    out = cached(tmp_path, entry)
    assert out[0, 0, 0] == 0.0 and out[16, 15, 15] == pytest.approx((0.0 - mean) / std, abs=2e-3)
    assert out[10, 10, 20] == pytest.approx((300.0 - mean) / std, abs=2e-3)


def test_nonzero_mask_is_nnunets() -> None:
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    rng = np.random.default_rng(0)
    array = (rng.random((20, 24, 22)) > 0.35).astype(np.float32) * rng.normal(5, 1, (20, 24, 22)).astype(np.float32)
    array[5:15, 5:15, 5:15] = 3.0
    array[8:12, 8:12, 8:12] = 0.0  # a hole
    np.testing.assert_array_equal(nonzero_mask(array), create_nonzero_mask(array[None]))


def test_cache_keys_and_validation(tmp_path) -> None:
    base = config(["x"], tmp_path)
    assert "mr_window" not in base.preprocessing_params("mr")  # existing caches keep their keys
    windowed = config(["x"], tmp_path, mr_window=(0, 400))
    assert windowed.preprocessing_params("mr")["mr_window"] == [0.0, 400.0]
    assert windowed.params_key("mr") != base.params_key("mr") and windowed.params_key("ct") == base.params_key("ct")
    for intensity in ("minmax", "zscore_nonzero"):
        assert config(["x"], tmp_path, intensity=intensity).preprocessing_params("ct")["intensity"] == intensity
    with pytest.raises(ValueError, match="mr_window is a window"):
        config(["x"], tmp_path, intensity="zscore", mr_window=(0, 400))
    with pytest.raises(ValueError, match="mr_window must be"):
        config(["x"], tmp_path, mr_window=(400, 0))


def test_records_of_the_new_mappings() -> None:
    assert pretraining_intensity("mr", [], (-500, 500), (5, 95), "window", (0, 400)) == {
        "modality": "MR", "mr_window": [0.0, 400.0], "range": [0.0, 1.0]}
    mixed = pretraining_intensity(None, ["ct", "mr"], (-500, 500), (5, 95), "window", (0, 400))
    assert mixed["window"] == [-500, 500] and mixed["mr_window"] == [0.0, 400.0] and "percentiles" not in mixed
    assert pretraining_intensity("mr", [], (-500, 500), (5, 95), "minmax") == {
        "modality": "MR", "normalization": "minmax", "scheme": "RescaleTo01Normalization", "per_image": True,
        "range": [0.0, 1.0]}
    assert pretraining_intensity("ct", [], (-500, 500), (5, 95), "zscore_nonzero") == {
        "modality": "CT", "normalization": "zscore", "scheme": "ZScoreNormalization", "per_image": True,
        "mask": "nonzero"}
    with pytest.raises(ValueError, match="unknown pretraining intensity mapping 'bogus'"):
        pretraining_intensity("ct", [], (-500, 500), (5, 95), "bogus")
    data = config(["x"], "c", modality="mr", mr_window=(0, 400))
    from dataclasses import asdict

    assert intensity_record(asdict(data), []) == {"modality": "MR", "mr_window": [0.0, 400.0], "range": [0.0, 1.0]}
