"""Read, validate, resample, window and body-crop one volume.

The steps, in order (:func:`preprocess_source`):

1. read the file or DICOM series with SimpleITK (:func:`read_source`); a DICOM series whose
   slice positions are not evenly spaced (a missing slice) is refused (:func:`check_slice_positions`),
   since the reader would stack it at one average spacing; a NIfTI file is checked with nibabel
   first (:func:`check_nifti`), since ITK's reader makes NaN voxels and missing data 0 and a zero
   ``pixdim`` 1 mm;
2. validate it (:func:`validate_image`): scalar, 3-D without singleton axes, spacings in
   ``[min_spacing, max_spacing]``, finite voxels (no NaN, no Inf), not constant;
3. reorient to LPS (array axes ``(z, y, x)`` = inferior->superior, anterior->posterior,
   right->left) and resample with linear interpolation to the target spacing, keeping the centre of
   the field of view (:func:`resample_to_spacing`);
4. map intensities to ``[0, 1]``: CT window (:func:`window_ct`), MR percentiles
   (:func:`mr_intensity_range`, :func:`scale_intensities`) or a fixed MR window (``mr_window``); or,
   CT and MR alike, with ``intensity="zscore"`` z-score each image over the whole resampled volume
   (:func:`zscore`, nnU-Net's ``ZScoreNormalization``), without clipping; with
   ``"zscore_nonzero"`` z-score inside the image's nonzero region and leave the rest 0 (nnU-Net's
   ``ZScoreNormalization`` with ``use_mask_for_norm``); with ``"minmax"`` map each image's minimum
   and maximum to 0 and 1 (``RescaleTo01Normalization``). The last two take their statistics from
   the source grid, before resampling, as nnU-Net normalises before it resamples
   (:func:`nonzero_mask`);
5. crop to the bounding box of the body mask (CT: HU above ``ct_body_hu``; MR: scaled intensity
   above ``mr_body_threshold``), keeping the largest connected component and every component at
   least a quarter of its size (both legs, not the table), plus ``body_margin`` voxels
   (:func:`body_bbox`).

Volumes that fail a step raise :class:`SkipVolume` with a short reason (the manifest category)
and a detail. Volumes smaller than a crop are not padded here: the crop sampler pads with 0.
"""
from __future__ import annotations

import math
import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from nibabel.analyze import AnalyzeHeader
from nibabel.arrayproxy import ArrayProxy
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError
from scipy import ndimage

from .config import DataConfig
from .modality import AUTO, detect_modality
from .sources import Source

#: Components of the body mask at least this fraction of the largest one are kept.
BODY_COMPONENT_FRACTION = 0.25

#: MR percentiles are estimated on at most this many (evenly strided) voxels.
PERCENTILE_SAMPLES = 4_000_000

# Reasons (manifest categories) for skipped volumes.
UNREADABLE = "unreadable"
NOT_3D = "not 3-D"
NOT_SCALAR = "not a scalar image"
ABSURD_SPACING = "absurd spacing"
SPACING_TOO_FINE = "spacing too fine"
NON_FINITE = "non-finite voxels"
CONSTANT = "constant image"
NO_BODY = "no body found"
TOO_SMALL = "too small"
MODALITY_UNKNOWN = "modality unknown"
UNEVEN_SLICES = "uneven slice spacing"

#: A DICOM series is refused when a slice lies further than this fraction of the slice spacing
#: from where a reader stacking the slices at one spacing puts it.
SLICE_POSITION_TOLERANCE = 0.2


class SkipVolume(Exception):
    """A volume that cannot be used; ``reason`` is the manifest category, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Preprocessed:
    """A preprocessed volume and what the manifest records about it.

    Attributes:
        array: ``(D, H, W)`` = ``(z, y, x)`` float16 intensities in ``[0, 1]`` (z-scores with
            ``intensity="zscore"``), body-cropped.
        spacing: ``(x, y, z)`` mm of ``array``.
        source_shape: ``(z, y, x)`` voxels of the source.
        source_spacing: ``(x, y, z)`` mm of the source.
        resampled_shape: ``(z, y, x)`` voxels after resampling, before the body crop.
        bbox: ``((z0, z1), (y0, y1), (x0, x1))`` of the body crop in the resampled grid.
        stats: Intensity statistics (source range and mean, the values mapped to 0 and 1 (window)
            or the mean and standard deviation the image was z-scored with (``zscore_mean``,
            ``zscore_std``), mean and standard deviation of the cached values).
        modality: ``"ct"`` or ``"mr"``: how the volume was normalised.
        modality_decision: Why, when it was decided from the intensities (None when it was given).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    bbox: tuple[tuple[int, int], ...]
    stats: dict[str, float] = field(default_factory=dict)
    modality: str = "ct"
    modality_decision: str | None = None


_ITK_PREFIX = re.compile(r"^(?:ITK |itk::|sitk::)ERROR:\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?")


def _reader_message(exc: BaseException) -> str:
    """The informative part of a SimpleITK/ITK exception text (no source-file locations)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith("Exception thrown in SimpleITK"):
        lines = lines[1:]
    lines = [_ITK_PREFIX.sub("", ln) for ln in lines]
    return (" ".join(ln for ln in lines if ln) or type(exc).__name__)[:300]


#: Header layouts tried in turn on the first bytes of a ``.nii``/``.nii.gz`` file: NIfTI-1 (by its
#: magic; the same bytes of a NIfTI-2 header hold its qform code), NIfTI-2, and ANALYZE 7.5, which
#: ITK reads a NIfTI-1 header without its magic as.
_NIFTI_HEADERS = (Nifti1Header, Nifti2Header, AnalyzeHeader)

#: Voxels read per step when the data of a NIfTI file are checked (memory stays bounded, whatever
#: the header claims).
SCAN_VOXELS = 1 << 22

#: A deflate stream expands its input at most 1032-fold: a gzip file of ``n`` bytes holds at most
#: ``1032 n`` bytes of data.
MAX_DEFLATE_RATIO = 1032


def read_nifti_header(path: str) -> AnalyzeHeader | None:
    """The header of a NIfTI-1/2 file as written, parsed by nibabel, or ``None`` if there is none.

    The header is not checked: nibabel's checks would, as ITK's reader does, set a zero ``pixdim`` to
    1 mm, which :func:`check_nifti` must see.
    """
    try:
        with ImageOpener(path) as fh:
            block = fh.read(Nifti2Header.sizeof_hdr)
    except (OSError, EOFError, zlib.error):
        return None
    for header_class in _NIFTI_HEADERS:
        if header_class.may_contain_header(block):
            return header_class(block[: header_class.sizeof_hdr], check=False)
    return None


def _gzip_size_field(path: str) -> int:
    """The field that ends a gzip file (ISIZE, RFC 1952): the length of its last member's data modulo 2^32."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def _read_nifti_data(path: str, dtype: np.dtype, offset: int, count: int, floats: bool) -> tuple[int, int, int]:
    """``(voxels read, NaN voxels, infinite voxels)`` of a NIfTI file's data, read by nibabel in steps
    of :data:`SCAN_VOXELS` up to ``count`` voxels or where the data end (a whole step short)."""
    present = nans = infs = 0
    try:
        with ImageOpener(path) as fh:
            voxels = ArrayProxy(fh, ((count,), dtype, offset), mmap=False)
            for start in range(0, count, SCAN_VOXELS):
                values = voxels[start : start + SCAN_VOXELS]
                if floats and not np.isfinite(values).all():
                    nans += int(np.count_nonzero(np.isnan(values)))
                    infs += int(np.count_nonzero(np.isinf(values)))
                present += values.size
    except (OSError, EOFError, ValueError, zlib.error):
        pass  # The data end early: ``present`` says how far whole steps reached.
    return present, nans, infs


def check_nifti(path: str) -> None:
    """Catch, before ITK's NIfTI reader reads a file, what it lets through silently: truncated data
    (read as zeros), NaN and infinite voxels (read as zeros), a zero or non-finite ``pixdim`` (read
    as 1 mm); and headers that declare more data than the file holds, refused without reading or
    allocating them.

    nibabel parses the header and reads the data; integer data cost a header read and a look at
    the gzip size field, float data are read once, :data:`SCAN_VOXELS` at a time.

    Raises:
        SkipVolume: ``"unreadable"`` (truncated), ``"non-finite voxels"`` or ``"absurd spacing"``.
    """
    header = read_nifti_header(path)
    if header is None:
        return  # Not NIfTI after all: let the reader decide.
    ndim = int(header["dim"][0])
    try:
        dtype = header.get_data_dtype()
    except (HeaderDataError, KeyError):
        return  # Unknown data type: let the reader decide.
    if not 1 <= ndim <= 7 or dtype.itemsize == 0:
        return
    spatial = tuple(float(p) for p in header["pixdim"][1 : min(ndim, 3) + 1])
    if any(not math.isfinite(p) or p == 0.0 for p in spatial):
        raise SkipVolume(ABSURD_SPACING, f"NIfTI pixdim {spatial} (a reader would silently use 1 mm)")
    if not math.isfinite(float(header["vox_offset"])):
        raise SkipVolume(UNREADABLE, f"NIfTI vox_offset {float(header['vox_offset'])} does not say where the data start")
    offset = max(header.get_data_offset(), header.sizeof_hdr)
    count = math.prod(max(int(d), 1) for d in header["dim"][1 : ndim + 1])
    expected = offset + count * dtype.itemsize
    size = os.path.getsize(path)
    compressed = path.lower().endswith(".gz")
    if not compressed and size < expected:
        raise SkipVolume(UNREADABLE, f"truncated NIfTI: {size} of {expected} bytes ({count} voxels declared)")
    if compressed and expected > MAX_DEFLATE_RATIO * size:
        raise SkipVolume(
            UNREADABLE, f"truncated NIfTI: {count} voxels declared ({expected} bytes), more than a {size}-byte gzip file holds"
        )
    floats = dtype.kind == "f"
    if not floats and (not compressed or _gzip_size_field(path) == expected % (1 << 32)):
        return
    present, nans, infs = _read_nifti_data(path, dtype, offset, count, floats)
    if present < count:
        raise SkipVolume(UNREADABLE, f"truncated NIfTI: the data end before voxel {min(present + SCAN_VOXELS, count)} of {count}")
    if nans or infs:
        raise SkipVolume(NON_FINITE, f"{nans} NaN and {infs} infinite voxel(s) (a reader would silently make them 0)")


def _dicom_floats(text: str, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.strip().split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.size == count and np.isfinite(values).all() else None


def check_slice_positions(
    positions: list[tuple[float, float, float]], orientation: tuple[float, ...], names: list[str] | None = None
) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along the slice normal.

    A reader stacks the slices at one spacing (first to last position over ``n - 1``): a missing
    slice or a change of slice spacing would stretch or squeeze the anatomy silently.

    Args:
        positions: ImagePositionPatient ``(x, y, z)`` mm of each slice, in reading order.
        orientation: ImageOrientationPatient (row and column direction cosines, 6 values).
        names: File names of the slices, for the message.

    Raises:
        SkipVolume: ``"uneven slice spacing"`` (with the gaps and where they change), when a slice
            lies more than :data:`SLICE_POSITION_TOLERANCE` of the spacing from its stacked position,
            or two slices share a position.
    """
    if len(positions) < 3 or len(orientation) != 6:
        return
    normal = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64))
    norm = float(np.linalg.norm(normal))
    if not math.isfinite(norm) or norm < 1e-6:
        return
    depth = np.asarray(positions, dtype=np.float64) @ (normal / norm)
    gaps = np.diff(depth)
    if gaps.size and np.median(gaps) < 0:
        gaps = -gaps
    typical = float(np.median(np.abs(gaps)))
    spacing = abs(float(depth[-1] - depth[0])) / (len(depth) - 1)
    label = (lambda i: f"{i + 1} ({names[i]})") if names else (lambda i: str(i + 1))
    if typical <= 1e-6 or gaps.min() <= 1e-3 * typical:
        i = int(np.argmin(gaps))
        raise SkipVolume(
            UNEVEN_SLICES,
            f"slices {label(i)} and {label(i + 1)} of {len(depth)} lie at the same position or out of order "
            f"({depth[i]:.4g} and {depth[i + 1]:.4g} mm along the slice normal): two acquisitions in one series?",
        )
    error = np.abs(depth - (depth[0] + np.sign(depth[-1] - depth[0]) * spacing * np.arange(len(depth))))
    if float(error.max()) <= SLICE_POSITION_TOLERANCE * spacing:
        return
    i = int(np.argmax(np.abs(gaps - typical)))
    ratio = gaps[i] / typical
    hint = " (a missing slice?)" if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1 else ""
    changed = int(np.count_nonzero(np.abs(gaps - typical) > SLICE_POSITION_TOLERANCE * typical))
    raise SkipVolume(
        UNEVEN_SLICES,
        f"gaps of {typical:.4g} mm and {gaps[i]:.4g} mm between slices {label(i)} and {label(i + 1)}{hint}; "
        f"{changed} of {gaps.size} gaps differ (a reader would stack all {len(depth)} slices {spacing:.4g} mm apart)",
    )


def _check_series(reader: sitk.ImageSeriesReader, files: list[str]) -> None:
    """:func:`check_slice_positions` from the per-slice tags of a series just read (if every slice has them)."""
    positions = []
    orientation = None
    for i in range(len(files)):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return
        position = _dicom_floats(reader.GetMetaData(i, "0020|0032"), 3)
        if position is None:
            return
        positions.append(tuple(position))
        if orientation is None and reader.HasMetaDataKey(i, "0020|0037"):
            orientation = _dicom_floats(reader.GetMetaData(i, "0020|0037"), 6)
    if orientation is not None:
        check_slice_positions(positions, tuple(orientation), [os.path.basename(f) for f in files])


def read_source(source: Source) -> sitk.Image:
    """Read a source with SimpleITK (DICOM series through ``ImageSeriesReader``).

    NIfTI files are checked first (:func:`check_nifti`).

    Raises:
        SkipVolume: ``"unreadable"`` if the file(s) cannot be read, ``"absurd spacing"`` if the
            reader refuses the spacing (zero) or NIfTI ``pixdim`` is zero or NaN, ``"uneven slice
            spacing"`` for a DICOM series with a missing slice (:func:`check_slice_positions`).
    """
    try:
        if source.files:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(source.files))
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            _check_series(reader, list(source.files))
            return image
        if source.path.lower().endswith((".nii", ".nii.gz")):
            check_nifti(source.path)
        return sitk.ReadImage(source.path)
    except (RuntimeError, OSError) as exc:
        message = _reader_message(exc)
        if "Reason: No such file or directory" in message and all(map(os.path.isfile, source.files or [source.path])):
            # MetaIO reports short reads with a stale errno: the file is there but truncated or corrupt.
            message = message.replace("Reason: No such file or directory", "(truncated or corrupt data)")
        reason = ABSURD_SPACING if "spacing" in message.lower() else UNREADABLE
        raise SkipVolume(reason, message) from exc


def validate_image(image: sitk.Image, max_spacing: float = 20.0, min_spacing: float = 0.05) -> np.ndarray:
    """Check that ``image`` is a usable 3-D scalar volume.

    Args:
        image: The image as read.
        max_spacing: Largest acceptable spacing in mm.
        min_spacing: Smallest acceptable spacing in mm (below it, a header error is far likelier than
            a real voxel size; resampling would shrink the volume to a few voxels).

    Returns:
        A ``(z, y, x)`` view of the voxels (no copy).

    Raises:
        SkipVolume: with reason ``"not a scalar image"``, ``"not 3-D"``, ``"absurd spacing"``,
            ``"spacing too fine"``, ``"non-finite voxels"`` or ``"constant image"``.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SkipVolume(NOT_SCALAR, f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    size = image.GetSize()
    if image.GetDimension() != 3:
        raise SkipVolume(NOT_3D, f"{image.GetDimension()}-D image of size {size}")
    if min(size) < 2:
        raise SkipVolume(NOT_3D, f"2-D image stored as 3-D (size {size})")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and 0.0 < s <= max_spacing for s in spacing):
        raise SkipVolume(ABSURD_SPACING, f"spacing {tuple(float(f'{s:.4g}') for s in spacing)} mm is not in (0, {max_spacing}]")
    if min(spacing) < min_spacing:
        raise SkipVolume(
            SPACING_TOO_FINE,
            f"spacing {tuple(float(f'{s:.4g}') for s in spacing)} mm is below min_spacing {min_spacing:g} mm "
            f"(the volume would span {tuple(float(f'{n * s:.3g}') for n, s in zip(size, spacing, strict=True))} mm); "
            "check the file's header",
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            nans = int(np.count_nonzero(np.isnan(array)))
            infs = int(finite.size - np.count_nonzero(finite)) - nans
            raise SkipVolume(NON_FINITE, f"{nans} NaN and {infs} infinite voxel(s)")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise SkipVolume(CONSTANT, f"every voxel is {float(lo):g}")
    return array


def resample_to_spacing(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
    """Reorient to LPS and resample to ``spacing`` (linear, float32), keeping the field of view's centre.

    The new size per axis is ``max(1, round(size * old_spacing / spacing))``; voxels beyond the
    source's last voxel centre take the nearest source value.

    Args:
        image: 3-D scalar image.
        spacing: ``(x, y, z)`` mm.

    Returns:
        The resampled float32 image.
    """
    try:
        image = sitk.DICOMOrient(image, "LPS")
    except RuntimeError:
        pass  # Degenerate direction: keep the grid as it is.
    old_spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    old_size = np.asarray(image.GetSize(), dtype=np.float64)
    new_spacing = np.asarray(spacing, dtype=np.float64)
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(np.int64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint(((old_size - 1) / 2).tolist()))
    new_origin = centre - direction @ ((new_size - 1) / 2 * new_spacing)
    return sitk.Resample(
        image,
        [int(s) for s in new_size],
        sitk.Transform(),
        sitk.sitkLinear,
        new_origin.tolist(),
        new_spacing.tolist(),
        direction.flatten().tolist(),
        0.0,
        sitk.sitkFloat32,
        True,
    )


def window_ct(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map HU linearly so that ``window[0] -> 0`` and ``window[1] -> 1``, clipped to ``[0, 1]``.

    Args:
        hu: Any shape, Hounsfield units.
        window: ``(low, high)`` HU.

    Returns:
        float32 array of the same shape.
    """
    low, high = float(window[0]), float(window[1])
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def mr_intensity_range(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The intensities at ``percentiles`` of ``array`` (on an even subsample of large volumes).

    Falls back to ``(min, max)`` when both percentiles coincide (mostly-empty images).

    Raises:
        SkipVolume: ``"constant image"`` if ``min == max``.
    """
    flat = array.reshape(-1)
    if flat.size > PERCENTILE_SAMPLES:
        flat = flat[:: math.ceil(flat.size / PERCENTILE_SAMPLES)]
    low, high = (float(v) for v in np.percentile(flat, percentiles))
    if high <= low:
        low, high = float(array.min()), float(array.max())
    if high <= low:
        raise SkipVolume(CONSTANT, f"every voxel is {low:g} after resampling")
    return low, high


def scale_intensities(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low -> 0`` and ``high -> 1`` linearly, clipped to ``[0, 1]`` (float32, same shape)."""
    return window_ct(array, (low, high))


#: The smallest standard deviation :func:`zscore` divides by (nnU-Net's ``ZScoreNormalization``).
ZSCORE_MIN_STD = 1e-8


def zscore_statistics(array: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` of every voxel of ``array`` in float64 (nnU-Net's ``ZScoreNormalization`` without a mask)."""
    return float(array.mean(dtype=np.float64)), float(array.std(dtype=np.float64))


def zscore(array: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(array - mean) / max(std, 1e-8)`` as float32, not clipped (nnU-Net's ``ZScoreNormalization``)."""
    out = np.asarray(array, dtype=np.float32) - np.float32(mean)
    out *= np.float32(1.0 / max(std, ZSCORE_MIN_STD))
    return out


def nonzero_mask(array: np.ndarray) -> np.ndarray:
    """Voxels that are not 0, with enclosed holes filled (nnU-Net's ``create_nonzero_mask`` for one channel).

    A hole is a 6-connected region of zeros that does not touch the volume's border (what
    ``scipy.ndimage.binary_fill_holes`` fills), found with one labelling pass.
    """
    zero = np.asarray(array) == 0
    labels, count = ndimage.label(zero)
    if count == 0:
        return ~zero
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(labels.ndim):
        for index in (0, -1):
            border[np.unique(np.take(labels, index, axis=axis))] = True
    border[0] = False
    return ~border[labels]


def _source_mapping_statistics(source: np.ndarray, intensity: str) -> tuple[float, float]:
    """What the per-image mappings that nnU-Net computes before resampling need, from the source grid.

    ``"minmax"``: ``(min, max)`` (``RescaleTo01Normalization``); ``"zscore_nonzero"``: ``(mean, std)`` inside
    :func:`nonzero_mask` (``ZScoreNormalization`` with ``use_mask_for_norm``; the whole image when it is all
    nonzero). Other mappings need nothing here: ``(0, 0)``.

    Raises:
        SkipVolume: ``"constant image"`` when the statistics leave nothing to map (``min == max``).
    """
    if intensity == "minmax":
        low, high = float(source.min()), float(source.max())
        if high <= low:
            raise SkipVolume(CONSTANT, f"every voxel is {low:g}")
        return low, high
    if intensity == "zscore_nonzero":
        inside = source[nonzero_mask(source)]
        if inside.size == 0:
            raise SkipVolume(CONSTANT, "every voxel is 0")
        return float(inside.mean(dtype=np.float64)), float(inside.std(dtype=np.float64))
    return 0.0, 0.0


def body_bbox(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice] | None:
    """Bounding box of the body in a foreground mask, grown by ``margin`` voxels.

    The largest 6-connected component is kept, with every component at least
    :data:`BODY_COMPONENT_FRACTION` of its size; smaller ones (table, noise) are dropped.

    Args:
        mask: ``(D, H, W)`` boolean foreground.
        margin: Voxels added on every side (clipped to the volume).

    Returns:
        Three slices ``(z, y, x)``, or ``None`` if the mask is empty.
    """
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    keep = np.flatnonzero(sizes >= BODY_COMPONENT_FRACTION * sizes.max()) + 1
    boxes = ndimage.find_objects(labels)
    lo = np.min([[s.start for s in boxes[k - 1]] for k in keep], axis=0)
    hi = np.max([[s.stop for s in boxes[k - 1]] for k in keep], axis=0)
    lo = np.maximum(lo - margin, 0)
    hi = np.minimum(hi + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def preprocess_image(image: sitk.Image, modality: str, config: DataConfig) -> Preprocessed:
    """Validate, resample, normalise and body-crop one image (see the module docstring).

    Args:
        image: As read from disk.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (decided from the intensities, :mod:`.modality`).
        config: Target spacing, window/percentiles, body thresholds and margin, minimum size.

    Raises:
        SkipVolume: if the volume cannot be used.
    """
    source_array = validate_image(image, config.max_spacing, config.min_spacing)
    decision = None
    if modality == AUTO:
        detected, decision = detect_modality(source_array)
        if detected is None:
            raise SkipVolume(MODALITY_UNKNOWN, decision)
        modality = detected
    stats: dict[str, float] = {
        "source_min": float(source_array.min()),
        "source_max": float(source_array.max()),
        "source_mean": float(source_array.mean(dtype=np.float64)),
    }
    source_shape = tuple(int(s) for s in source_array.shape)
    source_spacing = tuple(float(s) for s in image.GetSpacing())
    source_statistics = _source_mapping_statistics(source_array, config.intensity)
    del source_array
    resampled = sitk.GetArrayFromImage(resample_to_spacing(image, config.spacing))
    if min(resampled.shape) < config.min_size:
        raise SkipVolume(
            TOO_SMALL,
            f"the whole volume is {tuple(resampled.shape)} voxels (z, y, x) at the target spacing "
            f"{tuple(config.spacing)} mm, below min_size {config.min_size} on some axis",
        )
    if modality == "ct":
        low, high = config.ct_window
        mask = resampled > config.ct_body_hu
    else:
        low, high = mr_intensity_range(resampled, config.mr_percentiles)
        mask = resampled > low + config.mr_body_threshold * (high - low)
        if config.mr_window is not None:
            low, high = config.mr_window  # the body is still found from the percentiles
    box = body_bbox(mask, config.body_margin)
    del mask
    if box is None:
        threshold = f"{config.ct_body_hu:g} HU" if modality == "ct" else f"{config.mr_body_threshold:g} (scaled)"
        raise SkipVolume(NO_BODY, f"no voxel above the body threshold {threshold}")
    if config.intensity == "zscore":
        image_mean, image_std = zscore_statistics(resampled)  # the whole resampled image, as nnU-Net's
        cropped = zscore(resampled[box], image_mean, image_std)
        mapping = f"z-scoring (mean {image_mean:g}, std {image_std:g})"
        stats.update(zscore_mean=image_mean, zscore_std=image_std)
    elif config.intensity == "zscore_nonzero":
        image_mean, image_std = source_statistics
        inside = nonzero_mask(resampled)[box]
        cropped = np.where(inside, zscore(resampled[box], image_mean, image_std), np.float32(0.0))
        mapping = f"z-scoring inside the nonzero region (mean {image_mean:g}, std {image_std:g})"
        stats.update(zscore_mean=image_mean, zscore_std=image_std)
    elif config.intensity == "minmax":
        low, high = source_statistics
        cropped = window_ct(resampled[box], (low, high))
        mapping = f"min-max rescaling of [{low:g}, {high:g}]"
        stats.update(low=float(low), high=float(high))
    else:
        cropped = window_ct(resampled[box], (low, high))
        mapping = f"windowing to [{low:g}, {high:g}]"
        stats.update(low=float(low), high=float(high))
    crop_shape = cropped.shape
    if min(crop_shape) < config.min_size:
        raise SkipVolume(TOO_SMALL, f"body crop {crop_shape} voxels is below min_size {config.min_size} on some axis")
    cmin, cmax = float(cropped.min()), float(cropped.max())
    if cmax - cmin < 1e-6:
        raise SkipVolume(CONSTANT, f"every voxel is {cmin:g} after {mapping}")
    stats.update(mean=float(cropped.mean(dtype=np.float64)), std=float(cropped.std(dtype=np.float64)))
    return Preprocessed(
        array=cropped.astype(np.float16),
        spacing=tuple(config.spacing),  # type: ignore[arg-type]
        source_shape=source_shape,  # type: ignore[arg-type]
        source_spacing=source_spacing,  # type: ignore[arg-type]
        resampled_shape=tuple(int(s) for s in resampled.shape),  # type: ignore[arg-type]
        bbox=tuple((int(s.start), int(s.stop)) for s in box),
        stats=stats,
        modality=modality,
        modality_decision=decision,
    )


def preprocess_source(source: Source, config: DataConfig) -> Preprocessed:
    """Read ``source`` and preprocess it (:func:`read_source` then :func:`preprocess_image`).

    Raises:
        SkipVolume: if the volume cannot be read or used.
    """
    return preprocess_image(read_source(source), source.modality, config)
