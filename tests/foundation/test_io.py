"""Files written by temp-file-and-rename get the process's normal permissions (umask), not 0600/0700."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nnunet_ssl.io import atomic_json_dump, atomic_torch_save, default_mode


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_are_group_readable_under_umask_022(tmp_path: Path, umask_022) -> None:
    assert default_mode() == 0o644 and default_mode(directory=True) == 0o755
    json_file = atomic_json_dump({"a": 1}, tmp_path / "splits_final.json")
    weights = atomic_torch_save({"network_weights": {}}, tmp_path / "w.pt")
    for path in (json_file, weights):
        assert mode(path) == 0o644, oct(mode(path))


def test_mode_follows_a_stricter_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        assert mode(atomic_json_dump({}, tmp_path / "private.json")) == 0o600
    finally:
        os.umask(previous)


def test_generated_dataset_folders_are_group_readable(tmp_path: Path, umask_022) -> None:
    from nnunet_ssl.data.phantoms import PhantomConfig, write_phantom_datasets

    paths = write_phantom_datasets(tmp_path, PhantomConfig(num_train=1, num_test=0, num_unlabeled=0, shape=(24, 32, 32)))
    assert mode(paths.dataset_dir) == 0o755
    for file in paths.dataset_dir.rglob("*"):
        assert mode(file) & 0o044 == 0o044, file  # group and others can read
