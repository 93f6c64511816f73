"""95th-percentile Hausdorff distance per label, through MONAI when it is installed (optional)."""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence

import numpy as np


def hd95_available() -> bool:
    """Whether MONAI (the maintained implementation used here) is importable."""
    return importlib.util.find_spec("monai") is not None


def hd95_per_label(
    prediction: np.ndarray, reference: np.ndarray, labels: list[int], spacing: Sequence[float]
) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance (in the units of ``spacing``) for each label.

    Args:
        prediction: Label map ``(D, H, W)``.
        reference: Label map of the same shape.
        labels: Labels to score.
        spacing: Voxel size per array axis, in the order of the array's axes.

    Returns:
        NaN for a label missing from the prediction or the reference (the distance is undefined).

    Raises:
        ValueError: if the maps differ in shape.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    distances = {}
    for label in labels:
        p, r = prediction == label, reference == label
        if not p.any() or not r.any():
            distances[label] = float("nan")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation notices for its own internals
            value = compute_hausdorff_distance(
                torch.from_numpy(p[None, None]), torch.from_numpy(r[None, None]),
                include_background=True, percentile=95, spacing=[float(s) for s in spacing],
            )
        distances[label] = float(value.reshape(-1)[0])
    return distances
