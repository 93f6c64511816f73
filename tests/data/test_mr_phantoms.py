"""The T1-like head phantoms (``make-phantoms --modality mr``): what makes them MR, and a dataset nnU-Net accepts."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.cli import build_parser
from nnunet_ssl.data.phantoms import (
    LABELS,
    MR_LABELS,
    PhantomConfig,
    PhantomPaths,
    _case_rng,
    generate_case,
    generate_mr_case,
    write_phantom_datasets,
)

SMALL_MR = PhantomConfig(num_train=2, num_test=1, num_unlabeled=4, shape=(32, 48, 48), seed=0, dataset_id=502,
                         dataset_name="PhantomMR", modality="mr")


@pytest.fixture(scope="module")
def mr_cases() -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    return [generate_mr_case(_case_rng(0, 0, j), (32, 48, 48)) for j in range(6)]


@pytest.fixture(scope="module")
def mr_dataset(tmp_path_factory: pytest.TempPathFactory) -> PhantomPaths:
    return write_phantom_datasets(tmp_path_factory.mktemp("mr_phantoms"), SMALL_MR)


def test_t1_contrast_in_every_case(mr_cases: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]) -> None:
    """Ventricles (CSF) < grey matter < white matter < scalp fat, as in T1; each structure present."""
    for image, label, _ in mr_cases:
        assert label.dtype == np.uint8 and set(np.unique(label).tolist()) == set(MR_LABELS.values())
        means = {name: float(image[label == value].mean()) for name, value in MR_LABELS.items() if value}
        assert means["ventricles"] < means["grey_matter"] < means["white_matter"]
        assert means["white_matter"] / means["grey_matter"] > 1.15
        assert np.percentile(image, 99.5) > 1.3 * means["white_matter"]  # scalp fat (and marrow) are brighter


def test_large_noisy_background_that_goes_negative(
    mr_cases: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]],
) -> None:
    for image, label, _ in mr_cases:
        corner = image[:, :6, :6]  # air: Rician noise with its mean removed
        assert abs(float(corner.mean())) < 0.2 * float(corner.std())
        assert 0.3 < float((corner < 0).mean()) < 0.7
        assert 0.2 < float((image < 0).mean()) < 0.6  # much of the volume is background
        assert (label > 0).mean() < 0.4


def test_gains_differ_between_cases(mr_cases: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]) -> None:
    white = [float(image[label == MR_LABELS["white_matter"]].mean()) for image, label, _ in mr_cases]
    assert max(white) / min(white) > 1.5  # scanners differ: one shared window cannot fit every case


def test_deterministic_and_ct_untouched() -> None:
    a = generate_mr_case(np.random.default_rng(5), (32, 48, 48))
    b = generate_mr_case(np.random.default_rng(5), (32, 48, 48))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    ct = generate_case(np.random.default_rng(5), (32, 48, 48))
    assert ct[0].min() < -900 and set(np.unique(ct[1]).tolist()) <= set(LABELS.values())
    assert "modality" not in PhantomConfig().to_json()  # CT datasets written before the MR mode still match
    assert SMALL_MR.to_json()["modality"] == "mr"
    with pytest.raises(ValueError, match="modality must be one of"):
        PhantomConfig(modality="pet")


def test_mr_dataset_layout(mr_dataset: PhantomPaths) -> None:
    assert mr_dataset.dataset_dir.name == "Dataset502_PhantomMR"
    meta = json.loads((mr_dataset.dataset_dir / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "T1"} and meta["labels"] == MR_LABELS
    assert meta["phantom_config"] == SMALL_MR.to_json() and "T1-like head" in meta["description"]
    image = sitk.ReadImage(str(mr_dataset.dataset_dir / "imagesTr" / "Phantom_000_0000.nii.gz"))
    label = sitk.ReadImage(str(mr_dataset.dataset_dir / "labelsTr" / "Phantom_000.nii.gz"))
    assert image.GetSize() == label.GetSize() and np.allclose(image.GetSpacing(), label.GetSpacing())
    expected, expected_label, spacing = generate_mr_case(_case_rng(0, 0, 0), (32, 48, 48))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected_label)
    assert np.allclose(image.GetSpacing(), spacing)
    pool = sorted(mr_dataset.unlabeled_dir.glob("*.nii.gz"))
    assert len(pool) == 4 and (sitk.GetArrayFromImage(sitk.ReadImage(str(pool[0]))) < 0).any()
    assert write_phantom_datasets(mr_dataset.raw_root.parent, SMALL_MR) == mr_dataset  # same config: reused
    with pytest.raises(FileExistsError):
        write_phantom_datasets(mr_dataset.raw_root.parent, replace(SMALL_MR, modality="ct"))


def test_nnunet_verify_dataset_integrity(mr_dataset: PhantomPaths) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(mr_dataset.dataset_dir), num_processes=1)


def test_make_phantoms_modality_option(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["make-phantoms", "--out", str(tmp_path), "--modality", "mr"])
    assert args.modality == "mr" and args.dataset_id is None  # cmd_make_phantoms: 502, Dataset502_PhantomMR
    assert parser.parse_args(["make-phantoms", "--out", str(tmp_path)]).modality == "ct"
