"""How a plans file maps each channel's intensities, and whether that matches a weights file's pretraining.

Pretraining maps every volume to ``[0, 1]`` (CT: a fixed HU window; MR: per-image percentiles or a
fixed MR window), with ``intensity="minmax"`` each image's minimum and maximum to 0 and 1, or, with
``intensity="zscore"`` (the Spark3D recipe; ``"zscore_nonzero"`` inside the nonzero region), z-scores
every image as nnU-Net's ``ZScoreNormalization`` does. Fine-tuning should feed the encoder the same
values. Two checks, from cheap to measured:

* :func:`intensity_warnings`, by scheme: a different range (nnU-Net's z-scoring after a [0, 1]
  pretraining, or any scheme but ``ZScoreNormalization`` after a z-score one) or another modality;
* :func:`intensity_report`, measured: a few of the dataset's raw training images
  (:data:`MEASURE_CASES`, subsampled to :data:`MEASURE_VOXELS`) are mapped both ways, nnU-Net's by
  its own cropping and normalisation classes (:func:`map_like_plans`) and the pretraining's from
  the weights file's record (:func:`map_like_pretraining`), and the mean absolute difference on
  the labelled voxels is reported; above :data:`MAX_MEAN_DIFFERENCE` it is a warning, whatever
  the schemes (a shared MR window against per-image percentiles differs by 0.15 to 0.2 on brain
  voxels; a [0, 1] pretraining never warned about it by scheme).

:func:`settings_like_plans` goes the other way: the pretraining data settings (``intensity``,
``ct_window``, ``mr_window``) that reproduce a plans file's mapping (``nnunet-ssl pretrain
--intensity-like``), or a refusal naming what cannot be matched.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: nnU-Net's built-in schemes that produce values in [0, 1] whatever the properties.
UNIT_RANGE_SCHEMES = ("RescaleTo01Normalization", "RGBTo01Normalization")
#: nnU-Net's per-image z-scoring, the scheme a ``"zscore"`` pretraining record corresponds to.
ZSCORE_SCHEME = "ZScoreNormalization"
#: ``normalization`` of a pretraining record whose images were z-scored (a record without it is a [0, 1] one).
ZSCORE = "zscore"
#: ``normalization`` of a pretraining record whose images were min-max rescaled to [0, 1].
MINMAX = "minmax"
#: nnU-Net's per-image min-max, the scheme a ``"minmax"`` pretraining record corresponds to.
MINMAX_SCHEME = "RescaleTo01Normalization"
#: The pretraining ``intensity`` settings (``DataConfig.intensity``) a record can describe.
PRETRAINING_INTENSITIES = ("window", "zscore", "zscore_nonzero", "minmax")
#: A measured mean |difference| above this, in the pretraining's units ([0, 1], or one image standard deviation
#: for z-scores), is a warning: a tenth of the range the encoder learned on.
MAX_MEAN_DIFFERENCE = 0.1
#: Raw training images read to measure the difference (evenly spread over the sorted case ids) ...
MEASURE_CASES = 3
#: ... each subsampled (a stride per axis) to at most this many voxels before mapping.
MEASURE_VOXELS = 1_000_000


@dataclass(frozen=True)
class ChannelMapping:
    """One input channel's intensity mapping as the plans define it.

    Attributes:
        scheme: nnU-Net normalization class name.
        modality: ``"ct"``, ``"mr"`` or None when the plans do not say (nnU-Net's own planner).
        unit_range: Whether the result lies in [0, 1] (clipped window or min-max rescale).
        description: Short human text, e.g. ``"CT window [-175, 250] -> [0, 1]"``.
        use_mask: The plans' ``use_mask_for_norm`` of the channel (``ZScoreNormalization`` inside the nonzero region).
        properties: The channel's ``foreground_intensity_properties_per_channel`` that ``CTNormalization`` reads:
            ``(percentile_00_5, percentile_99_5, mean, std)``; None when incomplete.
    """

    scheme: str
    modality: str | None
    unit_range: bool
    description: str
    use_mask: bool = False
    properties: tuple[float, float, float, float] | None = None


def _is_unit_window(properties: dict[str, Any]) -> bool:
    low, high = properties.get("percentile_00_5"), properties.get("percentile_99_5")
    mean, std = properties.get("mean"), properties.get("std")
    if low is None or high is None or mean is None or std is None:
        return False
    return bool(np.isclose(mean, low) and np.isclose(std, high - low))


def pretraining_intensity(
    modality: str | None,
    cached_modalities: Iterable[str],
    ct_window: Sequence[float],
    mr_percentiles: Sequence[float],
    intensity: str = "window",
    mr_window: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The intensity mapping a pretraining run used, as a weights file's metadata records it (``intensity``).

    The pretraining engine stores it in every checkpoint; :func:`intensity_warnings` and
    :func:`intensity_report` read it back.

    Args:
        modality: The run's ``modality`` setting (``"ct"``, ``"mr"``) or None when the data decided it.
        cached_modalities: Modalities of the usable volumes in the run's cache (used when ``modality`` is None;
            none known means CT).
        ct_window: The run's CT window in HU.
        mr_percentiles: The run's per-image MR percentiles.
        intensity: The run's ``intensity`` setting: ``"window"`` (the records above, unchanged since
            version 1), ``"zscore"``, ``"zscore_nonzero"`` or ``"minmax"``.
        mr_window: The run's fixed MR window (``DataConfig.mr_window``), or None for the percentiles.

    Returns:
        ``{"modality": "CT"|"MR"|"mixed", "window"/"percentiles"/"mr_window": ..., "range": [0.0, 1.0]}``;
        for ``"zscore"`` ``{"modality": ..., "normalization": "zscore", "scheme": "ZScoreNormalization",
        "per_image": True}`` (no range: z-scores are not clipped), plus ``"mask": "nonzero"`` for
        ``"zscore_nonzero"``; for ``"minmax"`` ``{"modality": ..., "normalization": "minmax", "scheme":
        "RescaleTo01Normalization", "per_image": True, "range": [0.0, 1.0]}``.

    Raises:
        ValueError: An unknown ``intensity``.
    """
    modalities = {modality} if modality else {m for m in cached_modalities if m in ("ct", "mr")} or {"ct"}
    name = "CT" if modalities == {"ct"} else "MR" if modalities == {"mr"} else "mixed"
    if intensity in (ZSCORE, "zscore_nonzero"):
        record = {"modality": name, "normalization": ZSCORE, "scheme": ZSCORE_SCHEME, "per_image": True}
        return {**record, "mask": "nonzero"} if intensity == "zscore_nonzero" else record
    if intensity == MINMAX:
        return {"modality": name, "normalization": MINMAX, "scheme": MINMAX_SCHEME, "per_image": True,
                "range": [0.0, 1.0]}
    if intensity != "window":
        raise ValueError(f"unknown pretraining intensity mapping {intensity!r}; expected one of "
                         f"{', '.join(repr(i) for i in PRETRAINING_INTENSITIES)}")
    ct = {"window": list(ct_window)}
    mr: dict[str, Any] = (
        {"mr_window": [float(v) for v in mr_window]} if mr_window is not None
        else {"percentiles": list(mr_percentiles), "per_image": True}
    )
    if modalities == {"ct"}:
        return {"modality": "CT", **ct, "range": [0.0, 1.0]}
    if modalities == {"mr"}:
        return {"modality": "MR", **mr, "range": [0.0, 1.0]}
    return {"modality": "mixed", **ct, **mr, "range": [0.0, 1.0]}


def intensity_record(data: Mapping[str, Any], cached_modalities: Iterable[str]) -> dict[str, Any]:
    """:func:`pretraining_intensity` from a run's data settings as a mapping (``DataConfig`` as ``config.json``'s
    ``"data"`` holds it: ``modality``, ``ct_window``, ``mr_percentiles``, ``intensity``, ``mr_window``)."""
    return pretraining_intensity(
        data.get("modality"), cached_modalities, data["ct_window"], data["mr_percentiles"],
        data.get("intensity") or "window", data.get("mr_window"),
    )


def plans_channel_mappings(plans: dict[str, Any], configuration: str) -> list[ChannelMapping]:
    """The mapping of every input channel of ``configuration`` (follows ``inherits_from``)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    schemes = config.normalization_schemes
    masks = list(config.use_mask_for_norm or [])
    properties = manager.foreground_intensity_properties_per_channel
    ours = plans.get("nnunet_ssl", {})
    modalities = ours.get("modalities") or [None] * len(schemes)
    mr_notes = ours.get("mr_normalization", {})
    mappings = []
    for channel, scheme in enumerate(schemes):
        modality = modalities[channel] if channel < len(modalities) else None
        p = properties.get(str(channel), {})
        if scheme == "CTNormalization" and _is_unit_window(p):
            name = (modality or "ct").upper()
            text = f"{name} window [{p['percentile_00_5']:g}, {p['percentile_99_5']:g}] -> [0, 1]"
            unit = True
        elif scheme in UNIT_RANGE_SCHEMES:
            text, unit = f"{scheme} (per image, [0, 1])", True
        elif scheme == "CTNormalization":
            text, unit = "CTNormalization (nnU-Net's dataset percentiles, then z-score)", False
        else:
            text, unit = f"{scheme} (not mapped to [0, 1])", False
        use_mask = bool(masks[channel]) if channel < len(masks) else False
        if scheme == ZSCORE_SCHEME and use_mask:
            text = f"{scheme} inside the nonzero region (not mapped to [0, 1])"
        note = mr_notes.get(str(channel))
        if note and isinstance(note, str):
            text += f"; {note}"
        keys = ("percentile_00_5", "percentile_99_5", "mean", "std")
        stats = tuple(float(p[k]) for k in keys) if all(p.get(k) is not None for k in keys) else None
        mappings.append(ChannelMapping(scheme, modality, unit, text, use_mask, stats))  # type: ignore[arg-type]
    return mappings


def intensity_warnings(pretraining: dict[str, Any] | None, mappings: list[ChannelMapping]) -> list[str]:
    """Real mismatches between a weights file's pretraining intensities and the plans' mapping.

    A different window, or a per-image approximation of the percentile mapping, is not a mismatch:
    the encoder still sees [0, 1]. A channel not mapped to [0, 1], or another modality, is. After a
    z-score pretraining (a record with ``"normalization": "zscore"``), any scheme but nnU-Net's
    ``ZScoreNormalization`` is a mismatch (CTNormalization clips to dataset percentiles and z-scores
    with the dataset's foreground statistics, not the image's own).

    Args:
        pretraining: The weights metadata's ``intensity`` entry (``{"modality": "CT"|"MR"|"mixed", ...}``),
            or None / empty for files without it.
        mappings: :func:`plans_channel_mappings` of the plans used for fine-tuning.
    """
    return [w for channel, mapping in enumerate(mappings) if (w := _scheme_warning(pretraining, mapping, channel))]


def _scheme_warning(pretraining: dict[str, Any] | None, mapping: ChannelMapping, channel: int) -> str | None:
    """:func:`intensity_warnings` for one channel: its warning, or None."""
    pretrained_modality = str((pretraining or {}).get("modality", "")).lower() or None
    described = _describe_pretraining(pretraining)
    zscored = (pretraining or {}).get("normalization") == ZSCORE
    if zscored and mapping.scheme != ZSCORE_SCHEME:
        return (
            f"channel {channel} is mapped by {mapping.description}, but pretraining z-scored each image "
            f"({described}); plan the fine-tuning dataset with {ZSCORE_SCHEME} for matching intensities"
        )
    if not zscored and not mapping.unit_range:
        return (
            f"channel {channel} is mapped by {mapping.description}, but pretraining mapped intensities to [0, 1] "
            f"({described}); plan with `nnunet-ssl plan -d DATASET` for matching intensities"
        )
    if (pretrained_modality in ("ct", "mr") and mapping.modality is not None
            and mapping.modality != pretrained_modality):
        return (
            f"channel {channel} is {mapping.modality.upper()} ({mapping.description}) but the encoder was pretrained "
            f"on {pretrained_modality.upper()} ({described}): a cross-modality transfer"
        )
    return None


def _describe_pretraining(pretraining: dict[str, Any] | None) -> str:
    if not pretraining:
        return "no intensity record in the weights file"
    parts = [str(pretraining.get("modality", "?"))]
    if pretraining.get("normalization") == ZSCORE:
        parts.append(f"per-image z-score ({pretraining.get('scheme', ZSCORE_SCHEME)})")
    if pretraining.get("normalization") == MINMAX:
        parts.append(f"per-image min-max ({pretraining.get('scheme', MINMAX_SCHEME)})")
    if pretraining.get("mask") == "nonzero":
        parts.append("inside the nonzero region")
    if "window" in pretraining:
        parts.append(f"window {pretraining['window']}")
    if "mr_window" in pretraining:
        parts.append(f"MR window {pretraining['mr_window']}")
    if "percentiles" in pretraining:
        parts.append(f"per-image percentiles {pretraining['percentiles']}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Pretraining settings that reproduce a plans file's mapping (pretrain --intensity-like)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LikePlans:
    """The pretraining data settings that map intensities as a plans file does.

    Attributes:
        data: ``DataConfig`` values: ``intensity``, and ``ct_window`` / ``mr_window`` where the plans fix them.
        lines: One line per channel saying what was matched, for the log.
    """

    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)


def channel_modalities_of(mappings: Sequence[ChannelMapping], dataset_json: Mapping[str, Any] | None) -> list[str]:
    """``ct``/``mr`` per channel: the plans' record, else dataset.json's ``channel_names`` (``CT`` -> ct, else mr)."""
    names = dict((dataset_json or {}).get("channel_names") or (dataset_json or {}).get("modality") or {})
    modalities = []
    for channel, mapping in enumerate(mappings):
        if mapping.modality in ("ct", "mr"):
            modalities.append(mapping.modality)
        elif str(channel) in names:
            modalities.append("ct" if str(names[str(channel)]).strip().upper() == "CT" else "mr")
        else:
            modalities.append("ct" if mapping.scheme == "CTNormalization" else "mr")
    return modalities


def settings_like_plans(
    mappings: Sequence[ChannelMapping], modalities: Sequence[str], origin: str = "the plans"
) -> LikePlans:
    """The pretraining data settings that produce the plans' mapping of every channel.

    * ``CTNormalization`` with a window's statistics (``mean`` = lower bound, ``std`` = width; what
      ``nnunet-ssl plan`` writes for CT and for a shared MR window): ``intensity="window"`` with that
      window as ``ct_window`` (CT channels) or ``mr_window`` (MR channels);
    * ``RescaleTo01Normalization``: ``intensity="minmax"``;
    * ``ZScoreNormalization``: ``intensity="zscore"``, or ``"zscore_nonzero"`` with ``use_mask_for_norm``.

    Args:
        mappings: :func:`plans_channel_mappings` of the plans.
        modalities: ``ct``/``mr`` per channel (:func:`channel_modalities_of`).
        origin: The plans file, for messages.

    Raises:
        ValueError: A scheme pretraining cannot reproduce (nnU-Net's own ``CTNormalization`` with the
            dataset's statistics, ``RGBTo01Normalization``, ``NoNormalization``, a custom scheme), or
            channels that need different settings (two schemes, two CT or two MR windows): one line per
            problem, with what to do.
    """
    problems: list[str] = []
    intensities: dict[int, str] = {}
    windows: dict[str, dict[tuple[float, float], list[int]]] = {"ct": {}, "mr": {}}
    lines = []
    for channel, (mapping, modality) in enumerate(zip(mappings, modalities, strict=True)):
        if mapping.scheme == "CTNormalization" and mapping.unit_range and mapping.properties is not None:
            low, high = mapping.properties[0], mapping.properties[1]
            intensities[channel] = "window"
            windows[modality].setdefault((low, high), []).append(channel)
            lines.append(f"channel {channel} ({modality.upper()}): {mapping.description} -> "
                         f"{modality}_window [{low:g}, {high:g}]")
        elif mapping.scheme == MINMAX_SCHEME:
            intensities[channel] = MINMAX
            lines.append(f"channel {channel} ({modality.upper()}): {mapping.scheme} -> per-image min-max (minmax)")
        elif mapping.scheme == ZSCORE_SCHEME:
            intensities[channel] = "zscore_nonzero" if mapping.use_mask else ZSCORE
            lines.append(f"channel {channel} ({modality.upper()}): {mapping.description} -> {intensities[channel]}")
        elif mapping.scheme == "CTNormalization":
            props = mapping.properties
            detail = (f": clip to [{props[0]:g}, {props[1]:g}], then (x - {props[2]:g}) / {props[3]:g}, one affine map "
                      f"for every image to [{(props[0] - props[2]) / props[3]:.3g}, {(props[1] - props[2]) / props[3]:.3g}]"
                      if props is not None and props[3] > 0 else "")
            problems.append(
                f"channel {channel} is mapped by nnU-Net's CTNormalization with the dataset's statistics{detail}; "
                "pretraining maps to [0, 1] with a window or z-scores each image, and has no dataset-wide z-score: "
                "plan the dataset with `nnunet-ssl plan -d DATASET` (its CT window maps to [0, 1]) and pretrain like "
                "those plans, or give --intensity yourself"
            )
        else:
            problems.append(f"channel {channel} is mapped by {mapping.scheme}, which pretraining has no counterpart for "
                            f"(it reproduces CTNormalization windows, {MINMAX_SCHEME} and {ZSCORE_SCHEME})")
    if len(set(intensities.values())) > 1:
        listed = ", ".join(f"channel {c}: {i}" for c, i in sorted(intensities.items()))
        problems.append(f"the channels need different pretraining mappings ({listed}), and pretraining maps every "
                        "volume of its pool one way; pretrain for one channel's plans, or give --intensity yourself")
    for modality, found in windows.items():
        if len(found) > 1:
            listed = "; ".join(f"[{lo:g}, {hi:g}] (channel {', '.join(map(str, chs))})" for (lo, hi), chs in found.items())
            problems.append(f"the {modality.upper()} channels use different windows ({listed}); pretraining has one "
                            f"{modality}_window")
    if problems:
        raise ValueError(f"cannot pretrain with the intensity mapping of {origin}: " + "; ".join(problems))
    if not intensities:
        raise ValueError(f"{origin} map no channel")
    intensity = next(iter(intensities.values()))
    data: dict[str, Any] = {"intensity": intensity}
    for modality, found in windows.items():
        if found:
            data[f"{modality}_window"] = [float(v) for v in next(iter(found))]
    return LikePlans(data=data, lines=lines)


# ----------------------------------------------------------------------------------------------
# Both mappings applied to raw intensities, and the difference measured on a dataset's images
# ----------------------------------------------------------------------------------------------


def _nonzero_mask(image: np.ndarray) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask`` for one channel (voxels not 0, holes filled)."""
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    return np.asarray(create_nonzero_mask(image[None]), dtype=bool)


def map_like_pretraining(image: np.ndarray, record: Mapping[str, Any], modality: str) -> np.ndarray:
    """Raw intensities mapped as the pretraining recorded in ``record`` (:func:`pretraining_intensity`) maps them.

    On the image as given (the pretraining computes per-image statistics on the resampled image, or
    on the source grid for min-max and the nonzero z-score; a subsampled image comes close).

    Args:
        image: ``(z, y, x)`` raw intensities of one channel.
        record: The weights file's ``intensity`` entry.
        modality: ``ct`` or ``mr``: which part of a ``"mixed"`` record applies.

    Raises:
        ValueError: A record that says nothing about ``modality``'s mapping.
    """
    image = np.asarray(image, dtype=np.float64)
    normalization = record.get("normalization")
    if normalization == ZSCORE:
        if record.get("mask") == "nonzero":
            inside = _nonzero_mask(image)
            values = image[inside] if inside.any() else image.reshape(-1)
            mean, std = float(values.mean()), float(values.std())
            return np.where(inside, (image - mean) / max(std, 1e-8), image)
        return (image - image.mean()) / max(float(image.std()), 1e-8)
    if normalization == MINMAX:
        low, high = float(image.min()), float(image.max())
        return (image - low) / max(high - low, 1e-8)
    if modality == "ct" and "window" in record:
        low, high = (float(v) for v in record["window"])
    elif modality == "mr" and "mr_window" in record:
        low, high = (float(v) for v in record["mr_window"])
    elif modality == "mr" and "percentiles" in record:
        low, high = (float(v) for v in np.percentile(image, [float(p) for p in record["percentiles"]]))
        if high <= low:
            low, high = float(image.min()), float(image.max())
    else:
        raise ValueError(f"the pretraining record {dict(record)} says nothing about {modality.upper()} images")
    return np.clip((image - low) / max(high - low, 1e-8), 0.0, 1.0)


def map_like_plans(
    image: np.ndarray, mapping: ChannelMapping, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, ...]]:
    """Raw intensities mapped as nnU-Net's preprocessing maps them under ``mapping``, with nnU-Net's own code.

    ``crop_to_nonzero`` first (the voxels outside the nonzero region marked -1 in the label), then the
    scheme's normalisation class with the plans' ``use_mask_for_norm`` and intensity properties, as
    ``DefaultPreprocessor`` does before it resamples.

    Args:
        image: ``(z, y, x)`` raw intensities of one channel.
        mapping: The channel's :class:`ChannelMapping` (scheme, ``use_mask``, ``properties``).
        label: ``(z, y, x)`` segmentation of the case, or None.

    Returns:
        ``(mapped, cropped label or None, crop)``: ``mapped`` covers ``image[crop]``.

    Raises:
        ValueError: A scheme nnU-Net cannot find, or ``CTNormalization`` without its properties.
    """
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        RescaleTo01Normalization,
        RGBTo01Normalization,
        ZScoreNormalization,
    )

    classes = {c.__name__: c for c in (CTNormalization, RescaleTo01Normalization, RGBTo01Normalization,
                                       ZScoreNormalization)}
    if mapping.scheme not in classes:
        raise ValueError(f"{mapping.scheme} is not one of nnU-Net's built-in schemes ({', '.join(classes)})")
    if mapping.scheme == "CTNormalization" and mapping.properties is None:
        raise ValueError("CTNormalization without the plans' intensity properties")
    properties = dict(zip(("percentile_00_5", "percentile_99_5", "mean", "std"), mapping.properties or (), strict=False))
    data = np.asarray(image, dtype=np.float32)[None].copy()
    seg = None if label is None else np.asarray(label).astype(np.int16)[None].copy()
    data, seg, bbox = crop_to_nonzero(data, seg)
    crop = tuple(slice(int(lo), int(hi)) for lo, hi in bbox)
    normalizer = classes[mapping.scheme](use_mask_for_norm=mapping.use_mask, intensityproperties=properties)
    mapped = normalizer.run(data[0], seg[0])
    return np.asarray(mapped, dtype=np.float64), (None if label is None else seg[0]), crop


def _body(image: np.ndarray, modality: str) -> np.ndarray:
    """Where the anatomy is when a case has no labels: above -500 HU (CT), above 10 % of the 5-95 % range (MR)."""
    if modality == "ct":
        return image > -500.0
    low, high = np.percentile(image, [5.0, 95.0])
    return image > low + 0.1 * (high - low)


@dataclass(frozen=True)
class MappingDifference:
    """The measured distance between a channel's pretraining and fine-tuning mappings.

    Attributes:
        channel: Input channel.
        mean_abs: Mean |fine-tuning - pretraining| over the measured voxels of all images.
        per_image: The same per image.
        voxels: Voxels measured in all.
        where: Which voxels: ``"labelled voxels"`` or ``"body voxels"`` (images without labels).
        pretraining_range: 5th and 95th percentiles of the pretraining-mapped values there (their scale).
    """

    channel: int
    mean_abs: float
    per_image: tuple[float, ...]
    voxels: int
    where: str
    pretraining_range: tuple[float, float]

    @property
    def far(self) -> bool:
        return self.mean_abs > MAX_MEAN_DIFFERENCE

    def describe(self) -> str:
        images = ", ".join(f"{d:.3f}" for d in self.per_image)
        return (f"mean |difference| {self.mean_abs:.3f} on the {self.where} of {len(self.per_image)} training "
                f"image(s) (per image {images}; {self.voxels} voxels; pretraining values there span "
                f"{self.pretraining_range[0]:.3g} to {self.pretraining_range[1]:.3g})")


def subsample(image: np.ndarray, label: np.ndarray | None, max_voxels: int = MEASURE_VOXELS
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (and ``label``) strided evenly along every axis to at most ``max_voxels`` voxels."""
    step = max(1, math.ceil((image.size / max_voxels) ** (1.0 / image.ndim)))
    while math.prod(math.ceil(s / step) for s in image.shape) > max_voxels:
        step += 1
    view = tuple(slice(None, None, step) for _ in image.shape)
    return image[view], (None if label is None else label[view])


def measure_mapping_difference(
    record: Mapping[str, Any],
    mapping: ChannelMapping,
    modality: str,
    cases: Sequence[tuple[np.ndarray, np.ndarray | None]],
    channel: int = 0,
) -> MappingDifference:
    """Map each case both ways and average |difference| over its labelled voxels (its body when unlabelled).

    Args:
        record: The pretraining's ``intensity`` record.
        mapping: The plans' mapping of the channel.
        modality: ``ct``/``mr`` of the channel.
        cases: ``(image, label or None)`` pairs of ``(z, y, x)`` arrays (subsample them first: :func:`subsample`).
        channel: For the result.

    Raises:
        ValueError: No case, or no voxel to measure on.
    """
    if not cases:
        raise ValueError("no image to measure the intensity mappings on")
    sums, counts, pretrained_values = [], [], []
    labelled = all(label is not None and np.any(label > 0) for _, label in cases)
    for image, label in cases:
        tuned, seg, crop = map_like_plans(image, mapping, label if labelled else None)
        pretrained = map_like_pretraining(image, record, modality)[crop]
        where = (seg > 0) if labelled and seg is not None else _body(np.asarray(image, dtype=np.float64)[crop], modality)
        if not where.any():
            where = np.ones(tuned.shape, dtype=bool)
        difference = np.abs(tuned[where] - pretrained[where])
        sums.append(float(difference.sum()))
        counts.append(int(difference.size))
        pretrained_values.append(pretrained[where])
    values = np.concatenate(pretrained_values)
    low, high = (float(v) for v in np.percentile(values, [5.0, 95.0]))
    return MappingDifference(
        channel=channel,
        mean_abs=sum(sums) / max(sum(counts), 1),
        per_image=tuple(s / max(c, 1) for s, c in zip(sums, counts, strict=True)),
        voxels=sum(counts),
        where="labelled voxels" if labelled else "body voxels",
        pretraining_range=(low, high),
    )


def sample_training_cases(
    raw_folder: Path,
    dataset_json: Mapping[str, Any],
    channel: int,
    reader_name: str | None = None,
    count: int = MEASURE_CASES,
    max_voxels: int = MEASURE_VOXELS,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Up to ``count`` training images of ``channel`` (evenly spread over the sorted case ids), with their labels,
    read as nnU-Net reads them and subsampled (:func:`subsample`).

    Args:
        raw_folder: ``$nnUNet_raw/DatasetXXX_Name``.
        dataset_json: Its dataset.json.
        channel: Input channel.
        reader_name: The plans' ``image_reader_writer`` (else nnU-Net picks one from dataset.json and the files).
        count: Images to read.
        max_voxels: Voxels per image after subsampling.

    Raises:
        FileNotFoundError: No training image in ``raw_folder``.
    """
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        recursive_find_reader_writer_by_name,
    )
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset = get_filenames_of_train_images_and_targets(str(raw_folder), dict(dataset_json))
    names = sorted(dataset)
    if not names:
        raise FileNotFoundError(f"{raw_folder} has no training images (imagesTr)")
    picked = [names[i] for i in sorted({int(round(i)) for i in np.linspace(0, len(names) - 1, min(count, len(names)))})]
    first = dataset[picked[0]]["images"][channel]
    reader_class = (recursive_find_reader_writer_by_name(reader_name) if reader_name
                    else determine_reader_writer_from_dataset_json(dict(dataset_json), first))
    reader = reader_class()
    cases = []
    for name in picked:
        images, _ = reader.read_images([dataset[name]["images"][channel]])
        label_file = dataset[name].get("label")
        label = None
        if label_file and Path(label_file).is_file():
            label = np.asarray(reader.read_seg(label_file)[0][0])
        cases.append(subsample(np.asarray(images[0]), label, max_voxels))
    return cases


@dataclass(frozen=True)
class IntensityReport:
    """What :func:`intensity_report` found: warnings (log them as such) and notes (what was measured or why not)."""

    warnings: list[str]
    notes: list[str]


def intensity_report(
    pretraining: dict[str, Any] | None,
    plans: dict[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any] | None = None,
    raw_folder: Path | str | None = None,
    cases: int = MEASURE_CASES,
) -> IntensityReport:
    """The scheme checks of :func:`intensity_warnings`, plus the difference measured on the dataset's images.

    Every channel whose pretraining mapping is known is measured on ``cases`` raw training images
    (:func:`sample_training_cases`, :func:`measure_mapping_difference`). A channel gets at most one
    warning: its scheme mismatch with the measurement appended, or, when the schemes agree, the
    measurement alone if it exceeds :data:`MAX_MEAN_DIFFERENCE`. Nothing is measured for a
    cross-modality transfer, a file without a record, or when the raw images cannot be found; the
    notes say why. Nothing here raises for a missing or unreadable dataset: the trainer and export go on.

    Args:
        pretraining: The weights file's ``intensity`` record (None: files without one).
        plans: The fine-tuning plans.
        configuration: Their configuration (e.g. ``3d_fullres``).
        dataset_json: The dataset.json (channel names, file ending); None: read from ``raw_folder``.
        raw_folder: ``$nnUNet_raw/<dataset>``; None: from ``nnUNet_raw`` and the plans' ``dataset_name``.
        cases: Training images to read.
    """
    mappings = plans_channel_mappings(plans, configuration)
    notes: list[str] = []
    differences: dict[int, MappingDifference] = {}
    if not pretraining:
        notes.append("intensity difference not measured: the weights file records no pretraining intensity mapping")
    else:
        try:
            folder = Path(raw_folder) if raw_folder is not None else _raw_folder_of(plans)
            if dataset_json is None:
                dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
            modalities = channel_modalities_of(mappings, dataset_json)
            pretrained = str(pretraining.get("modality", "")).lower()
            for channel, mapping in enumerate(mappings):
                if pretrained in ("ct", "mr") and modalities[channel] != pretrained:
                    notes.append(f"channel {channel}: intensity difference not measured (a cross-modality transfer: "
                                 f"{modalities[channel].upper()} images, pretrained on {pretrained.upper()})")
                    continue
                sample = sample_training_cases(folder, dataset_json, channel, plans.get("image_reader_writer"), cases)
                differences[channel] = measure_mapping_difference(pretraining, mapping, modalities[channel], sample,
                                                                  channel)
                notes.append(f"channel {channel}: fine-tuning ({mapping.description}) against pretraining "
                             f"({_describe_pretraining(pretraining)}): {differences[channel].describe()}")
        except (OSError, ValueError, KeyError, RuntimeError, AssertionError) as error:
            notes.append(f"intensity difference not measured: {error}")
    warnings = []
    for channel, mapping in enumerate(mappings):
        measured = differences.get(channel)
        scheme = _scheme_warning(pretraining, mapping, channel)
        if scheme is not None:
            warnings.append(scheme + (f"; measured: {measured.describe()}" if measured else ""))
        elif measured is not None and measured.far:
            warnings.append(
                f"channel {channel}: the fine-tuning intensities ({mappings[channel].description}) are far from the "
                f"pretraining ones ({_describe_pretraining(pretraining)}): {measured.describe()}, above "
                f"{MAX_MEAN_DIFFERENCE:g}; pretrain with the plans' mapping (`nnunet-ssl pretrain --intensity-like "
                f"DATASET PLANS`) or plan the dataset to match the pretraining"
            )
    return IntensityReport(warnings=warnings, notes=notes)


def _raw_folder_of(plans: Mapping[str, Any]) -> Path:
    """``$nnUNet_raw/<plans' dataset_name>``; FileNotFoundError naming what is missing."""
    from nnunet_ssl.nnunet_paths import nnunet_folder

    folder = nnunet_folder("nnUNet_raw") / str(plans.get("dataset_name", ""))
    if not (folder / "dataset.json").is_file():
        raise FileNotFoundError(f"{folder / 'dataset.json'} does not exist (the raw images measure the difference)")
    return folder
