"""How a plans file maps each channel's intensities, and whether that matches a weights file's pretraining.

Pretraining maps every volume to ``[0, 1]`` (CT: a fixed HU window; MR: per-image percentiles), or,
with ``intensity="zscore"`` (the Spark3D recipe), z-scores every image as nnU-Net's
``ZScoreNormalization`` does. Fine-tuning should feed the encoder the same range: for a ``[0, 1]``
pretraining a different window or a per-image approximation of the same mapping is expected, a
different range (nnU-Net's z-scoring) or another modality is not; for a z-score pretraining, any
scheme but ``ZScoreNormalization`` is a mismatch.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: nnU-Net's built-in schemes that produce values in [0, 1] whatever the properties.
UNIT_RANGE_SCHEMES = ("RescaleTo01Normalization", "RGBTo01Normalization")
#: nnU-Net's per-image z-scoring, the scheme a ``"zscore"`` pretraining record corresponds to.
ZSCORE_SCHEME = "ZScoreNormalization"
#: ``normalization`` of a pretraining record whose images were z-scored (a record without it is a [0, 1] one).
ZSCORE = "zscore"


@dataclass(frozen=True)
class ChannelMapping:
    """One input channel's intensity mapping as the plans define it.

    Attributes:
        scheme: nnU-Net normalization class name.
        modality: ``"ct"``, ``"mr"`` or None when the plans do not say (nnU-Net's own planner).
        unit_range: Whether the result lies in [0, 1] (clipped window or min-max rescale).
        description: Short human text, e.g. ``"CT window [-175, 250] -> [0, 1]"``.
    """

    scheme: str
    modality: str | None
    unit_range: bool
    description: str


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
) -> dict[str, Any]:
    """The intensity mapping a pretraining run used, as a weights file's metadata records it (``intensity``).

    The pretraining engine stores it in every checkpoint; :func:`intensity_warnings` reads it back.

    Args:
        modality: The run's ``modality`` setting (``"ct"``, ``"mr"``) or None when the data decided it.
        cached_modalities: Modalities of the usable volumes in the run's cache (used when ``modality`` is None;
            none known means CT).
        ct_window: The run's CT window in HU.
        mr_percentiles: The run's per-image MR percentiles.
        intensity: The run's ``intensity`` setting: ``"window"`` (the records above, unchanged since
            version 1) or ``"zscore"``.

    Returns:
        ``{"modality": "CT"|"MR"|"mixed", "window"/"percentiles": ..., "range": [0.0, 1.0]}``, or for
        ``"zscore"`` ``{"modality": ..., "normalization": "zscore", "scheme": "ZScoreNormalization",
        "per_image": True}`` (no range: z-scores are not clipped).

    Raises:
        ValueError: An unknown ``intensity``.
    """
    modalities = {modality} if modality else {m for m in cached_modalities if m in ("ct", "mr")} or {"ct"}
    name = "CT" if modalities == {"ct"} else "MR" if modalities == {"mr"} else "mixed"
    if intensity == ZSCORE:
        return {"modality": name, "normalization": ZSCORE, "scheme": ZSCORE_SCHEME, "per_image": True}
    if intensity != "window":
        raise ValueError(f"unknown pretraining intensity mapping {intensity!r}; expected 'window' or 'zscore'")
    ct = {"window": list(ct_window)}
    mr = {"percentiles": list(mr_percentiles), "per_image": True}
    if modalities == {"ct"}:
        return {"modality": "CT", **ct, "range": [0.0, 1.0]}
    if modalities == {"mr"}:
        return {"modality": "MR", **mr, "range": [0.0, 1.0]}
    return {"modality": "mixed", **ct, **mr, "range": [0.0, 1.0]}


def plans_channel_mappings(plans: dict[str, Any], configuration: str) -> list[ChannelMapping]:
    """The mapping of every input channel of ``configuration`` (follows ``inherits_from``)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    schemes = manager.get_configuration(configuration).normalization_schemes
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
        note = mr_notes.get(str(channel))
        if note:
            text += f"; {note}"
        mappings.append(ChannelMapping(scheme, modality, unit, text))
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
    warnings = []
    pretrained_modality = str((pretraining or {}).get("modality", "")).lower() or None
    described = _describe_pretraining(pretraining)
    zscored = (pretraining or {}).get("normalization") == ZSCORE
    for channel, mapping in enumerate(mappings):
        if zscored and mapping.scheme != ZSCORE_SCHEME:
            warnings.append(
                f"channel {channel} is mapped by {mapping.description}, but pretraining z-scored each image "
                f"({described}); plan the fine-tuning dataset with {ZSCORE_SCHEME} for matching intensities"
            )
        elif not zscored and not mapping.unit_range:
            warnings.append(
                f"channel {channel} is mapped by {mapping.description}, but pretraining mapped intensities to [0, 1] "
                f"({described}); plan with `nnunet-ssl plan -d DATASET` for matching intensities"
            )
        elif (pretrained_modality in ("ct", "mr") and mapping.modality is not None
              and mapping.modality != pretrained_modality):
            warnings.append(
                f"channel {channel} is {mapping.modality.upper()} ({mapping.description}) but the encoder was pretrained "
                f"on {pretrained_modality.upper()} ({described}): a cross-modality transfer"
            )
    return warnings


def _describe_pretraining(pretraining: dict[str, Any] | None) -> str:
    if not pretraining:
        return "no intensity record in the weights file"
    parts = [str(pretraining.get("modality", "?"))]
    if pretraining.get("normalization") == ZSCORE:
        parts.append(f"per-image z-score ({pretraining.get('scheme', ZSCORE_SCHEME)})")
    if "window" in pretraining:
        parts.append(f"window {pretraining['window']}")
    if "percentiles" in pretraining:
        parts.append(f"per-image percentiles {pretraining['percentiles']}")
    return " ".join(parts)
