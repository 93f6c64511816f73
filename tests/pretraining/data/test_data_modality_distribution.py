"""CT or MR from the shape of the intensity distribution (issue 20), not from the sign.

Noisy MR with signed background noise (about 38 % negative voxels, noise wide enough to reach
-1000) must be MR; CT with padding borders or stored unsigned with a rescale intercept must be CT;
CT without its air peak and pure noise stay ambiguous.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_data_helpers import by_name, config

from nnunet_ssl.data.phantoms import generate_case, generate_mr_case
from nnunet_ssl.pretraining.data import build_cache
from nnunet_ssl.pretraining.data.config import MODALITY_DETECTION_VERSION, DataConfig
from nnunet_ssl.pretraining.data.modality import AIR_HU, detect_modality, drop_padding, hounsfield_evidence
from nnunet_ssl.pretraining.data.preprocess import preprocess_source
from nnunet_ssl.pretraining.data.sources import Source

SHAPE = (40, 48, 40)


def _radius(shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = (np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
               - np.array(shape, dtype=np.float32)[:, None, None, None] / 2)
    scale = np.array(shape, dtype=np.float32) * 0.4
    return np.sqrt((z / scale[0]) ** 2 + (y / scale[1]) ** 2 + (x / scale[2]) ** 2)


def signed_mr(seed: int = 0, gain: float = 1.0, sigma: float = 12.0) -> np.ndarray:
    """T1-like head (scalp fat 700, skull 60, CSF 120, grey 330, white 420) plus real-valued Gaussian noise.

    The noise is not a magnitude: the background (about 73 % of the box) is negative half the time.
    """
    rng = np.random.default_rng(seed)
    r = _radius(SHAPE)
    image = np.zeros(SHAPE, np.float32)
    for radius, value in ((1.0, 700.0), (0.93, 60.0), (0.88, 120.0), (0.84, 330.0), (0.6, 420.0)):
        image[r < radius] = value
    return (gain * (image + rng.normal(0.0, sigma, SHAPE))).astype(np.float32)


def ct_hu(seed: int = 0) -> np.ndarray:
    """Abdomen-like CT in HU: air outside, fat ring, soft tissue, bowel gas, a spine; 15 HU noise, int16."""
    rng = np.random.default_rng(seed)
    r = _radius(SHAPE)
    image = np.full(SHAPE, -1000.0)
    image[r < 1.0] = -100.0  # subcutaneous fat
    image[r < 0.85] = 45.0  # organs and muscle
    z, y, x = np.indices(SHAPE)
    image[(r < 0.5) & ((y - 20) ** 2 + (x - 16) ** 2 < 9)] = -950.0  # bowel gas
    image[(r < 0.85) & ((y - 34) ** 2 + (x - 20) ** 2 < 12)] = 700.0  # vertebral body
    return np.round(image + rng.normal(0.0, 15.0, SHAPE)).astype(np.int16)


def test_noisy_mr_with_38_percent_negative_voxels_is_mr() -> None:
    image = signed_mr()
    negative = float(np.mean(image < 0))
    assert 0.34 < negative < 0.42  # the brain MRI: about 38 %
    modality, why = detect_modality(image)
    assert modality == "mr", why
    assert "noise around zero" in why and f"{negative:.0%} negative" in why


def test_mr_noise_reaching_minus_1000_is_not_air() -> None:
    # gain 30: noise of sd 360 puts ~1 % of the voxels in the CT air band, enough for the sign-and-band rule of
    # version 1 to call it CT; they are the flank of a peak at zero, not a peak of their own
    image = signed_mr(gain=30.0)
    evidence = hounsfield_evidence(image.reshape(-1))
    assert evidence.air >= 0.005 and evidence.air_peak < 1.0
    assert detect_modality(image)[0] == "mr"


@pytest.mark.parametrize("border", [0.0, -3024.0])
def test_mr_with_a_padding_border_is_mr(border: float) -> None:
    image = signed_mr(seed=1)
    image[:5] = border
    image[:, :4] = border
    modality, why = detect_modality(image)
    assert modality == "mr", why
    if border < 0:
        assert "padding -3024 left out" in why


def test_magnitude_mr_is_mr_with_the_old_wording() -> None:
    image = np.abs(signed_mr(seed=2))
    modality, why = detect_modality(image)
    assert modality == "mr" and "no negative values" in why


@pytest.mark.parametrize("border", [None, -3024, -2048, -1024, 0])
def test_ct_with_padding_borders_is_ct(border: int | None) -> None:
    image = ct_hu()
    if border is not None:
        image[:, :6] = border  # outside the scanner's field of view
    modality, why = detect_modality(image)
    assert modality == "ct", why
    assert "air near -1000 HU" in why and "bone above +300 HU" in why
    if border in (-3024, -2048):
        assert f"padding {border} left out" in why


def test_padding_is_the_bottom_value_outside_the_air_band() -> None:
    values = np.concatenate([np.full(50, -3024.0), np.arange(950.0)])
    kept, padding = drop_padding(values)
    assert padding == -3024.0 and kept.size == 950
    air_fill = np.concatenate([np.full(50, -1024.0), np.arange(950.0)])
    assert drop_padding(air_fill)[1] is None  # -1024 is air to a CT reader
    assert AIR_HU[0] <= -1024 <= AIR_HU[1]


def test_noise_free_ct_with_exact_air_is_ct() -> None:
    # a synthetic CT whose air is exactly -1000 everywhere (no noise, no bone) is still CT: the air is a peak
    rng = np.random.default_rng(0)
    values = np.concatenate([np.full(2000, -1000.0), rng.normal(40.0, 10.0, 8000)])
    assert detect_modality(values)[0] == "ct"


def test_ct_without_air_is_not_taken_for_mr() -> None:
    # CT cropped inside the body: its values near zero are fat and soft tissue, not noise far below the tissue
    body = ct_hu()[14:26, 24:34, 14:26]  # organs and spine; no gas
    assert np.mean(body < -800) < 0.005
    modality, why = detect_modality(body)
    assert modality is None and "--modality" in why
    for seed in range(3):  # crops of the abdominal phantoms: fat, organs, vessels, bone, no air
        ct = generate_case(np.random.default_rng(seed), (32, 64, 64))[0]
        crop = ct[:, 20:44, 20:44]
        assert np.mean(crop < -800) < 0.005 and np.mean(crop < 0) > 0.3
        assert detect_modality(crop)[0] is None


def test_the_mr_phantoms_are_mr() -> None:
    # make-phantoms --modality mr: Rician noise with the air's mean subtracted, about a third of the voxels negative
    for seed in range(3):
        image = generate_mr_case(np.random.default_rng(seed), (32, 48, 48))[0]
        assert np.mean(image < 0) > 0.25
        modality, why = detect_modality(image)
        assert modality == "mr" and "noise around zero" in why, why


def test_mr_too_noisy_to_tell_is_neither() -> None:
    # noise of sd 1200 under tissue of 600 to 7000: 7 % of the voxels in the CT air band and "bone" above 300,
    # but the values cluster around zero: not CT, and the tissue is not far enough above the noise for MR
    image = signed_mr(gain=10.0, sigma=120.0)
    assert hounsfield_evidence(image.reshape(-1)).air > 0.05
    assert detect_modality(image)[0] is None


def test_unsigned_ct_with_a_rescale_intercept_reads_as_hu(tmp_path) -> None:
    # stored as uint16 with scl_inter -1024, as DICOM converters write it: the reader applies the intercept
    hu = ct_hu(seed=3)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint16)
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16).transpose(2, 1, 0)  # NIfTI's (x, y, z)
    image = nib.Nifti1Image(stored, np.diag([1.0, 1.0, 2.0, 1.0]), header)
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "ct_unsigned.nii.gz"
    nib.save(image, str(path))
    assert nib.load(str(path)).get_data_dtype() == np.uint16
    cfg = DataConfig(inputs=(str(path),), cache_dir=str(tmp_path / "cache"), spacing=(2.0, 2.0, 2.0), min_size=8)
    result = preprocess_source(Source(key=str(path), path=str(path), kind="nifti", modality="auto"), cfg)
    assert result.modality == "ct" and "air near -1000 HU" in (result.modality_decision or "")
    assert result.stats["source_min"] < -900


def test_raw_unsigned_ct_without_intercept_is_taken_as_mr_and_says_so() -> None:
    # a reader that ignored the intercept: air near 24, soft tissue near 1024, bone near 1700
    raw = (ct_hu(seed=4).astype(np.int32) + 1024).clip(0).astype(np.uint16)
    modality, why = detect_modality(raw)
    assert modality == "mr"
    assert "without its rescale intercept" in why and "scl_inter" in why
    # the same values as floats with a fraction are not flagged (CT stored unsigned is whole numbers)
    assert "intercept" not in detect_modality(raw.astype(np.float32) + 0.25)[1]


def test_pure_noise_stays_ambiguous() -> None:
    modality, why = detect_modality(np.random.default_rng(0).normal(0, 100, (20, 20, 20)))
    assert modality is None and "not MR noise around zero" in why


def test_detection_version_is_in_the_cache_key_and_decides_a_folder(tmp_path) -> None:
    assert MODALITY_DETECTION_VERSION >= 2
    cfg = config([tmp_path], tmp_path / "c")
    assert cfg.preprocessing_params("auto")["modality_detection"] == MODALITY_DETECTION_VERSION
    import SimpleITK as sitk

    for name, array in (("t1_signed.nii.gz", signed_mr(seed=5)), ("ct.nii.gz", ct_hu(seed=5))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.5, 1.5, 2.0))
        (tmp_path / "in").mkdir(exist_ok=True)
        sitk.WriteImage(image, str(tmp_path / "in" / name))
    entries = by_name(build_cache(config([tmp_path / "in"], tmp_path / "cache", min_size=8)))
    assert entries["t1_signed.nii.gz"].modality == "mr" and entries["t1_signed.nii.gz"].status == "ok"
    assert entries["ct.nii.gz"].modality == "ct"


def test_air_and_bone_without_a_peak_or_mr_noise_is_ct() -> None:
    # flat slabs: the -1000 HU slab is no denser than the -500 HU one, but air and bone with no noise around zero
    slabs = np.concatenate([np.full((6, 16, 16), hu, dtype=np.int16) for hu in (0, -1000, 500, -500, 1000, 250)])
    modality, why = detect_modality(slabs)
    assert modality == "ct" and "(no peak)" in why
