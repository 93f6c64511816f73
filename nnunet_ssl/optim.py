"""Optimisation helpers shared by fine-tuning and pretraining: schedules and weight-decay groups."""
from __future__ import annotations

import math

from torch import nn

#: Parameter name fragments that never get weight decay (Swin/DINO convention).
NO_DECAY_FRAGMENTS = ("relative_position_bias_table", "mask_token")


def warmup_cosine(step: int, peak: float, warmup_steps: int, total_steps: int, final: float = 0.0) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak``, then cosine decay to ``final``.

    Args:
        step: Zero-based step (an epoch or an iteration, whatever the caller counts).
        peak: Value reached at the end of the warm-up.
        warmup_steps: Steps of linear warm-up (0 for none).
        total_steps: Steps of the whole schedule; later steps stay at ``final``.
        final: Value at ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def uses_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """False for norms, biases (1-D tensors), position tables and tokens, True for every other weight."""
    return parameter.ndim > 1 and not any(fragment in name for fragment in NO_DECAY_FRAGMENTS)


def decay_parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a group without decay (norms, biases, tables, tokens)."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        if not uses_weight_decay(name, parameter):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
