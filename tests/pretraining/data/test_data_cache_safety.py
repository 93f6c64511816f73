"""The cache never touches a file outside its folder, whatever its (possibly shared) manifest says,
and the next build removes what a killed write left behind (only files of processes that are gone).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_helpers import by_name, config, ct_volume, write

from nnunet_ssl.pretraining.data import Manifest, build_cache
from nnunet_ssl.pretraining.data.cache import MANIFEST_NAME


def _plant(cache: Path, entries: list[dict]) -> None:
    manifest = json.loads((cache / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest["entries"].extend(entries)
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")


def test_manifest_entries_pointing_outside_the_cache_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    volume = write(ct_volume(seed=1), tmp_path / "in" / "a.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    cache = Path(cfg.cache_dir)
    good = by_name(build_cache(cfg))["a.nii.gz"]
    victims = {name: tmp_path / "precious" / name for name in ("up.b2nd", "absolute.b2nd", "linked.b2nd")}
    for path in victims.values():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weeks of work")
    os.symlink(victims["linked.b2nd"], cache / "linked.b2nd")
    vanished = {"kind": "nifti", "modality": "ct", "status": "ok", "cache_bytes": 13}
    _plant(cache, [
        # sources that are gone: their arrays would be deleted
        {**vanished, "key": "/gone/1.nii.gz", "source": "/gone/1.nii.gz", "cache_file": "../precious/up.b2nd"},
        {**vanished, "key": "/gone/2.nii.gz", "source": "/gone/2.nii.gz", "cache_file": str(victims["absolute.b2nd"])},
        {**vanished, "key": "/gone/3.nii.gz", "source": "/gone/3.nii.gz", "cache_file": "linked.b2nd"},
    ])
    # a live source whose entry claims the outside file as its array (same digest: would be reused and read)
    manifest = json.loads((cache / MANIFEST_NAME).read_text(encoding="utf-8"))
    for entry in manifest["entries"]:
        if entry["key"] == good.key:
            entry["cache_file"], entry["cache_bytes"] = "linked.b2nd", len(b"weeks of work")
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")

    with caplog.at_level("WARNING"):
        rebuilt = build_cache(cfg)

    assert all(path.read_bytes() == b"weeks of work" for path in victims.values())
    for name in ("../precious/up.b2nd", str(victims["absolute.b2nd"]), "linked.b2nd"):
        assert name in caplog.text
    assert str(cache / MANIFEST_NAME) in caplog.text and "/gone/1.nii.gz" in caplog.text and volume in caplog.text
    # the live source was preprocessed again into the cache, the planted entries are gone
    assert [e.key for e in rebuilt.entries] == [good.key]
    array = rebuilt.array_path(rebuilt.entries[0])
    assert os.path.dirname(os.path.realpath(array)) == os.path.realpath(cache) and not os.path.islink(array)
    # an entry leading outside is refused when a manifest is loaded or asked for an array path
    entry = Manifest.load(str(cache)).entries[0]
    entry.cache_file = "../precious/up.b2nd"
    with pytest.raises(ValueError, match="not a file inside the cache"):
        rebuilt.array_path(entry)


_KILLED_WRITE = """
import os, sys
import numpy as np
from nnunet_ssl.pretraining.data import cache
os.replace = lambda *args: os._exit(9)  # killed between writing and renaming
cache.write_array(os.path.join(sys.argv[1], "v.b2nd"), np.zeros((4, 4, 4), np.float16))
"""


def test_temporary_files_of_killed_writes_are_removed_and_no_others(tmp_path: Path) -> None:
    write(ct_volume(seed=1), tmp_path / "in" / "a.nii.gz")
    cfg = config([tmp_path / "in"], tmp_path / "cache")
    cache = Path(cfg.cache_dir)
    cache.mkdir()
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(cache)], check=False)
    assert killed.returncode == 9
    left = sorted(os.listdir(cache))
    assert len(left) == 1 and left[0].startswith("v.tmp")  # what a killed write leaves
    # Temporary files are named <name>.tmp-<host>-<pid>[.b2nd].
    host, dead = socket.gethostname(), _dead_pid()
    ours = cache / f"w.tmp-{host}-{os.getpid()}.b2nd"  # a live process (this one) is writing it
    other_host = cache / f"x.tmp-otherhost-{dead}.b2nd"  # another host's: a pid says nothing here
    manifest_tmp = cache / f"{MANIFEST_NAME}.tmp-{host}-{dead}"  # a killed save of the manifest
    old_style = cache / "y.tmp12345.b2nd"  # no host in the name: cannot tell whose it is
    unrelated = cache / "notes.tmp-me-1.txt"
    for path in (ours, other_host, manifest_tmp, old_style, unrelated):
        path.write_bytes(b"x")

    build_cache(cfg)

    assert not (cache / left[0]).exists() and not manifest_tmp.exists()
    assert ours.exists() and other_host.exists() and old_style.exists() and unrelated.exists()


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)
