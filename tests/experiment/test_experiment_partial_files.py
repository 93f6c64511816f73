"""Trust no partial file: a prediction cut short is redone by the runner and refused by the report.

Issue 20: the runner (and ``nnUNetv2_predict --continue_prediction``) only checked that a file
existed, and SimpleITK reads a truncated ``.nii.gz`` as zeros, so the report scored the cut file
(white-matter Dice 0.499 -> 0.457, silently).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_report import write_test_cases, write_volume

from nnunet_ssl.analysis import testset  # its Test* classes imported by name would be collected as tests
from nnunet_ssl.analysis.prediction_files import UnreadablePredictionError, read_problem
from nnunet_ssl.analysis.results import COMPLETE, INCOMPLETE, dataset_info
from nnunet_ssl.analysis.testset import (
    cases_to_predict,
    find_test_set,
    score_existing_predictions,
    score_predictions,
)
from nnunet_ssl.experiment.grid import SKIP, Job, decide
from nnunet_ssl.experiment.runner import DONE, FAILED, run_jobs

REFERENCE = np.zeros((6, 10, 12), np.uint8)
REFERENCE[1:5, 2:8, 3:9] = 1


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def noise_volume(path: Path) -> None:
    """A label map that compresses badly, so that half of its .nii.gz holds only part of the voxels."""
    write_volume((np.random.default_rng(0).random(REFERENCE.shape) > 0.5).astype(np.uint8), path)


def test_read_problem_finds_cut_files_that_simpleitk_reads_as_zeros(tmp_path: Path) -> None:
    whole = tmp_path / "whole.nii.gz"
    noise_volume(whole)
    assert read_problem(whole) is None and read_problem(whole, whole) is None
    for name, keep in (("cut.nii.gz", 0.5), ("cut_end.nii.gz", 0.98)):
        cut = tmp_path / name
        cut.write_bytes(whole.read_bytes())
        truncate(cut, keep)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == REFERENCE.shape  # read without a word
        assert "does not read back" in (read_problem(cut) or ""), name
    raw = tmp_path / "raw.nii"
    write_volume(REFERENCE, raw)
    truncate(raw, 0.8)
    assert "does not read back" in (read_problem(raw) or "")
    other = tmp_path / "other.nii.gz"
    write_volume(REFERENCE[:, :, :5], other)
    assert read_problem(other, whole) == "reads back with shape (5, 10, 6), but whole.nii.gz has (12, 10, 6)"
    mha = tmp_path / "cut.mha"
    sitk.WriteImage(sitk.GetImageFromArray(REFERENCE), str(mha), True)
    truncate(mha)
    assert "does not read back" in (read_problem(mha) or "")
    unknown = tmp_path / "case.b2nd"
    unknown.write_bytes(b"x")
    assert read_problem(unknown) is None  # no reader here: trusted as before


def _predict_job(tmp_path: Path, images: Path, out: Path, source: Path, cases: tuple[str, ...]) -> Job:
    """A prediction job whose command copies ``source`` into each missing output, as --continue_prediction skips."""
    tool = tmp_path / "bin" / "fakepredict"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text('#!/bin/sh\nmkdir -p "$1"\nfor c in t1 t2; do [ -f "$1/$c.nii.gz" ] || cp "$2" "$1/$c.nii.gz"; '
                    'echo "$c" >> "$1/predicted.txt"; done\n', encoding="utf-8")
    tool.chmod(0o755)
    return Job("predict-x", "predict", "x", (), (str(tool), str(out), str(source)),
               tuple(out / f"{c}.nii.gz" for c in cases), tmp_path / "logs" / "predict-x.log",
               references=tuple(images / f"{c}_0000.nii.gz" for c in cases))


def test_runner_redoes_a_truncated_prediction_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    images, _ = write_test_cases(tmp_path, REFERENCE)
    out = tmp_path / "pred"
    good = tmp_path / "good.nii.gz"
    noise_volume(good)
    job = _predict_job(tmp_path, images, out, good, ("t1", "t2"))
    out.mkdir()
    for case in ("t1", "t2"):
        (out / f"{case}.nii.gz").write_bytes(good.read_bytes())
    truncate(out / "t2.nii.gz")  # a prediction cut short by an interrupted nnUNetv2_predict
    assert decide(job)[0] == SKIP  # every file exists: the shell's test alone would trust it
    status = run_jobs([job], 1, tmp_path / "jobs.json", progress=False)
    assert status["predict-x"][0] == DONE
    assert (out / "t2.nii.gz").read_bytes() == good.read_bytes() and read_problem(out / "t2.nii.gz") is None
    assert (out / "t1.nii.gz").read_bytes() == good.read_bytes()
    assert run_jobs([job], 1, tmp_path / "jobs.json", progress=False)["predict-x"][0] == "skipped"
    # a command that exits 0 but leaves a cut file is a failed job, naming the file
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes())
    truncate(cut)
    (out / "t1.nii.gz").unlink()
    job = _predict_job(tmp_path, images, out, cut, ("t1", "t2"))
    state, detail = run_jobs([job], 1, tmp_path / "jobs.json", progress=False)["predict-x"]
    assert state == FAILED and f"{out / 't1.nii.gz'} does not read back" in detail


def test_a_prediction_of_the_wrong_shape_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    images, _ = write_test_cases(tmp_path, REFERENCE, ("t1",))
    out = tmp_path / "pred"
    out.mkdir()
    write_volume(REFERENCE[:3], out / "t1.nii.gz")
    good = tmp_path / "good.nii.gz"
    write_volume(REFERENCE, good)
    job = _predict_job(tmp_path, images, out, good, ("t1",))
    assert run_jobs([job], 1, tmp_path / "jobs.json", progress=False)["predict-x"][0] == DONE
    assert read_problem(out / "t1.nii.gz", images / "t1_0000.nii.gz") is None


def test_report_refuses_a_truncated_prediction_naming_the_file(tmp_path: Path) -> None:
    images, labels = write_test_cases(tmp_path, REFERENCE)
    info = dataset_info({"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz",
                         "channel_names": {"0": "CT"}})
    test_set = find_test_set(images, labels, ".nii.gz")
    out = tmp_path / "pred"
    out.mkdir()
    for case in ("t1", "t2"):
        write_volume(REFERENCE, out / f"{case}.nii.gz")
    settings = testset.TestRunSettings(test_set, tmp_path, predict=False)
    whole = score_existing_predictions(out, info, "x", 0, settings)
    assert whole.status == COMPLETE and whole.dice["t2"]["liver"] == pytest.approx(1.0)
    truncate(out / "t2.nii.gz", 0.7)
    with pytest.raises(UnreadablePredictionError, match=r"pred/t2\.nii\.gz: does not read back") as caught:
        score_predictions(out, test_set, info)
    assert list(caught.value.problems) == [out / "t2.nii.gz"] and "predict again" in str(caught.value)
    refused = score_existing_predictions(out, info, "x", 0, settings)
    assert refused.status == INCOMPLETE and str(out / "t2.nii.gz") in refused.reason and not refused.dice
    # nnunet-ssl report's own predictions: the cut file is predicted again, the whole one reused
    source = {"checkpoint": "c", "size": 1, "mtime_ns": 1}
    (out / "prediction_source.json").write_text('{"checkpoint": "c", "size": 1, "mtime_ns": 1}', encoding="utf-8")
    assert cases_to_predict(out, test_set.cases, ".nii.gz", source, test_set.labels) == ["t2"]
    assert not (out / "t2.nii.gz").exists() and (out / "t1.nii.gz").is_file()
