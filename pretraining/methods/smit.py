"""SMIT ([P] item 8; [SMIT]): masked image prediction plus patch- and image-token self-distillation.

Module layout (``ema_update_`` matches teacher and student by these names)::

    student    ModuleDict(encoder=SwinEncoder(mask token), norm=LayerNorm(8E, eps 1e-6),
                          head_cls=DINOHead(8E, K), head_patch=DINOHead(8E, K))
    teacher    deep copy of ``student`` at init, mask token removed, requires_grad False, eval mode
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

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from nnunet_ssl.pretraining.ema import cosine_momentum, ema_update_
from nnunet_ssl.pretraining.heads import DINOHead, LinearPixelHead
from nnunet_ssl.pretraining.losses import (
    cross_view_distillation_loss,
    entropy,
    masked_patch_distillation_loss,
    masked_pixel_loss,
    teacher_probabilities,
    updated_center,
)
from nnunet_ssl.pretraining.masking import (
    expand_mask,
    random_unit_masks,
)
from nnunet_ssl.pretraining.methods.base import StepContext
from nnunet_ssl.pretraining.methods.common import checked_views, validate_masked_image_settings
from nnunet_ssl.pretraining.schedules import linear_warmup
from torch import Tensor, nn

from nnunet_ssl.networks.presets import ENCODER_STRIDE, SwinPreset
from nnunet_ssl.networks.swin import DropPath, SwinEncoder

logger = logging.getLogger(__name__)

#: Stride of the distillation tokens (``features[3]``, the stage-3 merge output).
DENSE_STRIDE = 16
ENCODER_SOURCES = ("default", "teacher", "student")


@dataclass(frozen=True)
class SMITConfig:
    """SMIT settings ([P] where stated, else SSL_METHODS.md card 8 and §1).

    Attributes:
        mask_ratio: Fraction of units masked per view.
        unit: Mask unit edge in voxels; a multiple of 16 so units tile the stride-16 tokens.
        pixel_loss: ``"l1"`` ([SMIT]) or ``"l2"``.
        lambda_mpd: Weight of masked patch-token distillation.
        lambda_itd: Weight of image-token distillation.
        out_dim: Prototypes ``K`` of each head.
        head_hidden_dim: Hidden width of the DINO heads.
        head_bottleneck_dim: Bottleneck width of the DINO heads.
        student_temp: ``tau_s``.
        teacher_temp_start: ``tau_t`` at epoch 0.
        teacher_temp_end: ``tau_t`` after the warm-up.
        teacher_temp_warmup_epochs: Length of the linear ``tau_t`` ramp, in epochs.
        center_momentum: EMA momentum of both centres.
        ema_base: Teacher EMA momentum at step 0.
        ema_final: Teacher EMA momentum at the last step (cosine in between).
        freeze_last_layer_epochs: Epochs during which the heads' last layers get no update.
        crop_size: Cubic crop edge the loader delivers.
        drop_path_rate: Student stochastic depth (SSL_METHODS.md §0: 0.1); None keeps the preset's.
            The teacher never drops paths (eval mode).
    """

    mask_ratio: float = 0.75
    unit: int = 16
    pixel_loss: str = "l1"
    lambda_mpd: float = 0.1
    lambda_itd: float = 0.1
    out_dim: int = 8192
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_epochs: float = 30
    center_momentum: float = 0.9
    ema_base: float = 0.996
    ema_final: float = 1.0
    freeze_last_layer_epochs: float = 1
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_masked_image_settings(self.pixel_loss, self.mask_ratio, self.crop_size, self.unit, self.drop_path_rate)
        if self.unit % DENSE_STRIDE:
            raise ValueError(
                f"unit must be a multiple of {DENSE_STRIDE} (the distillation token stride), got {self.unit}"
            )
        if self.lambda_mpd < 0 or self.lambda_itd < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.lambda_mpd}, {self.lambda_itd}")
        if min(self.out_dim, self.head_hidden_dim, self.head_bottleneck_dim) < 1:
            raise ValueError("out_dim, head_hidden_dim and head_bottleneck_dim must be positive")
        if min(self.student_temp, self.teacher_temp_start, self.teacher_temp_end) <= 0:
            raise ValueError("temperatures must be positive")
        if self.teacher_temp_warmup_epochs < 0 or self.freeze_last_layer_epochs < 0:
            raise ValueError("teacher_temp_warmup_epochs and freeze_last_layer_epochs must be >= 0")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1], got {self.center_momentum}")
        if not 0.0 <= self.ema_base <= self.ema_final <= 1.0:
            raise ValueError(f"need 0 <= ema_base <= ema_final <= 1, got {self.ema_base}, {self.ema_final}")


class SMIT(nn.Module):
    """Self-distilled masked image transformer with an EMA teacher.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`SMITConfig`).
        in_channels: Image channels (also the channels the pixel head predicts).
    """

    name: ClassVar[str] = "smit"
    num_views: ClassVar[int] = 2

    center_cls: Tensor
    center_patch: Tensor

    def __init__(self, preset: SwinPreset, config: SMITConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        cfg = config if config is not None else SMITConfig()
        self.config = cfg
        if cfg.drop_path_rate is not None:
            preset = dataclasses.replace(preset, drop_path_rate=cfg.drop_path_rate)
        self.preset = preset
        dense_dim = preset.feature_dims[3]
        self.student = nn.ModuleDict(
            {
                "encoder": SwinEncoder(preset, in_channels, use_mask_token=True),
                "norm": nn.LayerNorm(dense_dim, eps=1e-6),
                "head_cls": DINOHead(dense_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim),
                "head_patch": DINOHead(dense_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim),
            }
        )
        self.pixel_head = LinearPixelHead(preset.feature_dims[4], ENCODER_STRIDE, in_channels)
        self.teacher = copy.deepcopy(self.student)
        self.teacher["encoder"].register_parameter("mask_token", None)  # the teacher never masks
        for module in self.teacher.modules():
            if isinstance(module, DropPath):
                module.p = 0.0
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.register_buffer("center_cls", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, cfg.out_dim))
        logger.debug("SMIT built: %s, %s", preset, cfg)

    # ----------------------------------------------------------------------------------- helpers
    def train(self, mode: bool = True) -> SMIT:
        """Set the student's mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _images(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """``batch["views"] (B, V, C, D, H, W)`` -> ``((B * V, C, D, H, W), B)``, sample-major."""
        return checked_views(batch, self.num_views, self.config.crop_size), batch["views"].shape[0]

    @staticmethod
    def _tokens(branch: nn.ModuleDict, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``dense6`` ``(N, T, 8E)`` (affine LayerNorm of the stride-16 tokens) and ``pool6`` ``(N, 8E)``."""
        dense = branch["norm"](features[3].flatten(2).transpose(1, 2))
        return dense, dense.mean(dim=1)

    @staticmethod
    def _by_view(x: Tensor, batch: int) -> Tensor:
        """``(B * V, ...)`` sample-major -> ``(V, B, ...)``."""
        return x.reshape(batch, -1, *x.shape[1:]).transpose(0, 1)

    def teacher_temp(self, context: StepContext) -> float:
        """``tau_t`` at this step (both distillation losses share it)."""
        cfg = self.config
        return linear_warmup(
            context.epoch, cfg.teacher_temp_start, cfg.teacher_temp_end, cfg.teacher_temp_warmup_epochs
        )

    def ema_momentum(self, context: StepContext) -> float:
        """EMA momentum that :meth:`after_step` applies after this step (global-step cosine)."""
        return cosine_momentum(context.step, context.total_steps, self.config.ema_base, self.config.ema_final)

    # ------------------------------------------------------------------------------ the protocol
    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Student on masked views, teacher on clean views, three losses; then update the centres.

        Masks come from ``context.generator`` (keyed by seed, rank and step).

        Args:
            batch: ``{"views": (B, 2, C, D, H, W)}`` in [0, 1].
            context: Training progress (teacher temperature schedule, reported EMA momentum).

        Returns:
            ``loss`` (with graph), detached ``loss_mip``, ``loss_mpd``, ``loss_itd``, ``teacher_temp``,
            ``ema_momentum`` and the mean teacher entropies ``teacher_entropy_cls`` /
            ``teacher_entropy_patch`` (nats; collapse shows as 0, uniform as ln K).
        """
        cfg = self.config
        x, b = self._images(batch)
        masks = random_unit_masks(
            x.shape[0], tuple(x.shape[2:]), cfg.unit, self.preset.patch_size, cfg.mask_ratio,
            generator=context.generator, device=x.device,
        )

        features = self.student["encoder"](x, masks.token)
        reconstruction = self.pixel_head(features[4])
        loss_mip = masked_pixel_loss(reconstruction, x, masks.voxel, cfg.pixel_loss)

        dense_s, pool_s = self._tokens(self.student, features)
        cls_s = self._by_view(self.student["head_cls"](pool_s), b)  # (V, B, K)
        patch_s = self._by_view(self.student["head_patch"](dense_s), b)  # (V, B, T, K)
        with torch.no_grad():
            dense_t, pool_t = self._tokens(self.teacher, self.teacher["encoder"](x))
            cls_t = self._by_view(self.teacher["head_cls"](pool_t), b)
            patch_t = self._by_view(self.teacher["head_patch"](dense_t), b)
        dense_mask = expand_mask(masks.unit, cfg.unit // DENSE_STRIDE).flatten(1)  # (B * V, T)
        dense_mask = self._by_view(dense_mask, b)  # (V, B, T)

        tau_t = self.teacher_temp(context)
        loss_itd = cross_view_distillation_loss(cls_s, cls_t, self.center_cls, cfg.student_temp, tau_t)
        loss_mpd = masked_patch_distillation_loss(
            patch_s, patch_t, dense_mask, self.center_patch, cfg.student_temp, tau_t
        )
        loss = loss_mip + cfg.lambda_mpd * loss_mpd + cfg.lambda_itd * loss_itd

        with torch.no_grad():
            entropy_cls = entropy(teacher_probabilities(cls_t, self.center_cls, tau_t)).mean()
            entropy_patch = entropy(teacher_probabilities(patch_t, self.center_patch, tau_t)).mean()
            self.center_cls.copy_(updated_center(self.center_cls, cls_t, cfg.center_momentum))
            self.center_patch.copy_(updated_center(self.center_patch, patch_t, cfg.center_momentum))
        scalar = loss.detach().new_tensor
        return {
            "loss": loss,
            "loss_mip": loss_mip.detach(),
            "loss_mpd": loss_mpd.detach(),
            "loss_itd": loss_itd.detach(),
            "teacher_temp": scalar(tau_t),
            "ema_momentum": scalar(self.ema_momentum(context)),
            "teacher_entropy_cls": entropy_cls,
            "teacher_entropy_patch": entropy_patch,
        }

    def before_optimizer_step(self, context: StepContext) -> None:
        """During the first ``freeze_last_layer_epochs``, drop the heads' last-layer gradients.

        Gradients are set to None (as [DINO]'s ``cancel_gradients_last_layer``), so AdamW skips
        those weights entirely (no moment or weight-decay update).
        """
        if context.epoch < self.config.freeze_last_layer_epochs:
            for key in ("head_cls", "head_patch"):
                cast(DINOHead, self.student[key]).last_layer.weight.grad = None

    def after_step(self, context: StepContext) -> None:
        """EMA update of the teacher with :meth:`ema_momentum` (nothing else)."""
        ema_update_(self.teacher, self.student, self.ema_momentum(context))

    def student_modules(self) -> nn.Module:
        """Student encoder (with mask token), norm, both heads and the pixel head; never the teacher."""
        return nn.ModuleDict({"student": self.student, "pixel_head": self.pixel_head})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights without ``mask_token``.

        ``"default"`` is the EMA teacher, as [DINO]/[iBOT] evaluate and export the teacher
        ([SMIT]'s own code fine-tunes from the student: ask for ``"student"`` to match it).

        Raises:
            ValueError: For an unknown source.
        """
        if source not in ENCODER_SOURCES:
            raise ValueError(f"unknown encoder source {source!r}; choose one of {ENCODER_SOURCES}")
        branch = self.student if source == "student" else self.teacher
        state = branch["encoder"].state_dict()
        return {k: v.detach().clone() for k, v in state.items() if k != "mask_token"}
