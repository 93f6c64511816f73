"""Random crops (views) from the cache, loaded in background workers.

Sampling (:class:`ViewSampler`, SSL_METHODS.md "ViewSampler"): with one view, a random
``crop_size^3`` crop of the volume; with ``V > 1`` views, a random ``region_size^3`` region, then
``V`` random crops inside it, so any two views overlap by at least ``2 * crop_size - region_size``
voxels per axis (64 for 96 in 128). Where the volume is smaller than the region the region hangs
over its edge (zero padding); views stay inside the volume along axes where it is at least one
crop long, and contain it whole (zero-padded) where it is shorter.

Order (:class:`CropDataset`): epoch ``e`` is a permutation of all usable volumes drawn from
``(seed, e)``, the same on every rank; rank ``r`` takes positions ``r, r + W, ...`` (``W`` =
world size; the permutation is wrapped to a multiple of ``W``), so ranks see disjoint volumes in
each epoch. Batch ``j`` of a rank holds items ``j * B ... (j + 1) * B - 1`` of its stream of
epochs, and whole batches are dealt round-robin to the loader workers (the ``DataLoader`` takes
them back in the same round-robin order); the crop positions of the ``i``-th item of epoch ``e``
come from a generator seeded with ``(seed, rank, e, i)``. So batch ``j`` is a function of
``(seed, rank, world_size, B, j)`` alone, whatever ``num_workers`` is, never repeats across
ranks, and a loader started at ``start_step = j`` (a resumed run) yields exactly the batches
``j, j + 1, ...`` of the uninterrupted run. Sampling is infinite; one epoch is
:func:`steps_per_epoch` batches.

Augmentation (``DataConfig.augmentation``, :mod:`.augment`): with ``"scale_rotate_mirror"`` every view
is cut with its own scaling, rotation and mirroring, drawn from the same per-item generator after
the view positions, so it is as reproducible as the positions; with ``"none"`` nothing more is drawn
and the views are the plain crops, exactly as without the option.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import blosc2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import SpatialAugmentation, augment_view
from .cache import Manifest, open_array
from .config import DataConfig

logger = logging.getLogger(__name__)

_OPEN_FILES = 32


class ArrayLike(Protocol):
    """A ``(z, y, x)`` array that returns numpy arrays when sliced (``numpy.ndarray``, ``blosc2.NDArray``)."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


def steps_per_epoch(num_volumes: int, batch_size: int, world_size: int = 1) -> int:
    """Optimisation steps for one pass over the volumes: ``ceil(num_volumes / (batch_size * world_size))``."""
    if num_volumes < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(f"need num_volumes, batch_size, world_size >= 1, got {num_volumes}, {batch_size}, {world_size}")
    return math.ceil(num_volumes / (batch_size * world_size))


@dataclass(frozen=True)
class ViewSampler:
    """Where the views of one volume are cut, and the cutting.

    Attributes:
        crop_size: Edge of each cubic view, voxels.
        region_size: Edge of the shared region when ``num_views > 1``.
        num_views: Views per volume.
        augmentation: Scaling, rotation and mirroring of each view (:mod:`.augment`); None for plain crops.
    """

    crop_size: int = 96
    region_size: int = 128
    num_views: int = 1
    augmentation: SpatialAugmentation | None = None

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        if self.region_size < self.crop_size:
            raise ValueError(f"region_size ({self.region_size}) must be >= crop_size ({self.crop_size})")
        if self.num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {self.num_views}")

    def origins(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Random view corners for a volume of ``shape``.

        Args:
            shape: ``(D, H, W)`` of the volume.
            rng: Source of randomness.

        Returns:
            ``(V, 3)`` int64 corners ``(z, y, x)`` of the views; negative values, or views
            reaching past the volume, mean zero padding.
        """
        c, r, v = self.crop_size, self.region_size, self.num_views
        out = np.empty((v, 3), dtype=np.int64)
        for axis, size in enumerate(int(s) for s in shape):
            lo_all, hi_all = min(0, size - c), max(0, size - c)  # every position the view may take
            if v == 1:
                out[0, axis] = rng.integers(lo_all, hi_all + 1)
                continue
            region = int(rng.integers(min(0, size - r), max(0, size - r) + 1))
            lo, hi = max(region, lo_all), min(region + r - c, hi_all)
            out[:, axis] = rng.integers(lo, hi + 1, size=v)
        return out

    def read(self, array: ArrayLike, origins: np.ndarray) -> np.ndarray:
        """Cut the views at ``origins`` out of ``array`` with one read of their joint bounding box.

        Args:
            array: ``(D, H, W)`` volume.
            origins: ``(V, 3)`` corners from :meth:`origins`.

        Returns:
            ``(V, 1, c, c, c)`` float32 views; voxels outside the volume are 0.
        """
        c = self.crop_size
        shape = np.asarray(array.shape[-3:], dtype=np.int64)
        lo = np.clip(origins.min(axis=0), 0, shape)
        hi = np.clip(origins.max(axis=0) + c, 0, shape)
        block = np.asarray(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
        out = np.zeros((len(origins), 1, c, c, c), dtype=np.float32)
        for i, origin in enumerate(origins):
            start = np.clip(origin, lo, hi)
            stop = np.clip(origin + c, lo, hi)
            if np.any(stop <= start):
                continue
            src = tuple(slice(int(a - b), int(e - b)) for a, e, b in zip(start, stop, lo, strict=True))
            dst = tuple(slice(int(a - o), int(e - o)) for a, e, o in zip(start, stop, origin, strict=True))
            out[i, 0][dst] = block[src]
        return out

    def sample(self, array: ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """``read(array, origins(array.shape, rng))``: ``(V, 1, c, c, c)`` float32.

        With an augmentation, each view (in order) is instead cut by :func:`~.augment.augment_view` with
        an augmentation drawn from ``rng`` after the origins.
        """
        origins = self.origins(array.shape[-3:], rng)
        if self.augmentation is None:
            return self.read(array, origins)
        views = [augment_view(array, origin, self.crop_size, rng, self.augmentation) for origin in origins]
        return np.stack(views)[:, None]


def epoch_share(num_volumes: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """Volume indices rank ``rank`` visits in ``epoch``, in order (disjoint across ranks when N >= W).

    Returns:
        ``(ceil(N / W),)`` int64 indices into the usable volumes.
    """
    perm = np.random.default_rng([seed, epoch, 0x7E12]).permutation(num_volumes)
    per_rank = math.ceil(num_volumes / world_size)
    wrapped = np.resize(perm, per_rank * world_size)
    return wrapped[rank::world_size]


class CropDataset(IterableDataset):
    """Infinite stream of ``{"views": (V, 1, c, c, c) float32, "index": int}`` samples.

    ``index`` is the volume's position in ``manifest.usable()``. See the module docstring for
    the order and the seeding.
    """

    def __init__(
        self,
        paths: Sequence[str],
        sampler: ViewSampler,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        """Args:
        paths: Cached ``.b2nd`` arrays (``(D, H, W)``, values in ``[0, 1]``).
        sampler: Crop and view geometry.
        seed: Non-negative base seed.
        rank: This process's rank in data-parallel training.
        world_size: Number of ranks.
        batch_size: Items per batch (whole batches are dealt to workers).
        start_batch: First batch to yield (the step a resumed run continues from).
        """
        super().__init__()
        if not paths:
            raise ValueError("CropDataset needs at least one volume")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1 or start_batch < 0:
            raise ValueError(f"need batch_size >= 1 and start_batch >= 0, got {batch_size}, {start_batch}")
        self.batch_size = int(batch_size)
        self.start_batch = int(start_batch)
        self.paths = list(paths)
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._open: OrderedDict[int, ArrayLike] = OrderedDict()

    def _array(self, index: int) -> ArrayLike:
        array = self._open.get(index)
        if array is None:
            array = open_array(self.paths[index])
            self._open[index] = array
            if len(self._open) > _OPEN_FILES:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(index)
        return array

    def items(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, int, int]]:
        """Infinite ``(epoch, position, volume index)`` triples of the batches dealt to ``worker``.

        Batch ``j >= start_batch`` (items ``j * B ... (j + 1) * B - 1`` of the stream) goes to
        worker ``(j - start_batch) % num_workers``; skipped items cost no sampling.
        """
        n = len(self.paths)
        k = 0
        epoch = 0
        while True:
            for position, index in enumerate(epoch_share(n, epoch, self.seed, self.rank, self.world_size)):
                batch = k // self.batch_size
                if batch >= self.start_batch and (batch - self.start_batch) % num_workers == worker:
                    yield epoch, position, int(index)
                k += 1
            epoch += 1

    def sample(self, epoch: int, position: int, index: int) -> dict[str, Any]:
        """The sample for item ``position`` of ``epoch`` (a deterministic function of its arguments)."""
        rng = np.random.default_rng([self.seed, self.rank, epoch, position, 0xC209])
        views = self.sampler.sample(self._array(index), rng)
        return {"views": torch.from_numpy(views), "index": index}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            blosc2.set_nthreads(1)
            torch.set_num_threads(1)
        for epoch, position, index in self.items(worker, num_workers):
            yield self.sample(epoch, position, index)


class CropLoader:
    """Infinite iterator of batches ``{"views": (B, V, 1, c, c, c) float32, "index": (B,) int64}``.

    Attributes:
        dataset: The :class:`CropDataset`.
        loader: The underlying ``torch.utils.data.DataLoader``.
        steps_per_epoch: Batches per pass over the volumes (all ranks together).
        num_volumes: Usable volumes.
    """

    def __init__(self, dataset: CropDataset, batch_size: int, num_workers: int, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_volumes = len(dataset.paths)
        self.steps_per_epoch = steps_per_epoch(self.num_volumes, batch_size, dataset.world_size)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=2 if num_workers > 0 else None,
            persistent_workers=False,
            # its own generator: starting an iterator must not draw from the global RNG, which
            # drop-path uses and a resumed run restores (the samples use their own seeds anyway)
            generator=torch.Generator().manual_seed(dataset.seed),
        )
        self._iterator: Iterator[dict[str, Tensor]] | None = None

    def __iter__(self) -> CropLoader:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return next(self._iterator)

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts the stream again from the beginning)."""
        self._iterator = None


def crop_augmentation(config: DataConfig) -> SpatialAugmentation | None:
    """The augmentation ``config.augmentation`` names (None for ``"none"``), at the cache's spacing."""
    if config.augmentation == "none":
        return None
    if config.augmentation == "scale_rotate_mirror":
        x, y, z = config.spacing
        return SpatialAugmentation(spacing_zyx=(z, y, x))
    raise ValueError(f"unknown augmentation {config.augmentation!r}")


def make_loader(
    manifest: Manifest,
    config: DataConfig,
    batch_size: int,
    num_views: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    start_step: int = 0,
) -> CropLoader:
    """Infinite loader of random crops from the cache, ``config.num_workers`` background workers.

    Args:
        manifest: A built manifest (:func:`~.cache.build_cache` or ``Manifest.load``).
        config: ``crop_size``, ``region_size``, ``augmentation``, ``spacing`` (of the augmentation's
            rotations) and ``num_workers`` are used.
        batch_size: Volumes per batch on this rank.
        num_views: Views per volume ``V`` (overlapping crops of one region when ``V > 1``).
        seed: Non-negative base seed.
        rank: This process's rank.
        world_size: Number of data-parallel ranks.
        pin_memory: Pin batches for faster host-to-GPU copies.
        start_step: First batch to yield: a run resumed at step ``j`` gets the batches the
            uninterrupted run would have got from step ``j`` on.

    Returns:
        A :class:`CropLoader` yielding ``{"views": (B, V, 1, D, H, W) float32 (in [0, 1], or z-scores),
        "index": (B,) int64}`` forever; ``index`` refers to ``manifest.usable()``.

    Raises:
        ValueError: on bad arguments or if the manifest has no usable volume.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    usable = manifest.usable()
    if not usable:
        raise ValueError(f"manifest {manifest.path} has no usable volume")
    sampler = ViewSampler(config.crop_size, config.region_size, num_views, crop_augmentation(config))
    dataset = CropDataset(
        [manifest.array_path(e) for e in usable], sampler, seed, rank, world_size, batch_size, start_step
    )
    logger.info(
        "crop loader: %d volume(s), rank %d/%d, batch %d x %d view(s) of %d^3, %d worker(s), %d step(s) per epoch%s",
        len(usable), rank, world_size, batch_size, num_views, config.crop_size, config.num_workers,
        steps_per_epoch(len(usable), batch_size, world_size),
        f", augmentation {config.augmentation}" if sampler.augmentation is not None else "",
    )
    return CropLoader(dataset, batch_size, config.num_workers, pin_memory)
