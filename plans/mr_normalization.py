"""MR normalisation that keeps the anatomy: measure nnU-Net's built-in schemes on the foreground.

The paper (and pretraining) maps every MR image to [0, 1] by clipping at its own 5th and 95th
percentiles (:func:`percentile_map`). nnU-Net 2.8.1 has no such scheme, so ``nnunet-ssl plan``
stands in one of its built-in schemes:

* ``window``: one window for all images (``CTNormalization`` with the medians of the images' own
  percentiles, or a fixed window);
* ``minmax``: per-image min-max (``RescaleTo01Normalization``);
* ``zscore``: nnU-Net's per-image z-score (``ZScoreNormalization``; not in [0, 1], so it is never
  chosen automatically: only when forced, e.g. to match a z-score pretraining).

Which stand-in comes closest is measured where it matters, on the **foreground** (nnU-Net's
``use_mask_for_norm`` idea): the voxels above 10 % of the image's own 5-95 % range (the body
threshold pretraining crops with), holes filled (skull, CSF), small specks of noise dropped, plus
every labelled voxel. Averaged over all voxels instead, a large noisy background (often most of an
MR volume) lets one shared window win while it clips the brain of the brighter images to 1.0.

The choice (:func:`choose_mr_scheme`): among ``window`` and ``minmax``, the lower mean foreground
error to the exact per-image mapping, but a window that clips away more than
:data:`MAX_EXTRA_CLIPPED` of some image's foreground is not eligible. A voxel is *clipped away* when
the scheme clips it to 0 or 1 while the exact mapping puts it more than :data:`CLIP_TOLERANCE` from
that bound (the white matter of an image 5 % brighter than the window saturating at 1.0 is not; the
grey matter of an image twice as bright is). Min-max never clips, so something is always eligible.

The contrast between the labelled structures (e.g. white minus grey matter, the mean normalised
intensity of one label minus another's, per image) is measured raw, under the exact mapping and under
every scheme. A scheme *loses* a pair's contrast in an image when its clipping leaves less than
:data:`CONTRAST_KEPT` of it: ``kept = mapped difference / (raw difference x the scheme's slope on that
image)`` is 1 while both structures lie inside the scheme's range, and 0 when both are clipped to the
same bound. Pairs with no contrast to lose (below :data:`MIN_CONTRAST` under the exact mapping) are not
counted.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

#: nnU-Net's scheme class for each of our scheme names.
NNUNET_SCHEMES: dict[str, str] = {
    "window": "CTNormalization",
    "minmax": "RescaleTo01Normalization",
    "zscore": "ZScoreNormalization",
}
#: Human names for logs and summaries.
SCHEME_TITLES: dict[str, str] = {"window": "one window", "minmax": "per-image min-max", "zscore": "z-score"}
#: The stand-ins that map to [0, 1] and are compared with the exact per-image mapping.
UNIT_SCHEMES = ("window", "minmax")
#: Foreground: intensities above this fraction of the image's low-high percentile range (pretraining's
#: ``mr_body_threshold``), holes filled.
BODY_THRESHOLD = 0.1
#: Foreground components smaller than this fraction of the largest are noise specks, not anatomy.
MIN_COMPONENT_FRACTION = 0.05
#: A window clipping away more than this fraction of some image's foreground is not chosen automatically.
MAX_EXTRA_CLIPPED = 0.10
#: A clipped voxel counts as clipped away when the exact mapping puts it farther than this from the bound.
CLIP_TOLERANCE = 0.1
#: A scheme keeping less than this share of a pair's contrast in an image loses it there.
CONTRAST_KEPT = 0.5
#: A pair whose exact-mapping contrast is below this (in [0, 1] units) has none to lose in that image.
MIN_CONTRAST = 0.02
#: With more foreground labels than this, only neighbouring labels (by value) are paired.
MAX_LABELS_ALL_PAIRS = 5


def percentile_map(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """The paper's MR mapping: clip at the image's own percentiles, then affinely to [0, 1]."""
    low, high = np.percentile(image, percentiles)
    return np.clip((image - low) / max(high - low, 1e-8), 0.0, 1.0)


def strided(volume: np.ndarray, max_voxels: int) -> np.ndarray:
    """``volume`` with the same stride on every axis so that it has at most about ``max_voxels`` voxels."""
    step = max(1, math.ceil((volume.size / max(max_voxels, 1)) ** (1.0 / volume.ndim) - 1e-9))
    return volume[(slice(None, None, step),) * volume.ndim]


def foreground_mask(image: np.ndarray, percentiles: tuple[float, float], label: np.ndarray | None = None,
                    threshold: float = BODY_THRESHOLD) -> np.ndarray:
    """The body/brain voxels of one image (any dimensionality), as described in the module doc.

    Args:
        image: Raw intensities.
        percentiles: The image's ``(low, high)`` percentiles define the threshold
            ``low + threshold * (high - low)``.
        label: Segmentation of the same shape, or None; labelled voxels (> 0) always count.
    """
    low, high = (float(v) for v in np.percentile(image, percentiles))
    body = image > low + threshold * (high - low)
    labelled, count = ndimage.label(body)
    if count > 1:
        sizes = np.bincount(labelled.reshape(-1))[1:]
        keep = np.flatnonzero(sizes >= MIN_COMPONENT_FRACTION * sizes.max()) + 1
        body = np.isin(labelled, keep)
    body = ndimage.binary_fill_holes(body)
    if label is not None:
        body |= label > 0
    return np.asarray(body, dtype=bool)


@dataclass(frozen=True)
class ImageSample:
    """What the measurement needs of one training image.

    Attributes:
        case: Case identifier (for the report).
        values: Raw intensities of (strided) voxels, flat, float32.
        foreground: Foreground flags of the same voxels.
        labels: Label values of the same voxels, or None.
        minimum, maximum: The whole image's extremes (what nnU-Net's min-max uses).
        mean, std: The whole image's statistics (nnU-Net's z-score without a mask).
    """

    case: str
    values: np.ndarray
    foreground: np.ndarray
    labels: np.ndarray | None
    minimum: float
    maximum: float
    mean: float
    std: float


def sample_image(case: str, image: np.ndarray, label: np.ndarray | None, percentiles: tuple[float, float],
                 max_voxels: int = 1_000_000, zscore_nonzero: bool = False) -> ImageSample:
    """Sample one image (and its label) on a regular grid and find its foreground.

    Args:
        case: Case identifier.
        image: Raw intensities, e.g. ``(z, y, x)``.
        label: Its segmentation (same shape) or None.
        percentiles: The exact mapping's percentiles, e.g. ``(5, 95)``.
        max_voxels: At most about this many voxels are kept (the same stride on every axis).
        zscore_nonzero: z-score statistics over the nonzero voxels only (nnU-Net's ``use_mask_for_norm``).
    """
    image = np.asarray(image)
    if label is not None and np.shape(label) != image.shape:
        raise ValueError(f"{case}: label shape {np.shape(label)} differs from the image's {image.shape}")
    grid = strided(image, max_voxels).astype(np.float32)
    grid_label = strided(np.asarray(label), max_voxels).round().astype(np.int16) if label is not None else None
    mask = foreground_mask(grid, percentiles, grid_label)
    statistics = image[image != 0] if zscore_nonzero and (image != 0).any() else image
    return ImageSample(
        case=case, values=grid.reshape(-1), foreground=mask.reshape(-1),
        labels=grid_label.reshape(-1) if grid_label is not None else None,
        minimum=float(image.min()), maximum=float(image.max()),
        mean=float(statistics.mean(dtype=np.float64)), std=float(statistics.std(dtype=np.float64)),
    )


def shared_window(samples: Sequence[ImageSample], percentiles: tuple[float, float]) -> tuple[float, float]:
    """The shared window: medians of the images' own ``percentiles`` (over all their voxels)."""
    bounds = np.array([np.percentile(s.values.astype(np.float64), percentiles) for s in samples], dtype=np.float64)
    return float(np.median(bounds[:, 0])), float(np.median(bounds[:, 1]))


def scheme_map(scheme: str, sample: ImageSample, percentiles: tuple[float, float],
               window: tuple[float, float]) -> tuple[np.ndarray, float, np.ndarray]:
    """One image's voxels under ``scheme`` (``exact``, ``window``, ``minmax`` or ``zscore``).

    Returns:
        The mapped values, the scheme's slope on this image (output units per raw unit) and a flag per
        voxel that the scheme clipped it.
    """
    x = sample.values.astype(np.float64)
    if scheme in ("exact", "window"):
        if scheme == "exact":
            low, high = (float(v) for v in np.percentile(x, percentiles))
        else:
            low, high = window
        slope = 1.0 / max(high - low, 1e-8)
        return np.clip((x - low) * slope, 0.0, 1.0), slope, (x < low) | (x > high)
    unclipped = np.zeros(x.shape, dtype=bool)
    if scheme == "minmax":
        slope = 1.0 / max(sample.maximum - sample.minimum, 1e-8)
        return (x - sample.minimum) * slope, slope, unclipped
    if scheme == "zscore":
        slope = 1.0 / max(sample.std, 1e-8)
        return (x - sample.mean) * slope, slope, unclipped
    raise ValueError(f"unknown MR scheme {scheme!r}; expected exact, {', '.join(NNUNET_SCHEMES)}")


@dataclass(frozen=True)
class SchemeMeasure:
    """How one scheme fares on the training images.

    Attributes:
        scheme: ``window``, ``minmax`` or ``zscore``.
        foreground_error: Per image: mean |scheme - exact per-image mapping| over its foreground
            voxels (None for z-score, which is not in [0, 1]).
        all_voxel_error: The same over all voxels (what the planner compared before).
        extra_clipped: Per image: the fraction of its foreground the scheme clips away (to a bound the exact
            mapping puts it more than :data:`CLIP_TOLERANCE` from).
    """

    scheme: str
    foreground_error: tuple[float, ...] | None
    all_voxel_error: tuple[float, ...] | None
    extra_clipped: tuple[float, ...]

    @property
    def mean_foreground_error(self) -> float | None:
        return float(np.mean(self.foreground_error)) if self.foreground_error else None

    @property
    def mean_all_voxel_error(self) -> float | None:
        return float(np.mean(self.all_voxel_error)) if self.all_voxel_error else None

    @property
    def max_extra_clipped(self) -> float:
        return max(self.extra_clipped, default=0.0)


@dataclass(frozen=True)
class PairContrast:
    """The contrast between two labelled structures: ``mean(upper) - mean(lower)`` per image.

    Attributes:
        lower, upper: Label names (``upper`` has the larger label value).
        raw: Per image, in raw intensity units (None where a structure is absent from the sample).
        mapped: Per scheme (and ``exact``, the per-image percentile mapping), per image, in the scheme's units.
        kept: Per scheme (and ``exact``), per image: the share of the contrast its clipping leaves.
    """

    lower: str
    upper: str
    raw: tuple[float | None, ...]
    mapped: dict[str, tuple[float | None, ...]]
    kept: dict[str, tuple[float | None, ...]]

    @property
    def name(self) -> str:
        return f"{self.upper} - {self.lower}"

    def counted(self) -> list[int]:
        """The images where the pair has contrast to lose (at least :data:`MIN_CONTRAST` under the exact mapping)."""
        return [i for i, value in enumerate(self.mapped["exact"]) if value is not None and abs(value) >= MIN_CONTRAST]

    def lost(self, scheme: str) -> list[int]:
        """Indices of the images where ``scheme`` keeps less than :data:`CONTRAST_KEPT` of this contrast."""
        kept = self.kept[scheme]
        return [i for i in self.counted() if kept[i] is None or kept[i] < CONTRAST_KEPT]  # type: ignore[operator]

    def median(self, scheme: str) -> float | None:
        """Median over the images of the contrast under ``scheme`` (``raw`` for the raw intensities)."""
        values = [v for v in (self.raw if scheme == "raw" else self.mapped[scheme]) if v is not None]
        return float(np.median(values)) if values else None


@dataclass(frozen=True)
class MRMeasurement:
    """Every scheme measured on one MR channel's training images (see the module doc).

    Attributes:
        cases: The images measured, in order.
        percentiles: The exact mapping's percentiles.
        window: The window measured (shared, fitted, or a fixed one).
        window_fixed: Whether the window was given (``--mr-window``) rather than fitted.
        foreground_fraction: Per image, the share of its voxels in the foreground.
        schemes: Per scheme name.
        contrasts: One entry per pair of labelled structures.
    """

    cases: tuple[str, ...]
    percentiles: tuple[float, float]
    window: tuple[float, float]
    window_fixed: bool
    foreground_fraction: tuple[float, ...]
    schemes: dict[str, SchemeMeasure]
    contrasts: tuple[PairContrast, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe record for the plans (figures rounded to 5 significant digits)."""
        def rounded(values: Sequence[float | None] | None) -> list[float | None] | None:
            return None if values is None else [None if v is None else float(f"{v:.5g}") for v in values]

        return {
            "cases": list(self.cases),
            "percentiles": list(self.percentiles),
            "window": [float(v) for v in self.window],
            "window_fixed": self.window_fixed,
            "foreground": (f"voxels above {BODY_THRESHOLD:g} of each image's own {self.percentiles[0]:g}-"
                           f"{self.percentiles[1]:g} % range, holes filled, plus labelled voxels"),
            "foreground_fraction": rounded(self.foreground_fraction),
            "schemes": {
                name: {
                    "nnunet_scheme": NNUNET_SCHEMES[name],
                    "mean_foreground_error": rounded([m.mean_foreground_error])[0],  # type: ignore[index]
                    "mean_all_voxel_error": rounded([m.mean_all_voxel_error])[0],  # type: ignore[index]
                    "max_extra_clipped_foreground": rounded([m.max_extra_clipped])[0],  # type: ignore[index]
                    "foreground_error": rounded(m.foreground_error),
                    "all_voxel_error": rounded(m.all_voxel_error),
                    "extra_clipped_foreground": rounded(m.extra_clipped),
                }
                for name, m in self.schemes.items()
            },
            "contrast": [
                {
                    "pair": [pair.upper, pair.lower],
                    "raw": rounded(pair.raw),
                    **{name: rounded(values) for name, values in pair.mapped.items()},
                    "kept": {name: rounded(values) for name, values in pair.kept.items()},
                    "images_with_contrast": len(pair.counted()),
                    "images_losing_it": {name: len(pair.lost(name)) for name in self.schemes},
                }
                for pair in self.contrasts
            ],
        }


def label_pairs(label_names: dict[int, str]) -> list[tuple[int, int]]:
    """Which pairs of foreground labels to report: all pairs of up to :data:`MAX_LABELS_ALL_PAIRS` labels."""
    values = sorted(v for v in label_names if v > 0)
    if len(values) <= MAX_LABELS_ALL_PAIRS:
        return [(a, b) for i, a in enumerate(values) for b in values[i + 1:]]
    return list(zip(values[:-1], values[1:], strict=True))


def dataset_label_names(labels: dict[str, Any]) -> dict[int, str]:
    """dataset.json's ``labels`` as value -> name, foreground integer labels only (regions and ``ignore`` skipped)."""
    names = {}
    for name, value in labels.items():
        if str(name).lower() == "ignore" or isinstance(value, (list, tuple)):
            continue
        if int(value) > 0:
            names[int(value)] = str(name)
    return names


def measure_mr_normalization(samples: Sequence[ImageSample], percentiles: tuple[float, float],
                             label_names: dict[int, str] | None = None,
                             window: tuple[float, float] | None = None) -> MRMeasurement:
    """Measure every scheme on ``samples`` (one MR channel's training images).

    Args:
        samples: From :func:`sample_image`.
        percentiles: The exact mapping's ``(low, high)``, e.g. ``(5, 95)``.
        label_names: Label value -> name of the structures whose contrast is reported (None: none).
        window: A fixed window to measure as ``window``; None fits the shared one (:func:`shared_window`).

    Raises:
        ValueError: no sample, or the fitted window is empty.
    """
    if not samples:
        raise ValueError("no image to measure the MR normalisation on")
    fixed = window is not None
    window = window if window is not None else shared_window(samples, percentiles)
    if not window[1] > window[0]:
        raise ValueError(f"the MR images' {percentiles} percentiles coincide ({window[0]:g}); use "
                         "--mr-normalization zscore or minmax")
    names = ("exact", *NNUNET_SCHEMES)
    errors: dict[str, list[float]] = {n: [] for n in UNIT_SCHEMES}
    all_errors: dict[str, list[float]] = {n: [] for n in UNIT_SCHEMES}
    clipped: dict[str, list[float]] = {n: [] for n in NNUNET_SCHEMES}
    pairs = label_pairs(label_names or {})
    raw: dict[tuple[int, int], list[float | None]] = {p: [] for p in pairs}
    mapped: dict[tuple[int, int], dict[str, list[float | None]]] = {p: {n: [] for n in names} for p in pairs}
    kept: dict[tuple[int, int], dict[str, list[float | None]]] = {p: {n: [] for n in names} for p in pairs}
    fractions = []
    for sample in samples:
        fg = sample.foreground
        fractions.append(float(fg.mean()))
        outputs = {n: scheme_map(n, sample, percentiles, window) for n in names}
        exact = outputs["exact"][0]
        for n in NNUNET_SCHEMES:
            values, _, was_clipped = outputs[n]
            difference = np.abs(values - exact)
            away = was_clipped & fg & (difference > CLIP_TOLERANCE)
            clipped[n].append(float(away.sum() / max(int(fg.sum()), 1)))
            if n in UNIT_SCHEMES:
                errors[n].append(float(difference[fg].mean()) if fg.any() else 0.0)
                all_errors[n].append(float(difference.mean()))
        means = _label_means(sample, {v for p in pairs for v in p}, outputs)
        for pair in pairs:
            lower, upper = pair
            if lower not in means or upper not in means:
                raw[pair].append(None)
                for n in names:
                    mapped[pair][n].append(None)
                    kept[pair][n].append(None)
                continue
            raw_difference = means[upper]["raw"] - means[lower]["raw"]
            raw[pair].append(raw_difference)
            for n in names:
                difference = means[upper][n] - means[lower][n]
                unclipped = raw_difference * outputs[n][1]
                mapped[pair][n].append(difference)
                kept[pair][n].append(difference / unclipped if abs(unclipped) > 1e-12 else None)
    label_names = label_names or {}
    return MRMeasurement(
        cases=tuple(s.case for s in samples),
        percentiles=(float(percentiles[0]), float(percentiles[1])),
        window=(float(window[0]), float(window[1])),
        window_fixed=fixed,
        foreground_fraction=tuple(fractions),
        schemes={n: SchemeMeasure(n, tuple(errors[n]) if n in errors else None,
                                  tuple(all_errors[n]) if n in all_errors else None, tuple(clipped[n]))
                 for n in NNUNET_SCHEMES},
        contrasts=tuple(
            PairContrast(lower=label_names[p[0]], upper=label_names[p[1]], raw=tuple(raw[p]),
                         mapped={n: tuple(v) for n, v in mapped[p].items()},
                         kept={n: tuple(v) for n, v in kept[p].items()})
            for p in pairs
        ),
    )


def _label_means(sample: ImageSample, values: set[int],
                 outputs: dict[str, tuple[np.ndarray, float, np.ndarray]]) -> dict[int, dict[str, float]]:
    """Per label value present in the sample: its mean raw intensity and its mean under every scheme."""
    if sample.labels is None:
        return {}
    means: dict[int, dict[str, float]] = {}
    for value in values:
        inside = sample.labels == value
        if not inside.any():
            continue
        means[value] = {"raw": float(sample.values[inside].mean(dtype=np.float64)),
                        **{n: float(out[0][inside].mean()) for n, out in outputs.items()}}
    return means


@dataclass(frozen=True)
class MRChoice:
    """The scheme ``nnunet-ssl plan`` uses for one MR channel, and why.

    Attributes:
        scheme: ``window``, ``minmax`` or ``zscore``.
        forced: The user chose it (``--mr-normalization``, ``--mr-window``).
        reason: One sentence.
    """

    scheme: str
    forced: bool
    reason: str

    @property
    def nnunet_scheme(self) -> str:
        return NNUNET_SCHEMES[self.scheme]


def choose_mr_scheme(measurement: MRMeasurement, forced: str | None = None) -> MRChoice:
    """The stand-in with the lowest mean foreground error among those that clip no image's foreground
    by more than :data:`MAX_EXTRA_CLIPPED` (see the module doc), or ``forced``."""
    if forced is not None:
        if forced not in NNUNET_SCHEMES:
            raise ValueError(f"unknown MR scheme {forced!r}; expected one of {', '.join(NNUNET_SCHEMES)}")
        return MRChoice(forced, True, f"{SCHEME_TITLES[forced]}, as asked")
    measures = [measurement.schemes[n] for n in UNIT_SCHEMES]
    eligible = [m for m in measures if m.max_extra_clipped <= MAX_EXTRA_CLIPPED] or measures
    best = min(eligible, key=lambda m: (m.mean_foreground_error, UNIT_SCHEMES.index(m.scheme)))
    window = measurement.schemes["window"]
    if window not in eligible:
        worst = int(np.argmax(window.extra_clipped))
        reason = (f"the window clips away {window.extra_clipped[worst]:.0%} of {measurement.cases[worst]}'s "
                  f"foreground (more than {MAX_EXTRA_CLIPPED:.0%} of an image's is not allowed)")
    else:
        reason = "the lowest mean error on foreground voxels"
    return MRChoice(best.scheme, False, reason)


def describe_measurement(measurement: MRMeasurement, choice: MRChoice) -> list[str]:
    """Report lines: foreground errors and clipping per scheme, then each pair's contrast before and after."""
    p_low, p_high = measurement.percentiles
    n = len(measurement.cases)
    parts = []
    for name in UNIT_SCHEMES:
        m = measurement.schemes[name]
        worst = max(m.foreground_error or (0.0,))
        clip = f", clips away up to {m.max_extra_clipped:.0%} of an image's foreground" if m.max_extra_clipped > 0 \
            else ""
        parts.append(f"{SCHEME_TITLES[name]} {m.mean_foreground_error:.4f} (worst image {worst:.4f}{clip}; "
                     f"all voxels {m.mean_all_voxel_error:.4f})")
    fraction = float(np.mean(measurement.foreground_fraction))
    lines = [f"error to per-image {p_low:g}-{p_high:g} % on the foreground ({fraction:.0%} of the voxels, "
             f"{n} image(s)): " + ", ".join(parts) + f"; using {SCHEME_TITLES[choice.scheme]}: {choice.reason}"]
    order = [choice.scheme] + [s for s in NNUNET_SCHEMES if s != choice.scheme]
    for pair in measurement.contrasts:
        counted = len(pair.counted())
        raw, exact = pair.median("raw"), pair.median("exact")
        if raw is None or exact is None:
            lines.append(f"contrast {pair.name}: not in the same sampled image")
            continue
        after = []
        for name in order:
            lost = pair.lost(name)
            which = f": {', '.join(measurement.cases[i] for i in lost[:4])}{', ...' if len(lost) > 4 else ''}" \
                if lost else ""
            value = pair.median(name)
            after.append(f"{SCHEME_TITLES[name]}{' (used)' if name == choice.scheme else ''} "
                         f"{value:.3g} (lost in {len(lost)} of {counted}{which})")
        lines.append(f"contrast {pair.name} (median over images): raw {raw:.4g}, per-image {p_low:g}-{p_high:g} % "
                     f"{exact:.3g}; " + ", ".join(after))
    return lines
