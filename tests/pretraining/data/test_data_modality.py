"""Volumes without modality information: CT or MR decided from the intensities, loudly; ambiguous ones refused."""
from __future__ import annotations

import numpy as np
import pytest
from test_data_helpers import by_name, config, ct_volume, image_from_array, write

from nnunet_ssl.pretraining.data import build_cache
from nnunet_ssl.pretraining.data.modality import detect_modality


def mr_volume(seed: int = 0, gain: float = 1.0) -> np.ndarray:
    """(z, y, x) MR-like magnitude image: noisy background, a head of grey/white matter, a bright rim."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:40, :56, :56]
    r = np.sqrt(((z - 20) / 17.0) ** 2 + ((y - 28) / 24.0) ** 2 + ((x - 28) / 22.0) ** 2)
    image = np.where(r < 1, 300.0, 0.0) + np.where(r < 0.7, 150.0, 0.0) + np.where((r > 0.92) & (r < 1), 500.0, 0.0)
    noise = rng.normal(0, 15, (2, *image.shape))
    return (gain * np.hypot(image + noise[0], noise[1])).astype(np.float32)  # Rician magnitude, >= 0


def test_detect_modality_rules() -> None:
    from test_data_helpers import sitk

    ct = sitk.GetArrayFromImage(ct_volume(seed=1))
    assert detect_modality(ct)[0] == "ct" and "air near -1000 HU" in detect_modality(ct)[1]
    assert detect_modality(mr_volume())[0] == "mr"
    ambiguous = np.random.default_rng(0).normal(0, 100, (20, 20, 20))  # negative values, no air
    modality, why = detect_modality(ambiguous)
    assert modality is None and "--modality" in why


def test_mr_folder_without_metadata_is_detected_as_mr_and_said_loudly(tmp_path, caplog) -> None:
    for i in range(2):
        write(image_from_array(mr_volume(i, gain=1.0 + i)), tmp_path / "in" / f"t1_{i}.nii.gz")
    write(ct_volume(seed=3), tmp_path / "in" / "ct.nii.gz")
    write(image_from_array(np.random.default_rng(0).normal(0, 100, (40, 48, 48)).astype(np.float32)),
          tmp_path / "in" / "odd.nii.gz")
    with caplog.at_level("WARNING"):
        manifest = build_cache(config([tmp_path / "in"], tmp_path / "cache"))
    entries = by_name(manifest)
    assert [entries[f"t1_{i}.nii.gz"].modality for i in range(2)] == ["mr", "mr"]
    assert entries["ct.nii.gz"].modality == "ct"
    assert entries["odd.nii.gz"].status == "skipped" and entries["odd.nii.gz"].reason == "modality unknown"
    assert "no negative values" in entries["t1_0.nii.gz"].modality_decision
    text = caplog.text
    assert "no modality information" in text and "2 MR" in text and "t1_1.nii.gz: MR" in text
    # MR uses the paper's per-image 5th/95th percentiles
    stats = entries["t1_1.nii.gz"].stats
    assert stats["low"] < stats["high"]
    # --modality decides instead, and the ambiguous volume is then used
    forced = by_name(build_cache(config([tmp_path / "in"], tmp_path / "cache2", modality="mr")))
    assert forced["odd.nii.gz"].status == "ok" and forced["ct.nii.gz"].modality == "mr"
    assert forced["t1_0.nii.gz"].modality_decision is None


@pytest.mark.parametrize("percentiles", [(5.0, 95.0)])
def test_mr_default_percentiles_are_the_papers(percentiles, tmp_path) -> None:
    assert config([tmp_path], tmp_path / "c").mr_percentiles == percentiles
