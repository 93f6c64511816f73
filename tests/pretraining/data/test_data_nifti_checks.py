"""The NIfTI checks before ITK's reader (nibabel parses): what the reader would let through silently is refused."""
from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_data_helpers import config, ct_volume, write

from nnunet_ssl.pretraining.data import preprocess
from nnunet_ssl.pretraining.data.preprocess import SkipVolume, check_nifti, preprocess_source, read_source
from nnunet_ssl.pretraining.data.sources import Source

AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])


def _source(path: Path | str) -> Source:
    return Source(key=str(path), path=str(path), kind="nifti", modality="ct")


def _raw_nifti(tmp_path: Path, dtype: str) -> bytes:
    """The bytes of an uncompressed NIfTI-1 file of the test CT volume stored as ``dtype``."""
    image = sitk.Cast(ct_volume(seed=1), sitk.sitkFloat32 if dtype == "f4" else sitk.sitkInt16)
    path = tmp_path / f"raw_{dtype}.nii"
    sitk.WriteImage(image, str(path), useCompression=False)
    return path.read_bytes()


def _skip(path: Path) -> SkipVolume:
    with pytest.raises(SkipVolume) as info:
        read_source(_source(path))
    return info.value


@pytest.mark.parametrize("dtype", ["i2", "f4"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_header_claiming_30000_cubed_voxels_is_refused_without_reading_or_allocating(tmp_path, dtype, suffix) -> None:
    data = bytearray(_raw_nifti(tmp_path, dtype))
    data[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(bytes(data)) if suffix.endswith(".gz") else bytes(data))
    tracemalloc.start()
    try:
        skip = _skip(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skip.reason == "unreadable" and "truncated NIfTI" in skip.detail and "27000000000000" in skip.detail
    assert peak < 4 * 2**20  # the header and a few buffers, never the claimed data


def test_a_nifti2_header_claiming_2_to_the_120_voxels_is_refused(tmp_path) -> None:
    path = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(np.zeros((4, 5, 6), dtype=np.float32), AFFINE), str(path))
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[16:80] = struct.pack("<8q", 3, 1 << 40, 1 << 40, 1 << 40, 1, 1, 1, 1)
    path.write_bytes(gzip.compress(bytes(data)))
    skip = _skip(path)
    assert skip.reason == "unreadable" and "truncated NIfTI" in skip.detail


@pytest.mark.parametrize(
    ("name", "endian", "image_class"),
    [("big_endian.nii.gz", ">", nib.Nifti1Image), ("nifti2.nii", "<", nib.Nifti2Image), ("nifti2.nii.gz", "<", nib.Nifti2Image)],
)
def test_nan_and_inf_are_found_whatever_the_header_layout(tmp_path, name, endian, image_class) -> None:
    values = np.random.default_rng(0).normal(size=(20, 24, 16)).astype(endian + "f4")
    values[1, 2, 3] = np.nan
    values[4, 5, 6] = np.inf
    values[7, 8, 9] = -np.inf
    nib.save(image_class(values, AFFINE), str(tmp_path / name))
    skip = _skip(tmp_path / name)
    assert skip.reason == "non-finite voxels"
    assert "1 NaN and 2 infinite voxel(s)" in skip.detail


def test_nan_voxels_are_counted_across_read_steps(tmp_path, monkeypatch) -> None:
    values = np.random.default_rng(0).normal(size=(30, 20, 10)).astype(np.float32)
    values[np.unravel_index([5, 1500, 5999], values.shape, order="F")] = np.nan  # in steps 1, 2 and 6 of the file
    nib.save(nib.Nifti1Image(values, AFFINE), str(tmp_path / "nan.nii.gz"))
    monkeypatch.setattr(preprocess, "SCAN_VOXELS", 1000)
    skip = _skip(tmp_path / "nan.nii.gz")
    assert "3 NaN and 0 infinite" in skip.detail


def test_a_truncated_float_file_says_where_its_data_end(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(_raw_nifti(tmp_path, "f4"))[:-20000])
    monkeypatch.setattr(preprocess, "SCAN_VOXELS", 1000)
    skip = _skip(path)
    assert skip.reason == "unreadable"
    count = 40 * 48 * 48
    end = int(skip.detail.split("before voxel ")[1].split(" of ")[0])
    assert skip.detail.endswith(f" of {count}") and 0 < end < count


@pytest.mark.parametrize("field", ["pixdim", "vox_offset"])
def test_header_fields_are_read_as_written(tmp_path, field) -> None:
    """nibabel's checked header would show a zero pixdim as 1 mm, as ITK's reader does."""
    data = bytearray(_raw_nifti(tmp_path, "i2"))
    if field == "pixdim":
        data[76:108] = struct.pack("<8f", 1.0, 0.0, 1.0, 2.5, 0, 0, 0, 0)
    else:
        data[108:112] = struct.pack("<f", float("nan"))
    (tmp_path / "bad.nii").write_bytes(bytes(data))
    skip = _skip(tmp_path / "bad.nii")
    assert skip.reason == ("absurd spacing" if field == "pixdim" else "unreadable")


def test_good_files_in_every_layout_give_the_same_cached_array(tmp_path) -> None:
    """A multi-member gzip (its size field covers only the last member: the data are read once),
    an extension before the data and big-endian voxels are read like the plain file."""
    raw = _raw_nifti(tmp_path, "i2")
    write(sitk.Cast(ct_volume(seed=1), sitk.sitkInt16), tmp_path / "plain.nii.gz")
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:20000]) + gzip.compress(raw[20000:]))
    reference = nib.load(str(tmp_path / "plain.nii.gz"))
    extended = nib.Nifti1Image(np.asanyarray(reference.dataobj).astype(">i2"), reference.affine)
    extended.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment " * 100))
    nib.save(extended, str(tmp_path / "extended.nii.gz"))
    cfg = config([tmp_path], tmp_path / "cache")
    arrays = {name: preprocess_source(_source(tmp_path / name), cfg).array for name in ("plain.nii.gz", "members.nii.gz", "extended.nii.gz")}
    assert all(np.array_equal(a, arrays["plain.nii.gz"]) for a in arrays.values())


def test_complete_data_with_a_cut_gzip_trailer_are_read(tmp_path) -> None:
    """Every voxel is there (ITK and nibabel read them all); only the stream's CRC and size field are missing."""
    write(sitk.Cast(ct_volume(seed=1), sitk.sitkFloat32), tmp_path / "plain.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "plain.nii.gz").read_bytes()[:-8])
    check_nifti(str(tmp_path / "cut.nii.gz"))
    cut = sitk.GetArrayFromImage(read_source(_source(tmp_path / "cut.nii.gz")))
    assert np.array_equal(cut, sitk.GetArrayFromImage(read_source(_source(tmp_path / "plain.nii.gz"))))


def test_files_that_are_not_nifti_are_left_to_the_reader(tmp_path) -> None:
    (tmp_path / "garbage.nii.gz").write_bytes(b"definitely not gzip")
    (tmp_path / "garbage.nii").write_bytes(b"definitely not nifti" * 30)
    for name in ("garbage.nii.gz", "garbage.nii"):
        check_nifti(str(tmp_path / name))  # no header: nothing to check here
        assert _skip(tmp_path / name).reason == "unreadable"  # the reader refuses it
