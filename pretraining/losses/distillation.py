"""Shared pieces of the self-distillation cross-entropy (SDLoss, SSL_METHODS.md §1).

``P_t = softmax((z_t - c) / tau_t)`` (centred, sharpened, no gradient) and
``log P_s = log_softmax(z_s / tau_s)``; both in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def teacher_probabilities(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centred and sharpened teacher distribution ``softmax((z_t - c) / tau_t)`` (detached, float32).

    Args:
        teacher_logits: ``(..., K)``.
        center: Broadcastable to ``teacher_logits`` (``(1, K)`` or ``(1, 1, K)``).
        teacher_temp: ``tau_t`` > 0.

    Returns:
        ``(..., K)`` probabilities.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher temperature must be positive, got {teacher_temp}")
    logits = teacher_logits.detach().float() - center.detach().float()
    return F.softmax(logits / teacher_temp, dim=-1)


def student_log_probabilities(student_logits: Tensor, student_temp: float) -> Tensor:
    """Student log-distribution ``log_softmax(z_s / tau_s)`` in float32.

    Args:
        student_logits: ``(..., K)``.
        student_temp: ``tau_s`` > 0.

    Returns:
        ``(..., K)`` log-probabilities.
    """
    if student_temp <= 0:
        raise ValueError(f"student temperature must be positive, got {student_temp}")
    return F.log_softmax(student_logits.float() / student_temp, dim=-1)


def soft_cross_entropy(teacher_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """``-sum_k P_t log P_s`` over the last axis: ``(..., K), (..., K) -> (...)``."""
    return -(teacher_probs * student_log_probs).sum(dim=-1)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis: ``(..., K) -> (...)``; 0 log 0 counts as 0."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=-1)
