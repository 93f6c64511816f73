"""Reconstruction ([P] item 3; SSL_METHODS.md card 3): a plain autoencoder through x4.

The clean crop goes in and the same crop comes out of x4 -> :class:`ConvUpHead` (stride 32, no
skip connections), scored by the mean squared error over all voxels. A denoising variant (Gaussian
noise added to the input only, ``noise_std``) is a flag, off by default: [P] reconstructs "from
original uncorrupted images". No teacher.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
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
from nnunet_ssl.pretraining.views import device_generator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionConfig:
    """Reconstruction settings (SSL_METHODS.md card 3).

    Attributes:
        pixel_loss: ``"l2"`` (MSE, [P]) or ``"l1"``.
        noise_std: Standard deviation of Gaussian noise added to the input (target stays clean);
            0 (default) is [P]'s plain autoencoder.
        crop_size: Cubic crop edge the loader delivers (a multiple of 32, >= 64).
        drop_path_rate: Stochastic depth of the encoder (SSL_METHODS.md §0: 0.1); None keeps the preset's.
    """

    pixel_loss: str = "l2"
    noise_std: float = 0.0
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_choice("pixel_loss", self.pixel_loss, PIXEL_LOSS_KINDS)
        validate_student_settings(self.crop_size, self.drop_path_rate, MIN_CONV_HEAD_CROP)
        if not self.noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


class Reconstruction(nn.Module):
    """Autoencode the clean crop through the stride-32 bottleneck.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`ReconstructionConfig`).
        in_channels: Image channels (also the channels the head predicts).
    """

    name: ClassVar[str] = "reconstruction"
    num_views: ClassVar[int] = 1
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = STUDENT_ONLY
    info: ClassVar[MethodInfo] = MethodInfo(
        family="restoration",
        views="1 clean crop",
        heads="x4 -> ConvUpHead",
        losses="1.0 loss_rec (MSE over all voxels vs the same crop)",
    )

    def __init__(self, preset: SwinPreset, config: ReconstructionConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else ReconstructionConfig()
        self.encoder = student_encoder(preset, self.config.drop_path_rate, in_channels)
        self.preset = self.encoder.preset
        self.pixel_head = ConvUpHead(self.preset.feature_dims[4], in_channels)
        logger.debug("Reconstruction built: %s, %s", self.preset, self.config)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Encode (optionally noised), decode from x4, score every voxel against the clean crop.

        Args:
            batch: ``{"views": (B, 1, C, D, H, W)}`` in [0, 1].
            context: Training progress (its generator draws the optional input noise).

        Returns:
            ``loss`` (with graph) and detached ``loss_rec``.
        """
        target = checked_views(batch, self.num_views, self.config.crop_size)
        inputs = target
        if self.config.noise_std > 0:
            noise = torch.randn(
                target.shape, generator=device_generator(context.generator, target.device),
                device=target.device, dtype=target.dtype,
            )
            inputs = target + self.config.noise_std * noise
        prediction = self.pixel_head(self.encoder(inputs)[4])
        loss = reconstruction_loss(prediction, target, self.config.pixel_loss)
        return {"loss": loss, "loss_rec": loss.detach()}

    def student_modules(self) -> nn.Module:
        """Encoder and pixel head: everything the optimiser updates."""
        return nn.ModuleDict({"encoder": self.encoder, "pixel_head": self.pixel_head})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights (``"default"`` = ``"student"``; there is no teacher or mask token)."""
        return student_encoder_state(self.encoder, source, self.name)
