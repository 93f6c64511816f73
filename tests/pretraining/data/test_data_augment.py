"""Scaling, rotation and mirroring of a view (pretraining/data/augment.py) and their place in the crop loader."""
from __future__ import annotations

import math

import blosc2
import numpy as np
import pytest
import torch
from test_data_helpers import config, ct_volume, write

from nnunet_ssl.pretraining.data import (
    CropTransform,
    SpatialAugmentation,
    ViewSampler,
    augment_view,
    build_cache,
    make_loader,
)
from nnunet_ssl.pretraining.data.augment import cut, rotation_matrix
from nnunet_ssl.pretraining.data.crops import CropDataset, crop_augmentation

C = 16
KEEP = (False, False, False)


def _coordinates(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel value = z * 10^4 + y * 10^2 + x: every voxel says where it is, and it is linear in z, y, x."""
    z, y, x = np.indices(shape)
    return (z * 10_000 + y * 100 + x).astype(np.float32)


VOLUME = _coordinates((40, 44, 48))


def test_identity_is_the_plain_crop_and_mirrors_flip_it_exactly() -> None:
    plain = VOLUME[3:19, 5:21, 7:23]
    np.testing.assert_array_equal(cut(VOLUME, (3, 5, 7), C, CropTransform(np.eye(3), KEEP)), plain)
    flipped = cut(VOLUME, (3, 5, 7), C, CropTransform(np.eye(3), (True, False, True)))
    np.testing.assert_array_equal(flipped, plain[::-1, :, ::-1])
    # past the volume: fill (0 here, the pad value of every crop)
    edge = cut(VOLUME, (30, -4, 40), C, CropTransform(np.eye(3), KEEP), fill=-7.0)
    assert np.all(edge[10:] == -7.0) and np.all(edge[:, :4] == -7.0) and np.all(edge[:, :, 8:] == -7.0)
    np.testing.assert_array_equal(edge[:10, 4:, :8], VOLUME[30:40, 0:12, 40:48])


def test_a_quarter_turn_about_z_is_numpys_rot90_of_the_plane() -> None:
    # source = centre + R u: a 90-degree rotation about z turns the (y, x) plane, as rot90 with k = -1
    quarter = CropTransform(rotation_matrix(np.radians([90.0, 0.0, 0.0])), KEEP)
    view = cut(VOLUME, (6, 8, 10), C, quarter)
    np.testing.assert_allclose(view, np.rot90(VOLUME[6:22, 8:24, 10:26], -1, axes=(1, 2)), atol=1e-2)


def test_scaling_samples_a_larger_region_about_the_same_centre() -> None:
    """Scale 1.5: output voxel o reads the source at centre + 1.5 (o - 7.5), with centre = origin + 7.5. On a
    volume whose value is its z (y, x) coordinate, linear interpolation returns that position exactly."""
    origin = np.array([12, 14, 16])
    scaled = CropTransform(1.5 * np.eye(3), KEEP)
    expected = origin + (C - 1) / 2 + 1.5 * (np.arange(C)[:, None] - (C - 1) / 2)  # (C, 3): per output index, per axis
    for axis in range(3):
        coordinate = np.indices(VOLUME.shape)[axis].astype(np.float32)
        view = cut(coordinate, origin, C, scaled)
        along = np.moveaxis(view, axis, 0).reshape(C, -1)
        np.testing.assert_allclose(along, np.repeat(expected[:, axis : axis + 1], C * C, axis=1), atol=1e-4)


def test_rotation_acts_in_millimetres_with_anisotropic_voxels() -> None:
    """Voxels of 2 mm along z and 1 mm in-plane: a quarter turn about x sends one z voxel (2 mm) to 2 y voxels."""
    augmentation = SpatialAugmentation(p_rotation=1.0, p_scale=0.0, p_mirror=0.0, spacing_zyx=(2.0, 1.0, 1.0))
    matrix = np.linalg.inv(np.diag([2.0, 1.0, 1.0])) @ rotation_matrix(np.radians([0.0, 0.0, 90.0])) @ np.diag([2.0, 1.0, 1.0])
    np.testing.assert_allclose(matrix @ [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], atol=1e-12)
    # draw() builds that form: check the matrix of a drawn rotation keeps lengths in mm
    drawn = augmentation.draw(np.random.default_rng(3))
    spacing = np.diag(augmentation.spacing_zyx)
    in_mm = spacing @ drawn.matrix @ np.linalg.inv(spacing)
    np.testing.assert_allclose(in_mm @ in_mm.T, np.eye(3), atol=1e-12)


def test_draws_follow_nnunets_probabilities_and_ranges() -> None:
    augmentation = SpatialAugmentation()
    rng = np.random.default_rng(0)
    draws = [augmentation.draw(rng) for _ in range(4000)]
    rotated = np.array([any(d.angles_deg) for d in draws])
    scales = np.array([d.scale for d in draws])
    flips = np.array([d.flips for d in draws])
    # binomial standard errors: sqrt(0.2 * 0.8 / 4000) = 0.0063, sqrt(0.25 / 4000) = 0.0079
    assert abs(rotated.mean() - 0.2) < 0.03 and abs((scales != 1.0).mean() - 0.2) < 0.03
    assert np.all(np.abs(flips.mean(axis=0) - 0.5) < 0.04)
    angles = np.array([d.angles_deg for d in draws if any(d.angles_deg)])
    assert np.all(np.abs(angles) <= 30.0) and angles.min() < -25 and angles.max() > 25
    scaled = scales[scales != 1.0]
    assert scaled.min() >= 0.7 and scaled.max() <= 1.4 and abs((scaled < 1).mean() - 0.5) < 0.1
    for d in draws[:50]:  # the matrix is the drawn scale times a rotation (isotropic voxels)
        np.testing.assert_allclose(d.matrix @ d.matrix.T, d.scale**2 * np.eye(3), atol=1e-12)
        assert d.resamples == (d.scale != 1.0 or any(d.angles_deg))
    nothing = SpatialAugmentation(p_rotation=0.0, p_scale=0.0, p_mirror=0.0).draw(np.random.default_rng(1))
    assert not nothing.resamples and nothing.flips == KEEP


def test_augment_view_is_a_function_of_the_array_and_the_generator() -> None:
    augmentation = SpatialAugmentation(p_rotation=1.0, p_scale=1.0)
    first = augment_view(VOLUME, (4, 4, 4), C, np.random.default_rng(11), augmentation)
    again = augment_view(VOLUME, (4, 4, 4), C, np.random.default_rng(11), augmentation)
    other = augment_view(VOLUME, (4, 4, 4), C, np.random.default_rng(12), augmentation)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (C, C, C) and first.dtype == np.float32 and not np.array_equal(first, other)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="p_scale must be a probability"):
        SpatialAugmentation(p_scale=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        SpatialAugmentation(scale_range=(1.2, 1.4))


def test_the_sampler_draws_the_same_positions_with_and_without_augmentation() -> None:
    """Augmentation is drawn after the origins: the views stay centred where the plain ones are, and
    without it the sampler is what it was (one read of the views' bounding box)."""
    volume = blosc2.asarray(VOLUME, chunks=(16, 16, 16), blocks=(8, 8, 8))
    plain, mirrored = ViewSampler(C, 24, 2), ViewSampler(C, 24, 2, SpatialAugmentation(0.0, 30.0, 0.0, (0.7, 1.4), 1.0))
    for seed in range(5):
        rng = np.random.default_rng(seed)
        expected = plain.read(volume, plain.origins(volume.shape, rng))
        np.testing.assert_array_equal(plain.sample(volume, np.random.default_rng(seed)), expected)
        np.testing.assert_array_equal(mirrored.sample(volume, np.random.default_rng(seed)), expected[..., ::-1, ::-1, ::-1])


def test_crop_augmentation_follows_the_data_config(tmp_path) -> None:
    assert crop_augmentation(config(["x"], tmp_path)) is None
    augmentation = crop_augmentation(config(["x"], tmp_path, augmentation="scale_rotate_mirror", spacing=(1.5, 1.25, 2.0)))
    assert augmentation == SpatialAugmentation(spacing_zyx=(2.0, 1.25, 1.5))
    with pytest.raises(ValueError, match="augmentation must be one of none, scale_rotate_mirror, got 'elastic'"):
        config(["x"], tmp_path, augmentation="elastic")


def test_the_augmented_stream_is_reproducible_and_resumes_in_place(tmp_path) -> None:
    """Loader batches with augmentation: the same for 0 or 2 workers, a loader started at step 2 yields
    the uninterrupted run's batch 2, and the batches differ from the plain ones."""
    write(ct_volume(seed=1), tmp_path / "in" / "a.nii.gz")
    write(ct_volume(seed=2), tmp_path / "in" / "b.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache", crop_size=24, augmentation="scale_rotate_mirror")
    manifest = build_cache(cfg)
    batches = [next(loader)["views"] for loader in [make_loader(manifest, cfg, 2, 1, seed=5)] for _ in range(3)]
    resumed = make_loader(manifest, cfg, 2, 1, seed=5, start_step=2)
    assert torch.equal(next(resumed)["views"], batches[2])
    workers = make_loader(manifest, config([tmp_path / "in"], tmp_path / "cache", crop_size=24, num_workers=2,
                                           augmentation="scale_rotate_mirror"), 2, 1, seed=5)
    try:
        assert all(torch.equal(next(workers)["views"], batch) for batch in batches)
    finally:
        workers.close()
    plain_cfg = config([tmp_path / "in"], tmp_path / "cache", crop_size=24)
    plain = make_loader(manifest, plain_cfg, 2, 1, seed=5)
    assert not all(torch.equal(next(plain)["views"], batch) for batch in batches)


def test_dataset_items_carry_their_augmentation(tmp_path) -> None:
    """CropDataset.sample keys the augmentation by (seed, rank, epoch, position), like the crop position."""
    path = str(tmp_path / "v.b2nd")
    smooth = np.random.default_rng(0).normal(size=VOLUME.shape).astype(np.float16)
    blosc2.asarray(smooth, urlpath=path, chunks=(16, 16, 16), blocks=(8, 8, 8))
    sampler = ViewSampler(C, C, 1, SpatialAugmentation(p_rotation=1.0, p_scale=1.0))
    dataset = CropDataset([path], sampler, seed=3)
    a, b = dataset.sample(0, 1, 0)["views"], dataset.sample(0, 1, 0)["views"]
    assert torch.equal(a, b) and not torch.equal(a, dataset.sample(0, 2, 0)["views"])
    assert math.isfinite(float(a.sum())) and a.shape == (1, 1, C, C, C)
