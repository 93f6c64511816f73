"""glibc settings with which a CPU training process keeps its freed memory for reuse.

By default glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it when it is
freed, so each training step faults its whole working set in again and the kernel zeroes every
page. With ``MALLOC_MMAP_MAX_=0`` large blocks come from the heap, and with a huge
``MALLOC_TRIM_THRESHOLD_`` freed heap memory is kept: the process holds its peak between steps
and reuses it. Measured on 2 CPU cores (docs/benchmarks.md): a SimMIM pretraining step at 96^3
9.5 s instead of 13.8 s, a 2-epoch ``nnUNetv2_train`` of the demo's trainer 55-58 s instead of 66 s. The variables
are read when a process starts, so they are set for child processes; other C libraries ignore them.
"""
from __future__ import annotations

from collections.abc import Mapping

#: Environment variables that make glibc keep freed memory (see the module docstring).
KEEP_FREED_MEMORY_ENV: dict[str, str] = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def with_freed_memory_kept(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus :data:`KEEP_FREED_MEMORY_ENV`; a variable already in ``env`` keeps its value."""
    return {**KEEP_FREED_MEMORY_ENV, **env}
