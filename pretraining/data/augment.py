"""Spatial augmentation of one crop: scaling, rotation and mirroring, as nnU-Net (and Spark3D) draw them.

SSL_METHODS.md card 10: Spark3D pretrains with nnU-Net's spatial augmentation, as nnssl's MAE trainer
configures batchgenerators' ``SpatialTransform`` and ``MirrorTransform``
(``BaseMAETrainer.get_training_transforms``; nnU-Net's 3D ``rotation_for_DA``):

* rotation with probability 0.2: angles about all three axes, each uniform in [-30, 30] degrees;
* scaling with probability 0.2: one factor for all axes, uniform in [0.7, 1) or [1, 1.4] with equal
  odds (batchgenerators' draw); a factor above 1 samples a larger region (the anatomy looks smaller);
* mirroring of the result along each axis with probability 0.5.

Differences, by design: the rotation acts in millimetres (the voxel grid's spacing is undone before
rotating and redone after, which is the voxel-space rotation nnU-Net does wherever the spacing is
isotropic, as Spark3D's 1 mm is); the crop is resampled with linear interpolation (nnssl: cubic
splines; nnU-Net 2's own augmentation: trilinear), which a loader process on a CPU can afford.

Everything here is a pure function of its arguments: :meth:`SpatialAugmentation.draw` takes what it
needs from the ``numpy.random.Generator`` it is given (the crop loader's per-item generator, seeded
with ``(seed, rank, epoch, position)``), so a run draws the same augmentations whatever the number of
loader processes, and a resumed run continues the same stream. :func:`augment_view` draws and cuts.

The transformed crop is read from the volume itself (the bounding box of its source positions), so a
rotated or shrunk view shows real anatomy in its corners; positions outside the volume take ``fill``
(0: the low end of a window, or the mean of a z-scored image), like the plain crops.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

#: A ``(z, y, x)`` triple: a sequence or a ``(3,)`` array.
Triple = Sequence[float] | np.ndarray


class ArrayLike(Protocol):
    """A ``(z, y, x)`` array that returns numpy arrays when sliced (``numpy.ndarray``, ``blosc2.NDArray``)."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


@dataclass(frozen=True)
class CropTransform:
    """One drawn augmentation of a crop.

    Attributes:
        matrix: ``(3, 3)`` map from an output voxel's offset to the crop centre, to its source offset in
            the volume's voxels (axes ``(z, y, x)``); the identity when neither rotation nor scaling was drawn.
        flips: Whether the result is mirrored along ``z``, ``y``, ``x``.
        angles_deg: The rotation drawn about ``z``, ``y``, ``x`` (zeros when none was).
        scale: The scale factor drawn (1 when none was).
    """

    matrix: np.ndarray
    flips: tuple[bool, bool, bool]
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    @property
    def resamples(self) -> bool:
        """Whether the crop must be interpolated (a rotation or a scaling was drawn)."""
        return not np.array_equal(self.matrix, np.eye(3))


def rotation_matrix(angles_rad: Triple) -> np.ndarray:
    """``R_z @ R_y @ R_x``: rotations by ``angles_rad[0]`` about ``z`` (the plane ``y, x``), ``[1]`` about ``y``
    and ``[2]`` about ``x``, acting on ``(z, y, x)`` column vectors (each a right-handed rotation)."""
    a, b, c = (float(v) for v in angles_rad)
    about_z = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    about_x = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


@dataclass(frozen=True)
class SpatialAugmentation:
    """Probabilities and ranges of the augmentation (defaults: nnU-Net's, as Spark3D uses them).

    Attributes:
        p_rotation: Probability of a rotation (then about all three axes).
        max_rotation_deg: Each angle is uniform in ``[-max, max]`` degrees.
        p_scale: Probability of a scaling.
        scale_range: ``(low, high)``; a drawn factor is uniform in ``[low, 1)`` or ``[1, high]``, each half the time.
        p_mirror: Probability of mirroring, per axis.
        spacing_zyx: Voxel spacing of the cached volumes ``(z, y, x)`` in mm (rotations act in mm).
    """

    p_rotation: float = 0.2
    max_rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("p_rotation", "p_scale", "p_mirror"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg!r}")
        low, high = self.scale_range
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= 1 <= high, got {self.scale_range!r}")
        if len(self.spacing_zyx) != 3 or min(self.spacing_zyx) <= 0:
            raise ValueError(f"spacing_zyx must be three positive mm values, got {self.spacing_zyx!r}")

    def draw(self, rng: np.random.Generator) -> CropTransform:
        """One augmentation: rotation, then scaling, then the three mirror decisions, from ``rng``.

        Always takes the same number of draws from ``rng`` for a given outcome of the coin flips, so the
        stream that follows depends only on ``rng``'s state.
        """
        angles = np.zeros(3)
        if rng.uniform() < self.p_rotation:
            limit = math.radians(self.max_rotation_deg)
            angles = rng.uniform(-limit, limit, size=3)
        scale = 1.0
        if rng.uniform() < self.p_scale:
            low, high = self.scale_range
            scale = float(rng.uniform(low, 1.0) if rng.uniform() < 0.5 and low < 1.0 else rng.uniform(1.0, high))
        flips = tuple(bool(flip) for flip in rng.uniform(size=3) < self.p_mirror)
        matrix = np.eye(3)
        if scale != 1.0 or angles.any():
            spacing = np.diag(np.asarray(self.spacing_zyx, dtype=np.float64))
            # output voxels -> mm -> rotate and scale -> source voxels
            matrix = np.linalg.inv(spacing) @ (scale * rotation_matrix(angles)) @ spacing
        return CropTransform(
            matrix=matrix,
            flips=(flips[0], flips[1], flips[2]),
            angles_deg=(float(math.degrees(angles[0])), float(math.degrees(angles[1])), float(math.degrees(angles[2]))),
            scale=scale,
        )


def read_box(array: ArrayLike, lo: Triple, hi: Triple, fill: float = 0.0) -> np.ndarray:
    """``array[lo:hi]`` as float32, with ``fill`` where the box reaches past the volume.

    Args:
        array: ``(D, H, W)`` volume.
        lo: Inclusive corner ``(z, y, x)``; may be negative.
        hi: Exclusive corner; may lie past the volume.
    """
    shape = np.asarray(array.shape[-3:], dtype=np.int64)
    lo_arr, hi_arr = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    out = np.full(tuple(int(v) for v in hi_arr - lo_arr), fill, dtype=np.float32)
    start, stop = np.clip(lo_arr, 0, shape), np.clip(hi_arr, 0, shape)
    if np.all(stop > start):
        src = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
        dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(start, stop, lo_arr, strict=True))
        out[dst] = np.asarray(array[src], dtype=np.float32)
    return out


def cut(array: ArrayLike, origin: Triple, crop_size: int, transform: CropTransform, fill: float = 0.0) -> np.ndarray:
    """The ``crop_size^3`` view at ``origin`` under ``transform``: ``(c, c, c)`` float32.

    The view is centred where the plain crop at ``origin`` is (``origin + (c - 1) / 2``); output voxel
    ``o`` takes the volume's value at ``centre + matrix @ (o - (c - 1) / 2)``, linearly interpolated,
    with ``fill`` outside the volume; then the flips. With the identity matrix it is the plain crop
    (read exactly, no interpolation), mirrored.
    """
    c = int(crop_size)
    origin_arr = np.asarray(origin, dtype=np.int64)
    if not transform.resamples:
        view = read_box(array, origin_arr, origin_arr + c, fill)
    else:
        half = (c - 1) / 2.0
        centre = origin_arr + half
        corners = np.array([[sz, sy, sx] for sz in (-half, half) for sy in (-half, half) for sx in (-half, half)])
        sources = centre + corners @ transform.matrix.T
        shape = np.asarray(array.shape[-3:], dtype=np.int64)
        # the source positions' bounding box (one voxel more for the interpolation), inside the volume
        lo = np.clip(np.floor(sources.min(axis=0)).astype(np.int64), 0, shape)
        hi = np.clip(np.ceil(sources.max(axis=0)).astype(np.int64) + 1, 0, shape)
        if np.any(hi <= lo):
            view = np.full((c, c, c), fill, dtype=np.float32)
        else:
            block = read_box(array, lo, hi, fill)
            offset = centre - lo - transform.matrix @ np.full(3, half)
            # grid-constant: positions past the block (past the volume) interpolate against ``fill``
            view = ndimage.affine_transform(
                block, transform.matrix, offset=offset, output_shape=(c, c, c), order=1, mode="grid-constant",
                cval=fill, prefilter=False,
            ).astype(np.float32, copy=False)
    axes = tuple(axis for axis, flip in enumerate(transform.flips) if flip)
    if axes:
        view = np.ascontiguousarray(np.flip(view, axis=axes))
    return view


def augment_view(
    array: ArrayLike,
    origin: Triple,
    crop_size: int,
    rng: np.random.Generator,
    augmentation: SpatialAugmentation,
    fill: float = 0.0,
) -> np.ndarray:
    """Draw an augmentation from ``rng`` and cut the view at ``origin`` with it (:func:`cut`): ``(c, c, c)`` float32."""
    return cut(array, origin, crop_size, augmentation.draw(rng), fill)
