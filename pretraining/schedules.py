"""Closed-form per-step schedules (pure functions of the step or fractional epoch).

The engine owns the learning-rate schedule; methods use these for their own hyper-parameters
(teacher temperature, EMA momentum), always indexed by *global* progress (SSL_METHODS.md §0).
"""
from __future__ import annotations

import math


def linear_warmup(epoch: float, start: float, end: float, warmup_epochs: float) -> float:
    """Linear ramp from ``start`` at epoch 0 to ``end`` at ``warmup_epochs``, then constant ``end``.

    Used for the teacher temperature (0.04 -> 0.07 over 30 epochs: 0.055 at epoch 15). Unlike
    [DINO]'s per-integer-epoch ``linspace`` it is continuous in the fractional epoch.

    Args:
        epoch: Fractional epoch (``step / steps_per_epoch``); negative values count as 0.
        start: Value at epoch 0.
        end: Value from ``warmup_epochs`` on.
        warmup_epochs: Length of the ramp; 0 means ``end`` throughout.
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return end
    progress = min(max(epoch / warmup_epochs, 0.0), 1.0)
    return start + (end - start) * progress


def cosine_schedule(step: float, total_steps: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (clamped outside).

    ``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``, the form of [DINO]'s
    ``cosine_scheduler`` without warm-up.

    Args:
        step: Global step (0-based).
        total_steps: Steps of the whole run, > 0.
        start: Value at step 0.
        end: Value at ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
