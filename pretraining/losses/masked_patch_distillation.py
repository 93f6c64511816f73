"""[iBOT] masked patch-token self-distillation loss (SMIT's MPD)."""
from __future__ import annotations

import torch
from torch import Tensor

from nnunet_ssl.pretraining.losses.distillation import (
    soft_cross_entropy,
    student_log_probabilities,
    teacher_probabilities,
)


def masked_patch_distillation_loss(
    student: Tensor,
    teacher: Tensor,
    masks: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """iBOT patch loss: same-view CE at masked tokens, ``sum(m * CE) / max(1, sum(m))`` per sample.

    The per-sample values are averaged over samples and views. Tokens with ``m = 0`` are excluded
    with ``where``: their teacher targets do not affect the loss, and an all-zero mask gives 0.

    Args:
        student: ``(V, B, T, K)`` logits of the masked student views.
        teacher: ``(V, B, T, K)`` logits of the same views, unmasked; no gradient flows into it.
        masks: ``(V, B, T)`` bool, True where the student's token was masked.
        center: ``(1, 1, K)`` patch centre.
        student_temp: ``tau_s``.
        teacher_temp: ``tau_t``.

    Returns:
        Scalar loss (float32).
    """
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be equal (V, B, T, K)"
        )
    if masks.shape != student.shape[:3]:
        raise ValueError(f"masks {tuple(masks.shape)} must be (V, B, T) = {tuple(student.shape[:3])}")
    p_t = teacher_probabilities(teacher, center, teacher_temp)
    log_p_s = student_log_probabilities(student, student_temp)
    ce = soft_cross_entropy(p_t, log_p_s)  # (V, B, T)
    m = masks.to(device=ce.device, dtype=torch.bool)
    per_sample = ce.where(m, ce.new_zeros(())).sum(dim=-1) / m.sum(dim=-1).clamp(min=1).to(ce.dtype)
    return per_sample.mean()
