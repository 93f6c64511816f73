"""No command overwrites what it did not create, and every refusal is one line: through the CLI, in-process.

Issue 18, items 1 and 5: ``export``/``convert``/``experiment emit --out`` refuse an existing file unless
``--force`` and never write over their source; an output that is a folder (or a folder output that is a
file) is refused before any work; OSErrors and refused inputs end as one ERROR line naming the file,
exit code 1, no traceback; Ctrl-C is "interrupted", exit code 130; bugs keep their traceback.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_refusals import plans_and_dataset
from test_splits import fake_preprocessed_dataset

from nnunet_ssl import cli
from nnunet_ssl.cli import main
from nnunet_ssl.outputs import WriteError

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny SimMIM pretraining run, as the engine leaves it (checkpoint written in-process, no training)."""
    from nnunet_ssl.checkpoints import CHECKPOINT_FORMAT
    from nnunet_ssl.pretraining.config import RunConfig, data_config_from_dict
    from nnunet_ssl.pretraining.engine import build_run_method

    run = tmp_path_factory.mktemp("run")
    config = RunConfig(method="simmim", preset="tiny",
                       data=data_config_from_dict({"inputs": ["unused"], "cache_dir": str(run / "cache"), "modality": "ct"}))
    torch.manual_seed(0)
    method = build_run_method(config)
    torch.save({"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "method": method.state_dict(), "step": 3},
               run / "checkpoint_final.pt")
    (run / "config.json").write_text(json.dumps(config.to_dict()), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def plans_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("Dataset900_Unit")
    plans, dataset_json = plans_and_dataset(1)
    (folder / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    path = folder / "nnUNetSwinPlans.json"
    path.write_text(json.dumps(plans), encoding="utf-8")
    return path


@pytest.fixture
def no_export_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if export/convert start loading or converting: refusals come first."""

    def expensive(*args: object, **kwargs: object) -> None:
        raise AssertionError("the command started its work before refusing the output")

    monkeypatch.setattr("nnunet_ssl.weights.export.export_run", expensive)
    monkeypatch.setattr("nnunet_ssl.weights.convert_file.convert_file", expensive)


def one_error_line(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, *names: object) -> str:
    """The single ERROR record, one line, naming every one of ``names``; no traceback anywhere."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    message = errors[0]
    assert "\n" not in message and "Traceback" not in message
    for name in names:
        assert str(name) in message, (name, message)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and "Traceback" not in caplog.text
    return message


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- export / convert / emit: files


@pytest.mark.parametrize("force", [False, True])
def test_export_never_writes_over_its_own_run(run_dir: Path, plans_file: Path, force: bool, caplog, capsys) -> None:
    checkpoint = run_dir / "checkpoint_final.pt"
    before = checkpoint.read_bytes()
    flags = ["--force"] if force else []
    for out in (checkpoint, run_dir / "config.json"):
        caplog.clear()
        assert main(["export", str(run_dir), "-p", str(plans_file), "--out", str(out), *flags]) == 1
        assert "source" in one_error_line(caplog, capsys, out)
    caplog.clear()  # the checkpoint given as the source protects its run folder too
    assert main(["export", str(checkpoint), "-p", str(plans_file), "--out", str(run_dir / "config.json"), *flags]) == 1
    one_error_line(caplog, capsys, run_dir / "config.json")
    caplog.clear()  # a weights file named like a checkpoint in the run would be taken for one
    assert main(["export", str(run_dir), "-p", str(plans_file), "--out", str(run_dir / "checkpoint_latest.pt"), *flags]) == 1
    one_error_line(caplog, capsys, run_dir / "checkpoint_latest.pt")
    assert not (run_dir / "checkpoint_latest.pt").exists()
    assert checkpoint.read_bytes() == before


def test_convert_never_writes_over_its_source_even_through_a_link(run_dir: Path, plans_file: Path, tmp_path: Path,
                                                                  caplog, capsys) -> None:
    checkpoint = run_dir / "checkpoint_final.pt"
    before = checkpoint.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(checkpoint)
    hard = tmp_path / "hard.pt"
    os.link(checkpoint, hard)
    for out in (checkpoint, link, hard):
        caplog.clear()
        assert main(["convert", str(checkpoint), "-p", str(plans_file), "--out", str(out), "--force"]) == 1
        assert "source" in one_error_line(caplog, capsys, out)
    assert checkpoint.read_bytes() == before and link.is_symlink()


def test_existing_output_needs_force_then_is_replaced_atomically(run_dir: Path, plans_file: Path, tmp_path: Path,
                                                                 caplog, capsys) -> None:
    from nnunet_ssl.weights.format import load_weights_file

    out = tmp_path / "smit_900.pt"
    out.write_bytes(b"weeks of GPU work")
    for command in (["export", str(run_dir)], ["convert", str(run_dir)]):
        caplog.clear()
        assert main([*command, "-p", str(plans_file), "--out", str(out)]) == 1
        assert "--force" in one_error_line(caplog, capsys, out)
        assert out.read_bytes() == b"weeks of GPU work"
    assert main(["export", str(run_dir), "-p", str(plans_file), "--out", str(out), "--force"]) == 0
    _, metadata = load_weights_file(out)
    assert metadata["method"] == "simmim" and temporary_files(tmp_path) == []


@pytest.mark.parametrize("command", ["export", "convert"])
def test_out_that_cannot_be_a_file_is_refused_before_any_work(command: str, run_dir: Path, tmp_path: Path,
                                                              no_export_work: None, caplog, capsys) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me", encoding="utf-8")
    cases = {folder: "is a folder", regular / "w.pt": "is not a folder", regular / "sub" / "w.pt": "is not a folder"}
    if os.path.exists("/dev/null"):
        cases[Path("/dev/null")] = "not a regular file"
    for out, problem in cases.items():
        caplog.clear()
        assert main([command, str(run_dir), "-d", "900", "--out", str(out), "--force"]) == 1
        assert problem in one_error_line(caplog, capsys, out)
    assert list(folder.iterdir()) == [] and regular.read_text(encoding="utf-8") == "keep me"


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root writes in read-only folders; the simulated test below covers it")
def test_out_in_a_read_only_folder_is_refused_before_any_work(run_dir: Path, tmp_path: Path, no_export_work: None,
                                                              caplog, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["export", str(run_dir), "-d", "900", "--out", str(locked / "w.pt")]) == 1
        one_error_line(caplog, capsys, locked / "w.pt", locked)
    finally:
        locked.chmod(0o755)


class FullDisk:
    """A binary file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_disk_full_keeps_the_previous_file_and_leaves_no_temporary(run_dir: Path, plans_file: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, caplog, capsys) -> None:
    import builtins

    out = tmp_path / "w.pt"
    out.write_bytes(b"previous export")
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle, room=4096) if "w" in mode and str(file).startswith(str(tmp_path)) else handle

    monkeypatch.setattr(builtins, "open", full_disk_open)
    assert main(["export", str(run_dir), "-p", str(plans_file), "--out", str(out), "--force"]) == 1
    monkeypatch.setattr(builtins, "open", real_open)
    message = one_error_line(caplog, capsys, out)
    assert message == f"cannot write {out}: No space left on device"
    assert out.read_bytes() == b"previous export" and temporary_files(tmp_path) == []


def test_emit_out_needs_force_and_never_replaces_the_experiment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog, capsys) -> None:
    dataset = fake_preprocessed_dataset(tmp_path / "preprocessed")
    (dataset / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}), encoding="utf-8")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable.split("_")[1]))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "dataset": 777, "plans": "nnUNetPlans", "preset": "tiny", "device": "cpu",
        "arms": [{"name": "scratch"}], "settings": {"full": {"folds": [0]}},
    }), encoding="utf-8")
    before = experiment.read_bytes()
    jobs = tmp_path / "jobs.sh"
    assert main(["experiment", "emit", str(experiment), "--out", str(jobs)]) == 0
    emitted = jobs.read_bytes()
    assert b"nnUNetv2_train" in emitted
    jobs.write_bytes(b"# my edited job list\n")
    caplog.clear()
    assert main(["experiment", "emit", str(experiment), "--out", str(jobs)]) == 1
    assert "--force" in one_error_line(caplog, capsys, jobs)
    assert jobs.read_bytes() == b"# my edited job list\n"
    assert main(["experiment", "emit", str(experiment), "--out", str(jobs), "--force"]) == 0
    assert jobs.read_bytes() == emitted and temporary_files(tmp_path) == []
    caplog.clear()
    assert main(["experiment", "emit", str(experiment), "--out", str(experiment), "--force"]) == 1
    assert "source" in one_error_line(caplog, capsys, experiment)
    assert experiment.read_bytes() == before


# ---------------------------------------------------------------- output folders


FOLDER_COMMANDS = {
    "pretrain": ["pretrain", "--method", "simmim", "--data", "nowhere", "--out"],
    "cka": ["cka", "--pretrained", "a.pt", "--finetuned", "fold_0", "--data", "imagesTs", "--out"],
    "report": ["report", "-d", "900", "--trainers", "A", "--out"],
    "demo": ["demo", "--out"],
    "make-phantoms": ["make-phantoms", "--out"],
}


@pytest.mark.parametrize("command", sorted(FOLDER_COMMANDS))
def test_a_file_given_as_an_output_folder_is_one_line(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog, capsys) -> None:
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    regular = tmp_path / "results.txt"
    regular.write_text("keep me", encoding="utf-8")
    for out, problem in ((regular, "is a file, not a folder"), (regular / "sub", "is not a folder")):
        caplog.clear()
        assert main([*FOLDER_COMMANDS[command], str(out)]) == 1
        assert problem in one_error_line(caplog, capsys, out)
    assert regular.read_text(encoding="utf-8") == "keep me"


# ---------------------------------------------------------------- the error boundary


def test_split_with_a_folder_as_splits_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog, capsys) -> None:
    folder = fake_preprocessed_dataset(tmp_path)
    (folder / "splits_final.json").mkdir()
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["split", "-d", "Dataset777_Fake", "--shots", "5"]) == 1
    one_error_line(caplog, capsys, folder / "splits_final.json")
    assert temporary_files(folder) == [] and list((folder / "splits_final.json").iterdir()) == []


def test_split_in_a_read_only_dataset_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog, capsys) -> None:
    """Root writes anywhere, so the folder refuses as a read-only one would: creating a file in it fails."""
    import tempfile

    folder = fake_preprocessed_dataset(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    real_mkstemp = tempfile.mkstemp

    def read_only_mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, f"{prefix}x1y2z3{suffix}"))
        return real_mkstemp(suffix, prefix, dir, text)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    assert main(["split", "-d", "Dataset777_Fake", "--shots", "5"]) == 1
    message = one_error_line(caplog, capsys, folder)
    assert "Permission denied" in message and ".tmp" not in message  # the file meant, not a temporary one
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetPlans.json", "nnUNetPlans_3d_fullres"]


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root writes in read-only folders; the simulated test above covers it")
def test_split_in_a_chmod_read_only_dataset_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog, capsys) -> None:
    folder = fake_preprocessed_dataset(tmp_path)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folder.chmod(0o555)
    try:
        assert main(["split", "-d", "Dataset777_Fake", "--shots", "5"]) == 1
        assert "Permission denied" in one_error_line(caplog, capsys, folder)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(("raised", "expected"), [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.nii.gz"), "/data/x.nii.gz: Permission denied"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/f/y"), "/data/f/y: Not a directory"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/c.pt"), "/runs/c.pt: No space left on device"),
    (WriteError(errno.ENOSPC, "No space left on device", "/runs/c.pt"), "cannot write /runs/c.pt: No space left on device"),
    (FileNotFoundError("/data/z.json: no such split file"), "/data/z.json: no such split file"),
    (ValueError("--shots must be positive"), "--shots must be positive"),
    (SystemExit("unknown trainer 'X'"), "unknown trainer 'X'"),
])
def test_refusals_and_os_errors_end_as_one_line(raised: BaseException, expected: str, monkeypatch: pytest.MonkeyPatch,
                                                caplog, capsys) -> None:
    def handler(args: object) -> int:
        raise raised

    monkeypatch.setattr(cli, "cmd_ext_path", handler)
    assert main(["ext-path"]) == 1
    assert one_error_line(caplog, capsys) == expected


def test_verbose_logs_the_traceback_of_a_refusal_at_debug(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def handler(args: object) -> int:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", "/x/splits_final.json")

    monkeypatch.setattr(cli, "cmd_ext_path", handler)
    caplog.set_level(logging.DEBUG, logger="nnunet_ssl")
    assert main(["-v", "ext-path"]) == 1
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug and debug[0].exc_info[0] is IsADirectoryError


def test_ctrl_c_is_interrupted_and_exit_130(monkeypatch: pytest.MonkeyPatch, caplog, capsys) -> None:
    def handler(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_ext_path", handler)
    assert main(["ext-path"]) == 130
    assert one_error_line(caplog, capsys) == "interrupted"


@pytest.mark.parametrize("bug", [TypeError("f() takes 1 argument"), AttributeError("'NoneType' has no 'shape'")])
def test_bugs_keep_their_traceback(bug: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(args: object) -> int:
        raise bug

    monkeypatch.setattr(cli, "cmd_ext_path", handler)
    with pytest.raises(type(bug)):
        main(["ext-path"])


def test_the_installed_command_prints_one_line_on_stderr(tmp_path: Path) -> None:
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("dataset: 777\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "nnunet_ssl.cli", "experiment", "emit", str(experiment), "--out", str(experiment)],
        capture_output=True, encoding="utf-8", timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ERROR ") and str(experiment) in result.stderr
    assert experiment.read_text(encoding="utf-8") == "dataset: 777\n"
