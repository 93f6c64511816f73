"""Small file helpers shared by checkpoints and exports."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` give new files / folders under the process's umask (0644 / 0755 at 022).

    ``tempfile`` creates private 0600 files and 0700 folders; renamed into place as they are, group
    members on a shared cluster could not read them.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: str | os.PathLike[str], write: Any) -> Path:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it.

    A reader (or a resumed run after ``kill -9``) sees either the old file or the new one, never a
    half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(directory=False))  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json_dump(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write JSON atomically, indented and key-sorted."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True)
            handle.write("\n")

    return atomic_write(path, write)
