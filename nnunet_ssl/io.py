"""Small file helpers shared by checkpoints and exports."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nnunet_ssl.outputs import WriteError


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` give new files / folders under the process's umask (0644 / 0755 at 022).

    ``tempfile`` creates private 0600 files and 0700 folders; renamed into place as they are, group
    members on a shared cluster could not read them.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _write_error(error: OSError, path: Path, tmp: str | None) -> WriteError:
    reason = error.strerror or str(error)
    ours = (str(path), tmp)
    others = [str(n) for n in (error.filename, error.filename2) if n is not None and str(n) not in ours]
    if others and Path(others[0]).parent == path.parent and Path(others[0]).name.startswith(f".{path.name}."):
        others[0] = f"in {path.parent}"  # mkstemp's temporary file: the folder is what refused it
    if isinstance(error, FileExistsError) and others:  # mkdir met a file where a folder was needed
        reason = f"{others[0]} is not a folder"
    elif others:
        reason += f" ({others[0]})"
    return WriteError(error.errno, reason, str(path))


def atomic_write(path: str | os.PathLike[str], write: Any) -> Path:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it.

    A reader (or a resumed run after ``kill -9``) sees either the old file or the new one, never a
    half-written file; a failed write removes its temporary file.

    Raises:
        WriteError: any ``OSError`` on the way (disk full, permission, a folder at ``path``), naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(error, path, None) from error
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(directory=False))  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as error:
        raise _write_error(error, path, tmp) from error
    finally:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):  # the error that brought us here is the one to report
                os.remove(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` atomically (see :func:`atomic_write`).

    ``torch.save`` reports a failed write (a full disk) as a ``RuntimeError``; it is raised as the
    ``OSError`` underneath, so callers see :class:`WriteError` naming ``path``.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            try:
                torch.save(obj, handle)
            except RuntimeError as error:
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from error
                raise

    return atomic_write(path, write)


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_json_dump(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write JSON atomically, indented and key-sorted."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True)
            handle.write("\n")

    return atomic_write(path, write)
