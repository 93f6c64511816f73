"""SwinUNETR multi-objective pretraining ([P] item 9; [TANG] main.py; SSL_METHODS.md card 9).

Per crop ``x``: ``x1 = rot(x, k1)``, ``x2 = rot(x, k2)`` (independent axial 90-degree rotations),
each corrupted by ``aug_rand`` into the student inputs ``x~1``, ``x~2``. Both go through the
encoder in one batch; on x4:

- rotation ``Linear(16E, 4)`` on token 0 -> cross-entropy against ``(k1, k2)``;
- contrastive ``Linear(16E, 512)`` on token 1 -> NT-Xent (t = 0.5) with ``(x~1, x~2)`` the positive pair;
- ``ConvUpHead`` -> L1 over all voxels against the clean rotated ``(x1, x2)``;

``loss = w_rot * rot + w_contrast * contrast + w_rec * rec`` with weights 1, 1, 1 ([TANG]
``Loss``). The corner tokens are [TANG]'s readout; ``readout="pool"`` reads pool4 for both
vector heads instead. No teacher.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.pretraining.heads import ConvUpHead, linear_head, x4_vector
from nnunet_ssl.pretraining.losses import PIXEL_LOSS_KINDS, nt_xent_loss, reconstruction_loss, rotation_loss
from nnunet_ssl.pretraining.methods.base import STUDENT_ONLY, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import (
    MIN_CONV_HEAD_CROP,
    checked_views,
    student_encoder,
    student_encoder_state,
    validate_choice,
    validate_student_settings,
)
from nnunet_ssl.pretraining.views import NUM_ROTATIONS, aug_rand, random_axial_rotation

logger = logging.getLogger(__name__)

#: ``"tokens"``: rotation reads x4 token 0 and contrast token 1 ([TANG]); ``"pool"``: both read pool4.
SWINUNETR_READOUTS = ("tokens", "pool")


@dataclass(frozen=True)
class SwinUNETRConfig:
    """SwinUNETR multi-objective settings (SSL_METHODS.md card 9).

    Attributes:
        weight_rot: Weight of the rotation cross-entropy ([TANG] alpha1 = 1).
        weight_contrast: Weight of NT-Xent ([TANG] alpha2 = 1).
        weight_rec: Weight of the reconstruction loss ([TANG] alpha3 = 1).
        temperature: NT-Xent ``t`` (0.5).
        projection_dim: Contrastive projection width (512).
        pixel_loss: ``"l1"`` ([TANG] L1Loss) or ``"l2"``.
        readout: ``"tokens"`` (x4 tokens 0 and 1, [TANG]) or ``"pool"``.
        crop_size: Cubic crop edge the loader delivers (a multiple of 32, >= 64).
        drop_path_rate: Stochastic depth of the encoder (SSL_METHODS.md §0: 0.1); None keeps the preset's.
    """

    weight_rot: float = 1.0
    weight_contrast: float = 1.0
    weight_rec: float = 1.0
    temperature: float = 0.5
    projection_dim: int = 512
    pixel_loss: str = "l1"
    readout: str = "tokens"
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_student_settings(self.crop_size, self.drop_path_rate, MIN_CONV_HEAD_CROP)
        validate_choice("pixel_loss", self.pixel_loss, PIXEL_LOSS_KINDS)
        validate_choice("readout", self.readout, SWINUNETR_READOUTS)
        if not min(self.weight_rot, self.weight_contrast, self.weight_rec) >= 0:
            raise ValueError("loss weights must be >= 0")
        if not self.temperature > 0 or self.projection_dim < 1:
            raise ValueError(f"need temperature > 0 and projection_dim >= 1, got {self.temperature}, {self.projection_dim}")


class SwinUNETRPretraining(nn.Module):
    """Rotation + contrastive + reconstruction on two rotated, corrupted copies of each crop.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`SwinUNETRConfig`).
        in_channels: Image channels (also the channels the reconstruction head predicts).
    """

    name: ClassVar[str] = "swinunetr"
    num_views: ClassVar[int] = 1
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = STUDENT_ONLY
    info: ClassVar[MethodInfo] = MethodInfo(
        family="multi-objective",
        views="1 crop -> 2 axial rotations, each corrupted by aug_rand",
        heads="x4 token 0 -> Linear(16E, 4); token 1 -> Linear(16E, 512); x4 -> ConvUpHead",
        losses="1.0 loss_rot (rotation CE) + 1.0 loss_contrast (NT-Xent, t = 0.5) + 1.0 loss_rec (L1 reconstruction)",
    )

    def __init__(self, preset: SwinPreset, config: SwinUNETRConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else SwinUNETRConfig()
        self.encoder = student_encoder(preset, self.config.drop_path_rate, in_channels)
        self.preset = self.encoder.preset
        width = self.preset.feature_dims[4]
        self.rotation_head = linear_head(width, NUM_ROTATIONS)
        self.contrastive_head = linear_head(width, self.config.projection_dim)
        self.pixel_head = ConvUpHead(width, in_channels)
        logger.debug("SwinUNETR pretraining built: %s, %s", self.preset, self.config)

    @staticmethod
    def make_views(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(x~1 ; x~2)`` inputs, ``(x1 ; x2)`` clean rotated targets and ``(k1 ; k2)`` labels, each ``2B`` rows."""
        x1, k1 = random_axial_rotation(x, generator)
        x2, k2 = random_axial_rotation(x, generator)
        inputs = torch.cat([aug_rand(x1, generator).images, aug_rand(x2, generator).images])
        return inputs, torch.cat([x1, x2]), torch.cat([k1, k2])

    def predict(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(N, C, D, H, W)`` -> rotation logits ``(N, 4)``, projections ``(N, 512)``, reconstruction."""
        x4 = self.encoder(inputs)[4]
        tokens = self.config.readout == "tokens"
        rotation = self.rotation_head(x4_vector(x4, "token0" if tokens else "pool"))
        projection = self.contrastive_head(x4_vector(x4, "token1" if tokens else "pool"))
        return rotation, projection, self.pixel_head(x4)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Two rotated, corrupted copies per crop through the student; three weighted losses.

        Args:
            batch: ``{"views": (B, 1, C, D, H, W)}`` in [0, 1].
            context: Training progress (generator for rotations and cutouts; collectives for negatives).

        Returns:
            ``loss`` (with graph), detached ``loss_rot``, ``loss_contrast``, ``loss_rec`` (unweighted)
            and ``rotation_accuracy``.
        """
        cfg = self.config
        x = checked_views(batch, self.num_views, cfg.crop_size)
        inputs, targets, labels = self.make_views(x, context.generator)
        rotation, projection, reconstruction = self.predict(inputs)
        b = x.shape[0]
        loss_rot = rotation_loss(rotation, labels)
        loss_contrast = nt_xent_loss(projection[:b], projection[b:], cfg.temperature, context.collectives)
        loss_rec = reconstruction_loss(reconstruction, targets, cfg.pixel_loss)
        loss = cfg.weight_rot * loss_rot + cfg.weight_contrast * loss_contrast + cfg.weight_rec * loss_rec
        return {
            "loss": loss,
            "loss_rot": loss_rot.detach(),
            "loss_contrast": loss_contrast.detach(),
            "loss_rec": loss_rec.detach(),
            "rotation_accuracy": (rotation.detach().argmax(dim=1) == labels).float().mean(),
        }

    def student_modules(self) -> nn.Module:
        """Encoder and the three heads: everything the optimiser updates."""
        return nn.ModuleDict({
            "encoder": self.encoder, "rotation_head": self.rotation_head,
            "contrastive_head": self.contrastive_head, "pixel_head": self.pixel_head,
        })

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights (``"default"`` = ``"student"``; there is no teacher or mask token)."""
        return student_encoder_state(self.encoder, source, self.name)
