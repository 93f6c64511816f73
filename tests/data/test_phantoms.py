"""Tests for the synthetic CT phantom generator (``nnunet_ssl.data.phantoms``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ssl.data.phantoms import (
    LABELS,
    SLICE_SPACINGS_MM,
    PhantomConfig,
    PhantomPaths,
    generate_case,
    write_phantom_datasets,
)

SMALL = PhantomConfig(num_train=3, num_test=1, num_unlabeled=4, shape=(32, 48, 48), seed=0)
ORGANS = ("liver", "spleen", "kidney")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> PhantomPaths:
    return write_phantom_datasets(tmp_path_factory.mktemp("phantoms"), SMALL)


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _pairs(paths: PhantomPaths, split: str) -> list[tuple[Path, Path]]:
    images = sorted((paths.dataset_dir / f"images{split}").glob("*.nii.gz"))
    return [(p, paths.dataset_dir / f"labels{split}" / p.name.replace("_0000.nii.gz", ".nii.gz")) for p in images]


def test_layout_and_dataset_json(small_dataset: PhantomPaths) -> None:
    paths = small_dataset
    assert paths.dataset_dir == paths.raw_root / "Dataset501_Phantom"
    assert paths.raw_root.name == "nnUNet_raw"
    ds = paths.dataset_dir
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == [f"Phantom_{i:03d}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [f"Phantom_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == ["Phantom_003_0000.nii.gz"]
    assert sorted(p.name for p in (ds / "labelsTs").iterdir()) == ["Phantom_003.nii.gz"]
    assert sorted(p.name for p in paths.unlabeled_dir.glob("*.nii.gz")) == [
        f"Unlabeled_{i:03d}.nii.gz" for i in range(4)
    ]

    meta = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == LABELS
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    assert meta["name"] == "Phantom" and meta["description"]
    assert meta["phantom_config"] == SMALL.to_json()
    assert not any(p.name.startswith(".") for p in paths.raw_root.iterdir()), "temporary folder left behind"


def test_images_and_labels_agree(small_dataset: PhantomPaths) -> None:
    for split in ("Tr", "Ts"):
        for image_path, label_path in _pairs(small_dataset, split):
            image, img = _read(image_path)
            label, lab = _read(label_path)
            assert img.GetSize() == lab.GetSize()
            assert np.allclose(img.GetSpacing(), lab.GetSpacing())
            assert np.allclose(img.GetOrigin(), lab.GetOrigin())
            assert np.allclose(img.GetDirection(), np.eye(3).ravel())
            assert np.allclose(lab.GetDirection(), np.eye(3).ravel())
            assert image.dtype == np.float32 and np.isfinite(image).all()
            assert label.dtype == np.uint8
            assert set(np.unique(label).tolist()) <= set(LABELS.values())
            assert -1024 <= image.min() < -900 and image.max() > 300  # air and bone present
            if split == "Tr":
                for organ in ORGANS:
                    assert (label == LABELS[organ]).any(), f"{organ} missing in {label_path.name}"


def test_unlabeled_pool(small_dataset: PhantomPaths) -> None:
    sizes = set()
    for path in sorted(small_dataset.unlabeled_dir.glob("*.nii.gz")):
        image, img = _read(path)
        assert image.dtype == np.float32 and np.isfinite(image).all()
        sizes.add(img.GetSize()[:2])
    assert (48, 48) in sizes and len(sizes) > 1  # every fourth case has another field of view
    assert not list(small_dataset.unlabeled_dir.glob("*labels*"))


def test_nnunet_verify_dataset_integrity(small_dataset: PhantomPaths) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(small_dataset.dataset_dir), num_processes=1)


def test_generate_case_is_deterministic() -> None:
    a = generate_case(np.random.default_rng(123), (32, 48, 48))
    b = generate_case(np.random.default_rng(123), (32, 48, 48))
    c = generate_case(np.random.default_rng(124), (32, 48, 48))
    assert a[2] == b[2]
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_datasets_are_reproducible(small_dataset: PhantomPaths, tmp_path: Path) -> None:
    again = write_phantom_datasets(tmp_path / "same", SMALL)
    other = write_phantom_datasets(tmp_path / "other", replace(SMALL, seed=1))
    for (img_a, lab_a), (img_b, lab_b), (img_c, _) in zip(
        _pairs(small_dataset, "Tr"), _pairs(again, "Tr"), _pairs(other, "Tr"), strict=True
    ):
        assert np.array_equal(_read(img_a)[0], _read(img_b)[0])
        assert np.array_equal(_read(lab_a)[0], _read(lab_b)[0])
        a, c = _read(img_a)[0], _read(img_c)[0]
        assert a.shape != c.shape or not np.array_equal(a, c)
    for name in ("Unlabeled_000.nii.gz", "Unlabeled_003.nii.gz"):
        assert np.array_equal(_read(small_dataset.unlabeled_dir / name)[0], _read(again.unlabeled_dir / name)[0])


def test_unlabeled_stream_differs_from_labelled(small_dataset: PhantomPaths) -> None:
    train = _read(small_dataset.dataset_dir / "imagesTr" / "Phantom_000_0000.nii.gz")[0]
    pool = _read(small_dataset.unlabeled_dir / "Unlabeled_000.nii.gz")[0]
    assert train.shape != pool.shape or not np.array_equal(train, pool)


def _organ_voxels(paths: PhantomPaths) -> dict[str, np.ndarray]:
    values: dict[str, list[np.ndarray]] = {organ: [] for organ in ORGANS}
    for image_path, label_path in _pairs(paths, "Tr"):
        image, label = _read(image_path)[0], _read(label_path)[0]
        for organ in ORGANS:
            values[organ].append(image[label == LABELS[organ]])
    return {organ: np.concatenate(v) for organ, v in values.items()}


def test_organ_intensities_overlap(small_dataset: PhantomPaths) -> None:
    """The 5-95 percentile HU ranges of liver, spleen and kidney intersect: thresholding cannot solve it."""
    ranges = {organ: np.percentile(v, [5, 95]) for organ, v in _organ_voxels(small_dataset).items()}
    for i, a in enumerate(ORGANS):
        for b in ORGANS[i + 1 :]:
            lo, hi = max(ranges[a][0], ranges[b][0]), min(ranges[a][1], ranges[b][1])
            assert hi - lo > 10.0, f"{a} {ranges[a]} and {b} {ranges[b]} barely overlap"
    for organ, (lo, hi) in ranges.items():
        assert -60 < lo < hi < 160, f"{organ} range {lo, hi} is not soft-tissue like"


def test_noise_inside_organs(small_dataset: PhantomPaths) -> None:
    for image_path, label_path in _pairs(small_dataset, "Tr"):
        image, label = _read(image_path)[0], _read(label_path)[0]
        core = ndimage.binary_erosion(label == LABELS["liver"], iterations=1)
        assert core.sum() > 50
        assert image[core].std() > 5.0
        assert 30.0 < float(np.median(image[core])) < 90.0


def test_partial_volume_edges() -> None:
    """Liver boundary voxels are blended with their surroundings: ring < edge < core (pooled HU means)."""
    ring_v, edge_v, core_v = [], [], []
    for seed in range(4):
        image, label, _ = generate_case(np.random.default_rng(seed), (32, 64, 64))
        liver = label == LABELS["liver"]
        ring_v.append(image[ndimage.binary_dilation(liver) & ~liver & (label == 0)])
        edge_v.append(image[liver & ~ndimage.binary_erosion(liver)])
        core_v.append(image[ndimage.binary_erosion(liver, iterations=2)])
    ring, edge, core = (float(np.concatenate(v).mean()) for v in (ring_v, edge_v, core_v))
    assert ring + 10.0 < edge < core - 5.0


def test_spacing_varies_and_anatomy_is_fixed_in_mm() -> None:
    shape = (32, 48, 48)
    seen_z, seen_xy = set(), set()
    for seed in range(12):
        image, label, (sx, sy, sz) = generate_case(np.random.default_rng(seed), shape)
        assert image.shape == label.shape and image.shape[1:] == shape[1:]
        assert sx == sy and 0.8 <= sx <= 1.2
        assert sz in SLICE_SPACINGS_MM
        assert abs(image.shape[0] * sz - shape[0] * 2.0) <= sz  # same craniocaudal extent in mm
        seen_z.add(sz)
        seen_xy.add(round(sx, 3))
    assert len(seen_z) >= 3 and len(seen_xy) >= 6


def test_lesions_sit_inside_the_liver() -> None:
    n_with_lesion = 0
    for seed in range(10):
        _, label, _ = generate_case(np.random.default_rng(seed), (32, 64, 64))
        lesion = label == LABELS["lesion"]
        if not lesion.any():
            continue
        n_with_lesion += 1
        ring = ndimage.binary_dilation(lesion) & ~lesion
        neighbours = label[ring]
        assert np.isin(neighbours, [LABELS["liver"], LABELS["lesion"]]).mean() > 0.6
    assert 2 <= n_with_lesion <= 10


def test_idempotent_and_refuses_other_config(small_dataset: PhantomPaths) -> None:
    out_dir = small_dataset.raw_root.parent
    meta = small_dataset.dataset_dir / "dataset.json"
    before = meta.stat().st_mtime_ns
    assert write_phantom_datasets(out_dir, SMALL) == small_dataset
    assert meta.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="Dataset501_Phantom"):
        write_phantom_datasets(out_dir, replace(SMALL, seed=1))
    with pytest.raises(FileExistsError, match="Dataset501_Phantom"):
        write_phantom_datasets(out_dir, replace(SMALL, num_train=2))
    assert json.loads(meta.read_text(encoding="utf-8"))["phantom_config"] == SMALL.to_json()


def test_refuses_foreign_folders(tmp_path: Path) -> None:
    foreign = tmp_path / "a" / "nnUNet_raw" / "Dataset501_Phantom"
    foreign.mkdir(parents=True)
    (foreign / "dataset.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError, match="Dataset501_Phantom"):
        write_phantom_datasets(tmp_path / "a", SMALL)
    pool = tmp_path / "b" / "unlabeled"
    pool.mkdir(parents=True)
    (pool / "something.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="unlabeled"):
        write_phantom_datasets(tmp_path / "b", SMALL)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PhantomConfig(shape=(8, 48, 48))
    with pytest.raises(ValueError):
        PhantomConfig(num_train=0)
    with pytest.raises(ValueError):
        PhantomConfig(dataset_name="bad name")
    assert PhantomConfig(shape=[32, 48, 48]).shape == (32, 48, 48)  # type: ignore[arg-type]
