"""``nnunet-ssl pretrain`` on a folder full of inputs it cannot use: it trains on the rest, and its
log and manifest list every input it skipped, with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_data_helpers import by_name, ct_volume, write, write_dicom_series
from test_data_skips import unblocking

from nnunet_ssl.pretraining.data import Manifest

SMALL = ["--preset", "tiny", "--crop-size", "64", "--batch-size", "1", "--workers", "0", "--no-progress", "--amp", "off"]


def test_pretrain_skips_and_lists_bad_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nnunet_ssl.cli import main

    data = tmp_path / "data"
    z, y, x = np.mgrid[:40, :72, :72]
    for i in range(2):
        body = ((y - 36) / 30.0) ** 2 + ((x - 36) / 26.0) ** 2 < 1
        image = sitk.GetImageFromArray(np.where(body, 40.0, -1000.0).astype(np.float32) + np.float32(i) * z)
        image.SetSpacing((1.5, 1.5, 2.0))
        write(image, data / f"vol_{i}.nii.gz")
    os.symlink(data / "vol_0.nii.gz", data / "vol_0_again.nii.gz")
    os.rename(write(ct_volume(seed=1), data / "tmp.nii.gz"), os.fsdecode(os.fsencode(data) + b"/caf\xe9.nii.gz"))
    os.mkfifo(data / "pipe.nii.gz")
    dicom = write_dicom_series(ct_volume(seed=2), data / "dicom")
    os.remove(os.path.join(dicom, "slice020.dcm"))
    out = tmp_path / "run"

    with unblocking([data / "pipe.nii.gz"], 120), caplog.at_level("INFO"):
        code = main(["pretrain", "--method", "simmim", "--data", str(data), "--out", str(out), *SMALL, "--max-steps", "1"])

    assert code == 0, caplog.text
    expected = {
        "vol_0_again.nii.gz": "duplicate",
        "caf\\xe9.nii.gz": "name not UTF-8",
        "pipe.nii.gz": "not a regular file",
        "dicom": "uneven slice spacing",
    }
    entries = by_name(Manifest.load(str(out / "cache")))
    assert {name: e.reason for name, e in entries.items() if not e.usable} == expected
    assert sorted(e for e in entries if entries[e].usable) == ["vol_0.nii.gz", "vol_1.nii.gz"]
    assert "6 source(s): 2 usable (2 CT; 2 padded), 4 skipped" in caplog.text
    for name, reason in expected.items():
        assert f"  {reason}: 1" in caplog.text and name in caplog.text
