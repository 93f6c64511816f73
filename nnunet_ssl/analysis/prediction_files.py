"""Whether a prediction file reads back whole: the check behind "a file that exists is not a file that is done".

``nnUNetv2_predict --continue_prediction`` and a plain ``[ -f FILE ]`` trust any file that exists,
and SimpleITK reads a NIfTI file that was cut short (an interrupted writer, a full disk) without a
word, filling what is missing with zeros: a truncated label map then scores as a bad prediction
(white-matter Dice 0.499 -> 0.457 in issue 20), silently. So a gzip file is decompressed to its
end (a stream cut anywhere, even after the last voxel, fails its length and CRC check), NIfTI files
are read with nibabel, which refuses a short ``.nii``, and MetaImage, NRRD and the 2D formats with
SimpleITK, which refuses them when short. The shape read back is
compared with the file's reference (the case's image or label: nnU-Net writes a prediction in its
input's geometry). A format neither reader knows (e.g. ``.b2nd``) is trusted as before.
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Endings read with nibabel (SimpleITK fills a truncated NIfTI with zeros instead of failing).
NIFTI_ENDINGS = (".nii.gz", ".nii")
#: Endings read with SimpleITK, which fails on a truncated file of these formats.
SIMPLEITK_ENDINGS = (".mha", ".mhd", ".nrrd", ".nhdr", ".gipl", ".png", ".bmp", ".tif", ".tiff")


class UnreadablePredictionError(ValueError):
    """Prediction files that do not read back whole; the message names each file and the fix."""

    def __init__(self, problems: dict[Path, str], fix: str) -> None:
        self.problems = problems
        shown = [f"{path}: {reason}" for path, reason in list(problems.items())[:3]]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(f"{len(problems)} prediction file(s) do not read back whole, refused: "
                         + "; ".join(shown) + more + f". {fix}")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_ENDINGS):
        return "nifti"
    if name.endswith(SIMPLEITK_ENDINGS):
        return "simpleitk"
    return None


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without trailing singleton axes (a 3D volume stored with a 4th axis of 1 is the same volume)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def header_shape(path: Path) -> tuple[int, ...] | None:
    """The voxel grid of an image from its header alone (x, y, z order), or None for a format not read here."""
    kind = _kind(path)
    if kind == "nifti":
        import nibabel

        return _squeezed(nibabel.load(str(path)).shape)  # type: ignore[attr-defined]
    if kind == "simpleitk":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return _squeezed(reader.GetSize())
    return None


def _nifti(path: Path) -> Any:
    """A NIfTI image with its voxels in memory; a ``.nii.gz`` is decompressed whole first (length and CRC checked)."""
    import nibabel

    if not path.name.lower().endswith(".gz"):
        return nibabel.load(str(path))
    data = gzip.decompress(path.read_bytes())  # nibabel alone stops after the last voxel it needs
    header_size = {int.from_bytes(data[:4], order) for order in ("little", "big")}
    image_class = nibabel.Nifti2Image if 540 in header_size else nibabel.Nifti1Image
    return image_class.from_bytes(data)


def read_problem(path: Path, reference: Path | None = None) -> str | None:
    """Why ``path`` cannot be trusted as a finished file, or None when it reads back whole.

    Every voxel is read, and a gzip stream is decompressed to its end, so a file cut short anywhere
    is found (a 512 x 512 x 300 ``.nii.gz`` label map: 0.3-0.7 s on one shared CPU core). With
    ``reference``, the shape read back must equal the reference's (read from its header).

    Args:
        path: An existing prediction (label map) file.
        reference: The image or label of the same case, or None for the read check alone.
    """
    import numpy as np

    kind = _kind(path)
    if kind is None:
        logger.debug("%s: no reader checks this format; trusted as it is", path)
        return None
    try:
        if kind == "nifti":
            image = _nifti(path)
            shape = _squeezed(np.asanyarray(image.dataobj).shape)
        else:
            import SimpleITK as sitk

            shape = _squeezed(sitk.ReadImage(str(path)).GetSize())
    except Exception as error:  # EOFError, OSError, zlib.error, RuntimeError from ITK: all say "cut short"
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"does not read back ({type(error).__name__}: {reason})"
    if reference is None:
        return None
    try:
        expected = header_shape(reference)
    except Exception as error:
        logger.warning("%s: cannot read the shape of its reference %s (%s); checked without it", path, reference, error)
        return None
    if expected is not None and shape != expected:
        return f"reads back with shape {shape}, but {reference.name} has {expected}"
    return None
