"""A DICOM series whose slices are not evenly spaced (a missing slice, a change of spacing) is skipped
with the gaps and where they change; a reader would stack it at one average spacing, stretched.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import SimpleITK as sitk
from test_data_helpers import by_name, config, ct_volume, write_dicom_series

from nnunet_ssl.pretraining.data import SkipVolume, build_cache, summarize
from nnunet_ssl.pretraining.data.preprocess import check_slice_positions


def _retag_positions(folder: str, shift_from: int, shift_mm: float) -> None:
    """Move slices ``shift_from`` and above by ``shift_mm`` along z (a change of slice spacing)."""
    for name in sorted(os.listdir(folder))[shift_from:]:
        path = os.path.join(folder, name)
        image = sitk.ReadImage(path)
        x, y, z = (float(v) for v in image.GetMetaData("0020|0032").split("\\"))
        image.SetMetaData("0020|0032", f"{x}\\{y}\\{z + shift_mm}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(path)
        writer.Execute(image)


def test_a_dicom_series_with_a_missing_slice_or_uneven_spacing_is_skipped(tmp_path: Path) -> None:
    write_dicom_series(ct_volume(seed=1), tmp_path / "dicom" / "good")
    missing = write_dicom_series(ct_volume(seed=2), tmp_path / "dicom" / "missing")
    os.remove(os.path.join(missing, "slice020.dcm"))
    uneven = write_dicom_series(ct_volume(seed=3), tmp_path / "dicom" / "uneven")
    _retag_positions(uneven, 30, 2.0)

    manifest = build_cache(config([tmp_path / "dicom"], tmp_path / "cache"))

    entries = by_name(manifest)
    assert entries["good"].status == "ok" and entries["good"].source_shape == (48, 48, 40)
    for name in ("missing", "uneven"):
        assert entries[name].status == "skipped" and entries[name].reason == "uneven slice spacing", entries[name]
    assert "gaps of 2.5 mm and 5 mm between slices 20 (slice019.dcm) and 21 (slice021.dcm) (a missing slice?)" in (
        entries["missing"].detail
    )
    assert "gaps of 2.5 mm and 4.5 mm between slices 30 (slice029.dcm) and 31 (slice030.dcm)" in entries["uneven"].detail
    assert "uneven slice spacing: 2" in summarize(manifest)


def test_slice_positions_tolerate_rounding_and_catch_stacked_acquisitions() -> None:
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    check_slice_positions([(0.0, 0.0, round(0.625 * i, 1)) for i in range(40)], axial)  # positions rounded to 0.1 mm
    check_slice_positions([(5.0, -3.0, -2.5 * i) for i in range(10)], axial)  # read top to bottom
    oblique = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)  # normal (0, 0.6, 0.8)
    positions = [(0.0, 0.6 * 2.0 * i, 0.8 * 2.0 * i) for i in range(12)]
    check_slice_positions(positions, oblique)
    with pytest.raises(SkipVolume, match=r"gaps of 2 mm and 4 mm between slices 6 and 7 \(a missing slice\?\)"):
        check_slice_positions(positions[:6] + positions[7:], oblique)
    with pytest.raises(SkipVolume, match="slices 3 and 4 of 6 lie at the same position"):
        check_slice_positions([(0.0, 0.0, z) for z in (0.0, 2.0, 4.0, 4.0, 6.0, 8.0)], axial)
