"""Bad inputs never crash the build and are never dropped silently: each is skipped with its reason."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_data_helpers import by_name, config, ct_volume, image_from_array, write

from nnunet_ssl.pretraining.data import Manifest, build_cache, summarize
from nnunet_ssl.pretraining.data import cache as cache_module


def _truncate(path: str, fraction: float = 0.6) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def _patch_nifti_pixdim(src: str, dst: str, z_spacing: float) -> None:
    data = bytearray(Path(src).read_bytes())
    pixdim = list(struct.unpack("<8f", data[76:108]))
    pixdim[3] = z_spacing
    data[76:108] = struct.pack("<8f", *pixdim)
    Path(dst).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    d = root / "in"
    write(ct_volume(size_xyz=(56, 56, 48), seed=1), d / "good.nii.gz")  # >= 32^3 after resampling
    # Unreadable: not an image, truncated compressed / uncompressed NIfTI, truncated NRRD and MHA.
    os.makedirs(d, exist_ok=True)
    (d / "garbage.nii.gz").write_bytes(b"definitely not gzip")
    for name in ("trunc.nii.gz", "trunc_raw.nii", "trunc.nrrd", "trunc.mha"):
        _truncate(write(ct_volume(seed=2), d / name))
    (d / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    # Not 3-D: 2-D, a single slice stored as 3-D, 4-D; not scalar: RGB.
    write(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)), d / "flat2d.nii.gz")
    write(image_from_array(np.random.default_rng(0).normal(size=(1, 40, 40)).astype(np.float32)), d / "slice.nii.gz")
    write(sitk.JoinSeries([ct_volume(seed=3), ct_volume(seed=4)]), d / "series4d.nii.gz")
    write(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8), isVector=True), d / "rgb.mha")
    # Non-finite and constant voxels.
    arr = np.random.default_rng(0).normal(size=(48, 48, 40)).astype(np.float32)
    arr[3, 4, 5] = np.nan
    write(image_from_array(arr), d / "nan.nii.gz")
    arr[3, 4, 5] = np.inf
    write(image_from_array(arr), d / "inf.nrrd")
    ct_float = sitk.GetArrayFromImage(ct_volume(seed=5)).astype(np.float32)
    ct_float[2, 3, 4] = np.inf  # ITK's NIfTI reader would make it 0
    ct_float[5, 6, 7] = -np.inf
    write(image_from_array(ct_float), d / "inf.nii.gz")
    write(image_from_array(np.full((48, 48, 40), 7, dtype=np.int16)), d / "constant.nii.gz")
    # No body (CT of air), too small, and small but usable (padded).
    air = np.random.default_rng(0).integers(-1000, -900, size=(48, 48, 40)).astype(np.int16)
    write(image_from_array(air), d / "air.nii.gz")
    write(ct_volume(size_xyz=(8, 8, 4), air_margin=0), d / "tiny.nii.gz")
    write(ct_volume(size_xyz=(30, 30, 14), air_margin=0), d / "small.nii.gz")
    write(image_from_array(np.full((3, 3, 3), 40, dtype=np.int16) + np.eye(3, dtype=np.int16)), d / "three.nii.gz")
    write(ct_volume(spacing_xyz=(1e-6, 1e-6, 1e-6)), d / "micro_spacing.nii.gz")
    # Absurd spacings: too coarse, zero and NaN pixdim (ITK would read 1 mm), zero in NRRD.
    write(ct_volume(spacing_xyz=(1.0, 1.0, 25.0)), d / "coarse.nii.gz")
    raw = write(ct_volume(), root / "raw.nii")
    _patch_nifti_pixdim(raw, str(d / "zero_pixdim.nii"), 0.0)
    _patch_nifti_pixdim(raw, str(d / "nan_pixdim.nii"), float("nan"))
    sitk.WriteImage(ct_volume(), str(root / "ok.nrrd"), useCompression=False)
    text = (root / "ok.nrrd").read_bytes().replace(b"(0,0,2.5)", b"(0,0,0)")
    (d / "zero_spacing.nrrd").write_bytes(text)
    # A list naming a missing file.
    (root / "list.txt").write_text(f"{d / 'good.nii.gz'}\n{root / 'missing.nii.gz'}\n", encoding="utf-8")
    cfg = config([d, root / "list.txt", root / "nowhere"], root / "cache")
    return build_cache(cfg, progress=False)


EXPECTED = {
    "good.nii.gz": ("ok", None),
    "small.nii.gz": ("ok", None),
    "garbage.nii.gz": ("skipped", "unreadable"),
    "trunc.nii.gz": ("skipped", "unreadable"),
    "trunc_raw.nii": ("skipped", "unreadable"),
    "trunc.nrrd": ("skipped", "unreadable"),
    "trunc.mha": ("skipped", "unreadable"),
    "in": ("skipped", "unreadable"),  # the folder holding broken.dcm: no readable DICOM series
    "flat2d.nii.gz": ("skipped", "not 3-D"),
    "slice.nii.gz": ("skipped", "not 3-D"),
    "series4d.nii.gz": ("skipped", "not 3-D"),
    "rgb.mha": ("skipped", "not a scalar image"),
    "nan.nii.gz": ("skipped", "non-finite voxels"),
    "inf.nrrd": ("skipped", "non-finite voxels"),
    "inf.nii.gz": ("skipped", "non-finite voxels"),
    "three.nii.gz": ("skipped", "too small"),
    "micro_spacing.nii.gz": ("skipped", "spacing too fine"),
    "constant.nii.gz": ("skipped", "constant image"),
    "air.nii.gz": ("skipped", "no body found"),
    "tiny.nii.gz": ("skipped", "too small"),
    "coarse.nii.gz": ("skipped", "absurd spacing"),
    "zero_pixdim.nii": ("skipped", "absurd spacing"),
    "nan_pixdim.nii": ("skipped", "absurd spacing"),
    "zero_spacing.nrrd": ("skipped", "absurd spacing"),
    "missing.nii.gz": ("skipped", "not found"),
    "nowhere": ("skipped", "not found"),
}


def test_every_bad_input_is_listed_with_its_reason(bad_manifest):
    entries = by_name(bad_manifest)
    assert sorted(entries) == sorted(EXPECTED)
    got = {name: (e.status, e.reason) for name, e in entries.items()}
    assert got == EXPECTED
    for entry in bad_manifest.skipped():
        assert entry.detail, entry  # every skip says why
    assert "4-D" in entries["series4d.nii.gz"].detail
    assert "truncated" in entries["trunc.nii.gz"].detail
    assert "0 NaN and 2 infinite voxel(s)" in entries["inf.nii.gz"].detail
    assert "1 NaN and 0 infinite" in entries["nan.nii.gz"].detail
    assert "whole volume" in entries["three.nii.gz"].detail  # too small, not "no body"
    assert "below min_spacing" in entries["micro_spacing.nii.gz"].detail


def test_small_volume_is_padded_not_skipped(bad_manifest):
    small = by_name(bad_manifest)["small.nii.gz"]
    assert small.status == "ok" and small.note is not None and small.note.startswith("padded")
    assert small.shape == (18, 20, 20)
    assert by_name(bad_manifest)["good.nii.gz"].note is None


def test_summary_counts_per_reason(bad_manifest):
    text = summarize(bad_manifest)
    # small.nii.gz is soft tissue without air and no negative value: by its intensities, MR
    assert text.splitlines()[0] == "26 source(s): 2 usable (1 CT, 1 MR; 1 padded), 24 skipped"
    assert "  unreadable: 6" in text and "  absurd spacing: 4" in text and "  not 3-D: 3" in text
    assert "  not found: 2" in text and "  too small: 2" in text and "  spacing too fine: 1" in text
    assert "  non-finite voxels: 3" in text
    # The manifest on disk tells the same story.
    assert summarize(Manifest.load(bad_manifest.path)) == text


def test_no_usable_volume_raises_with_reasons(tmp_path):
    write(image_from_array(np.zeros((48, 48, 40), dtype=np.int16)), tmp_path / "in" / "zeros.nii.gz")
    (tmp_path / "in" / "junk.mha").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable pretraining volume") as info:
        build_cache(config([tmp_path / "in"], tmp_path / "cache"))
    assert "constant image: 1" in str(info.value) and "unreadable: 1" in str(info.value)
    assert os.path.isfile(tmp_path / "cache" / "manifest.json")  # saved anyway, for inspection


def test_unexpected_failure_is_recorded_and_retried(tmp_path, monkeypatch):
    write(ct_volume(seed=1), tmp_path / "in" / "a.nii.gz")
    write(ct_volume(seed=2), tmp_path / "in" / "b.nii.gz")
    real = cache_module.preprocess_source

    def flaky(source, cfg):
        if source.path.endswith("b.nii.gz"):
            raise KeyError("boom")
        return real(source, cfg)

    monkeypatch.setattr(cache_module, "preprocess_source", flaky)
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    manifest = build_cache(cfg)
    b = by_name(manifest)["b.nii.gz"]
    assert b.status == "skipped" and b.reason == "error" and "KeyError" in b.detail
    monkeypatch.setattr(cache_module, "preprocess_source", real)
    assert by_name(build_cache(cfg))["b.nii.gz"].status == "ok"  # errors are not cached


def test_ignored_files_are_named(tmp_path, caplog):
    from nnunet_ssl.pretraining.data import scan_inputs

    write(ct_volume(seed=1), tmp_path / "in" / "a.nii.gz")
    (tmp_path / "in" / "notes.csv").write_text("x", encoding="utf-8")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "protocol.pdf").write_bytes(b"%PDF")
    with caplog.at_level("INFO"):
        sources, _ = scan_inputs(config([tmp_path / "in"], tmp_path / "cache"))
    assert len(sources) == 1
    message = next(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
    assert "ignored 2 file(s)" in message and "notes.csv" in message and "protocol.pdf" in message
