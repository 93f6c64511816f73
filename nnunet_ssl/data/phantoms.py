"""Seeded synthetic abdominal-CT-like (and T1-like head MR) phantoms written in nnU-Net v2 raw format.

Every case is a small CT-like volume in Hounsfield units: air outside an elliptic body, a
subcutaneous fat layer, a muscle wall, a visceral cavity whose background mixes fat and soft
tissue, a spine (vertebral body, discs, posterior arch), ribs, paraspinal muscles, aorta, IVC,
bowel loops (distractors, some with gas), and the labelled organs: liver (two smooth lobes),
spleen (crescent), both kidneys (with a hilum notch) and 0-3 small hypodense liver lesions.

What makes the task non-trivial:

* organ intensities overlap (liver ~60, spleen ~50, kidney ~40, bowel ~20-45, vessels ~40 HU)
  and per-case means are jittered, so thresholding cannot separate them;
* organ shapes are randomly deformed, rotated, scaled and placed per case;
* edges carry partial volume (sigmoid of an approximate signed distance in mm), the image is
  blurred by a slice-profile PSF, and correlated Gaussian noise of 15-25 HU is added;
* slice spacing varies per case (1.5-3.0 mm) with the anatomy fixed in mm, so thicker slices
  mean fewer slices; in-plane spacing varies too.

Labels are the hard threshold (> 0.5) of the same occupancies used to blend the intensities;
later layers win (lesion > kidney > spleen > liver); bone clears labels.

MR mode (``PhantomConfig(modality="mr")``, ``nnunet-ssl make-phantoms --modality mr``): T1-like
heads in a large noisy background (about two thirds of the voxels): bright scalp fat, a dark skull
with fatty (bright) marrow, dark CSF reaching into the sulci of a folded cortex, grey matter darker
than white matter, deep grey nuclei and the lateral ventricles; a smooth bias field, a per-case gain
(x0.55 to x1.8: scanners differ) and Rician noise whose background mean is removed, so about half of
the background is negative. Labels: grey matter (cortex and deep nuclei), white matter, ventricles;
the channel is named ``T1``. The CT phantoms are unchanged by it.

Coordinates: arrays are ``(z, y, x)``; world millimetres are centred on the volume, ``+x`` is
patient left, ``+y`` posterior, ``+z`` superior (LPS, identity direction). Spacing returned for
SimpleITK is ``(x, y, z)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ssl.io import default_mode

logger = logging.getLogger(__name__)

#: nnU-Net label map; ``kidney`` covers both kidneys.
LABELS: dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "lesion": 4}
#: nnU-Net label map of the MR head phantoms; ``grey_matter`` includes the deep grey nuclei.
MR_LABELS: dict[str, int] = {"background": 0, "grey_matter": 1, "white_matter": 2, "ventricles": 3}
#: ``PhantomConfig.modality`` values.
PHANTOM_MODALITIES = ("ct", "mr")

#: Slice spacings (mm) drawn per case.
SLICE_SPACINGS_MM: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0)
#: ``PhantomConfig.shape[0]`` slices at this spacing give the nominal craniocaudal extent (mm).
REFERENCE_SLICE_SPACING_MM = 2.0
#: ``PhantomConfig.shape[1:]`` voxels at this spacing give the nominal in-plane field of view (mm).
REFERENCE_INPLANE_SPACING_MM = 1.0

CASE_PREFIX = "Phantom"
UNLABELED_PREFIX = "Unlabeled"
FILE_ENDING = ".nii.gz"
#: Marker written into the unlabeled folder (the labelled dataset stores its config in dataset.json).
UNLABELED_MARKER = "phantom_config.json"

_Region = tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


@dataclass(frozen=True)
class PhantomConfig:
    """What :func:`write_phantom_datasets` generates.

    Attributes:
        num_train: Labelled training cases (``imagesTr``/``labelsTr``).
        num_test: Labelled test cases (``imagesTs``/``labelsTs``).
        num_unlabeled: Unlabelled pretraining pool (images only).
        shape: Nominal ``(z, y, x)`` voxels before spacing variation; ``z`` is the slice count at
            2.0 mm, ``y, x`` the in-plane matrix.
        seed: Root seed; every case gets its own stream derived from it.
        dataset_id: nnU-Net dataset id (``Dataset{id:03d}_{name}``).
        dataset_name: nnU-Net dataset name.
        modality: ``"ct"`` (abdominal CT) or ``"mr"`` (T1-like heads, :func:`generate_mr_case`).
    """

    num_train: int = 12
    num_test: int = 4
    num_unlabeled: int = 16
    shape: tuple[int, int, int] = (64, 96, 96)
    seed: int = 0
    dataset_id: int = 501
    dataset_name: str = "Phantom"
    modality: str = "ct"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 16:
            raise ValueError(f"shape must be three sizes >= 16 (z, y, x), got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if self.num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {self.num_train}")
        if self.num_test < 0 or self.num_unlabeled < 0:
            raise ValueError(f"num_test and num_unlabeled must be >= 0, got {self.num_test}, {self.num_unlabeled}")
        if self.num_train + self.num_test > 1000 or self.num_unlabeled > 1000:
            raise ValueError("at most 1000 cases per pool (three-digit case ids)")
        if not 1 <= self.dataset_id <= 999:
            raise ValueError(f"dataset_id must be in 1..999, got {self.dataset_id}")
        if not _NAME_RE.match(self.dataset_name):
            raise ValueError(f"dataset_name must be alphanumeric (dashes allowed), got {self.dataset_name!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.modality not in PHANTOM_MODALITIES:
            raise ValueError(f"modality must be one of {PHANTOM_MODALITIES}, got {self.modality!r}")

    @property
    def dataset_folder_name(self) -> str:
        """nnU-Net folder name, e.g. ``Dataset501_Phantom``."""
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (``shape`` as a list), as stored under ``phantom_config`` in dataset.json.

        ``modality`` is left out for CT, so CT datasets generated before the MR mode still match.
        """
        out = asdict(self)
        out["shape"] = list(self.shape)
        if self.modality == "ct":
            del out["modality"]
        return out

    @property
    def generator(self) -> Callable[[np.random.Generator, tuple[int, int, int], float],
                                    tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
        """``(rng, shape, fov_scale) -> (image, label, spacing_xyz)`` of this modality."""
        return _generate_mr if self.modality == "mr" else _generate

    @property
    def labels(self) -> dict[str, int]:
        """dataset.json's label map of this modality."""
        return dict(MR_LABELS if self.modality == "mr" else LABELS)


@dataclass(frozen=True)
class PhantomPaths:
    """Where :func:`write_phantom_datasets` put things.

    Attributes:
        raw_root: ``<out_dir>/nnUNet_raw`` (use as ``nnUNet_raw``).
        dataset_dir: ``<raw_root>/Dataset501_Phantom`` with imagesTr/labelsTr/imagesTs/labelsTs.
        unlabeled_dir: ``<out_dir>/unlabeled`` with ``Unlabeled_XXX.nii.gz`` images.
    """

    raw_root: Path
    dataset_dir: Path
    unlabeled_dir: Path


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fourier:
    """Smooth random field: a sum of random plane waves, evaluated analytically anywhere."""

    omega: np.ndarray  # (K, 3) angular frequency per (z, y, x) coordinate unit
    phase: np.ndarray  # (K,)
    amp: np.ndarray  # (K,)

    @classmethod
    def random(cls, rng: np.random.Generator, n_terms: int, freq: tuple[float, float], std: float) -> _Fourier:
        """Field with roughly ``std`` standard deviation and angular frequencies in ``freq``."""
        dirs = rng.standard_normal((n_terms, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        omega = dirs * rng.uniform(freq[0], freq[1], size=(n_terms, 1))
        phase = rng.uniform(0.0, 2.0 * np.pi, size=n_terms)
        amp = np.full(n_terms, std * np.sqrt(2.0 / n_terms))
        return cls(omega=omega, phase=phase, amp=amp)

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
        for (oz, oy, ox), ph, a in zip(self.omega, self.phase, self.amp, strict=True):
            out += np.float32(a) * np.cos(np.float32(oz) * z + np.float32(oy) * y + np.float32(ox) * x + np.float32(ph))
        return out


def _rotation(rz: float, ry: float, rx: float) -> np.ndarray:
    """Rotation matrix acting on ``(z, y, x)`` vectors; angles (radians) about the z, y, x axes."""
    cz, sz = np.cos(rz), np.sin(rz)
    cy, sy = np.cos(ry), np.sin(ry)
    cx, sx = np.cos(rx), np.sin(rx)
    about_z = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])  # mixes y, x
    about_y = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])  # mixes z, x
    about_x = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # mixes z, y
    return about_z @ about_y @ about_x


@dataclass(frozen=True)
class _Ellipsoid:
    """Rotated ellipsoid whose boundary is displaced by a smooth random field."""

    center: np.ndarray  # (3,) mm, (z, y, x)
    radii: np.ndarray  # (3,) mm along the local axes
    rotation: np.ndarray  # (3, 3), columns are the local axes in world (z, y, x)
    wobble: _Fourier | None = None  # on normalised local coordinates; relative boundary displacement

    @property
    def half_extent(self) -> np.ndarray:
        """Half size (mm) of a world box that surely contains the shape."""
        slack = 1.0 + (3.0 * float(np.abs(self.wobble.amp).sum()) if self.wobble is not None else 0.0)
        return np.full(3, float(self.radii.max()) * slack + 2.0)

    def sdf(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm, negative inside), first order in the boundary distance."""
        d = (z - np.float32(self.center[0]), y - np.float32(self.center[1]), x - np.float32(self.center[2]))
        rot = self.rotation.astype(np.float32)
        u = [(rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / np.float32(self.radii[i]) for i in range(3)]
        r = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        r = np.maximum(r, np.float32(1e-6))
        grad = np.sqrt(sum((u[i] / np.float32(self.radii[i])) ** 2 for i in range(3))) / r
        level = r - np.float32(1.0)
        if self.wobble is not None:
            level = level - self.wobble(u[0], u[1], u[2])
        return level / np.maximum(grad, np.float32(1e-6))


def _random_ellipsoid(
    rng: np.random.Generator,
    center: np.ndarray,
    radii: np.ndarray,
    angles_deg: tuple[float, float, float],
    wobble: float,
) -> _Ellipsoid:
    """Ellipsoid with the given rotation (degrees about z, y, x) and a random boundary wobble."""
    rot = _rotation(*np.deg2rad(angles_deg))
    field = _Fourier.random(rng, n_terms=6, freq=(1.2, 2.8), std=wobble) if wobble > 0 else None
    return _Ellipsoid(center=np.asarray(center, float), radii=np.asarray(radii, float), rotation=rot, wobble=field)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (smooth union of two signed distances), blend width ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (smooth intersection)."""
    return -_smooth_min(-a, -b, k)


@dataclass(frozen=True)
class _Grid:
    """World coordinates (mm, centred) of the voxel centres along each axis."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @classmethod
    def centred(cls, shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float]) -> _Grid:
        axes = [
            ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing_zyx, strict=True)
        ]
        return cls(z=axes[0], y=axes[1], x=axes[2])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    def full(self) -> _Region:
        """The whole grid as a region with broadcastable coordinates."""
        sl = (slice(None), slice(None), slice(None))
        return sl, self.z[:, None, None], self.y[None, :, None], self.x[None, None, :]

    def region(self, lo: np.ndarray, hi: np.ndarray) -> _Region | None:
        """Voxels inside the world box ``[lo, hi]`` (mm, (z, y, x)); ``None`` if it misses the grid."""
        slices = []
        for axis, a, b in zip((self.z, self.y, self.x), lo, hi, strict=True):
            start, stop = int(np.searchsorted(axis, a, "left")), int(np.searchsorted(axis, b, "right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        sz, sy, sx = slices
        return (sz, sy, sx), self.z[sz][:, None, None], self.y[sy][None, :, None], self.x[sx][None, None, :]

    def region_of(self, *shapes: _Ellipsoid) -> _Region | None:
        """Union bounding box of some ellipsoids."""
        lo = np.min([s.center - s.half_extent for s in shapes], axis=0)
        hi = np.max([s.center + s.half_extent for s in shapes], axis=0)
        return self.region(lo, hi)


class _Canvas:
    """Image and label volumes painted layer by layer (later layers win)."""

    def __init__(self, grid: _Grid, edge_mm: float) -> None:
        self.grid = grid
        self.edge_mm = edge_mm
        self.image = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def occupancy(self, sdf: np.ndarray) -> np.ndarray:
        """Soft partial-volume occupancy: sigmoid of the signed distance (ramp ~ one voxel wide)."""
        t = np.clip(sdf / np.float32(self.edge_mm), -30.0, 30.0)
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(t))).astype(np.float32)

    def paint(
        self,
        sl: tuple[slice, slice, slice],
        occ: np.ndarray,
        value: np.ndarray | float,
        label: int | None = None,
    ) -> None:
        """Blend ``value`` into the image with weight ``occ``; set ``label`` where ``occ > 0.5``."""
        sub = self.image[sl]
        self.image[sl] = sub + occ * (np.asarray(value, dtype=np.float32) - sub)
        if label is not None:
            self.label[sl][np.broadcast_to(occ > 0.5, self.label[sl].shape)] = label


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


def generate_case(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Generate one labelled phantom.

    Args:
        rng: Generator that owns this case (all randomness comes from it).
        shape: Nominal ``(z, y, x)`` voxels. The in-plane matrix is ``shape[1:]``; the slice count
            is ``shape[0] * 2.0 mm / slice_spacing`` (the anatomy is fixed in mm), clipped to
            ``[shape[0] / 2, 2 * shape[0]]``.

    Returns:
        ``image`` float32 HU ``(Z, Y, X)``, ``label`` uint8 ``(Z, Y, X)`` with values of
        :data:`LABELS`, and the spacing ``(x, y, z)`` in mm (SimpleITK order).
    """
    return _generate(rng, shape, fov_scale=1.0)


def _generate(
    rng: np.random.Generator, shape: tuple[int, int, int], fov_scale: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """:func:`generate_case` with a field-of-view factor (matrix size scaled, anatomy unchanged).

    The stages paint in this order and draw from ``rng`` in this order; changing either changes
    every phantom generated so far.
    """
    scene = _acquisition_geometry(rng, shape, fov_scale)
    body = _paint_body(rng, scene)
    _paint_ribs(rng, scene, body)
    spine = _paint_paraspinal_and_vessels(rng, scene, body)
    _paint_bowel(rng, scene, body)
    # labelled organs: liver -> spleen -> kidneys, so kidneys always survive
    _paint_liver(rng, scene, body)
    _paint_spleen(rng, scene, body)
    _paint_kidneys(rng, scene, body, spine)
    _paint_liver_lesions(rng, scene)
    _paint_bone(rng, scene, body, spine)
    del body  # its occupancy volumes are not needed for the blur
    image = _blur_and_noise(rng, scene)
    return image, scene.canvas.label, (scene.s_xy, scene.s_xy, scene.s_z)


@dataclass(frozen=True)
class _Scene:
    """One case's acquisition geometry, shared by every painting stage.

    Attributes:
        grid: World coordinates (mm) of the voxel centres.
        canvas: The image and label volumes being painted.
        full: The whole grid as a region: slices and broadcastable ``z (Z, 1, 1)``, ``y (1, Y, 1)``,
            ``x (1, 1, X)`` coordinates.
        s_xy: In-plane spacing (mm).
        s_z: Slice spacing (mm).
        extent_z: Nominal craniocaudal extent of the anatomy (mm).
        fov_y: Nominal anterior-posterior field of view (mm).
        fov_x: Nominal left-right field of view (mm).
    """

    grid: _Grid
    canvas: _Canvas
    full: _Region
    s_xy: float
    s_z: float
    extent_z: float
    fov_y: float
    fov_x: float


@dataclass(frozen=True)
class _Body:
    """The body outline and its layers, as later stages place anatomy inside them.

    Attributes:
        ax: Left-right half axis of the body (mm).
        ay: Anterior half axis of the body (mm).
        ay_post: Posterior half axis (mm; a flatter back).
        cy0: Anterior-posterior centre of the body (mm).
        cx0: Left-right centre of the body (mm).
        z0: Craniocaudal shift of the anatomy in the field of view (mm).
        occ_wall: Occupancy ``(Z, Y, X)`` inside the subcutaneous fat (muscle wall and cavity).
        occ_cavity: Occupancy ``(Z, Y, X)`` of the visceral cavity; organs are clipped to it.
    """

    ax: float
    ay: float
    ay_post: float
    cy0: float
    cx0: float
    z0: float
    occ_wall: np.ndarray
    occ_cavity: np.ndarray


@dataclass(frozen=True)
class _Spine:
    """Where the vertebral body sits (mm): centre ``vb_y`` (anterior-posterior), half axes ``vb_ry``, ``vb_rx``."""

    vb_y: float
    vb_ry: float
    vb_rx: float


def _cylinder(scene: _Scene, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Approximate signed distance (mm) to an elliptic cylinder along z, ``(1, Y, X)``."""
    _, _, yc, xc = scene.full
    uu, vv = (xc - np.float32(cx)) / np.float32(rx), (yc - np.float32(cy)) / np.float32(ry)
    rr = np.maximum(np.sqrt(uu**2 + vv**2), np.float32(1e-6))
    return (rr - 1.0) / np.maximum(np.sqrt((uu / rx) ** 2 + (vv / ry) ** 2) / rr, np.float32(1e-6))


def _texture(rng: np.random.Generator, region: _Region, std: float) -> np.ndarray:
    """Smooth intensity texture (HU) of standard deviation ``std`` over ``region``."""
    _, z, y, x = region
    return _Fourier.random(rng, 6, (2 * np.pi / 30.0, 2 * np.pi / 8.0), std)(z, y, x)


def _acquisition_geometry(rng: np.random.Generator, shape: tuple[int, int, int], fov_scale: float) -> _Scene:
    """Draw the spacings, size the grid (anatomy fixed in mm) and start an air-filled canvas."""
    n0, n1, n2 = (int(s) for s in shape)
    s_xy = float(rng.uniform(0.8, 1.0) * rng.uniform(1.0, 1.2))
    s_z = float(rng.choice(SLICE_SPACINGS_MM))
    extent_z = n0 * REFERENCE_SLICE_SPACING_MM  # nominal craniocaudal anatomy extent (mm)
    fov_y, fov_x = n1 * REFERENCE_INPLANE_SPACING_MM, n2 * REFERENCE_INPLANE_SPACING_MM
    nz = int(np.clip(round(extent_z * fov_scale / s_z), max(8, n0 // 2), 2 * n0))
    ny, nx = max(16, round(n1 * fov_scale)), max(16, round(n2 * fov_scale))
    grid = _Grid.centred((nz, ny, nx), (s_z, s_xy, s_xy))
    canvas = _Canvas(grid, edge_mm=0.25 * s_xy)
    return _Scene(
        grid=grid, canvas=canvas, full=grid.full(), s_xy=s_xy, s_z=s_z, extent_z=extent_z, fov_y=fov_y, fov_x=fov_x
    )


def _paint_body(rng: np.random.Generator, scene: _Scene) -> _Body:
    """Body outline, subcutaneous fat, muscle wall and a visceral cavity of mixed fat and soft tissue."""
    canvas, full, extent_z = scene.canvas, scene.full, scene.extent_z
    _, ny, nx = scene.grid.shape
    _, zc, yc, xc = full
    s_xy = scene.s_xy
    scale = rng.uniform(0.9, 1.05)
    ax = min(rng.uniform(0.40, 0.45) * scene.fov_x * scale, 0.47 * nx * s_xy)
    ay = min(rng.uniform(0.29, 0.34) * scene.fov_y * scale, 0.44 * ny * s_xy)
    ay_post = ay * rng.uniform(0.8, 0.9)
    cy0 = rng.uniform(-0.03, 0.03) * scene.fov_y
    cx0 = rng.uniform(-0.03, 0.03) * scene.fov_x
    z0 = rng.uniform(-0.08, 0.08) * extent_z  # craniocaudal shift of the anatomy in the field of view
    wave = 2.0 * np.pi / (extent_z * rng.uniform(1.5, 3.0))
    ax_z = np.float32(ax) * (1.0 + np.float32(rng.uniform(0.02, 0.06)) * np.sin(wave * zc + rng.uniform(0, 6.3)))
    ay_ant_z = np.float32(ay) * (1.0 + np.float32(rng.uniform(0.02, 0.06)) * np.sin(wave * zc + rng.uniform(0, 6.3)))
    dy, dx = yc - np.float32(cy0), xc - np.float32(cx0)
    ay_z = np.where(dy > 0, ay_ant_z * np.float32(ay_post / ay), ay_ant_z)  # flatter back
    u, v = dx / ax_z, dy / ay_z
    r = np.maximum(np.sqrt(u**2 + v**2), np.float32(1e-6))
    body_sdf = (r - 1.0) / np.maximum(np.sqrt((u / ax_z) ** 2 + (v / ay_z) ** 2) / r, np.float32(1e-6))
    del u, v, r, ay_z, ax_z

    fat_field = _Fourier.random(rng, 4, (2 * np.pi / 60.0, 2 * np.pi / 25.0), 1.0)(zc, yc, xc)
    anterior = np.clip(-dy / np.float32(ay), 0.0, 1.0)
    t_fat = np.float32(rng.uniform(0.07, 0.12) * ay) * (1.0 + 0.3 * fat_field) * (1.0 + 0.5 * anterior)
    t_wall = np.float32(rng.uniform(0.05, 0.09) * ay)
    occ_body = canvas.occupancy(body_sdf)
    canvas.paint(full[0], occ_body, -100.0 + 8.0 * fat_field)
    occ_wall = canvas.occupancy(body_sdf + t_fat)
    canvas.paint(full[0], occ_wall, float(rng.uniform(42, 55)))
    cavity_sdf = body_sdf + t_fat + t_wall
    occ_cavity = canvas.occupancy(cavity_sdf)
    visceral = _Fourier.random(rng, 8, (2 * np.pi / 40.0, 2 * np.pi / 12.0), 1.0)(zc, yc, xc)
    fat_fraction = np.clip(rng.uniform(0.5, 0.7) + 0.4 * visceral, 0.0, 1.0)
    canvas.paint(full[0], occ_cavity, 35.0 * (1.0 - fat_fraction) - 95.0 * fat_fraction)
    return _Body(ax=ax, ay=ay, ay_post=ay_post, cy0=cy0, cx0=cx0, z0=z0, occ_wall=occ_wall, occ_cavity=occ_cavity)


def _paint_ribs(rng: np.random.Generator, scene: _Scene, body: _Body) -> None:
    """Z-periodic bone in the lateral/posterior muscle wall of the upper abdomen."""
    _, zc, yc, xc = scene.full
    dy, dx = yc - np.float32(body.cy0), xc - np.float32(body.cx0)
    rib_period = rng.uniform(10.0, 14.0)
    rib_phase = rng.uniform(0.0, rib_period)
    theta = np.arctan2(dy, dx)  # ribs slope, so an axial slice cuts them into separate arcs
    rib_slope = rng.uniform(0.5, 0.9) * rib_period / np.pi
    rib_offset = np.mod(zc - rib_phase - rib_slope * np.abs(theta), rib_period) - rib_period / 2
    rib_z = np.abs(rib_offset) - rng.uniform(1.2, 1.8)  # signed distance to the nearest rib (mm)
    upper = np.float32(1.0) / (np.float32(1.0) + np.exp(-(zc - np.float32(body.z0 - 0.15 * scene.extent_z)) / 3.0))
    lateral = np.clip((dx / np.float32(body.ax)) ** 2 * 2.5 + np.clip(dy / np.float32(body.ay), 0, 1) * 2.0 - 0.3, 0, 1)
    occ_rib = body.occ_wall * (1.0 - body.occ_cavity) * scene.canvas.occupancy(rib_z) * upper * lateral
    scene.canvas.paint(scene.full[0], occ_rib, float(rng.uniform(350, 550)))


def _paint_paraspinal_and_vessels(rng: np.random.Generator, scene: _Scene, body: _Body) -> _Spine:
    """Place the vertebral body (painted last, as bone), then paraspinal muscles, aorta and IVC (cylinders along z)."""
    canvas, everywhere = scene.canvas, scene.full[0]
    ax, ay, cx0, occ_cavity = body.ax, body.ay, body.cx0, body.occ_cavity
    vb_rx, vb_ry = rng.uniform(0.17, 0.21) * ax, rng.uniform(0.16, 0.2) * ay
    vb_y = body.cy0 + body.ay_post * rng.uniform(0.42, 0.52)

    para_dx = vb_rx + rng.uniform(0.1, 0.16) * ax
    para_r = (rng.uniform(0.14, 0.2) * ay, rng.uniform(0.13, 0.17) * ax)
    for side in (-1.0, 1.0):
        sdf2 = _cylinder(scene, vb_y + 0.8 * vb_ry, cx0 + side * para_dx, *para_r)
        canvas.paint(everywhere, canvas.occupancy(sdf2) * occ_cavity, float(rng.uniform(45, 58)))
    aorta_r = rng.uniform(0.07, 0.09) * ax
    aorta = _cylinder(scene, vb_y - vb_ry - aorta_r - 1.0, cx0 + rng.uniform(0.04, 0.1) * ax, aorta_r, aorta_r)
    canvas.paint(everywhere, canvas.occupancy(aorta) * occ_cavity, float(rng.uniform(35, 48)))
    ivc_r = rng.uniform(0.07, 0.09) * ax
    ivc = _cylinder(scene, vb_y - vb_ry - 0.8 * ivc_r, cx0 - rng.uniform(0.16, 0.24) * ax, 0.7 * ivc_r, 1.3 * ivc_r)
    canvas.paint(everywhere, canvas.occupancy(ivc) * occ_cavity, float(rng.uniform(30, 45)))
    return _Spine(vb_y=vb_y, vb_ry=vb_ry, vb_rx=vb_rx)


def _paint_bowel(rng: np.random.Generator, scene: _Scene, body: _Body) -> None:
    """Bowel loops: unlabelled distractors with organ-like HU, some with gas."""
    canvas, extent_z = scene.canvas, scene.extent_z
    ax, ay, cy0, cx0, z0 = body.ax, body.ay, body.cy0, body.cx0, body.z0
    for _ in range(int(rng.integers(3, 7))):
        center = np.array(
            [
                z0 + rng.uniform(-0.45, 0.3) * extent_z,
                cy0 + rng.uniform(-0.75, 0.05) * ay,
                cx0 + rng.uniform(-0.45, 0.45) * ax,
            ]
        )
        radii = np.array([rng.uniform(0.08, 0.2) * extent_z, rng.uniform(0.1, 0.2) * ay, rng.uniform(0.1, 0.2) * ax])
        angles = (rng.uniform(-90, 90), rng.uniform(-30, 30), rng.uniform(-30, 30))
        loop = _random_ellipsoid(rng, center, radii, angles, wobble=rng.uniform(0.08, 0.18))
        region = scene.grid.region_of(loop)
        # every draw of a loop comes before the check, so a loop off the grid keeps the stream in step
        value = float(rng.uniform(18, 45))
        has_gas = rng.random() < 0.5
        gas_center = center + np.array([0.0, -0.5 * radii[1], rng.uniform(-0.3, 0.3) * radii[2]])
        gas_radius = rng.uniform(0.3, 0.5) * radii[1:].min()
        if region is None:
            continue
        sl, z, y, x = region
        occ = canvas.occupancy(loop.sdf(z, y, x)) * body.occ_cavity[sl]
        canvas.paint(sl, occ, value)
        if has_gas:
            gas = np.sqrt((z - gas_center[0]) ** 2 + (y - gas_center[1]) ** 2 + (x - gas_center[2]) ** 2)
            canvas.paint(sl, occ * canvas.occupancy(gas - np.float32(gas_radius)), -900.0)


def _paint_liver(rng: np.random.Generator, scene: _Scene, body: _Body) -> None:
    """Liver (label 1): a smooth union of a right and a left lobe."""
    canvas, extent_z = scene.canvas, scene.extent_z
    ax, ay = body.ax, body.ay
    liver_c = np.array(
        [
            body.z0 + rng.uniform(0.05, 0.2) * extent_z,
            body.cy0 - rng.uniform(0.0, 0.15) * ay,
            body.cx0 - rng.uniform(0.33, 0.45) * ax,
        ]
    )
    right_lobe = _random_ellipsoid(
        rng,
        liver_c,
        np.array([rng.uniform(0.22, 0.32) * extent_z, rng.uniform(0.5, 0.62) * ay, rng.uniform(0.36, 0.46) * ax]),
        (rng.uniform(-15, 15), rng.uniform(-8, 8), rng.uniform(-8, 8)),
        wobble=rng.uniform(0.05, 0.1),
    )
    left_c = liver_c + np.array(
        [rng.uniform(0.0, 0.08) * extent_z, -rng.uniform(0.25, 0.4) * ay, rng.uniform(0.45, 0.6) * ax]
    )
    left_lobe = _random_ellipsoid(
        rng,
        left_c,
        np.array([rng.uniform(0.12, 0.2) * extent_z, rng.uniform(0.18, 0.28) * ay, rng.uniform(0.25, 0.35) * ax]),
        (rng.uniform(-25, 10), rng.uniform(-8, 8), rng.uniform(-8, 8)),
        wobble=rng.uniform(0.05, 0.12),
    )
    liver_value = float(rng.uniform(54, 68))
    region = scene.grid.region_of(right_lobe, left_lobe)
    if region is not None:
        sl, z, y, x = region
        sdf = _smooth_min(right_lobe.sdf(z, y, x), left_lobe.sdf(z, y, x), k=4.0)
        occ = canvas.occupancy(sdf) * body.occ_cavity[sl]
        canvas.paint(sl, occ, liver_value + _texture(rng, region, 4.0), LABELS["liver"])


def _paint_spleen(rng: np.random.Generator, scene: _Scene, body: _Body) -> None:
    """Spleen (label 2): a crescent, an ellipsoid with its medial (visceral) side carved concave."""
    canvas, extent_z = scene.canvas, scene.extent_z
    ax, ay = body.ax, body.ay
    spleen_c = np.array(
        [
            body.z0 + rng.uniform(0.05, 0.2) * extent_z,
            body.cy0 + rng.uniform(0.1, 0.3) * ay,
            body.cx0 + rng.uniform(0.5, 0.6) * ax,
        ]
    )
    spleen_r = np.array([rng.uniform(0.12, 0.2) * extent_z, rng.uniform(0.3, 0.4) * ay, rng.uniform(0.15, 0.2) * ax])
    spleen = _random_ellipsoid(
        rng,
        spleen_c,
        spleen_r,
        (rng.uniform(-40, -15), rng.uniform(-10, 10), rng.uniform(-10, 10)),
        rng.uniform(0.06, 0.14),
    )
    # concave visceral surface: carve a blob on the medial side
    medial = -spleen.rotation[:, 2]
    notch = _Ellipsoid(
        spleen_c + medial * spleen_r[2] * rng.uniform(1.2, 1.5), spleen_r * np.array([1.1, 0.75, 0.8]), spleen.rotation
    )
    spleen_value = float(rng.uniform(44, 56))
    region = scene.grid.region_of(spleen)
    if region is not None:
        sl, z, y, x = region
        sdf = _smooth_max(spleen.sdf(z, y, x), -notch.sdf(z, y, x), k=2.0)
        occ = canvas.occupancy(sdf) * body.occ_cavity[sl]
        canvas.paint(sl, occ, spleen_value + _texture(rng, region, 3.0), LABELS["spleen"])


def _paint_kidneys(rng: np.random.Generator, scene: _Scene, body: _Body, spine: _Spine) -> None:
    """Both kidneys (label 3), beside the spine, each with a hilum notch on its medial side."""
    canvas, extent_z = scene.canvas, scene.extent_z
    ax, ay = body.ax, body.ay
    kidney_z = body.z0 - rng.uniform(0.05, 0.18) * extent_z
    for side in (-1.0, 1.0):
        kc = np.array(
            [
                kidney_z + rng.uniform(-0.06, 0.06) * extent_z,
                spine.vb_y - rng.uniform(0.1, 0.25) * ay,
                body.cx0 + side * rng.uniform(0.4, 0.5) * ax,
            ]
        )
        kr = np.array([rng.uniform(0.13, 0.18) * extent_z, rng.uniform(0.17, 0.22) * ay, rng.uniform(0.12, 0.16) * ax])
        kidney = _random_ellipsoid(
            rng,
            kc,
            kr,
            (side * rng.uniform(15, 35), side * rng.uniform(-15, -5), rng.uniform(-8, 8)),
            wobble=rng.uniform(0.03, 0.07),
        )
        # hilum: notch on the medial, slightly anterior side
        hilum_dir = kidney.rotation @ np.array([0.0, -0.35, -side])
        hilum = _Ellipsoid(
            kc + hilum_dir * kr[2] * 1.05,
            kr * np.array([0.35, 0.45, 0.5]),
            kidney.rotation,
            None,
        )
        kidney_value = float(rng.uniform(33, 46))  # drawn before the check, like the bowel loops
        region = scene.grid.region_of(kidney)
        if region is None:
            continue
        sl, z, y, x = region
        sdf = _smooth_max(kidney.sdf(z, y, x), -hilum.sdf(z, y, x), k=1.5)
        occ = canvas.occupancy(sdf) * body.occ_cavity[sl]
        canvas.paint(sl, occ, kidney_value + _texture(rng, region, 3.0), LABELS["kidney"])


def _paint_liver_lesions(rng: np.random.Generator, scene: _Scene) -> None:
    """0-3 small hypodense ellipsoids (label 4) fully inside the final liver label."""
    canvas, grid, s_xy = scene.canvas, scene.grid, scene.s_xy
    n_lesions = int(rng.integers(0, 4))
    liver_mask = canvas.label == LABELS["liver"]
    box = ndimage.find_objects(liver_mask.astype(np.uint8))
    if not (n_lesions and box and box[0] is not None):
        return
    bsl = box[0]
    depth = ndimage.distance_transform_edt(liver_mask[bsl], sampling=(scene.s_z, s_xy, s_xy))
    for _ in range(n_lesions):
        # a lesion draws its size, shape, angles and value before it may be skipped
        radius = rng.uniform(3.0, 8.0) * s_xy
        radius = min(radius, float(depth.max()) - s_xy)
        aspect = rng.uniform(0.8, 1.25, size=3)
        angles = (rng.uniform(-90, 90), rng.uniform(-30, 30), rng.uniform(-30, 30))
        value = float(rng.uniform(12, 30))
        if radius < 2.0 * s_xy:
            continue
        candidates = np.flatnonzero(depth > radius * aspect.max() + 0.5 * s_xy)
        if candidates.size == 0:
            continue
        idx = np.unravel_index(candidates[rng.integers(candidates.size)], depth.shape)
        center = np.array([grid.z[bsl[0]][idx[0]], grid.y[bsl[1]][idx[1]], grid.x[bsl[2]][idx[2]]], float)
        lesion = _random_ellipsoid(rng, center, radius * aspect, angles, wobble=rng.uniform(0.03, 0.08))
        region = grid.region_of(lesion)
        if region is None:
            continue
        sl, z, y, x = region
        inside = (canvas.label[sl] == LABELS["liver"]) | (canvas.label[sl] == LABELS["lesion"])
        occ = canvas.occupancy(lesion.sdf(z, y, x)) * inside
        canvas.paint(sl, occ, value + _texture(rng, region, 2.0), LABELS["lesion"])


def _paint_bone(rng: np.random.Generator, scene: _Scene, body: _Body, spine: _Spine) -> None:
    """Vertebral body with discs, spinal canal and posterior arch, painted last; bone clears labels."""
    canvas, everywhere, zc = scene.canvas, scene.full[0], scene.full[1]
    cx0, vb_y, vb_rx = body.cx0, spine.vb_y, spine.vb_rx
    vb = _cylinder(scene, vb_y, cx0, spine.vb_ry, vb_rx)
    occ_vb = canvas.occupancy(vb)
    canvas.paint(everywhere, occ_vb, float(rng.uniform(600, 750)), 0)
    canvas.paint(everywhere, canvas.occupancy(vb + np.float32(1.5)), float(rng.uniform(300, 450)))
    disc_period = rng.uniform(0.16, 0.22) * scene.extent_z
    disc_z = np.abs(np.mod(zc - rng.uniform(0, disc_period), disc_period) - disc_period / 2) - rng.uniform(1.5, 2.5)
    canvas.paint(everywhere, occ_vb * canvas.occupancy(disc_z), float(rng.uniform(70, 100)))
    canal_r = 0.45 * vb_rx
    canal_y = vb_y + spine.vb_ry + canal_r + 0.5
    arch = _cylinder(scene, canal_y, cx0, canal_r + 2.0, canal_r + 2.0)
    canvas.paint(everywhere, canvas.occupancy(arch), float(rng.uniform(450, 650)), 0)
    back = body.cy0 + body.ay_post
    length = max(back - (canal_y + canal_r + 2.0) - 2.0, 1.0)
    process = _cylinder(scene, canal_y + canal_r + 1.0 + length / 2, cx0, length / 2, max(1.2, 0.12 * vb_rx))
    canvas.paint(everywhere, canvas.occupancy(process), float(rng.uniform(400, 600)), 0)
    canvas.paint(everywhere, canvas.occupancy(_cylinder(scene, canal_y, cx0, canal_r, canal_r)), 15.0)


def _blur_and_noise(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """The acquisition: PSF (slice profile + in-plane blur) and correlated noise; float32 HU ``(Z, Y, X)``."""
    psf = (rng.uniform(0.35, 0.5), rng.uniform(0.5, 0.75), rng.uniform(0.5, 0.75))
    psf = (psf[0], psf[1], psf[1])
    image = ndimage.gaussian_filter(scene.canvas.image, sigma=psf, mode="nearest")
    noise_sigma = float(rng.uniform(15.0, 25.0))
    corr = float(rng.uniform(0.4, 0.7))
    noise = rng.standard_normal(scene.grid.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, corr, corr), mode="wrap")
    noise *= np.float32(noise_sigma / max(float(noise.std()), 1e-6))
    result: np.ndarray = np.clip(image + noise, -1024.0, 3071.0).astype(np.float32)
    return result


# ----------------------------------------------------------------------------------------------
# T1-like head phantoms (``PhantomConfig.modality == "mr"``)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeadTissues:
    """One case's T1-like tissue intensities (arbitrary units, before gain, bias and noise)."""

    fat: float
    skull: float
    marrow: float
    csf: float
    grey: float
    white: float


def generate_mr_case(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Generate one labelled T1-like head phantom (see :data:`MR_LABELS` and the module doc).

    Args:
        rng: Generator that owns this case (all randomness comes from it).
        shape: Nominal ``(z, y, x)`` voxels, with the same spacing rules as :func:`generate_case`.

    Returns:
        ``image`` float32 ``(Z, Y, X)`` (arbitrary MR units, negative in much of the background),
        ``label`` uint8 ``(Z, Y, X)`` with values of :data:`MR_LABELS`, and the spacing ``(x, y, z)`` in mm.
    """
    return _generate_mr(rng, shape, fov_scale=1.0)


def _generate_mr(
    rng: np.random.Generator, shape: tuple[int, int, int], fov_scale: float
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """:func:`generate_mr_case` with a field-of-view factor; stages draw from ``rng`` in this order."""
    scene = _acquisition_geometry(rng, shape, fov_scale)
    scene.canvas.image.fill(0.0)  # no signal outside the head (the acquisition adds the noise)
    tissues = _HeadTissues(
        fat=float(rng.uniform(650, 760)), skull=float(rng.uniform(40, 70)), marrow=float(rng.uniform(380, 480)),
        csf=float(rng.uniform(70, 110)), grey=float(rng.uniform(310, 350)), white=float(rng.uniform(415, 450)),
    )
    brain_sdf = _paint_head_layers(rng, scene, tissues)
    _paint_brain(rng, scene, tissues, brain_sdf)
    image = _mr_acquisition(rng, scene, tissues)
    return image, scene.canvas.label, (scene.s_xy, scene.s_xy, scene.s_z)


def _paint_head_layers(rng: np.random.Generator, scene: _Scene, tissues: _HeadTissues) -> np.ndarray:
    """Scalp fat (bright), skull with fatty marrow, and the CSF around the brain; returns the brain's signed distance."""
    canvas, full = scene.canvas, scene.full
    _, zc, yc, xc = full
    center = np.array([rng.uniform(-0.04, 0.04) * scene.extent_z, rng.uniform(-0.03, 0.03) * scene.fov_y,
                       rng.uniform(-0.03, 0.03) * scene.fov_x])
    radii = np.array([rng.uniform(0.40, 0.44) * scene.extent_z, rng.uniform(0.43, 0.46) * scene.fov_y,
                      rng.uniform(0.38, 0.42) * scene.fov_x])
    head = _random_ellipsoid(rng, center, radii, tuple(rng.uniform(-8, 8, 3)), rng.uniform(0.01, 0.03))
    head_sdf = head.sdf(zc, yc, xc)
    scalp, skull, csf = (float(rng.uniform(2.0, 3.0)), float(rng.uniform(2.0, 3.0)), float(rng.uniform(1.0, 1.5)))
    canvas.paint(full[0], canvas.occupancy(head_sdf), tissues.fat + _texture(rng, full, 15.0))
    canvas.paint(full[0], canvas.occupancy(head_sdf + np.float32(scalp)), tissues.skull)
    marrow = canvas.occupancy(head_sdf + np.float32(scalp + 0.3 * skull)) * \
        (1.0 - canvas.occupancy(head_sdf + np.float32(scalp + 0.7 * skull)))
    canvas.paint(full[0], marrow, tissues.marrow)
    canvas.paint(full[0], canvas.occupancy(head_sdf + np.float32(scalp + skull)), tissues.csf)
    return head_sdf + np.float32(scalp + skull + csf)


def _paint_brain(rng: np.random.Generator, scene: _Scene, tissues: _HeadTissues, brain_sdf: np.ndarray) -> None:
    """Folded cortex (grey matter), white matter, deep grey nuclei and the lateral ventricles (labelled)."""
    canvas, full = scene.canvas, scene.full
    _, zc, yc, xc = full
    folds = _Fourier.random(rng, 12, (2 * np.pi / 16.0, 2 * np.pi / 7.0), 1.0)(zc, yc, xc)
    sulci = np.float32(rng.uniform(0.8, 1.2)) * np.maximum(folds, np.float32(0.0))
    occ_brain = canvas.occupancy(brain_sdf + sulci)  # CSF reaches into the sulci
    canvas.paint(full[0], occ_brain, tissues.grey + _texture(rng, full, 8.0), MR_LABELS["grey_matter"])
    cortex = float(rng.uniform(7.0, 8.0))
    occ_white = canvas.occupancy(brain_sdf + np.float32(cortex) + np.float32(rng.uniform(1.0, 1.5)) * folds)
    canvas.paint(full[0], occ_white * occ_brain, tissues.white + _texture(rng, full, 8.0), MR_LABELS["white_matter"])
    # the brain's extent (mm) from the voxels inside it, for placing the deep structures
    inside = np.argwhere(occ_brain > 0.5)
    if inside.size == 0:
        return
    grid = scene.grid
    lo = np.array([grid.z[inside[:, 0].min()], grid.y[inside[:, 1].min()], grid.x[inside[:, 2].min()]])
    hi = np.array([grid.z[inside[:, 0].max()], grid.y[inside[:, 1].max()], grid.x[inside[:, 2].max()]])
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    for side in (-1.0, 1.0):  # deep grey nuclei (thalamus and basal ganglia together)
        nucleus = _random_ellipsoid(
            rng, mid + half * np.array([rng.uniform(-0.15, -0.05), rng.uniform(-0.05, 0.1), side * rng.uniform(0.22, 0.3)]),
            half * np.array([rng.uniform(0.16, 0.2), rng.uniform(0.16, 0.2), rng.uniform(0.14, 0.18)]),
            tuple(rng.uniform(-10, 10, 3)), rng.uniform(0.03, 0.06))
        _paint_inside(scene, nucleus, occ_brain, tissues.grey + float(rng.uniform(-10, 10)), MR_LABELS["grey_matter"])
    for side in (-1.0, 1.0):  # lateral ventricles: long, narrow, beside the midline
        ventricle = _random_ellipsoid(
            rng, mid + half * np.array([rng.uniform(0.0, 0.1), rng.uniform(-0.05, 0.05), side * rng.uniform(0.13, 0.16)]),
            half * np.array([rng.uniform(0.2, 0.25), rng.uniform(0.4, 0.5), rng.uniform(0.11, 0.13)]),
            (rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(-5, 5)), rng.uniform(0.04, 0.08))
        _paint_inside(scene, ventricle, occ_brain, tissues.csf, MR_LABELS["ventricles"])


def _paint_inside(scene: _Scene, shape: _Ellipsoid, occ_brain: np.ndarray, value: float, label: int) -> None:
    """Paint ``shape`` with ``value`` and ``label``, clipped to the brain."""
    region = scene.grid.region_of(shape)
    if region is None:
        return
    sl, z, y, x = region
    scene.canvas.paint(sl, scene.canvas.occupancy(shape.sdf(z, y, x)) * occ_brain[sl], value, label)


def _mr_acquisition(rng: np.random.Generator, scene: _Scene, tissues: _HeadTissues) -> np.ndarray:
    """PSF, a smooth bias field, the scanner's gain and Rician noise with its background mean removed.

    The magnitude of a complex signal with Gaussian noise is Rician (Rayleigh in the air); subtracting
    the air's mean, as some reconstructions and intensity corrections do, leaves about half of the
    background voxels negative.
    """
    _, zc, yc, xc = scene.full
    psf = (rng.uniform(0.35, 0.5), rng.uniform(0.5, 0.75), rng.uniform(0.5, 0.75))
    image = ndimage.gaussian_filter(scene.canvas.image, sigma=(psf[0], psf[1], psf[1]), mode="nearest")
    bias = _Fourier.random(rng, 4, (2 * np.pi / 250.0, 2 * np.pi / 120.0), 1.0)(zc, yc, xc)
    image *= np.float32(1.0) + np.float32(rng.uniform(0.06, 0.12)) * bias
    gain = float(np.exp(rng.uniform(np.log(0.55), np.log(1.8))))  # scanners and protocols differ
    sigma = float(rng.uniform(0.025, 0.04)) * tissues.white
    real = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    magnitude = np.hypot(real, imaginary) - np.float32(sigma * np.sqrt(np.pi / 2.0))
    result: np.ndarray = (magnitude * np.float32(gain)).astype(np.float32)
    return result


# ----------------------------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------------------------


def _case_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Independent generator per (stream, case): 0 = train, 1 = test, 2 = unlabeled."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


def _write_volume(array: np.ndarray, spacing_xyz: tuple[float, float, float], path: Path) -> None:
    """Write ``array`` ``(Z, Y, X)`` as NIfTI with the given spacing, a centred origin, identity direction."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    size_xyz = array.shape[::-1]
    img.SetOrigin(tuple(-(n - 1) / 2.0 * s for n, s in zip(size_xyz, spacing_xyz, strict=True)))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def _expected_dataset_files(config: PhantomConfig) -> list[str]:
    names = ["dataset.json"]
    for folder, first, count in (("Tr", 0, config.num_train), ("Ts", config.num_train, config.num_test)):
        for i in range(first, first + count):
            names.append(f"images{folder}/{CASE_PREFIX}_{i:03d}_0000{FILE_ENDING}")
            names.append(f"labels{folder}/{CASE_PREFIX}_{i:03d}{FILE_ENDING}")
    return names


def _expected_unlabeled_files(config: PhantomConfig) -> list[str]:
    return [UNLABELED_MARKER] + [f"{UNLABELED_PREFIX}_{i:03d}{FILE_ENDING}" for i in range(config.num_unlabeled)]


def _is_complete(folder: Path, marker: Path, key: str | None, config: PhantomConfig, expected: list[str]) -> bool:
    """True if ``folder`` already holds this config's output, False if absent or empty.

    Raises:
        FileExistsError: ``folder`` has other content.
    """
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return False
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
        stored = stored[key] if key is not None else stored
    except (OSError, ValueError, KeyError, TypeError):
        stored = None
    if stored != config.to_json():
        raise FileExistsError(
            f"{folder} already exists and was not generated from this PhantomConfig ({config}); "
            "remove it or pick another out_dir / dataset_id"
        )
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FileExistsError(f"{folder} matches this PhantomConfig but is incomplete (missing {missing[:3]}...)")
    return True


def _atomic_folder(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of ``final`` and rename it into place (no half-written datasets)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fill(tmp)
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700
        if final.exists():
            final.rmdir()  # empty (checked by _is_complete); rmdir refuses otherwise
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dataset_json(config: PhantomConfig) -> dict[str, Any]:
    if config.modality == "mr":
        description = (
            "Synthetic T1-like head MR phantoms (nnunet_ssl.data.phantoms): grey matter (folded cortex and deep "
            "nuclei), white matter and ventricles under scalp fat, skull and CSF; bias field, per-case gain and "
            "Rician noise with its background mean removed (negative background values)."
        )
    else:
        description = (
            "Synthetic abdominal CT phantoms (nnunet_ssl.data.phantoms): liver, spleen, kidneys, liver lesions "
            "with overlapping HU, partial-volume edges, PSF, correlated noise and varied slice spacing."
        )
    return {
        "channel_names": {"0": "T1" if config.modality == "mr" else "CT"},
        "labels": config.labels,
        "numTraining": config.num_train,
        "file_ending": FILE_ENDING,
        "name": config.dataset_name,
        "description": description,
        "reference": "generated",
        "licence": "CC0",
        "release": "0.1",
        "numTest": config.num_test,
        "phantom_config": config.to_json(),
    }


def write_phantom_datasets(out_dir: Path, config: PhantomConfig = PhantomConfig()) -> PhantomPaths:
    """Generate the labelled nnU-Net dataset and the unlabeled pool.

    Writes ``<out_dir>/nnUNet_raw/Dataset{id}_{name}/{imagesTr,labelsTr,imagesTs,labelsTs,dataset.json}``
    (images ``Phantom_000_0000.nii.gz``, labels ``Phantom_000.nii.gz``; test cases continue the
    numbering) and ``<out_dir>/unlabeled/Unlabeled_000.nii.gz, ...``. Each folder is written to a
    temporary sibling and renamed into place. Calling again with the same config is a no-op.

    Args:
        out_dir: Root folder for the outputs.
        config: What to generate.

    Returns:
        The output locations.

    Raises:
        FileExistsError: The dataset or unlabeled folder exists with content from another config.
    """
    out_dir = Path(out_dir)
    raw_root = out_dir / "nnUNet_raw"
    paths = PhantomPaths(
        raw_root=raw_root, dataset_dir=raw_root / config.dataset_folder_name, unlabeled_dir=out_dir / "unlabeled"
    )
    dataset_done = _is_complete(
        paths.dataset_dir, paths.dataset_dir / "dataset.json", "phantom_config", config, _expected_dataset_files(config)
    )
    unlabeled_done = _is_complete(
        paths.unlabeled_dir, paths.unlabeled_dir / UNLABELED_MARKER, None, config, _expected_unlabeled_files(config)
    )

    if dataset_done:
        logger.info("phantom dataset %s already generated for this config; reusing it", paths.dataset_dir)
    else:

        def fill_dataset(folder: Path) -> None:
            for split, stream, first, count in (
                ("Tr", 0, 0, config.num_train),
                ("Ts", 1, config.num_train, config.num_test),
            ):
                (folder / f"images{split}").mkdir()
                (folder / f"labels{split}").mkdir()
                for j in range(count):
                    image, label, spacing = config.generator(_case_rng(config.seed, stream, j), config.shape, 1.0)
                    case = f"{CASE_PREFIX}_{first + j:03d}"
                    _write_volume(image, spacing, folder / f"images{split}" / f"{case}_0000{FILE_ENDING}")
                    _write_volume(label, spacing, folder / f"labels{split}" / f"{case}{FILE_ENDING}")
                logger.info(
                    "phantoms: wrote %d %s cases to %s",
                    count,
                    "training" if split == "Tr" else "test",
                    paths.dataset_dir / f"images{split}",
                )
            (folder / "dataset.json").write_text(json.dumps(_dataset_json(config), indent=2), encoding="utf-8")

        _atomic_folder(paths.dataset_dir, fill_dataset)

    if unlabeled_done:
        logger.info("phantom unlabeled pool %s already generated for this config; reusing it", paths.unlabeled_dir)
    else:

        def fill_unlabeled(folder: Path) -> None:
            for i in range(config.num_unlabeled):
                # every fourth case has another field of view (larger / cropped matrix, same anatomy)
                fov = (1.25 if (i // 4) % 2 == 0 else 0.85) if i % 4 == 3 else 1.0
                image, _, spacing = config.generator(_case_rng(config.seed, 2, i), config.shape, fov)
                _write_volume(image, spacing, folder / f"{UNLABELED_PREFIX}_{i:03d}{FILE_ENDING}")
            (folder / UNLABELED_MARKER).write_text(json.dumps(config.to_json(), indent=2), encoding="utf-8")
            logger.info("phantoms: wrote %d unlabeled cases to %s", config.num_unlabeled, paths.unlabeled_dir)

        _atomic_folder(paths.unlabeled_dir, fill_unlabeled)
    return paths
