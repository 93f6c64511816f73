"""Checks on the paths a command writes, made before it does any expensive work.

A command writes an output FILE (``export``/``convert --out``, ``experiment emit --out``) only where
nothing is, or over an earlier file when ``--force`` says so; never over its own source (the file or
run folder it reads), not even with ``--force``. An output FOLDER (``pretrain``, ``cka``, ``report``,
``demo``, ``make-phantoms``) may exist, but not as a file. Either way the folder that will hold the
output must be a folder the process can write in (missing folders below it are created on writing).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

#: A pretraining run's checkpoints are named ``checkpoint_<kind>.pt``; their folder is the run.
RUN_CHECKPOINT_PREFIX = "checkpoint_"


class OutputError(ValueError):
    """An output path a command refuses; the message names the path, the problem and the fix."""


class WriteError(OSError):
    """An ``OSError`` met while writing a file; ``str()`` names the file meant, not a temporary one.

    ``errno`` and ``strerror`` are the original error's (``ENOSPC``, ``EACCES``, ``EISDIR``, ...);
    ``filename`` is the file that was to be written (:func:`nnunet_ssl.io.atomic_write` raises it).
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def check_output_file(
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    sources: Iterable[str | os.PathLike[str]] = (),
    option: str = "--out",
) -> Path:
    """Refuse an output file that would replace something it should not; return it as a ``Path``.

    Args:
        path: The file the command will write (atomically, with missing folders created).
        force: Replace an existing regular file (never a source, a folder or a special file).
        sources: What the command reads: a file, or a folder (a pretraining run) whose contents are
            all protected. A run checkpoint (``checkpoint_*.pt``) protects its whole run folder.
        option: The flag that named ``path``, for the messages.

    Raises:
        OutputError: ``path`` is (inside) a source, a folder, a special file, an existing file
            without ``force``, or below something that is not a writable folder.
    """
    path = Path(path)
    for source in sources:
        _refuse_source(path, Path(source), option)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder; give the name of a file to write")
    if os.path.lexists(path):
        if not path.is_file():
            raise OutputError(f"{option} {path}: exists and is not a regular file; give another file name")
        if not force:
            raise OutputError(f"{option} {path}: already exists; pass --force to replace it")
    _check_writable_folder(path.absolute().parent, path)
    return path


def check_output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Refuse an output folder that is a file or cannot be created or written in; return it as a ``Path``.

    Raises:
        OutputError: ``path`` exists but is not a folder, or the folder (or its nearest existing
            parent) cannot be written.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"{option} {path}: is a file, not a folder; give a folder (it is created if missing)")
    _check_writable_folder(path.absolute(), path)
    return path


def _check_writable_folder(folder: Path, output: Path) -> None:
    """The nearest existing folder at or above ``folder`` must be a folder this process can write in."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {output}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {output}: no permission to write in {existing} (or it is read-only)")


def _refuse_source(path: Path, source: Path, option: str) -> None:
    if not os.path.lexists(source):
        return  # a missing source is the reader's error to report
    refusal = "write elsewhere (--force never replaces the source)"
    if path.exists() and os.path.samefile(path, source):
        raise OutputError(f"{option} {path}: is the source {source} this command reads; {refusal}")
    is_run_checkpoint = source.name.startswith(RUN_CHECKPOINT_PREFIX) and source.suffix == ".pt"
    root = source if source.is_dir() else source.parent if is_run_checkpoint else None
    if root is None:
        return
    entry = Path(os.path.realpath(path.parent)) / path.name  # the folder entry a rename would replace
    if not entry.is_relative_to(os.path.realpath(root)):
        return
    if os.path.lexists(path):
        raise OutputError(f"{option} {path}: would replace a file of the source {root} this command reads; {refusal}")
    if path.name.startswith(RUN_CHECKPOINT_PREFIX):
        raise OutputError(
            f"{option} {path}: a weights file named like a checkpoint inside the run {root} would be taken for the "
            "run's own checkpoint; write elsewhere"
        )
