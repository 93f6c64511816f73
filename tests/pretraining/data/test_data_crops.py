"""Crops and views from the cache: geometry, overlap, values, determinism, ranks, workers."""
from __future__ import annotations

import itertools

import blosc2
import numpy as np
import pytest
import torch
from test_data_helpers import config, ct_volume, write

from nnunet_ssl.pretraining.data import (
    ViewSampler,
    build_cache,
    make_loader,
    steps_per_epoch,
)
from nnunet_ssl.pretraining.data.crops import epoch_share

C, R = 32, 48


def _coordinates(shape):
    """Voxel value = 1 + z * 10^4 + y * 10^2 + x: every voxel says where it is (exact in float32)."""
    z, y, x = np.indices(shape)
    return (1 + z * 10_000 + y * 100 + x).astype(np.float32)


def _decode(value):
    v = int(value) - 1
    return np.array([v // 10_000, v // 100 % 100, v % 100])


@pytest.mark.parametrize("num_views", [1, 2, 4])
def test_views_are_exact_crops_inside_one_region(num_views):
    shape = (70, 60, 50)
    volume = blosc2.asarray(_coordinates(shape), chunks=(16, 16, 16), blocks=(8, 8, 8))
    sampler = ViewSampler(C, R, num_views)
    rng = np.random.default_rng(0)
    for _ in range(50):
        views = sampler.sample(volume, rng)
        assert views.shape == (num_views, 1, C, C, C) and views.dtype == np.float32
        origins = np.array([_decode(v[0, 0, 0, 0]) for v in views])
        for v, o in zip(views, origins, strict=True):
            np.testing.assert_array_equal(v[0], _coordinates(shape)[o[0] : o[0] + C, o[1] : o[1] + C, o[2] : o[2] + C])
        if num_views > 1:
            # All views fit in one R^3 region, so any two overlap by >= 2C - R voxels per axis.
            assert np.all(origins.max(axis=0) - origins.min(axis=0) + C <= R)
            for a, b in itertools.combinations(origins, 2):
                assert np.all(C - np.abs(a - b) >= 2 * C - R)


def test_small_volume_is_zero_padded_and_kept_whole():
    shape = (20, 40, 60)  # axis 0 shorter than a crop, axis 1 shorter than the region
    coords = _coordinates(shape)
    sampler = ViewSampler(C, R, 2)
    rng = np.random.default_rng(1)
    for _ in range(50):
        for view in sampler.sample(coords, rng)[:, 0]:
            inside = view > 0
            # All 20 slices are in the view, padded along z only (the other axes are long enough).
            assert inside.sum() == 20 * C * C
            values = view[inside]
            assert (_decode(values.min())[0], _decode(values.max())[0]) == (0, 19)


@pytest.fixture(scope="module")
def manifest_and_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    for i in range(4):
        write(ct_volume(size_xyz=(56, 56, 48), seed=i), root / "in" / f"v{i}.nii.gz")
    write(ct_volume(size_xyz=(30, 30, 14), air_margin=0, seed=9), root / "in" / "small.nii.gz")
    cfg = config([root / "in"], root / "cache")
    return build_cache(cfg), cfg


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_format_and_values(manifest_and_config):
    manifest, cfg = manifest_and_config
    loader = make_loader(manifest, cfg, batch_size=3, num_views=2, seed=0)
    assert loader.steps_per_epoch == 2  # ceil(5 / 3)
    for batch in _take(loader, 4):
        assert set(batch) == {"views", "index"}
        assert batch["views"].shape == (3, 2, 1, C, C, C) and batch["views"].dtype == torch.float32
        assert batch["index"].shape == (3,) and batch["index"].dtype == torch.int64
        assert 0.0 <= batch["views"].min() and batch["views"].max() <= 1.0
        assert all(0 <= i < len(manifest.usable()) for i in batch["index"].tolist())
    # One epoch visits every volume once (5 volumes, batches of 3 -> the last one wraps around).
    first_epoch = torch.cat([b["index"] for b in _take(make_loader(manifest, cfg, 5, 1, seed=3), 1)])
    assert sorted(first_epoch.tolist()) == [0, 1, 2, 3, 4]


def test_deterministic_per_seed(manifest_and_config):
    manifest, cfg = manifest_and_config
    a = _take(make_loader(manifest, cfg, 2, 2, seed=7), 3)
    b = _take(make_loader(manifest, cfg, 2, 2, seed=7), 3)
    c = _take(make_loader(manifest, cfg, 2, 2, seed=8), 3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["views"], y["views"]) and torch.equal(x["index"], y["index"])
    assert not all(torch.equal(x["views"], z["views"]) for x, z in zip(a, c, strict=True))


def test_ranks_see_different_volumes(manifest_and_config):
    manifest, cfg = manifest_and_config
    for epoch in range(5):
        shares = [set(epoch_share(5, epoch, seed=0, rank=r, world_size=2).tolist()) for r in range(2)]
        assert shares[0] | shares[1] == set(range(5))
        assert len(shares[0] & shares[1]) <= 1  # 5 volumes over 2 ranks: one wraps around
    r0 = _take(make_loader(manifest, cfg, 1, 2, seed=0, rank=0, world_size=2), 3)
    r1 = _take(make_loader(manifest, cfg, 1, 2, seed=0, rank=1, world_size=2), 3)
    assert [b["index"].item() for b in r0] != [b["index"].item() for b in r1]
    assert not any(torch.equal(x["views"], y["views"]) for x, y in zip(r0, r1, strict=True))
    with pytest.raises(ValueError):
        make_loader(manifest, cfg, 1, 2, seed=0, rank=2, world_size=2)


def test_two_workers_give_the_same_samples(manifest_and_config):
    manifest, cfg = manifest_and_config
    serial = _take(make_loader(manifest, cfg, 2, 2, seed=5), 4)
    workers = make_loader(manifest, config(cfg.inputs, cfg.cache_dir, num_workers=2), 2, 2, seed=5)
    parallel = _take(workers, 4)
    workers.close()

    def samples(batches):
        return sorted(
            (int(i), round(float(v.sum()), 2)) for b in batches for i, v in zip(b["index"], b["views"], strict=True)
        )

    assert samples(serial) == samples(parallel)


def test_steps_per_epoch():
    assert steps_per_epoch(10, 2, 1) == 5 and steps_per_epoch(10, 2, 4) == 2 and steps_per_epoch(1, 8, 8) == 1
    with pytest.raises(ValueError):
        steps_per_epoch(0, 1, 1)
    with pytest.raises(ValueError):
        ViewSampler(96, 64, 2)


def test_a_loader_started_at_step_j_yields_the_uninterrupted_batches_from_j(manifest_and_config):
    manifest, cfg = manifest_and_config
    uninterrupted = _take(make_loader(manifest, cfg, 2, 2, seed=5), 6)
    resumed = _take(make_loader(manifest, cfg, 2, 2, seed=5, start_step=3), 3)
    workers = make_loader(manifest, config(cfg.inputs, cfg.cache_dir, num_workers=2), 2, 2, seed=5, start_step=3)
    resumed_workers = _take(workers, 3)
    workers.close()
    for expected, got, got_workers in zip(uninterrupted[3:], resumed, resumed_workers, strict=True):
        assert torch.equal(expected["index"], got["index"]) and torch.equal(expected["views"], got["views"])
        assert torch.equal(expected["views"], got_workers["views"])  # same batches in the same order
