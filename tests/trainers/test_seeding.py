"""NNUNET_SSL_SEED: parsing, derived worker seeds, and that seeded nnU-Net workers repeat their draws."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

from nnunet_ssl.trainers.inputs import SEED_ENV, TrainerInputError, seed_from_environment
from nnunet_ssl.trainers.seeding import process_seed, seed_process, worker_seeds


def test_seed_from_environment() -> None:
    assert seed_from_environment({}) is None
    assert seed_from_environment({SEED_ENV: " "}) is None
    assert seed_from_environment({SEED_ENV: "42"}) == 42
    assert seed_from_environment({SEED_ENV: str(2**32 - 1)}) == 2**32 - 1
    for bad in ("abc", "1.5", "-1", str(2**32)):
        with pytest.raises(TrainerInputError, match=SEED_ENV):
            seed_from_environment({SEED_ENV: bad})


def test_worker_seeds_are_pure_distinct_and_epoch_dependent() -> None:
    train = worker_seeds(7, "train", 0, 3)
    assert train == worker_seeds(7, "train", 0, 3)
    assert len(set(train)) == 3
    assert not set(train) & set(worker_seeds(7, "val", 0, 3))
    assert train != worker_seeds(7, "train", 5, 3) != worker_seeds(8, "train", 0, 3)
    assert not set(train) & set(worker_seeds(7, "train", 0, 3, rank=1))  # DDP ranks draw different patches
    assert all(0 <= s < 2**32 for s in train)
    assert process_seed(7, 0) == 7 and process_seed(7, 5) == process_seed(7, 5) != 7
    assert process_seed(7, 0, rank=1) != 7
    with pytest.raises(ValueError, match="stream"):
        worker_seeds(7, "test", 0, 1)


def test_seed_process_repeats_python_numpy_and_torch() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.uniform()), float(torch.rand(1))

    seed_process(3)
    first = draw()
    seed_process(3)
    assert draw() == first


class _RandomLoader(DataLoader):
    """Infinite loader whose batches are draws of the worker's global NumPy RNG (as nnU-Net's loader)."""

    def __init__(self) -> None:
        super().__init__(list(range(4)), 1, 1, infinite=True)

    def generate_train_batch(self) -> dict[str, np.ndarray]:
        return {"data": np.random.uniform(size=3)}


def _first_batches(seeds: list[int] | None, count: int = 3) -> list[np.ndarray]:
    augmenter = NonDetMultiThreadedAugmenter(_RandomLoader(), None, 1, num_cached=2, seeds=seeds, wait_time=0.002)
    try:
        return [next(augmenter)["data"] for _ in range(count)]
    finally:
        augmenter._finish()


def test_seeded_background_worker_repeats_its_batches() -> None:
    """The mechanism the trainer relies on: a seeded nnU-Net worker draws the same batches again."""
    seeds = worker_seeds(11, "train", 0, 1)
    np.testing.assert_array_equal(np.stack(_first_batches(seeds)), np.stack(_first_batches(seeds)))
    assert not np.array_equal(np.stack(_first_batches(None)), np.stack(_first_batches(None)))


def test_epoch_override_from_environment() -> None:
    from nnunet_ssl.trainers.inputs import EPOCHS_ENV, epochs_from_environment
    from nnunet_ssl.trainers.recipe import FineTuneRecipe, with_epochs

    assert epochs_from_environment({}) is None and epochs_from_environment({EPOCHS_ENV: "12"}) == 12
    for bad in ("0", "-3", "ten", "1.5"):
        with pytest.raises(TrainerInputError, match=EPOCHS_ENV):
            epochs_from_environment({EPOCHS_ENV: bad})
    recipe = with_epochs(FineTuneRecipe(), 1)
    assert (recipe.num_epochs, recipe.warmup_epochs) == (1, 0)  # the 50-epoch warm-up no longer fits
    assert with_epochs(FineTuneRecipe(), 200).warmup_epochs == 50
