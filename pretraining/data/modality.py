"""Tell CT from MR by the shape of the intensity distribution, for volumes that carry no modality information.

CT is stored in Hounsfield units: air is a peak near -1000 HU (around the body, in the lungs, in the
bowel), with little between it and fat (-100 HU), and bone reaches above +300 HU. MR intensities
are magnitudes on an arbitrary scale with neither: the background is noise around zero, which some
reconstructions and processing steps leave signed (about half of the background voxels negative,
38 % of a head volume's voxels), far below the tissue. The sign alone therefore decides nothing;
the rules, in order (:func:`detect_modality`):

1. **Padding is left out.** An exact value at the bottom of the range that holds at least
   :data:`PADDING_FRACTION` of the voxels (CT's -3024 or -2048 outside the field of view, an MR's 0
   border) is padding, not anatomy, unless it lies in the air band (-1024 is air to a CT reader).
2. **CT: an air peak.** At least :data:`MIN_AIR_FRACTION` of the voxels lie in :data:`AIR_HU`, and
   they are denser per HU than the voxels of :data:`GAP_HU` (between air and fat) by
   :data:`AIR_PEAK_RATIO`: zero-centred MR noise wide enough to reach -1000 is denser near zero,
   so it has no peak there. (An MR volume padded with one value between -1200 and -800 would
   read as CT, since -1024 is a CT reader's air; give ``--modality`` for such files.)
3. **No negative values** (beyond an interpolation undershoot): MR. A CT stored as unsigned values
   whose reader ignored the rescale intercept also has none (air near 0, soft tissue near 1024,
   bone above 1324); it is still taken as MR, and the decision says that it also reads as such a
   CT (:func:`looks_like_unsigned_ct`) and how to fix the header. SimpleITK applies a DICOM or
   NIfTI intercept when it reads the file, so this only happens when a header lost it; and a T1
   head whose white matter lies near 1024 on the scanner's scale reads the same way (measured on
   the MR normalisation benchmark's phantoms, rounded to integers: white matter between 735 and
   1260), so refusing would drop real MR, and shifting by a guessed offset would move every window
   silently. Give ``--modality`` (or fix the header) when the log says so.
4. **Negative values that are noise around zero**: MR. Over ``[-t, t]``, ``t`` the magnitude of the
   0.5th percentile, the histogram peaks within :data:`NOISE_MODE` ``* t`` with at least
   :data:`NOISE_PEAK_FRACTION` of its height at zero (the background: Gaussian noise peaks at
   zero; Rician noise with its mean subtracted a quarter of its sigma below, at 94 % of the height
   at zero), and the 99.5th percentile reaches :data:`MIN_SIGNAL_TO_NOISE` ``* t`` (tissue far above
   the noise: 24 to 50 on the MR phantoms). A CT without an air peak (a crop inside the body) peaks
   at its soft tissue, +0.25 to +0.45 ``t``, and reaches 0.6 to 4.8 ``t`` (measured on crops of
   the abdominal phantoms); pure noise reaches 1 ``t``: neither is MR. So a very noisy MR (its
   brightest tissue below about 15 times the background's sigma) is ambiguous too.
5. **Air and bone without noise around zero**: CT. At least :data:`MIN_AIR_FRACTION` of the voxels
   near -1000 HU and :data:`MIN_BONE_FRACTION` above :data:`BONE_HU`, and the values of ``[-t, t]``
   do not cluster around zero (a volume of flat slabs has air and bone but no peak: its -500 HU slab
   is as dense; an MR whose noise reaches -1000 clusters around zero, and stays ambiguous).

Anything else is ambiguous: the volume is skipped, and ``--modality`` decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Value a source's modality takes when nothing but its intensities can decide.
AUTO = "auto"
#: Air in CT: voxels in this HU range ...
AIR_HU = (-1200.0, -800.0)
#: ... make up at least this fraction of the (non-padding) volume ...
MIN_AIR_FRACTION = 0.005
#: ... and are this many times denser per HU than the voxels between air and fat (:data:`GAP_HU`).
AIR_PEAK_RATIO = 2.0
#: Between air and fat: in CT only lung edges and partial volumes lie here.
GAP_HU = (-600.0, -200.0)
#: Bone in CT: above this HU ...
BONE_HU = 300.0
#: ... at least this fraction of the volume.
MIN_BONE_FRACTION = 0.001
#: Soft tissue in CT lies within this HU range (fat to contrast-enhanced organs) ...
SOFT_TISSUE_HU = (-200.0, 200.0)
#: ... at least this fraction of the voxels above :data:`GAP_HU` (the body: fat, soft tissue, bone).
MIN_SOFT_TISSUE_FRACTION = 0.5
#: What a reader that ignores the rescale intercept adds to HU (the usual intercept is -1024).
UNSIGNED_CT_OFFSET = 1024.0
#: An exact value at the bottom of the range holding this fraction of the voxels is padding.
PADDING_FRACTION = 0.01
#: MR: the smallest value is at least this fraction of the range below zero (interpolation undershoot).
MR_NEGATIVE_TOLERANCE = 1e-3
#: MR noise: the histogram of ``[-t, t]`` peaks within this range (fractions of ``t``) ...
NOISE_MODE = (-0.4, 0.2)
#: ... its density at zero is at least this fraction of its peak ...
NOISE_PEAK_FRACTION = 0.75
#: ... and the 99.5th percentile is at least this many times ``t``.
MIN_SIGNAL_TO_NOISE = 6.0
#: Bins of the ``[-t, t]`` histogram (smoothed over 3 bins; an even number, so that zero is an edge).
NOISE_BINS = 20
#: Decisions are made on at most this many evenly strided voxels.
SAMPLES = 2_000_000


@dataclass(frozen=True)
class HounsfieldEvidence:
    """What the CT rules see in a volume read as HU (after subtracting ``offset``).

    Attributes:
        air: Fraction of the voxels in :data:`AIR_HU`.
        air_peak: Density per HU in :data:`AIR_HU` over the density in :data:`GAP_HU` (inf when the gap is empty).
        bone: Fraction of the voxels above :data:`BONE_HU`.
        soft_tissue: Fraction of the voxels above :data:`GAP_HU` (the body) that lie in :data:`SOFT_TISSUE_HU`.
    """

    air: float
    air_peak: float
    bone: float
    soft_tissue: float

    @property
    def has_air_peak(self) -> bool:
        return self.air >= MIN_AIR_FRACTION and self.air_peak >= AIR_PEAK_RATIO

    @property
    def has_bone(self) -> bool:
        return self.bone >= MIN_BONE_FRACTION

    @property
    def is_ct(self) -> bool:
        """Rule 2 of the module docstring: an air peak."""
        return self.has_air_peak


def hounsfield_evidence(values: np.ndarray, offset: float = 0.0) -> HounsfieldEvidence:
    """The CT evidence in ``values`` (1-D) read as ``HU + offset``."""
    hu = np.asarray(values, dtype=np.float64) - offset
    n = max(hu.size, 1)
    in_air = (hu >= AIR_HU[0]) & (hu <= AIR_HU[1])
    air_count = int(np.count_nonzero(in_air))
    gap_count = int(np.count_nonzero((hu >= GAP_HU[0]) & (hu <= GAP_HU[1])))
    air_density = air_count / (AIR_HU[1] - AIR_HU[0])
    gap_density = gap_count / (GAP_HU[1] - GAP_HU[0])
    air_peak = air_density / gap_density if gap_count else (math.inf if air_count else 0.0)
    body = int(np.count_nonzero(hu > GAP_HU[1]))
    soft = int(np.count_nonzero((hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])))
    return HounsfieldEvidence(
        air=air_count / n,
        air_peak=air_peak,
        bone=float(np.count_nonzero(hu > BONE_HU)) / n,
        soft_tissue=soft / body if body else 0.0,
    )


def looks_like_unsigned_ct(values: np.ndarray, shifted: HounsfieldEvidence) -> bool:
    """Rule 3's note: ``values`` (1-D, none negative) are whole numbers that read as CT after
    subtracting :data:`UNSIGNED_CT_OFFSET`: an air peak, bone, and at least :data:`MIN_SOFT_TISSUE_FRACTION`
    of the voxels above the gap within :data:`SOFT_TISSUE_HU`."""
    integers = bool(np.all(values == np.round(values)))
    return (integers and shifted.is_ct and shifted.has_bone
            and shifted.soft_tissue >= MIN_SOFT_TISSUE_FRACTION)


def drop_padding(values: np.ndarray) -> tuple[np.ndarray, float | None]:
    """``values`` (1-D) without an exact bottom value holding :data:`PADDING_FRACTION` of them, and that value.

    A bottom value inside :data:`AIR_HU` (e.g. -1024) is kept: a CT reader fills with air.
    """
    low = values.min()
    count = int(np.count_nonzero(values == low))
    if count < PADDING_FRACTION * values.size or count == values.size or AIR_HU[0] <= float(low) <= AIR_HU[1]:
        return values, None
    return values[values != low], float(low)


def _noise_around_zero(values: np.ndarray) -> tuple[bool, bool, str]:
    """Rule 4: ``(a cluster around zero, tissue far above it, explanation)``; both true for the background noise
    of an MR image (see the module docstring)."""
    t = -float(np.percentile(values, 0.5))
    high = float(np.percentile(values, 99.5))
    if t <= 0:
        t = -float(values.min())
    counts, edges = np.histogram(values[(values >= -t) & (values <= t)], bins=NOISE_BINS, range=(-t, t))
    smooth = np.convolve(counts.astype(np.float64), np.ones(3) / 3, mode="same")
    at_zero = float(smooth[NOISE_BINS // 2 - 1 : NOISE_BINS // 2 + 1].mean()) / max(float(smooth.max()), 1.0)
    peak = int(np.argmax(smooth))
    mode = float(edges[peak] + edges[peak + 1]) / 2
    negative = float(np.count_nonzero(values < 0)) / values.size
    text = (f"{negative:.0%} negative, the lowest 0.5 % below {-t:.4g}, the histogram of [{-t:.4g}, {t:.4g}] peaking "
            f"at {mode:.3g} with {at_zero:.0%} of its height at zero, the 99.5th percentile {high:.4g}")
    around_zero = NOISE_MODE[0] * t <= mode <= NOISE_MODE[1] * t and at_zero >= NOISE_PEAK_FRACTION
    return around_zero, high >= MIN_SIGNAL_TO_NOISE * t, text


def detect_modality(array: np.ndarray) -> tuple[str | None, str]:
    """``("ct" | "mr" | None, explanation)`` for a ``(z, y, x)`` volume of raw intensities.

    The rules are those of the module docstring: padding left out, CT by its air peak near -1000 HU
    (or air and bone without MR noise), MR by no negative values or by negative values that
    are noise around zero far below the tissue (saying so when a volume without negative values
    would also read as CT stored without its rescale intercept); anything else gives None, with the
    reason and the fix.
    """
    flat = np.asarray(array).reshape(-1)
    if flat.size > SAMPLES:
        flat = flat[:: math.ceil(flat.size / SAMPLES)]
    flat = flat.astype(np.float64, copy=False)
    values, padding = drop_padding(flat)
    low, high = float(values.min()), float(values.max())
    span = f"values {low:.4g} to {high:.4g}" + (f", padding {padding:g} left out" if padding is not None else "")
    hu = hounsfield_evidence(values)
    if hu.is_ct:
        bone = f"{hu.bone:.1%} bone above +{BONE_HU:g} HU" if hu.has_bone else f"no bone above +{BONE_HU:g} HU"
        return "ct", f"CT: {hu.air:.1%} of the voxels are air near -1000 HU (a peak), {bone} ({span})"
    if low >= -MR_NEGATIVE_TOLERANCE * max(high - low, 1e-12):
        decision = f"MR: no negative values and no air peak near -1000 ({span})"
        shifted = hounsfield_evidence(flat, UNSIGNED_CT_OFFSET)
        if looks_like_unsigned_ct(flat, shifted):
            decision += (
                f"; it would also read as CT stored as unsigned values without its rescale intercept "
                f"({shifted.air:.1%} of the voxels are a peak near {UNSIGNED_CT_OFFSET - 1000:g} (air), "
                f"{shifted.soft_tissue:.0%} of the rest within {UNSIGNED_CT_OFFSET:g} +- {SOFT_TISSUE_HU[1]:g} (soft "
                f"tissue), {shifted.bone:.1%} above {BONE_HU + UNSIGNED_CT_OFFSET:g} (bone)): if it is CT, write the "
                "intercept into the header (DICOM RescaleIntercept, NIfTI scl_inter, usually -1024) so it reads in HU"
            )
        return "mr", decision
    around_zero, far_below, text = _noise_around_zero(values)
    if around_zero and far_below:
        return "mr", f"MR: no air peak near -1000, negative values are noise around zero far below the tissue ({text}; {span})"
    if hu.air >= MIN_AIR_FRACTION and hu.has_bone and not around_zero:
        return "ct", (f"CT: {hu.air:.1%} of the voxels are air near -1000 HU (no peak), {hu.bone:.1%} bone above "
                      f"+{BONE_HU:g} HU, and the negative values are not MR noise around zero ({span})")
    return None, (
        f"cannot tell CT from MR: {span}; no air peak near -1000 HU (CT: {hu.air:.2%} of the voxels in "
        f"[{AIR_HU[0]:g}, {AIR_HU[1]:g}], {hu.air_peak:.2g} times as dense as [{GAP_HU[0]:g}, {GAP_HU[1]:g}]), and the "
        f"negative values are not MR noise around zero ({text}); give the modality (--modality ct|mr, or a list file "
        "with modality per entry)"
    )
