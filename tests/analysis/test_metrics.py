"""Dice against hand computations."""
import math

import numpy as np
import pytest

from nnunet_ssl.analysis.metrics import dice_per_label


def test_dice_hand_computed() -> None:
    reference = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    prediction = np.array([0, 1, 1, 0, 2, 0, 2, 0])
    scores = dice_per_label(prediction, reference, [1, 2, 3])
    assert scores[1] == pytest.approx(2 * 2 / (2 + 3))
    assert scores[2] == pytest.approx(2 * 1 / (2 + 2))
    assert math.isnan(scores[3])


def test_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(np.zeros(3), np.zeros(4), [1])
