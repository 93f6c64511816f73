"""Tell CT from MR by the intensities, for volumes that carry no modality information.

CT is stored in Hounsfield units, where air is about -1000 HU: every CT field of view holds some air
(around the body, in the lungs, in the bowel). MR intensities are magnitudes, never negative.
A volume that shows neither plainly is not guessed: it is skipped, and ``--modality`` decides.
"""
from __future__ import annotations

import math

import numpy as np

#: Value a source's modality takes when nothing but its intensities can decide.
AUTO = "auto"
#: Air in CT: voxels in this HU range ...
AIR_HU = (-1200.0, -800.0)
#: ... make up at least this fraction of the volume.
MIN_AIR_FRACTION = 0.005
#: MR: the smallest value is at least this fraction of the range below zero (interpolation undershoot).
MR_NEGATIVE_TOLERANCE = 1e-3
#: Decisions are made on at most this many evenly strided voxels.
SAMPLES = 2_000_000


def detect_modality(array: np.ndarray) -> tuple[str | None, str]:
    """``("ct" | "mr" | None, explanation)`` for a ``(z, y, x)`` volume of raw intensities.

    CT: at least :data:`MIN_AIR_FRACTION` of the voxels lie in :data:`AIR_HU` (air near -1000 HU).
    MR: no negative values (beyond a tiny interpolation undershoot). Anything else is ambiguous (None).
    """
    flat = np.asarray(array).reshape(-1)
    if flat.size > SAMPLES:
        flat = flat[:: math.ceil(flat.size / SAMPLES)]
    low, high = float(flat.min()), float(flat.max())
    air = float(np.count_nonzero((flat >= AIR_HU[0]) & (flat <= AIR_HU[1]))) / flat.size
    span = f"values {low:.4g} to {high:.4g}"
    if air >= MIN_AIR_FRACTION:
        return "ct", f"CT: {air:.1%} of the voxels are air near -1000 HU ({span})"
    if low >= -MR_NEGATIVE_TOLERANCE * max(high - low, 1e-12):
        return "mr", f"MR: no negative values ({span})"
    return None, (
        f"cannot tell CT from MR: {span}, only {air:.2%} of the voxels near -1000 HU (CT air) and negative values "
        "(MR has none); give the modality (--modality ct|mr, or a list file with modality per entry)"
    )
