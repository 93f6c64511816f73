"""Optimisation helpers shared by fine-tuning and pretraining: schedules, weight-decay groups, optimisers."""
from __future__ import annotations

import math

import torch
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


#: Exponent of nnU-Net's ``PolyLRScheduler`` (nnunetv2/training/lr_scheduler/polylr.py).
POLY_EXPONENT = 0.9
#: Learning-rate schedules :func:`scheduled_lr` knows.
SCHEDULES = ("cosine", "poly")
#: Optimisers :func:`build_optimizer` knows.
OPTIMIZERS = ("adamw", "sgd")


def warmup_poly(step: int, peak: float, warmup_steps: int, total_steps: int, exponent: float = POLY_EXPONENT) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak``, then nnU-Net's polynomial decay.

    After the warm-up, ``peak * (1 - t / T) ** exponent`` with ``t = step - warmup_steps`` and
    ``T = total_steps - warmup_steps``: without warm-up exactly nnU-Net's ``PolyLRScheduler``
    (``initial_lr * (1 - current_step / max_steps) ** 0.9``), which reaches 0 at ``total_steps``
    (the last step, ``total_steps - 1``, still trains at ``peak * (1 / T) ** 0.9``).

    Args:
        step: Zero-based step.
        peak: Value at the end of the warm-up (at step 0 without one).
        warmup_steps: Steps of linear warm-up (0 for none).
        total_steps: Steps of the whole schedule; later steps stay at 0.
        exponent: Power of the decay (nnU-Net: 0.9).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    remaining = max(0.0, 1.0 - (step - warmup_steps) / decay_steps)
    return peak * remaining**exponent


def scheduled_lr(schedule: str, step: int, peak: float, warmup_steps: int, total_steps: int, final: float = 0.0) -> float:
    """The learning rate of ``step`` under ``schedule``: ``"cosine"`` (:func:`warmup_cosine`, decaying to
    ``final``) or ``"poly"`` (:func:`warmup_poly`, decaying to 0 as nnU-Net's; ``final`` is not used).

    Raises:
        ValueError: An unknown schedule (the message lists :data:`SCHEDULES`).
    """
    if schedule == "cosine":
        return warmup_cosine(step, peak, warmup_steps, total_steps, final)
    if schedule == "poly":
        return warmup_poly(step, peak, warmup_steps, total_steps)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {SCHEDULES}")


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


def build_optimizer(
    name: str,
    module: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """``"adamw"`` or ``"sgd"`` over :func:`decay_parameter_groups` of ``module`` (the same groups for both).

    Args:
        name: One of :data:`OPTIMIZERS`.
        module: Everything the optimiser updates (parameters without ``requires_grad`` are left out).
        lr: Initial learning rate (a schedule sets it every step).
        weight_decay: Decay of the decayed group (norms, biases, position tables and tokens get none).
        momentum: SGD momentum (AdamW does not use it).
        nesterov: Nesterov momentum for SGD (AdamW does not use it; needs ``momentum > 0``).

    Raises:
        ValueError: An unknown optimiser, or Nesterov SGD without momentum.
    """
    groups = decay_parameter_groups(module, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError(f"Nesterov SGD needs a momentum > 0, got {momentum}")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
