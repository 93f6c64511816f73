"""Inpainting ([P] item 2, citing Tang et al.; [TANG] utils/ops.py ``aug_rand``; SSL_METHODS.md card 2).

One crop per volume is corrupted by ``aug_rand`` (noise-filled cuboids covering U(0, 0.3) of the
voxels, then cuboids pasted from another crop of the batch); the encoder sees the corrupted crop and
x4 -> :class:`ConvUpHead` predicts the clean crop. The loss is the mean squared error over all
voxels ([P]; [TANG] uses L1: ``pixel_loss``). No teacher.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.pretraining.heads import ConvUpHead
from nnunet_ssl.pretraining.losses import PIXEL_LOSS_KINDS, reconstruction_loss
from nnunet_ssl.pretraining.methods.base import STUDENT_ONLY, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import (
    MIN_CONV_HEAD_CROP,
    checked_views,
    student_encoder,
    student_encoder_state,
    validate_choice,
    validate_student_settings,
)
from nnunet_ssl.pretraining.views import CutoutSettings, aug_rand

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InpaintingConfig:
    """Inpainting settings (SSL_METHODS.md card 2).

    Attributes:
        pixel_loss: ``"l2"`` (MSE, [P]) or ``"l1"`` ([TANG]).
        max_fraction: Each cutout pass covers U(0, max_fraction) of the voxels ([TANG] 0.3).
        min_block: Shortest cuboid side as a fraction of the crop ([TANG] 0.05).
        max_block: Longest cuboid side (exclusive) as a fraction of the crop ([TANG] 0.25).
        paste: Run ``aug_rand``'s second pass pasting cuboids from another crop of the batch.
        crop_size: Cubic crop edge the loader delivers (a multiple of 32, >= 64).
        drop_path_rate: Stochastic depth of the encoder (SSL_METHODS.md §0: 0.1); None keeps the preset's.
    """

    pixel_loss: str = "l2"
    max_fraction: float = 0.3
    min_block: float = 0.05
    max_block: float = 0.25
    paste: bool = True
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_choice("pixel_loss", self.pixel_loss, PIXEL_LOSS_KINDS)
        validate_student_settings(self.crop_size, self.drop_path_rate, MIN_CONV_HEAD_CROP)
        self.cutout.side_limits(self.crop_size)  # raises for blocks that cannot fit

    @property
    def cutout(self) -> CutoutSettings:
        return CutoutSettings(self.max_fraction, self.min_block, self.max_block)


class Inpainting(nn.Module):
    """Restore cutout-corrupted crops from x4 with a convolutional up-sampling head.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`InpaintingConfig`).
        in_channels: Image channels (also the channels the head predicts).
    """

    name: ClassVar[str] = "inpainting"
    num_views: ClassVar[int] = 1
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = STUDENT_ONLY
    info: ClassVar[MethodInfo] = MethodInfo(
        family="restoration",
        views="1 crop, noise cutout + cross-sample paste (aug_rand)",
        heads="x4 -> ConvUpHead",
        losses="1.0 loss_rec (MSE over all voxels vs the clean crop)",
    )

    def __init__(self, preset: SwinPreset, config: InpaintingConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else InpaintingConfig()
        self.encoder = student_encoder(preset, self.config.drop_path_rate, in_channels)
        self.preset = self.encoder.preset
        self.pixel_head = ConvUpHead(self.preset.feature_dims[4], in_channels)
        logger.debug("Inpainting built: %s, %s", self.preset, self.config)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Corrupt (cuboids from ``context.generator``), encode, restore, score every voxel.

        Args:
            batch: ``{"views": (B, 1, C, D, H, W)}`` in [0, 1].
            context: Training progress (its generator draws the corruption).

        Returns:
            ``loss`` (with graph), detached ``loss_rec`` and ``corrupted_fraction`` (mean share of
            voxels written by either pass).
        """
        target = checked_views(batch, self.num_views, self.config.crop_size)
        corrupted = aug_rand(target, context.generator, self.config.cutout, self.config.paste)  # target stays clean
        prediction = self.pixel_head(self.encoder(corrupted.images)[4])
        loss = reconstruction_loss(prediction, target, self.config.pixel_loss)
        return {
            "loss": loss,
            "loss_rec": loss.detach(),
            "corrupted_fraction": corrupted.mask.float().mean().detach(),
        }

    def student_modules(self) -> nn.Module:
        """Encoder and pixel head: everything the optimiser updates."""
        return nn.ModuleDict({"encoder": self.encoder, "pixel_head": self.pixel_head})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights (``"default"`` = ``"student"``; there is no teacher or mask token)."""
        return student_encoder_state(self.encoder, source, self.name)
