"""[DINO] cross-view self-distillation loss (SMIT's image-token distillation, ITD)."""
from __future__ import annotations

from torch import Tensor

from nnunet_ssl.pretraining.losses.distillation import (
    soft_cross_entropy,
    student_log_probabilities,
    teacher_probabilities,
)


def cross_view_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """DINO loss: mean over view pairs ``q != v`` of the batch-mean ``CE(P_t[q], P_s[v])``.

    View ``i`` of the teacher and view ``i`` of the student are the same crop, so those pairs are
    skipped; extra student views (``Vs > Vt``, e.g. local crops) pair with every teacher view.

    Args:
        student_logits: ``(Vs, B, K)``.
        teacher_logits: ``(Vt, B, K)``, ``Vt <= Vs``; no gradient flows into it.
        center: ``(1, K)`` teacher centre.
        student_temp: ``tau_s``.
        teacher_temp: ``tau_t``.

    Returns:
        Scalar loss (float32).
    """
    if student_logits.ndim != 3 or teacher_logits.ndim != 3:
        raise ValueError("student and teacher logits must be (V, B, K)")
    n_student, n_teacher = student_logits.shape[0], teacher_logits.shape[0]
    if student_logits.shape[1:] != teacher_logits.shape[1:] or n_teacher > n_student:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} do not pair"
        )
    if n_student < 2:
        raise ValueError("cross-view distillation needs at least two views")
    p_t = teacher_probabilities(teacher_logits, center, teacher_temp)
    log_p_s = student_log_probabilities(student_logits, student_temp)
    total = log_p_s.new_zeros(())
    terms = 0
    for q in range(n_teacher):
        for v in range(n_student):
            if v == q:
                continue
            total = total + soft_cross_entropy(p_t[q], log_p_s[v]).mean()
            terms += 1
    return total / terms
