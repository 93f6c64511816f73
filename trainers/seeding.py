"""Seeding of the Swin trainers from ``NNUNET_SSL_SEED`` (no seed: nnU-Net's unseeded behaviour).

The variable is read with the trainer's other inputs (:mod:`nnunet_ssl.trainers.inputs`).

nnU-Net 2.8.1 does not seed training: the process RNGs start from OS entropy and its background
augmenters (``NonDetMultiThreadedAugmenter`` with ``seeds=None``) call ``np.random.seed(None)`` in
every worker. With a seed the trainer seeds Python's ``random``, NumPy and torch in the training
process, and hands each data-loader worker its own seed, derived from (seed, stream, epoch, rank) with
NumPy's ``SeedSequence``. The epoch is the one training starts (or continues) at, so a run
continued with ``--c`` draws other batches than the epochs before the interruption did, and two
runs continued at the same epoch draw the same ones.

See docs/reproducibility.md for what this makes reproducible and what it does not.
"""
from __future__ import annotations

import random

import numpy as np
import torch

#: Key of the seed in the ``init_args`` nnU-Net saves in every checkpoint.
CHECKPOINT_KEY = "nnunet_ssl_seed"
#: Data-loader streams: their worker seeds never coincide.
STREAMS = {"train": 0, "val": 1}


def process_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of training process ``rank`` when training starts at ``epoch`` (``seed`` itself at 0, rank 0)."""
    if epoch == 0 and rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_process(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def worker_seeds(seed: int, stream: str, epoch: int, count: int, rank: int = 0) -> list[int]:
    """One seed per background worker of a data-loader ``stream`` (``"train"`` or ``"val"``).

    Distinct across workers, streams and DDP ranks (so GPUs do not draw the same patches); a pure
    function of its arguments.

    Raises:
        ValueError: for an unknown stream or a count below 1.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {sorted(STREAMS)}, got {stream!r}")
    if count < 1:
        raise ValueError(f"need at least one worker, got {count}")
    states = np.random.SeedSequence([seed, STREAMS[stream], epoch, rank]).generate_state(count)
    return [int(s) for s in states]
