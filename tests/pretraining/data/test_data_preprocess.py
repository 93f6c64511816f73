"""Resampling, intensity mapping and body crop (hand-computed expectations)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_data_helpers import config, ct_volume, image_from_array, mr_volume, write

from nnunet_ssl.pretraining.data import (
    build_cache,
    open_array,
    resample_to_spacing,
    window_ct,
)
from nnunet_ssl.pretraining.data.preprocess import body_bbox, mr_intensity_range


def test_resample_spacing_and_shape():
    # 40 x 48 x 48 voxels (x, y, z) at 1 x 1 x 2.5 mm -> round(40 / 1.5), round(48 / 1.5), round(48 * 2.5 / 2)
    out = resample_to_spacing(ct_volume(), (1.5, 1.5, 2.0))
    assert out.GetSize() == (27, 32, 60)
    assert out.GetSpacing() == pytest.approx((1.5, 1.5, 2.0))
    assert out.GetPixelID() == sitk.sitkFloat32


def test_cached_shape_and_spacing_without_air(tmp_path):
    write(ct_volume(air_margin=0), tmp_path / "in" / "full.nii.gz")
    entry = build_cache(config([tmp_path / "in"], tmp_path / "cache")).entries[0]
    assert entry.status == "ok"
    assert entry.shape == (60, 32, 27)  # (z, y, x): nothing to crop
    assert entry.spacing == pytest.approx((1.5, 1.5, 2.0))
    assert entry.source_shape == (48, 48, 40) and entry.source_spacing == pytest.approx((1.0, 1.0, 2.5))


def test_reorientation_makes_flipped_storage_equivalent(tmp_path):
    img = ct_volume(seed=3)
    arr = sitk.GetArrayFromImage(img)
    flipped = image_from_array(arr[::-1].copy(), img.GetSpacing())
    flipped.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    flipped.SetOrigin(img.TransformIndexToPhysicalPoint((0, 0, img.GetDepth() - 1)))
    write(img, tmp_path / "in" / "a.nii.gz")
    write(flipped, tmp_path / "in" / "b.nii.gz")
    manifest = build_cache(config([tmp_path / "in"], tmp_path / "cache"))
    a, b = (open_array(manifest.array_path(e))[...] for e in manifest.entries)
    np.testing.assert_array_equal(a, b)


def test_window_ct_values():
    hu = np.array([-2000, -500, -250, 0, 250, 500, 3000], dtype=np.float32)
    np.testing.assert_allclose(window_ct(hu, (-500, 500)), [0, 0, 0.25, 0.5, 0.75, 1, 1])


def test_ct_window_end_to_end(tmp_path):
    # Slabs of 6 slices at the target spacing (no interpolation): HU -> expected cached value.
    slabs = [(0, 0.5), (-1000, 0.0), (500, 1.0), (-500, 0.0), (1000, 1.0), (250, 0.75)]
    arr = np.concatenate([np.full((6, 32, 32), hu, dtype=np.int16) for hu, _ in slabs])
    write(image_from_array(arr, (1.5, 1.5, 2.0)), tmp_path / "in" / "slabs.nii.gz")
    manifest = build_cache(config([tmp_path / "in"], tmp_path / "cache"))
    entry = manifest.entries[0]
    assert entry.shape == (36, 32, 32)
    cached = open_array(manifest.array_path(entry))[...].astype(np.float32)
    for i, (_, value) in enumerate(slabs):
        np.testing.assert_allclose(cached[6 * i + 1 : 6 * i + 5], value, atol=1e-6)
    assert entry.stats["low"] == -500 and entry.stats["high"] == 500


def test_mr_percentile_scaling(tmp_path):
    assert mr_intensity_range(np.arange(1000, dtype=np.float32), (0.5, 99.5)) == pytest.approx((4.995, 994.005))
    write(mr_volume(), tmp_path / "in" / "t2.nii.gz")
    manifest = build_cache(config([tmp_path / "in"], tmp_path / "cache", modality="mr"))
    entry = manifest.entries[0]
    assert entry.status == "ok" and entry.modality == "mr"
    cached = open_array(manifest.array_path(entry))[...].astype(np.float32)
    assert cached.min() == 0.0 and cached.max() == 1.0  # both ends clipped
    assert 0.0 <= entry.stats["mean"] <= 1.0
    assert entry.stats["high"] < 1000  # the 5000 outlier is above the 99.5th percentile


def test_body_crop_removes_air_and_table(tmp_path):
    img = ct_volume(air_margin=8)
    arr = sitk.GetArrayFromImage(img)
    arr[:, 45:47, 2:38] = 50  # a thin "table" plate below the body, separated by air
    write(image_from_array(arr), tmp_path / "in" / "body.nii.gz")
    full = resample_to_spacing(img, (1.5, 1.5, 2.0)).GetSize()[::-1]
    manifest = build_cache(config([tmp_path / "in"], tmp_path / "cache", body_margin=0))
    entry = manifest.entries[0]
    # Body: z 8..40 of 48 slices at 2.5 mm -> 32 * 2.5 / 2 = 40; y 8..40 at 1 mm -> 32 / 1.5 ~ 21;
    # x 8..32 -> 24 / 1.5 = 16 (linear interpolation can add one voxel of partial volume per side).
    assert all(s < f for s, f in zip(entry.shape, full, strict=True))
    assert abs(entry.shape[0] - 40) <= 2 and abs(entry.shape[1] - 21) <= 2 and abs(entry.shape[2] - 16) <= 2
    cached = open_array(manifest.array_path(entry))[...].astype(np.float32)
    for axis in range(3):  # tight crop: the first and last slab along every axis hold body
        assert np.take(cached, 0, axis=axis).max() > 0 and np.take(cached, -1, axis=axis).max() > 0
    margin = build_cache(config([tmp_path / "in"], tmp_path / "cache_m", body_margin=3)).entries[0]
    assert margin.shape == tuple(s + 6 for s in entry.shape)


def test_body_bbox_keeps_large_components():
    mask = np.zeros((20, 20, 40), dtype=bool)
    mask[5:15, 5:15, 2:12] = True  # leg 1
    mask[5:15, 5:15, 20:29] = True  # leg 2, 90 % of leg 1
    mask[18, 0:2, 35:37] = True  # speck
    box = body_bbox(mask, margin=1)
    assert box == (slice(4, 16), slice(4, 16), slice(1, 30))
    assert body_bbox(np.zeros((4, 4, 4), dtype=bool), 1) is None

