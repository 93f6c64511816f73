"""`nnunet-ssl split` with bad split files and failing writes: refused in one line naming the file, nothing
half-written, a symbolic link written through."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
from test_splits import CASES, fake_preprocessed_dataset

from nnunet_ssl.cli import main
from nnunet_ssl.splits import (
    MANIFEST_FILE,
    SPLITS_FILE,
    SplitError,
    SplitRequest,
    apply_split_request,
    ensure_default_splits,
    nnunet_default_splits,
)

DATASET = "Dataset777_Fake"
SPLIT = ["split", "-d", DATASET, "--shots", "5", "--seeds", "0"]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    return fake_preprocessed_dataset(tmp_path)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry of the dataset folder (files with their bytes; hidden temporary files included)."""
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in folder.iterdir()}


def refused(argv: list[str], caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    return caplog.text


# --- (a) an empty split file --------------------------------------------------------------------------------


def test_empty_split_file_is_refused_with_what_to_do(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / SPLITS_FILE).write_text("[]", encoding="utf-8")
    before = snapshot(folder)
    message = refused(SPLIT, caplog)
    assert f"{folder / SPLITS_FILE} holds no folds" in message and "delete it" in message
    assert "0--1" not in message and "--val-from-fold" not in message  # a flag the user never passed
    assert "holds no folds" in refused([*SPLIT, "--val-cases", "6"], caplog)
    assert snapshot(folder) == before
    with pytest.raises(SplitError, match="holds no folds"):  # experiment's full folds: not a random 80:20 split
        ensure_default_splits(folder)


def test_missing_default_fold_is_explained_without_naming_an_unused_flag() -> None:
    from nnunet_ssl.splits import choose_validation

    with pytest.raises(SplitError, match=r"fold 0 \(the default\): the split file has no folds; give --val-cases"):
        choose_validation(SplitRequest("few_shot", (5,), (0,)), CASES, [])


# --- (b) entries that are not known case identifiers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: s[1]["train"].insert(3, float("nan")), "case identifier nan (fold 1, 'train' entry 3) is not a string"),
        (lambda s: s[2]["val"].append(7), "case identifier 7 (fold 2, 'val' entry 6) is not a string"),
        (lambda s: s[0]["val"].append("case_999"), "case 'case_999' (fold 0, 'val' entry 6) is not among the 30"),
        (lambda s: s[4]["train"].insert(0, "../../x"), "case identifier '../../x' (fold 4, 'train' entry 0)"),
        (lambda s: s[3].update(train="case_001"), "fold 3 is not {'train': [...], 'val': [...]}"),
        (lambda s: s.append([]), "fold 5 is not {'train': [...], 'val': [...]}"),
    ],
)
def test_every_entry_must_be_a_known_case(folder: Path, caplog: pytest.LogCaptureFixture, edit, named: str) -> None:
    splits = nnunet_default_splits(CASES)
    edit(splits)
    (folder / SPLITS_FILE).write_text(json.dumps(splits), encoding="utf-8")  # json writes NaN as NaN, as the bug had
    before = snapshot(folder)
    message = refused(SPLIT, caplog)
    assert f"{folder / SPLITS_FILE}: {named}" in message, message
    assert snapshot(folder) == before  # not written back


# --- (c) a split file that is a symbolic link ---------------------------------------------------------------


def test_symlinked_split_file_is_written_through(folder: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "my_splits.json"
    shared.parent.mkdir()
    own = nnunet_default_splits(CASES)
    shared.write_text(json.dumps(own), encoding="utf-8")
    (folder / SPLITS_FILE).symlink_to(shared)
    assert main(SPLIT) == 0
    link = folder / SPLITS_FILE
    assert link.is_symlink() and Path(os.readlink(link)) == shared  # still the user's link
    written = json.loads(shared.read_text(encoding="utf-8"))
    assert written[:5] == own and len(written) == 6  # the fold went into the file the link points at
    backups = sorted(folder.glob(f"{SPLITS_FILE}.bak-*"))
    assert len(backups) == 1 and not backups[0].is_symlink() and json.loads(backups[0].read_text(encoding="utf-8")) == own
    assert json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["folds"][0]["fold"] == 5
    assert not [p for p in (*folder.iterdir(), *shared.parent.iterdir()) if p.name.endswith(".tmp")]
    assert main(SPLIT) == 0 and len(json.loads(shared.read_text(encoding="utf-8"))) == 6  # idempotent through it


def test_dangling_link_is_refused(folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / SPLITS_FILE).symlink_to(tmp_path / "gone.json")
    before = snapshot(folder)
    assert f"{folder / SPLITS_FILE} is a symbolic link to {tmp_path / 'gone.json'}, which does not exist" in refused(
        SPLIT, caplog)
    assert snapshot(folder) == before and (folder / SPLITS_FILE).is_symlink()


# --- failed writes: one error naming the path, nothing half-written ---------------------------------------------


def test_split_file_that_is_a_folder(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / SPLITS_FILE).mkdir()
    before = snapshot(folder)
    assert f"{folder / SPLITS_FILE} is not a regular file" in refused(SPLIT, caplog)
    assert f"{folder / SPLITS_FILE} is not a regular file" in refused(["split", "-d", DATASET, "--list"], caplog)
    assert snapshot(folder) == before


def _deny_writes_in(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """As a read-only folder behaves (tests may run as root, for whom chmod does not deny)."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == denied:
            raise PermissionError(13, "Permission denied", str(denied / kwargs.get("prefix", "x")))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("existing", [False, True])
def test_read_only_folder_leaves_everything_as_it_was(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                      existing: bool) -> None:
    if existing:
        apply_split_request(folder, SplitRequest("few_shot", (3,), (0,)))
    before = snapshot(folder)
    _deny_writes_in(monkeypatch, folder)
    with pytest.raises(OSError, match=f"cannot write {folder}/splits_final.json.*Permission denied"):
        apply_split_request(folder, SplitRequest("few_shot", (5,), (0,)))
    assert snapshot(folder) == before  # no backup, no temporary file, no manifest


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(folder: Path) -> None:
    apply_split_request(folder, SplitRequest("few_shot", (3,), (0,)))
    before = snapshot(folder)
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match=f"cannot write {folder}/splits_final.json"):
            apply_split_request(folder, SplitRequest("few_shot", (5,), (0,)))
    finally:
        folder.chmod(0o755)
    assert snapshot(folder) == before


def test_failed_rename_puts_back_the_files_already_renamed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apply_split_request(folder, SplitRequest("few_shot", (3,), (0,)))
    before = snapshot(folder)
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == MANIFEST_FILE:
            raise OSError(28, "No space left on device", str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=f"cannot write {folder / MANIFEST_FILE}: No space left on device"):
        apply_split_request(folder, SplitRequest("few_shot", (5,), (0,)))
    monkeypatch.setattr(os, "replace", real)
    assert snapshot(folder) == before  # split file restored, backup of this call removed, no temporary files
