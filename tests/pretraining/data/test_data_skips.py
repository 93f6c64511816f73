"""The data pipeline skips what it cannot use, never aborts or hangs, and lists every skip with its reason.

File names that are not UTF-8, FIFOs named like volumes, symlinked and unreadable folders, one file
under two names, one file given two modalities (DICOM series with a missing slice:
``test_data_dicom_slices.py``).
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import by_name, config, ct_volume, mr_volume, nnunet_dataset, write, write_dicom_series

from nnunet_ssl.pretraining.data import Manifest, build_cache, open_array, scan_inputs, summarize


@contextmanager
def unblocking(fifos: list[Path], seconds: float) -> Iterator[None]:
    """Fail instead of hanging: after ``seconds``, a reader blocked opening one of ``fifos`` gets an
    end of file (a writer opens and closes it), and the block fails naming the FIFOs it was stuck on.
    """
    done = threading.Event()
    rescued: list[str] = []

    def watch() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO unless a reader is waiting
                except OSError:
                    continue
                rescued.append(str(fifo))
                os.close(fd)
            done.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    assert not rescued, f"blocked opening {sorted(set(rescued))}"


def _bytes_path(folder: Path, name: bytes) -> str:
    """The ``str`` path Python gives a file whose name holds bytes that are not UTF-8."""
    return os.fsdecode(os.path.join(os.fsencode(folder), name))


def test_a_name_that_is_not_utf8_is_skipped_and_shown_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write(ct_volume(seed=1), folder / "good.nii.gz")
    write(ct_volume(seed=2), folder / "tmp.nii.gz")
    os.rename(folder / "tmp.nii.gz", _bytes_path(folder, b"bad\xff.nii.gz"))
    os.makedirs(_bytes_path(folder, b"dir\xfe"))
    write(ct_volume(seed=3), folder / "tmp.nii.gz")
    os.rename(folder / "tmp.nii.gz", _bytes_path(folder, b"dir\xfe/c.nii.gz"))
    Path(_bytes_path(folder, b"notes\xff.csv")).write_text("not an image", encoding="utf-8")

    manifest = build_cache(config([folder], tmp_path / "cache"))

    entries = by_name(manifest)
    assert sorted(entries) == ["bad\\xff.nii.gz", "dir\\xfe", "good.nii.gz"]
    assert entries["good.nii.gz"].status == "ok"
    for name in ("bad\\xff.nii.gz", "dir\\xfe"):
        assert entries[name].status == "skipped" and entries[name].reason == "name not UTF-8", entries[name]
    # The manifest is valid UTF-8 JSON without escaped lone surrogates, and reads back the same.
    raw = Path(manifest.path).read_bytes().decode("utf-8", errors="strict")
    assert "\\udc" not in raw.lower()
    json.loads(raw)
    text = summarize(manifest)
    assert "name not UTF-8: 2" in text and "bad\\xff.nii.gz" in text
    assert summarize(Manifest.load(manifest.path)) == text


def test_a_fifo_named_like_a_volume_is_listed_never_opened(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write(ct_volume(seed=1), folder / "good.nii.gz")
    os.mkfifo(folder / "pipe.nii.gz")
    series = write_dicom_series(ct_volume(seed=2), folder / "dicom")
    os.mkfifo(Path(series) / "IM0001")  # no suffix: would be opened to look for the DICM magic
    os.mkfifo(Path(series) / "zz.dcm")  # GDCM drops files of the series when it meets a FIFO
    dataset = nnunet_dataset(tmp_path / "Dataset501_X", {"0": "CT"}, n_tr=1, n_ts=0)
    os.mkfifo(Path(dataset) / "imagesTr" / "caseTr999_0000.nii.gz")
    os.mkfifo(tmp_path / "named.nii.gz")  # given as an input itself
    fifos = [folder / "pipe.nii.gz", Path(series) / "IM0001", Path(series) / "zz.dcm",
             Path(dataset) / "imagesTr" / "caseTr999_0000.nii.gz", tmp_path / "named.nii.gz"]

    with unblocking(fifos, 60):
        manifest = build_cache(config([folder, dataset, tmp_path / "named.nii.gz"], tmp_path / "cache"))

    entries = by_name(manifest)
    for name in ("pipe.nii.gz", "IM0001", "zz.dcm", "caseTr999_0000.nii.gz", "named.nii.gz"):
        assert entries[name].status == "skipped" and entries[name].reason == "not a regular file", name
        assert "FIFO" in entries[name].detail
    assert entries["good.nii.gz"].status == "ok" and entries["caseTr000_0000.nii.gz"].status == "ok"
    assert entries["dicom"].status == "ok" and entries["dicom"].source_shape == (48, 48, 40)  # every slice
    assert "not a regular file: 5" in summarize(manifest)
    # The series, grouped without GDCM's folder scan, gives the same voxels as its NIfTI form.
    write(ct_volume(seed=2), tmp_path / "same" / "img.nii.gz")
    ref = build_cache(config([tmp_path / "same"], tmp_path / "cache_ref")).entries[0]
    np.testing.assert_array_equal(
        open_array(manifest.array_path(entries["dicom"]))[...], open_array(os.path.join(tmp_path / "cache_ref", ref.cache_file))[...]
    )


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write(ct_volume(seed=1), folder / "a.nii.gz")
    write(ct_volume(seed=2), tmp_path / "elsewhere" / "b.nii.gz")
    write(ct_volume(seed=3), folder / "sub" / "c.nii.gz")
    os.symlink(tmp_path / "elsewhere", folder / "linked")
    os.symlink(folder, folder / "loop")  # back to the input itself
    os.symlink("..", folder / "sub" / "up")  # back to the folder above
    os.symlink(folder / "sub", folder / "again")  # a second name of a folder scanned anyway

    sources, problems = scan_inputs(config([folder], tmp_path / "cache"))

    assert sorted(os.path.relpath(s.path, folder) for s in sources) == [
        "a.nii.gz", os.path.join("linked", "b.nii.gz"), os.path.join("sub", "c.nii.gz")
    ]
    listed = {os.path.relpath(p.path, folder): p for p in problems}
    assert sorted(listed) == ["again", "loop", os.path.join("sub", "up")]
    assert all(p.reason == "duplicate" for p in problems)
    assert "symlink loop" in listed["loop"].detail and "symlink loop" in listed[os.path.join("sub", "up")].detail
    assert str(folder / "sub") in listed["again"].detail


def test_an_unreadable_folder_is_listed_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    write(ct_volume(seed=1), folder / "a.nii.gz")
    write(ct_volume(seed=2), folder / "locked" / "b.nii.gz")
    dataset = Path(nnunet_dataset(tmp_path / "Dataset502_Y", {"0": "CT"}, n_tr=1, n_ts=1))
    locked = [folder / "locked", dataset / "imagesTs"]
    if os.geteuid() == 0:  # root reads folders whatever their mode: refuse the listing instead
        real_scandir, real_listdir = os.scandir, os.listdir

        def refuse(real):
            def call(path=".", *args, **kwargs):
                if os.fspath(path) in {str(p) for p in locked}:
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return real(path, *args, **kwargs)

            return call

        monkeypatch.setattr(os, "scandir", refuse(real_scandir))
        monkeypatch.setattr(os, "listdir", refuse(real_listdir))
    else:
        for path in locked:
            path.chmod(0)
    try:
        manifest = build_cache(config([folder, dataset], tmp_path / "cache"))
    finally:
        for path in locked:
            path.chmod(0o755)
    entries = by_name(manifest)
    for name in ("locked", "imagesTs"):
        assert entries[name].status == "skipped" and entries[name].reason == "unreadable", entries[name]
        assert "Permission denied" in entries[name].detail
    assert entries["a.nii.gz"].status == "ok" and entries["caseTr000_0000.nii.gz"].status == "ok"


def test_one_file_under_several_names_is_used_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    volume = write(ct_volume(seed=1), folder / "a.nii.gz")
    os.symlink(volume, folder / "0_link.nii.gz")  # sorts before the file itself
    os.link(volume, folder / "hard.nii.gz")
    write(ct_volume(seed=2), tmp_path / "other" / "b.nii.gz")
    os.symlink(tmp_path / "other", folder / "linked")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / '0_link.nii.gz'}\n{tmp_path / 'other' / 'b.nii.gz'}\n", encoding="utf-8")

    manifest = build_cache(config([folder, listing], tmp_path / "cache"))

    assert sorted(os.path.relpath(e.source, tmp_path) for e in manifest.usable()) == [
        os.path.join("in", "a.nii.gz"), os.path.join("in", "linked", "b.nii.gz")
    ]
    duplicates = {os.path.relpath(e.source, tmp_path): e for e in manifest.skipped()}
    assert sorted(duplicates) == [os.path.join("in", "0_link.nii.gz"), os.path.join("in", "hard.nii.gz"),
                                  os.path.join("other", "b.nii.gz")]
    assert all(e.reason == "duplicate" for e in duplicates.values())
    assert volume in duplicates[os.path.join("in", "hard.nii.gz")].detail
    assert "duplicate: 3" in summarize(manifest)


def test_one_file_given_two_modalities_is_refused_naming_both_entries(tmp_path: Path) -> None:
    a = write(ct_volume(seed=1), tmp_path / "img" / "a.nii.gz")
    os.symlink(a, tmp_path / "img" / "a_link.nii.gz")
    b = write(ct_volume(seed=2), tmp_path / "img" / "b.nii.gz")
    c = write(mr_volume(seed=3), tmp_path / "img" / "c.nii.gz")
    first, second = tmp_path / "ct.json", tmp_path / "mr.json"
    first.write_text(json.dumps([{"path": "img/a.nii.gz", "modality": "ct"}, {"path": b, "modality": "ct"}]), encoding="utf-8")
    second.write_text(json.dumps([{"path": "img/a_link.nii.gz", "modality": "mr"}, {"path": b, "modality": "mr"},
                                  {"path": c, "modality": "mr"}]), encoding="utf-8")
    # c is also reached through the folder, without modality information: the list's MR holds, no conflict
    sources, problems = scan_inputs(config([tmp_path / "img", first, second], tmp_path / "cache"))

    assert [(os.path.basename(s.path), s.modality) for s in sources] == [("c.nii.gz", "mr")]
    conflicts = {os.path.basename(p.path): p for p in problems if p.reason == "modality conflict"}
    assert sorted(conflicts) == ["a.nii.gz", "b.nii.gz"]
    for problem in conflicts.values():
        assert str(first) in problem.detail and str(second) in problem.detail
        assert "CT" in problem.detail and "MR" in problem.detail
    assert "a_link.nii.gz" in conflicts["a.nii.gz"].detail
