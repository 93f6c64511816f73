"""Every input kind reaches the cache: NIfTI, NRRD, MHA, DICOM, nnU-Net raw datasets, list files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_data_helpers import (
    by_name,
    config,
    ct_volume,
    mr_volume,
    nnunet_dataset,
    write,
    write_dicom_series,
)

from nnunet_ssl.pretraining.data import Manifest, build_cache, open_array, scan_inputs


def test_folder_of_nifti_nrrd_mha(tmp_path):
    folder = tmp_path / "images"
    write(ct_volume(seed=1), folder / "a.nii.gz")
    write(ct_volume(seed=2), folder / "sub" / "b.nii")
    write(ct_volume(seed=3), folder / "c.nrrd")
    write(ct_volume(seed=4), folder / "d.mha")
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")  # inside a folder: ignored, not an input list
    manifest = build_cache(config([folder], tmp_path / "cache"))
    entries = by_name(manifest)
    assert sorted(entries) == ["a.nii.gz", "b.nii", "c.nrrd", "d.mha"]
    assert {e.kind for e in entries.values()} == {"nifti", "nrrd", "mha"}
    for entry in manifest.entries:
        assert entry.status == "ok" and entry.modality == "ct", entry
        array = open_array(manifest.array_path(entry))
        assert tuple(array.shape) == entry.shape
        assert array.dtype == np.float16
    # The manifest on disk round-trips.
    again = Manifest.load(str(tmp_path / "cache"))
    assert [e.to_json() for e in again.entries] == [e.to_json() for e in manifest.entries]


def test_dicom_series(tmp_path):
    img = ct_volume(seed=5)
    write_dicom_series(img, tmp_path / "dicom" / "series1")
    write_dicom_series(mr_volume(seed=6), tmp_path / "dicom" / "series2", modality="MR")
    manifest = build_cache(config([tmp_path / "dicom"], tmp_path / "cache"))
    entries = by_name(manifest)
    assert sorted(entries) == ["series1", "series2"]
    ct, mr = entries["series1"], entries["series2"]
    assert ct.kind == "dicom" and ct.status == "ok" and "#series=" in ct.key
    assert ct.modality == "ct" and mr.modality == "mr"  # from the DICOM Modality tag
    assert ct.source_shape == (48, 48, 40)
    assert ct.source_spacing == pytest.approx((1.0, 1.0, 2.5))
    # Same voxels as the NIfTI written from the same image.
    write(img, tmp_path / "same" / "img.nii.gz")
    ref = build_cache(config([tmp_path / "same"], tmp_path / "cache_ref")).entries[0]
    assert ref.shape == ct.shape
    a = open_array(manifest.array_path(ct))[...]
    b = open_array(os.path.join(tmp_path / "cache_ref", ref.cache_file))[...]
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3)


def test_nnunet_raw_dataset_all_channels(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset501_Test", {"0": "CT", "1": "T2"}, n_tr=2, n_ts=1)
    manifest = build_cache(config([root], tmp_path / "cache"))
    entries = by_name(manifest)
    # 3 cases x 2 channels, labelsTr not included.
    assert len(manifest.entries) == 6 and len(manifest.usable()) == 6
    assert not any("labelsTr" in e.source for e in manifest.entries)
    assert sum("imagesTs" in e.source for e in manifest.entries) == 2
    for name, entry in entries.items():
        channel = int(name.split("_")[-1][:4])
        assert entry.channel == channel
        assert entry.modality == ("ct" if channel == 0 else "mr")
    # The modality flag overrides dataset.json.
    forced = build_cache(config([root], tmp_path / "cache_ct", modality="ct"))
    assert {e.modality for e in forced.entries} == {"ct"}


def test_nnunet_dataset_found_inside_a_folder_and_via_dataset_json(tmp_path):
    nnunet_dataset(tmp_path / "raw" / "Dataset502_X", {"0": "MRI"}, n_tr=1, n_ts=0)
    sources, problems = scan_inputs(config([tmp_path / "raw"], tmp_path / "cache"))
    assert len(sources) == 1 and not problems
    assert sources[0].modality == "mr" and sources[0].channel == 0
    sources, _ = scan_inputs(config([tmp_path / "raw" / "Dataset502_X" / "dataset.json"], tmp_path / "cache"))
    assert len(sources) == 1


def test_txt_and_json_lists(tmp_path):
    a = write(ct_volume(seed=1), tmp_path / "img" / "a.nii.gz")
    b = write(ct_volume(seed=2), tmp_path / "img" / "b.mha")
    c = write(mr_volume(seed=3), tmp_path / "img" / "c.nrrd")
    txt = tmp_path / "list.txt"
    txt.write_text(f"# pretraining volumes\n{a}\n\nimg/b.mha\n", encoding="utf-8")  # absolute and relative to the list
    manifest = build_cache(config([txt], tmp_path / "cache_txt"))
    assert sorted(by_name(manifest)) == ["a.nii.gz", "b.mha"]
    assert all(e.origin == str(txt) for e in manifest.entries)

    js = tmp_path / "list.json"
    js.write_text(json.dumps([b, {"path": "img/c.nrrd", "modality": "mr"}]), encoding="utf-8")
    manifest = build_cache(config([js], tmp_path / "cache_json"))
    entries = by_name(manifest)
    assert sorted(entries) == ["b.mha", "c.nrrd"]
    assert entries["c.nrrd"].modality == "mr" and entries["b.mha"].modality == "ct"
    assert all(e.status == "ok" for e in entries.values())
    assert c  # written above


def test_same_volume_through_two_inputs_is_used_once(tmp_path):
    a = write(ct_volume(), tmp_path / "img" / "a.nii.gz")
    txt = tmp_path / "list.txt"
    txt.write_text(a + "\n", encoding="utf-8")
    sources, _ = scan_inputs(config([tmp_path / "img", txt], tmp_path / "cache"))
    assert len(sources) == 1
