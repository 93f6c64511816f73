"""Experiment files: every field's type is checked when the file is read (a list where one integer is
expected, true/false, zero), a file that is not UTF-8 is named, and a folder given as ``weights`` is
called a folder."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_experiment import write_experiment

from nnunet_ssl.cli import main
from nnunet_ssl.experiment.spec import Epochs, ExperimentError, load_experiment

SMIT = {"name": "m", "method": "smit", "weights": "smit.pt"}


@pytest.mark.parametrize(("change", "message"), [
    ({"epochs": {"full": [10, 20]}}, r"epochs\.full must be one integer >= 1, got \[10, 20\] \(a list\)"),
    ({"epochs": {"few_shot": True}}, r"epochs\.few_shot must be one integer >= 1, got True \(true/false\)"),
    ({"epochs": {"few_shot": 2.5}}, r"epochs\.few_shot must be one integer >= 1, got 2\.5"),
    ({"epochs": {"data_limited": -3}}, r"epochs\.data_limited must be one integer >= 1, got -3"),
    ({"epochs": {"full": "100"}}, r"epochs\.full must be one integer >= 1, got '100'"),
    ({"dataset": 0}, r"dataset must be a positive nnU-Net dataset id or a name, got 0"),
    ({"dataset": -501}, r"dataset must be a positive"),
    ({"dataset": [501]}, r"dataset must be an id or a name, got \[501\] \(a list\)"),
    ({"settings": {"few_shot": {"shots": [3], "val_cases": [2, 3]}}},
     r"settings\.few_shot\.val_cases must be one integer >= 1, got \[2, 3\] \(a list\)"),
    ({"settings": {"few_shot": {"shots": [3], "val_from_fold": True}}},
     r"settings\.few_shot\.val_from_fold must be one integer >= 0, got True"),
    ({"settings": {"data_limited": {"sizes": [4], "val_cases": 0}}}, r"settings\.data_limited\.val_cases"),
    ({"arms": [{**SMIT, "method": ["smit"]}]}, r"arms\[0\]\.method \['smit'\] \(a list\) is not a method"),
    ({"arms": [{**SMIT, "method": {"smit": 1}}]}, r"arms\[0\]\.method .* is not a method"),
    ({"env": {"nnUNet_n_proc_DA": None}}, r"env\.nnUNet_n_proc_DA must be a string or a number, got None \(empty\)"),
    ({"env": {"nnUNet_n_proc_DA": [1, 2]}}, r"env\.nnUNet_n_proc_DA must be a string or a number"),
    ({"env": {"nnUNet_compile": True}}, r"env\.nnUNet_compile must be a string or a number, got True .*quote it"),
    ({"seed": [3]}, r"seed must be an integer .* got \[3\] \(a list\)"),
    ({"plans": ["nnUNetPlans"]}, r"plans must be a string, got \['nnUNetPlans'\] \(a list\)"),
])
def test_field_types_are_checked_when_the_file_is_read(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message) as error:
        load_experiment(write_experiment(tmp_path, **change))
    assert str(error.value).startswith(str(tmp_path / "exp.yaml")) and "\n" not in str(error.value)


def test_integers_stay_integers(tmp_path: Path) -> None:
    experiment = load_experiment(write_experiment(
        tmp_path, epochs={"full": 7, "few_shot": None},
        settings={"few_shot": {"shots": [3], "val_cases": 2}, "data_limited": {"sizes": [4], "val_from_fold": 0}},
    ))
    assert experiment.epochs == Epochs(full=7)
    assert experiment.few_shot.val_cases == 2 and experiment.data_limited.val_from_fold == 0


def test_unknown_keys_of_several_types_are_listed(tmp_path: Path) -> None:
    path = write_experiment(tmp_path)
    path.write_text(path.read_text(encoding="utf-8") + "1: one\nzz: two\n", encoding="utf-8")
    with pytest.raises(ExperimentError, match=r"exp\.yaml: unknown field\(s\) 1, zz"):
        load_experiment(path)


def test_epochs_list_is_refused_by_the_cli_before_any_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_experiment(tmp_path, epochs={"full": [10, 20]})
    assert main(["experiment", "emit", str(path)]) == 1
    assert f"{path}: epochs.full must be one integer >= 1, got [10, 20] (a list)" in caplog.text


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_experiment(tmp_path)
    path.write_bytes(path.read_bytes() + b"# caf\xe9 (Latin-1)\n")
    with pytest.raises(ExperimentError, match=r"exp\.yaml: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_experiment(path)
    assert main(["experiment", "emit", str(path)]) == 1
    assert f"{path}: not UTF-8 text" in caplog.text and "Traceback" not in caplog.text


def test_a_folder_is_called_a_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "weights_dir"
    folder.mkdir()
    with pytest.raises(ExperimentError, match=r"arms\[0\]\.weights .*weights_dir is a folder, not a file; give the "
                                              r"\.pt file that `nnunet-ssl export` wrote"):
        load_experiment(write_experiment(tmp_path, arms=[{**SMIT, "weights": "weights_dir"}]))
    with pytest.raises(ExperimentError, match=r"arms\[0\]\.pretraining_run .*smit\.pt is a file, not a folder"):
        load_experiment(write_experiment(tmp_path, arms=[{"name": "m", "method": "smit", "pretraining_run": "smit.pt"}]))
    with pytest.raises(ExperimentError, match=r"arms\[0\]\.pretraining_run .*absent does not exist"):
        load_experiment(write_experiment(tmp_path, arms=[{"name": "m", "method": "smit", "pretraining_run": "absent"}]))
    # the experiment file itself
    with pytest.raises(IsADirectoryError, match="is a folder; give the YAML or JSON file"):
        load_experiment(folder)
    assert main(["experiment", "emit", str(folder)]) == 1
    assert f"experiment file {folder} is a folder" in caplog.text
