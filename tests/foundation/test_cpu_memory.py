"""glibc keeps freed memory in processes started with KEEP_FREED_MEMORY_ENV; the demo starts its commands so."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ssl.cpu_memory import KEEP_FREED_MEMORY_ENV, with_freed_memory_kept
from nnunet_ssl.demo import Demo, DemoConfig

# Touch a 64 MB block and free it: how much of it the process still holds (MiB of resident memory).
HELD_AFTER_FREE = """
import os
import numpy as np
def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = np.ones(16 * 2**20, dtype=np.float32)
touched = resident()
del block
print((resident() - touched + 64 * 2**20) // 2**20)
"""


def held_after_free(env: dict[str, str]) -> int:
    result = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE], env=env, capture_output=True, text=True,
                            encoding="utf-8", check=True)
    return int(result.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_kept_for_reuse_instead_of_unmapped() -> None:
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert held_after_free(plain) < 8  # default glibc: the block was an mmap, unmapped when freed
    assert held_after_free(with_freed_memory_kept(plain)) > 56  # kept in the heap for the next step


def test_the_callers_malloc_settings_win() -> None:
    assert with_freed_memory_kept({"A": "1"}) == {**KEEP_FREED_MEMORY_ENV, "A": "1"}
    assert with_freed_memory_kept({"MALLOC_MMAP_MAX_": "65536"})["MALLOC_MMAP_MAX_"] == "65536"


def test_demo_commands_keep_freed_memory_unless_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEEP_FREED_MEMORY_ENV:
        monkeypatch.delenv(name, raising=False)
    assert KEEP_FREED_MEMORY_ENV.items() <= Demo(DemoConfig(tmp_path)).env.items()
    assert not KEEP_FREED_MEMORY_ENV.keys() & Demo(DemoConfig(tmp_path, keep_freed_memory=False)).env.keys()
