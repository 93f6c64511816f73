"""Contrastive ([P] item 4; [TANG] losses/loss.py ``Contrast``; SSL_METHODS.md card 4).

Two random crops of one volume (the loader's two views) are the positive pair; every other view
of the global batch, gathered across ranks by the engine's :class:`Collectives`, is a negative.
Each view: encoder -> ``pool4`` (mean of x4) -> ``Linear(16E, 512)``; loss NT-Xent with t = 0.5.
[TANG]'s rotation + cutout of the views is a flag (``augment``), off by default. No teacher.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.pretraining.heads import READOUTS, linear_head, x4_vector
from nnunet_ssl.pretraining.losses import nt_xent_loss
from nnunet_ssl.pretraining.methods.base import STUDENT_ONLY, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import (
    checked_views,
    student_encoder,
    student_encoder_state,
    validate_choice,
    validate_student_settings,
)
from nnunet_ssl.pretraining.views import aug_rand, random_axial_rotation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContrastiveConfig:
    """Contrastive settings (SSL_METHODS.md card 4).

    Attributes:
        temperature: NT-Xent ``t`` ([TANG] 0.5).
        projection_dim: Output width of the linear projection ([TANG] 512).
        readout: ``"pool"`` (pool4, the card) or ``"token1"`` ([TANG] reads token 1 of x4).
        augment: Rotate (axial, k uniform) and ``aug_rand``-corrupt each view, as [TANG] does.
        crop_size: Cubic crop edge the loader delivers (a multiple of 32).
        drop_path_rate: Stochastic depth of the encoder (SSL_METHODS.md §0: 0.1); None keeps the preset's.
    """

    temperature: float = 0.5
    projection_dim: int = 512
    readout: str = "pool"
    augment: bool = False
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_student_settings(self.crop_size, self.drop_path_rate)
        validate_choice("readout", self.readout, READOUTS)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be positive, got {self.projection_dim}")


class Contrastive(nn.Module):
    """SimCLR-style contrast of two crops per volume on pooled x4.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`ContrastiveConfig`).
        in_channels: Image channels.
    """

    name: ClassVar[str] = "contrastive"
    num_views: ClassVar[int] = 2
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = STUDENT_ONLY
    info: ClassVar[MethodInfo] = MethodInfo(
        family="contrastive",
        views="2 crops per volume (positive pair); all other views negatives, across ranks",
        heads="pool4 -> Linear(16E, 512)",
        losses="1.0 loss_contrast (NT-Xent, t = 0.5)",
    )

    def __init__(self, preset: SwinPreset, config: ContrastiveConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else ContrastiveConfig()
        self.encoder = student_encoder(preset, self.config.drop_path_rate, in_channels)
        self.preset = self.encoder.preset
        self.projection = linear_head(self.preset.feature_dims[4], self.config.projection_dim)
        logger.debug("Contrastive built: %s, %s", self.preset, self.config)

    def project(self, x: Tensor) -> Tensor:
        """``(N, C, D, H, W)`` crops -> ``(N, projection_dim)`` projections."""
        return self.projection(x4_vector(self.encoder(x)[4], self.config.readout))

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Project both views of every volume and contrast them against the gathered batch.

        Args:
            batch: ``{"views": (B, 2, C, D, H, W)}`` in [0, 1].
            context: Training progress (collectives for the negatives; generator for ``augment``).

        Returns:
            ``loss`` (with graph), detached ``loss_contrast`` and ``positive_cosine`` (mean cosine
            similarity of the positive pairs).
        """
        x = checked_views(batch, self.num_views, self.config.crop_size)  # (B * 2, ...), sample-major
        if self.config.augment:
            x = aug_rand(random_axial_rotation(x, context.generator)[0], context.generator).images
        z = self.project(x).reshape(-1, 2, self.config.projection_dim)
        loss = nt_xent_loss(z[:, 0], z[:, 1], self.config.temperature, context.collectives)
        cosine = nn.functional.cosine_similarity(z[:, 0].detach().float(), z[:, 1].detach().float(), dim=-1)
        return {"loss": loss, "loss_contrast": loss.detach(), "positive_cosine": cosine.mean()}

    def student_modules(self) -> nn.Module:
        """Encoder and projection: everything the optimiser updates."""
        return nn.ModuleDict({"encoder": self.encoder, "projection": self.projection})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights (``"default"`` = ``"student"``; there is no teacher or mask token)."""
        return student_encoder_state(self.encoder, source, self.name)
