"""The demo's epoch progress lines (parsed from nnU-Net's output) and its choice of structures."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.demo_progress import EpochProgress, keep_structures

# what nnUNetv2_train 2.8.1 prints for one epoch (numpy 2 reprs in the pseudo-Dice list)
NNUNET_EPOCH = """\
2026-11-29 18:00:00.123456: Epoch 2
2026-11-29 18:00:00.123456: Current learning rate: 0.00091
2026-11-29 18:00:21: train_loss -0.4123
2026-11-29 18:00:21.5: val_loss -0.3881
2026-11-29 18:00:21.5: Pseudo dice [np.float32(0.7134), np.float32(0.1201)]
2026-11-29 18:00:21.5: Epoch time: 21.38 s
2026-11-29 18:00:21.5: Yayy! New best EMA pseudo Dice: 0.3124
"""


def test_epoch_progress_line_from_nnunet_output(caplog: pytest.LogCaptureFixture) -> None:
    progress = EpochProgress(16, ["liver", "spleen"])
    with caplog.at_level(logging.INFO, logger="nnunet_ssl.demo"):
        for line in NNUNET_EPOCH.splitlines():
            progress.feed(line)
    expected = "epoch 3/16: train loss -0.412, val loss -0.388, pseudo-Dice liver 0.71 spleen 0.12 (21 s)"
    assert progress.lines == [expected] and expected in caplog.text


def test_progress_inside_an_epoch_is_echoed_with_the_1_based_epoch(caplog: pytest.LogCaptureFixture) -> None:
    progress = EpochProgress(16, ["liver", "spleen"])
    with caplog.at_level(logging.INFO, logger="nnunet_ssl.demo"):
        progress.feed("2026-11-29 18:00:08.1: Epoch 2: 12/30 training iterations (15 s), loss -0.3012")
        progress.feed("2026-11-29 18:00:08.2: Epoch 2: encoder unfrozen")  # another trainer line: not progress
    assert [r.getMessage() for r in caplog.records] == ["    epoch 3/16: 12/30 training iterations (15 s), loss -0.3012"]
    assert progress.lines == []  # the epoch's own line comes at its end


def test_in_epoch_progress_says_every_so_many_seconds_and_never_after_the_last_step() -> None:
    from nnunet_ssl.trainers.epoch_progress import InEpochProgress

    now = [100.0]
    clock = InEpochProgress(5, 10.0, clock=lambda: now[0])
    said = []
    for seconds in (4.0, 4.0, 4.0, 12.0, 30.0):  # step ends at 104, 108, 112, 124, 154
        now[0] += seconds
        said.append(clock.step(-0.5))
    assert said == [None, None, "3/5 training iterations (12 s), loss -0.5000", "4/5 training iterations (24 s), loss -0.5000",
                    None]  # the 5th step ends the epoch: nnU-Net's own lines follow
    silent = InEpochProgress(5, None, clock=lambda: now[0])
    now[0] += 100
    assert silent.step(0.1) is None


def test_keep_structures_merges_lesions_into_liver_and_is_idempotent(tmp_path: Path) -> None:
    (tmp_path / "labelsTr").mkdir()
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lesion": 4}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}), encoding="utf-8")
    array = np.array([[[0, 1, 2, 3, 4]]], dtype=np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(tmp_path / "labelsTr" / "c1.nii.gz"))
    for _ in range(2):
        assert keep_structures(tmp_path, ["spleen", "liver"]) == ["liver", "spleen"]
    out = sitk.ReadImage(str(tmp_path / "labelsTr" / "c1.nii.gz"))
    assert sitk.GetArrayFromImage(out).tolist() == [[[0, 1, 2, 0, 1]]]  # kidney -> background, lesion -> liver
    assert out.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    assert json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    with pytest.raises(ValueError, match="pancreas"):
        keep_structures(tmp_path, ["pancreas"])
