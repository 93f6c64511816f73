"""The EMA teacher of the self-distillation methods (SMIT, DINO, iBOT), in one place.

:class:`EMATeacher` is built from the student branch (SSL_METHODS.md §1, "EMA teacher"):

- a deep copy of the student at construction (so at step 0 the teacher equals the student);
- every ``mask_token`` removed (the teacher never masks);
- stochastic depth off (every :class:`~nnunet_ssl.networks.swin.DropPath` at p = 0);
- ``requires_grad = False`` and eval mode, which ``train()`` cannot undo;
- updated after each optimiser step by ``theta_t <- m theta_t + (1 - m) theta_s`` with ``m`` the
  cosine 0.996 -> 1 indexed by the *global* step (:func:`~nnunet_ssl.pretraining.ema.cosine_momentum`).

The copy keeps the student's child names (``teacher.encoder``, ``teacher.head_cls`` ...), so its
parameters match the student's by name and ``teacher["encoder"]`` reads like the student's
``ModuleDict``. :func:`export_encoder_state` serves ``nnunet-ssl export --from``.
"""
from __future__ import annotations

import copy

from torch import Tensor, nn

from nnunet_ssl.networks.swin import DropPath, SwinEncoder
from nnunet_ssl.pretraining.context import StepContext
from nnunet_ssl.pretraining.ema import cosine_momentum, ema_update_

#: ``--from`` choices of ``nnunet-ssl export`` for a method with a teacher.
ENCODER_SOURCES = ("default", "teacher", "student")


class EMATeacher(nn.Module):
    """A frozen, never-masking, eval-mode copy of a student branch, updated by EMA.

    Args:
        student: The student branch (e.g. ``ModuleDict(encoder=..., norm=..., head=...)``); copied,
            not kept. Parameters held directly by ``student`` (not by a child) are not supported.
        ema_base: Momentum at step 0.
        ema_final: Momentum at the last step (cosine in between, by global step).
    """

    def __init__(self, student: nn.Module, ema_base: float = 0.996, ema_final: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= ema_base <= ema_final <= 1.0:
            raise ValueError(f"need 0 <= ema_base <= ema_final <= 1, got {ema_base}, {ema_final}")
        if any(True for _ in student.named_parameters(recurse=False)):
            raise ValueError("the student branch must hold its parameters in child modules")
        self.ema_base = ema_base
        self.ema_final = ema_final
        for name, child in copy.deepcopy(student).named_children():
            self.add_module(name, child)
        for module in self.modules():
            if isinstance(module, SwinEncoder) and module.mask_token is not None:
                module.register_parameter("mask_token", None)
            elif isinstance(module, DropPath):
                module.p = 0.0
        self.requires_grad_(False)
        super().train(False)

    def __getitem__(self, name: str) -> nn.Module:
        """The copy of the student's child ``name`` (``teacher["encoder"]``)."""
        return self._modules[name]  # type: ignore[return-value]

    def train(self, mode: bool = True) -> EMATeacher:
        """Stay in eval mode whatever ``mode`` is (the teacher never drops paths or normalises per batch)."""
        return super().train(False)

    def momentum(self, context: StepContext) -> float:
        """EMA momentum of the update after ``context.step`` (cosine by global step)."""
        return cosine_momentum(context.step, context.total_steps, self.ema_base, self.ema_final)

    def update_(self, student: nn.Module, context: StepContext) -> float:
        """In place: ``theta_t <- m theta_t + (1 - m) theta_s`` by parameter name; returns ``m``."""
        m = self.momentum(context)
        ema_update_(self, student, m)
        return m


def export_encoder_state(student_encoder: nn.Module, teacher: EMATeacher, source: str = "default") -> dict[str, Tensor]:
    """Encoder weights to export, without ``mask_token`` (detached copies).

    ``"default"`` is the EMA teacher, as [DINO]/[iBOT] evaluate the teacher ([SMIT]'s own code
    fine-tunes from the student: ``"student"`` matches it).

    Args:
        student_encoder: The student's encoder.
        teacher: The method's teacher; its ``encoder`` child is exported for ``"teacher"``/``"default"``.
        source: One of :data:`ENCODER_SOURCES`.

    Raises:
        ValueError: For an unknown source.
    """
    if source not in ENCODER_SOURCES:
        raise ValueError(f"unknown encoder source {source!r}; choose one of {ENCODER_SOURCES}")
    encoder = student_encoder if source == "student" else teacher["encoder"]
    return {k: v.detach().clone() for k, v in encoder.state_dict().items() if k != "mask_token"}
