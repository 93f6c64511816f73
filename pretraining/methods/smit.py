"""SMIT ([P] item 8; [SMIT]): masked image prediction plus patch- and image-token self-distillation.

Module layout (the EMA matches teacher and student parameters by these names)::

    student    ModuleDict(encoder=SwinEncoder(mask token), norm=LayerNorm(8E, eps 1e-6),
                          head_cls=DINOHead(8E, K), head_patch=DINOHead(8E, K))
    teacher    EMATeacher(student): copy at init, no mask token, no gradients, always eval mode
    pixel_head LinearPixelHead(16E -> 32^3 * C) on x4, student only
    center_cls (1, K), center_patch (1, 1, K) buffers (saved in the state dict)

Per step, with two crops per volume, each masked independently for the student:

- ``dense6`` = norm(stride-16 tokens) ``(N, T, 8E)``, ``pool6`` = its mean over tokens;
- MIP: ``masked_pixel_loss(pixel_head(x4), x, voxel mask, "l1")`` over both views;
- MPD: iBOT patch loss between student and teacher ``head_patch(dense6)`` at masked 16^3 units
  (= masked stride-16 tokens), same view;
- ITD: DINO cross-view loss between ``head_cls(pool6)`` of the two views;
- ``loss = MIP + lambda_mpd * MPD + lambda_itd * ITD``; the centres are updated after the loss.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.presets import ENCODER_STRIDE, SwinPreset
from nnunet_ssl.pretraining.heads import DINOHead, LinearPixelHead
from nnunet_ssl.pretraining.losses import (
    cross_view_distillation_loss,
    masked_patch_distillation_loss,
    masked_pixel_loss,
)
from nnunet_ssl.pretraining.masking import random_unit_masks, spatial_size
from nnunet_ssl.pretraining.methods.base import TEACHER_AND_STUDENT, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import checked_views, validate_masked_image_settings, with_drop_path
from nnunet_ssl.pretraining.methods.distillation import (
    DistillationConfig,
    advance_center,
    freeze_last_layers,
    student_branch,
)
from nnunet_ssl.pretraining.teacher import EMATeacher, export_encoder_state
from nnunet_ssl.pretraining.tokens import DENSE_STRIDE, by_view, dense_and_pooled, dense_token_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SMITConfig(DistillationConfig):
    """SMIT settings ([P] where stated, else SSL_METHODS.md card 8 and §1).

    Heads, temperatures, centre and EMA momenta and the frozen last layer are the fields of
    :class:`DistillationConfig` (the same defaults as DINO and iBOT).

    Attributes:
        mask_ratio: Fraction of units masked per view.
        unit: Mask unit edge in voxels; a multiple of 16 so units tile the stride-16 tokens.
        pixel_loss: ``"l1"`` ([SMIT]) or ``"l2"``.
        lambda_mpd: Weight of masked patch-token distillation.
        lambda_itd: Weight of image-token distillation.
        crop_size: Cubic crop edge the loader delivers.
        drop_path_rate: Student stochastic depth (SSL_METHODS.md §0: 0.1); None keeps the preset's.
            The teacher never drops paths (eval mode).
    """

    mask_ratio: float = 0.75
    unit: int = 16
    pixel_loss: str = "l1"
    lambda_mpd: float = 0.1
    lambda_itd: float = 0.1
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_masked_image_settings(self.pixel_loss, self.mask_ratio, self.crop_size, self.unit, self.drop_path_rate)
        if self.unit % DENSE_STRIDE:
            raise ValueError(
                f"unit must be a multiple of {DENSE_STRIDE} (the distillation token stride), got {self.unit}"
            )
        if self.lambda_mpd < 0 or self.lambda_itd < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.lambda_mpd}, {self.lambda_itd}")


class SMIT(nn.Module):
    """Self-distilled masked image transformer with an EMA teacher.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`SMITConfig`).
        in_channels: Image channels (also the channels the pixel head predicts).
    """

    name: ClassVar[str] = "smit"
    num_views: ClassVar[int] = 2
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = TEACHER_AND_STUDENT
    info: ClassVar[MethodInfo] = MethodInfo(
        family="masked image modelling + self-distillation",
        views="2 crops of one 128^3 region; student masked 0.75 (16^3 units), EMA teacher unmasked",
        heads="x4 -> LinearPixelHead; dense6 -> DINOHead(K=8192); pool6 -> separate DINOHead(K=8192)",
        losses="1.0 loss_mip (L1, masked voxels) + 0.1 loss_mpd (iBOT patch) + 0.1 loss_itd (DINO cross-view)",
    )

    center_cls: Tensor
    center_patch: Tensor

    def __init__(self, preset: SwinPreset, config: SMITConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        cfg = config if config is not None else SMITConfig()
        self.config = cfg
        preset = with_drop_path(preset, cfg.drop_path_rate)
        self.preset = preset
        dense_dim = preset.feature_dims[3]
        self.student = student_branch(
            preset, in_channels, True, {"head_cls": cfg.head(dense_dim), "head_patch": cfg.head(dense_dim)}
        )
        self.pixel_head = LinearPixelHead(preset.feature_dims[4], ENCODER_STRIDE, in_channels)
        self.teacher = EMATeacher(self.student, cfg.ema_base, cfg.ema_final)
        self.register_buffer("center_cls", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, cfg.out_dim))
        logger.debug("SMIT built: %s, %s", preset, cfg)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Student on masked views, teacher on clean views, three losses; then update the centres.

        Masks come from ``context.generator`` (keyed by seed, rank and step); the centres are
        averaged over ranks by ``context.collectives``.

        Args:
            batch: ``{"views": (B, 2, C, D, H, W)}`` in [0, 1].
            context: Training progress (teacher temperature schedule, reported EMA momentum).

        Returns:
            ``loss`` (with graph), detached ``loss_mip``, ``loss_mpd``, ``loss_itd``, ``teacher_temp``,
            ``ema_momentum`` and the mean teacher entropies ``teacher_entropy_cls`` /
            ``teacher_entropy_patch`` (nats; collapse shows as 0, uniform as ln K).
        """
        cfg = self.config
        x, b = checked_views(batch, self.num_views, cfg.crop_size), batch["views"].shape[0]
        masks = random_unit_masks(
            x.shape[0], spatial_size(x), cfg.unit, self.preset.patch_size, cfg.mask_ratio,
            generator=context.generator, device=x.device,
        )

        features = self.student["encoder"](x, masks.token)
        reconstruction = self.pixel_head(features[4])
        loss_mip = masked_pixel_loss(reconstruction, x, masks.voxel, cfg.pixel_loss)

        dense_s, pool_s = dense_and_pooled(self.student["norm"], features)
        cls_s = by_view(self.student["head_cls"](pool_s), b)  # (V, B, K)
        patch_s = by_view(self.student["head_patch"](dense_s), b)  # (V, B, T, K)
        with torch.no_grad():
            dense_t, pool_t = dense_and_pooled(self.teacher["norm"], self.teacher["encoder"](x))
            cls_t = by_view(self.teacher["head_cls"](pool_t), b)
            patch_t = by_view(self.teacher["head_patch"](dense_t), b)
        dense_mask = by_view(dense_token_mask(masks.unit, cfg.unit), b)  # (V, B, T)

        tau_t = cfg.teacher_temp(context)
        loss_itd = cross_view_distillation_loss(cls_s, cls_t, self.center_cls, cfg.student_temp, tau_t)
        loss_mpd = masked_patch_distillation_loss(
            patch_s, patch_t, dense_mask, self.center_patch, cfg.student_temp, tau_t
        )
        loss = loss_mip + cfg.lambda_mpd * loss_mpd + cfg.lambda_itd * loss_itd

        entropy_cls = advance_center(self.center_cls, cls_t, tau_t, cfg, context)
        entropy_patch = advance_center(self.center_patch, patch_t, tau_t, cfg, context)
        scalar = loss.detach().new_tensor
        return {
            "loss": loss,
            "loss_mip": loss_mip.detach(),
            "loss_mpd": loss_mpd.detach(),
            "loss_itd": loss_itd.detach(),
            "teacher_temp": scalar(tau_t),
            "ema_momentum": scalar(self.teacher.momentum(context)),
            "teacher_entropy_cls": entropy_cls,
            "teacher_entropy_patch": entropy_patch,
        }

    def before_optimizer_step(self, context: StepContext) -> None:
        """Freeze both heads' last layers during the first ``freeze_last_layer_epochs``."""
        heads = (cast(DINOHead, self.student[key]) for key in ("head_cls", "head_patch"))
        freeze_last_layers(heads, self.config, context)

    def after_step(self, context: StepContext) -> None:
        """EMA update of the teacher (nothing else)."""
        self.teacher.update_(self.student, context)

    def student_modules(self) -> nn.Module:
        """Student encoder (with mask token), norm, both heads and the pixel head; never the teacher."""
        return nn.ModuleDict({"student": self.student, "pixel_head": self.pixel_head})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights without ``mask_token``; ``"default"`` is the EMA teacher (see :mod:`..teacher`)."""
        return export_encoder_state(self.student["encoder"], self.teacher, source)
