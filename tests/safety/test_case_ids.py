"""Case identifiers cannot name files outside their folder: the rule, and `plan`, `split`, `experiment` and
`report` refusing an unsafe one (naming the file and the identifier) before anything is written."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from test_report import DATASET, nnunet_tree  # noqa: F401  (the fake results tree, as a fixture here too)
from test_splits import fake_preprocessed_dataset

from nnunet_ssl.case_ids import CaseIdError, case_id_problem, check_case_id, check_file_ending
from nnunet_ssl.cli import main

SAFE = ["case_001", "BraTS-GLI-00000-000", "la_003", "1.2.840.113619.2", "patient 7", "Fall_ü", "a..b", "x."]
UNSAFE = {
    "": "is empty",
    ".": "names a folder",
    "..": "names a folder",
    ".hidden": "starts with '.'",
    "../../../escaped": "starts with '.'",
    "sub/case": "path separator '/'",
    "/abs/case": "path separator '/'",
    "win\\case": "path separator '\\\\'",
    "nul\x00case": "control character '\\x00'",
    "new\nline": "control character '\\n'",
    "bad\udcffbyte": "not valid text",
}


@pytest.mark.parametrize("case", SAFE)
def test_usual_identifiers_are_allowed(case: str) -> None:
    assert case_id_problem(case) is None and check_case_id(case, "x.json") == case


@pytest.mark.parametrize(("case", "problem"), UNSAFE.items())
def test_unsafe_identifiers_are_refused_naming_file_and_identifier(case: str, problem: str) -> None:
    with pytest.raises(CaseIdError) as raised:
        check_case_id(case, Path("/data/dataset.json"), "fold 2, 'val' entry 1")
    message = str(raised.value)
    assert message.startswith(f"/data/dataset.json: case identifier {case!r} (fold 2, 'val' entry 1) ")
    assert problem in message and "plain file name" in message
    assert isinstance(raised.value, ValueError)  # the CLI's one-line refusal


@pytest.mark.parametrize("value", [float("nan"), 3, None, ["a"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(CaseIdError, match="is not a string but"):
        check_case_id(value, "splits_final.json")


def test_file_ending_cannot_hold_a_path() -> None:
    assert check_file_ending(".nii.gz", "dataset.json") == ".nii.gz"
    for bad in ("/../../x.nii.gz", "\\x", ".nii\x00.gz", None):
        with pytest.raises(CaseIdError, match="dataset.json: file_ending"):
            check_file_ending(bad, "dataset.json")


# --- plan ----------------------------------------------------------------------------------------------------


def raw_dataset(root: Path, dataset_json: dict, images: tuple[str, ...] = ()) -> Path:
    """A raw dataset folder holding only dataset.json (and empty image files): enough for the refusal, which
    must come before nnU-Net opens any image."""
    folder = root / "raw" / "Dataset991_Escape"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for name in images:
        (folder / "imagesTr" / name).write_bytes(b"")
    base = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
            "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps({**base, **dataset_json}), encoding="utf-8")
    return folder


def every_file(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("dataset_json", "images", "named"),
    [
        # nnU-Net 2.8's explicit "dataset" mapping: its keys are the identifiers; this one wrote three folders up
        ({"dataset": {"../../../escaped_0": {"images": ["imagesTr/a_0000.nii.gz"], "label": "labelsTr/a.nii.gz"}}},
         (), ("dataset.json", "'../../../escaped_0'")),
        ({"dataset": {"ok": {"images": [], "label": "x"}, "/tmp/abs": {"images": [], "label": "y"}}},
         (), ("dataset.json", "'/tmp/abs'")),
        # identifiers from imagesTr file names (a macOS resource-fork file)
        ({}, ("case_000_0000.nii.gz", "._case_000_0000.nii.gz"), ("imagesTr", "'._case_000'")),
        # a file ending that is a path
        ({"file_ending": "/../../../x.nii.gz"}, (), ("dataset.json", "file_ending")),
    ],
)
def test_plan_refuses_unsafe_identifiers_before_nnunet_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    dataset_json: dict, images: tuple[str, ...], named: tuple[str, str],
) -> None:
    raw_dataset(tmp_path, dataset_json, images)
    (tmp_path / "pre").mkdir()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    before = every_file(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert main(["plan", "-d", "Dataset991_Escape", "--preset", "tiny", "-np", "1"]) == 1
    assert all(part in caplog.text for part in named), caplog.text
    assert "extracting the dataset fingerprint" not in caplog.text
    assert every_file(tmp_path) == before  # nothing written, in or outside the dataset


# --- split (identifiers from the preprocessed folder) ----------------------------------------------------------


def test_split_refuses_unsafe_identifiers_of_the_preprocessed_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    folder = fake_preprocessed_dataset(tmp_path, [f"case_{i:03d}" for i in range(9)] + [".hidden"])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["split", "-d", "Dataset777_Fake", "--shots", "2", "--seeds", "0"]) == 1
    assert "nnUNetPlans_3d_fullres: case identifier '.hidden'" in caplog.text
    assert not (folder / "splits_final.json").exists() and not (folder / "splits_manifest.json").exists()


# --- experiment and report (identifiers of test folders, summaries and splits) ----------------------------------


def write_test_folders(root: Path, cases: list[str]) -> tuple[Path, Path]:
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir(parents=True)
    labels.mkdir()
    for case in cases:
        (images / f"{case}_0000.nii.gz").write_bytes(b"")
        (labels / f"{case}.nii.gz").write_bytes(b"")
    return images, labels


def test_experiment_refuses_unsafe_test_case_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    folder = fake_preprocessed_dataset(tmp_path / "pre")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}),
                                         encoding="utf-8")
    images, labels = write_test_folders(tmp_path / "test", ["t1", "..evil"])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "dataset": "Dataset777_Fake", "plans": "nnUNetPlans", "arms": [{"name": "scratch"}],
        "settings": {"full": {"folds": [0]}}, "test_set": {"images": str(images), "labels": str(labels)},
    }), encoding="utf-8")
    assert main(["experiment", "emit", str(experiment)]) == 1
    assert f"{images}: case identifier '..evil'" in caplog.text


def test_report_refuses_unsafe_case_ids_in_split_and_test_folders(
    nnunet_tree: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    results, preprocessed = nnunet_tree
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    splits_file = preprocessed / DATASET / "splits_final.json"
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    splits[0]["val"].append("../../x")
    splits_file.write_text(json.dumps(splits), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["report", "-d", DATASET, "--trainers", "Scratch", "-f", "0", "--out", str(out)]) == 1
    assert f"{splits_file}: case identifier '../../x' (fold 0, 'val' entry 2)" in caplog.text
    assert not out.exists()

    splits[0]["val"].pop()
    splits_file.write_text(json.dumps(splits), encoding="utf-8")
    images, labels = write_test_folders(tmp_path / "test", ["t1", ".t2"])
    caplog.clear()
    assert main(["report", "-d", DATASET, "--trainers", "Scratch", "-f", "0", "--out", str(out),
                 "--test-images", str(images), "--test-labels", str(labels)]) == 1
    assert f"{images}: case identifier '.t2'" in caplog.text
    assert not (out / "predictions").exists()
