"""DINO ([P] item 6; [DINO]): cross-view self-distillation of pool6 through a DINO head.

Module layout::

    student  ModuleDict(encoder=SwinEncoder (no mask token), norm=LayerNorm(8E), head=DINOHead(8E, K))
    teacher  EMATeacher(student): a frozen, eval-mode copy, EMA 0.996 -> 1 by global step
    center   (1, K) buffer

Per step both crops go unmasked through student and teacher; the loss is the SDLoss over the
cross-view pairs (q != v), averaged. Optional student-only local crops (``local_crops > 0``,
off by default as in [P]) are cut from the global views and pair with both teacher views.
The heads read the stride-16 tokens (pool6), so stage 4 is neither run nor trained.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.pretraining.heads import DINOHead
from nnunet_ssl.pretraining.losses import cross_view_distillation_loss
from nnunet_ssl.pretraining.methods.base import TEACHER_AND_STUDENT, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import checked_views, validate_crop_settings, with_drop_path
from nnunet_ssl.pretraining.methods.distillation import (
    DistillationConfig,
    advance_center,
    branch_encoder,
    freeze_last_layers,
    student_branch,
)
from nnunet_ssl.pretraining.teacher import EMATeacher, export_encoder_state
from nnunet_ssl.pretraining.tokens import by_view, dense_and_pooled, freeze_skipped_stage, stride16_tokens
from nnunet_ssl.pretraining.views import local_crops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DINOConfig(DistillationConfig):
    """DINO settings (SSL_METHODS.md card 6; heads, temperatures and momenta in :class:`DistillationConfig`).

    Attributes:
        crop_size: Cubic edge of the two global crops the loader delivers.
        drop_path_rate: Student stochastic depth (§0: 0.1); None keeps the preset's.
        local_crops: Student-only local crops per volume ([DINO] uses 8; [P] none: 0).
        local_crop_size: Edge of a local crop, a multiple of 32 below ``crop_size``.
    """

    crop_size: int = 96
    drop_path_rate: float | None = 0.1
    local_crops: int = 0
    local_crop_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_crop_settings(self.crop_size, self.drop_path_rate)
        if self.local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {self.local_crops}")
        if self.local_crops:
            validate_crop_settings(self.local_crop_size, None)
            if self.local_crop_size >= self.crop_size:
                raise ValueError(f"local_crop_size {self.local_crop_size} must be below crop_size {self.crop_size}")


class DINO(nn.Module):
    """Self-distillation with no labels on pool6, with an EMA teacher and a centred, sharpened target.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`DINOConfig`).
        in_channels: Image channels.
    """

    name: ClassVar[str] = "dino"
    num_views: ClassVar[int] = 2
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = TEACHER_AND_STUDENT
    info: ClassVar[MethodInfo] = MethodInfo(
        family="self-distillation",
        views="2 crops of one 128^3 region, unmasked, for student and EMA teacher (local crops: off)",
        heads="pool6 -> DINOHead(K=8192)",
        losses="1.0 loss_cls (DINO cross-view)",
    )

    center: Tensor

    def __init__(self, preset: SwinPreset, config: DINOConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        cfg = config if config is not None else DINOConfig()
        self.config = cfg
        preset = with_drop_path(preset, cfg.drop_path_rate)
        self.preset = preset
        self.student = student_branch(preset, in_channels, False, {"head": cfg.head(preset.feature_dims[3])})
        freeze_skipped_stage(branch_encoder(self.student))  # stage 4 never runs: no unused parameters under DDP
        self.teacher = EMATeacher(self.student, cfg.ema_base, cfg.ema_final)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        logger.debug("DINO built: %s, %s", preset, cfg)

    @staticmethod
    def _logits(branch: nn.ModuleDict | EMATeacher, x: Tensor, batch: int) -> Tensor:
        """``(B * V, C, D, H, W)`` -> head logits of pool6 ``(V, B, K)``."""
        _, pooled = dense_and_pooled(branch["norm"], stride16_tokens(branch_encoder(branch), x))
        return by_view(branch["head"](pooled), batch)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Student and teacher on both crops (student also on local crops), cross-view loss, centre update.

        Args:
            batch: ``{"views": (B, 2, C, D, H, W)}`` in [0, 1].
            context: Training progress (teacher temperature; local crops draw from ``context.generator``).

        Returns:
            ``loss`` (with graph), detached ``loss_cls`` (the same single term), ``teacher_temp``,
            ``ema_momentum`` and ``teacher_entropy`` (nats; 0 = collapse, ln K = uniform).
        """
        cfg = self.config
        x, b = checked_views(batch, self.num_views, cfg.crop_size), batch["views"].shape[0]
        student = self._logits(self.student, x, b)  # (2, B, K)
        if cfg.local_crops:
            local = local_crops(batch["views"], cfg.local_crops, cfg.local_crop_size, context.generator)
            student = torch.cat([student, self._logits(self.student, local.flatten(0, 1), b)])
        with torch.no_grad():
            teacher = self._logits(self.teacher, x, b)
        tau_t = cfg.teacher_temp(context)
        loss = cross_view_distillation_loss(student, teacher, self.center, cfg.student_temp, tau_t)
        entropy = advance_center(self.center, teacher, tau_t, cfg, context)
        scalar = loss.detach().new_tensor
        return {
            "loss": loss,
            "loss_cls": loss.detach(),
            "teacher_temp": scalar(tau_t),
            "ema_momentum": scalar(self.teacher.momentum(context)),
            "teacher_entropy": entropy,
        }

    def before_optimizer_step(self, context: StepContext) -> None:
        """Freeze the head's last layer during the first ``freeze_last_layer_epochs``."""
        freeze_last_layers([cast(DINOHead, self.student["head"])], self.config, context)

    def after_step(self, context: StepContext) -> None:
        """EMA update of the teacher."""
        self.teacher.update_(self.student, context)

    def student_modules(self) -> nn.Module:
        """Student encoder, norm and head; never the teacher."""
        return self.student

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights; ``"default"`` is the EMA teacher (as [DINO] evaluates it)."""
        return export_encoder_state(self.student["encoder"], self.teacher, source)
