"""iBOT ([P] item 7; [iBOT]): DINO's cross-view loss on pool6 plus masked patch-token distillation.

Module layout::

    student  ModuleDict(encoder=SwinEncoder (mask token), norm=LayerNorm(8E), head=DINOHead(8E, K))
    teacher  EMATeacher(student): frozen, unmasked, eval-mode copy, EMA 0.996 -> 1 by global step
    center_cls (1, K), center_patch (1, 1, K) buffers

Per step the student sees both crops masked (independently, r = 0.75 in 16^3 units, one unit =
one stride-16 token), the teacher both unmasked. One head (MLP and last layer shared, [iBOT]
shared_head) maps pool6 to the cls logits and dense6 to the patch logits:

- ``loss_cls``: SDLoss across views (q != v), as DINO, from the student's masked views;
- ``loss_patch``: same-view CE at masked tokens, ``sum(m CE) / max(1, sum(m))`` per sample;
- ``loss = lambda_cls * loss_cls + lambda_patch * loss_patch`` (1 and 1, [iBOT]).

The heads read the stride-16 tokens, so stage 4 is neither run nor trained.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.pretraining.heads import DINOHead
from nnunet_ssl.pretraining.losses import (
    cross_view_distillation_loss,
    masked_patch_distillation_loss,
)
from nnunet_ssl.pretraining.masking import random_unit_masks, spatial_size, validate_mask_settings
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
from nnunet_ssl.pretraining.tokens import (
    DENSE_STRIDE,
    by_view,
    dense_and_pooled,
    dense_token_mask,
    freeze_skipped_stage,
    stride16_tokens,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IBOTConfig(DistillationConfig):
    """iBOT settings (SSL_METHODS.md card 7; heads, temperatures and momenta in :class:`DistillationConfig`).

    Attributes:
        mask_ratio: Fraction of units masked per view, in [0, 1] (0: no patch loss, as [iBOT] allows).
        unit: Mask unit edge in voxels; a multiple of 16 so units tile the stride-16 tokens.
        lambda_cls: Weight of the cross-view cls loss.
        lambda_patch: Weight of the masked patch loss.
        crop_size: Cubic crop edge the loader delivers.
        drop_path_rate: Student stochastic depth (§0: 0.1); None keeps the preset's.
    """

    mask_ratio: float = 0.75
    unit: int = 16
    lambda_cls: float = 1.0
    lambda_patch: float = 1.0
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_crop_settings(self.crop_size, self.drop_path_rate)
        validate_mask_settings((self.crop_size,) * 3, self.unit, self.mask_ratio)  # 0 allowed, as [iBOT]
        if self.unit % DENSE_STRIDE:
            raise ValueError(f"unit must be a multiple of {DENSE_STRIDE} (the distillation token stride), got {self.unit}")
        if self.lambda_cls < 0 or self.lambda_patch < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.lambda_cls}, {self.lambda_patch}")


class IBOT(nn.Module):
    """Image BERT pre-training with an online tokenizer (EMA teacher, one shared DINO head).

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`IBOTConfig`).
        in_channels: Image channels.
    """

    name: ClassVar[str] = "ibot"
    num_views: ClassVar[int] = 2
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = TEACHER_AND_STUDENT
    info: ClassVar[MethodInfo] = MethodInfo(
        family="masked image modelling + self-distillation",
        views="2 crops of one 128^3 region; student masked 0.75 (16^3 units), EMA teacher unmasked",
        heads="pool6 and dense6 -> one shared DINOHead(K=8192)",
        losses="1.0 loss_cls (DINO cross-view) + 1.0 loss_patch (masked patch tokens, same view)",
    )

    center_cls: Tensor
    center_patch: Tensor

    def __init__(self, preset: SwinPreset, config: IBOTConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        cfg = config if config is not None else IBOTConfig()
        self.config = cfg
        preset = with_drop_path(preset, cfg.drop_path_rate)
        self.preset = preset
        self.student = student_branch(preset, in_channels, True, {"head": cfg.head(preset.feature_dims[3])})
        freeze_skipped_stage(branch_encoder(self.student))  # stage 4 never runs: no unused parameters under DDP
        self.teacher = EMATeacher(self.student, cfg.ema_base, cfg.ema_final)
        self.register_buffer("center_cls", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, cfg.out_dim))
        logger.debug("iBOT built: %s, %s", preset, cfg)

    @staticmethod
    def _logits(branch: nn.ModuleDict | EMATeacher, x: Tensor, batch: int, token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """cls ``(V, B, K)`` and patch ``(V, B, T, K)`` logits through the one shared head."""
        dense, pooled = dense_and_pooled(branch["norm"], stride16_tokens(branch_encoder(branch), x, token_mask))
        return by_view(branch["head"](pooled), batch), by_view(branch["head"](dense), batch)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Masked student, unmasked teacher, cls and patch losses; then update both centres.

        Args:
            batch: ``{"views": (B, 2, C, D, H, W)}`` in [0, 1].
            context: Training progress (teacher temperature; masks from ``context.generator``).

        Returns:
            ``loss`` (with graph), detached ``loss_cls`` and ``loss_patch``, ``teacher_temp``,
            ``ema_momentum``, ``teacher_entropy_cls`` and ``teacher_entropy_patch`` (nats).
        """
        cfg = self.config
        x, b = checked_views(batch, self.num_views, cfg.crop_size), batch["views"].shape[0]
        masks = random_unit_masks(
            x.shape[0], spatial_size(x), cfg.unit, self.preset.patch_size, cfg.mask_ratio,
            generator=context.generator, device=x.device,
        )
        cls_s, patch_s = self._logits(self.student, x, b, masks.token)
        with torch.no_grad():
            cls_t, patch_t = self._logits(self.teacher, x, b, None)
        token_mask = by_view(dense_token_mask(masks.unit, cfg.unit), b)  # (V, B, T)

        tau_t = cfg.teacher_temp(context)
        loss_cls = cross_view_distillation_loss(cls_s, cls_t, self.center_cls, cfg.student_temp, tau_t)
        loss_patch = masked_patch_distillation_loss(
            patch_s, patch_t, token_mask, self.center_patch, cfg.student_temp, tau_t
        )
        loss = cfg.lambda_cls * loss_cls + cfg.lambda_patch * loss_patch
        entropy_cls = advance_center(self.center_cls, cls_t, tau_t, cfg, context)
        entropy_patch = advance_center(self.center_patch, patch_t, tau_t, cfg, context)
        scalar = loss.detach().new_tensor
        return {
            "loss": loss,
            "loss_cls": loss_cls.detach(),
            "loss_patch": loss_patch.detach(),
            "teacher_temp": scalar(tau_t),
            "ema_momentum": scalar(self.teacher.momentum(context)),
            "teacher_entropy_cls": entropy_cls,
            "teacher_entropy_patch": entropy_patch,
        }

    def before_optimizer_step(self, context: StepContext) -> None:
        """Freeze the shared head's last layer during the first ``freeze_last_layer_epochs``."""
        freeze_last_layers([cast(DINOHead, self.student["head"])], self.config, context)

    def after_step(self, context: StepContext) -> None:
        """EMA update of the teacher."""
        self.teacher.update_(self.student, context)

    def student_modules(self) -> nn.Module:
        """Student encoder (with mask token), norm and head; never the teacher."""
        return self.student

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights without ``mask_token``; ``"default"`` is the EMA teacher (as [iBOT] evaluates it)."""
        return export_encoder_state(self.student["encoder"], self.teacher, source)
