"""Overlap metrics on label maps."""
from __future__ import annotations

import numpy as np


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice similarity coefficient for each label.

    Returns NaN for a label absent from both maps (undefined, not perfect), so averages can skip it
    explicitly instead of counting it as 1.0.

    Raises:
        ValueError: if the two maps differ in shape.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    scores = {}
    for label in labels:
        p, r = prediction == label, reference == label
        total = int(p.sum()) + int(r.sum())
        scores[label] = float("nan") if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total
    return scores
