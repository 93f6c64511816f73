"""Run a function in several CPU processes joined by a gloo process group (for cross-rank tests)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_in_processes(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each rank in its own process.

    ``fn`` must be a module-level function (it is pickled) and return picklable values (tensors
    are fine).
    """
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args, results), nprocs=world_size, join=True)
    return [results[rank] for rank in range(world_size)]
