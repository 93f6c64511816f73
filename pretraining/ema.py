"""Exponential-moving-average teacher: the update and its momentum schedule."""
from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.pretraining.schedules import cosine_schedule


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``theta_t <- m * theta_t + (1 - m) * theta_s`` for every teacher parameter.

    Parameters are matched by name, so the student may hold extra ones (e.g. ``mask_token``) that
    the teacher lacks; a teacher parameter without a student counterpart is an error. Buffers that
    exist in both are copied from the student (floating buffers such as running statistics, and
    index tables alike). Runs under ``torch.no_grad``; the student is not modified.

    Args:
        teacher: Module updated in place.
        student: Module whose parameters are averaged in (read only).
        momentum: ``m`` in [0, 1]; 1 keeps the teacher, 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum}")
    student_params = dict(student.named_parameters())
    teacher_list, student_list = [], []
    for name, t_param in teacher.named_parameters():
        s_param = student_params.get(name)
        if s_param is None:
            raise ValueError(f"teacher parameter {name!r} has no student counterpart")
        if s_param.shape != t_param.shape:
            raise ValueError(
                f"parameter {name!r}: teacher {tuple(t_param.shape)} != student {tuple(s_param.shape)}"
            )
        teacher_list.append(t_param.data)
        student_list.append(s_param.detach().to(t_param.dtype))
    if teacher_list:
        # m * t + (1 - m) * s == lerp(t, s, 1 - m); one fused pass over all tensors (as timm's ModelEmaV3)
        torch._foreach_lerp_(teacher_list, student_list, 1.0 - momentum)
    student_buffers = dict(student.named_buffers())
    for name, t_buffer in teacher.named_buffers():
        s_buffer = student_buffers.get(name)
        if s_buffer is None:
            continue
        if s_buffer.shape != t_buffer.shape:
            raise ValueError(
                f"buffer {name!r}: teacher {tuple(t_buffer.shape)} != student {tuple(s_buffer.shape)}"
            )
        t_buffer.copy_(s_buffer)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum at a *global* step: cosine from ``base`` (step 0) to ``final`` (``total_steps``).

    [SMIT] indexes its schedule by the step within the epoch, which keeps m near ``base``; this
    follows [DINO]/[iBOT] and indexes by global iteration.

    Args:
        step: Global optimisation step (0-based).
        total_steps: Steps of the whole run.
        base: Momentum at step 0.
        final: Momentum at the end of training.
    """
    return cosine_schedule(step, total_steps, base, final)
