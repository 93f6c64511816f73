"""Rotation ([P] item 5; [TANG] utils/ops.py ``rot_rand``; SSL_METHODS.md card 5).

Each crop is rotated by ``k * 90`` degrees in the axial plane (the two 1.5 mm axes, dims H and W
of the cached arrays; never the 2 mm slice axis), ``k`` uniform in {0, 1, 2, 3}; the encoder ->
``pool4`` -> ``Linear(16E, 4)`` predicts ``k`` with cross-entropy. No teacher.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.pretraining.heads import READOUTS, linear_head, x4_vector
from nnunet_ssl.pretraining.losses import rotation_loss
from nnunet_ssl.pretraining.methods.base import STUDENT_ONLY, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import (
    checked_views,
    student_encoder,
    student_encoder_state,
    validate_choice,
    validate_student_settings,
)
from nnunet_ssl.pretraining.views import NUM_ROTATIONS, random_axial_rotation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationConfig:
    """Rotation settings (SSL_METHODS.md card 5).

    Attributes:
        readout: ``"pool"`` (pool4, the card's "linear probing layer") or ``"token0"`` ([TANG]).
        crop_size: Cubic crop edge the loader delivers (a multiple of 32).
        drop_path_rate: Stochastic depth of the encoder (SSL_METHODS.md §0: 0.1); None keeps the preset's.
    """

    readout: str = "pool"
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_student_settings(self.crop_size, self.drop_path_rate)
        validate_choice("readout", self.readout, READOUTS)


class Rotation(nn.Module):
    """Predict the axial 90-degree rotation of each crop.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`RotationConfig`).
        in_channels: Image channels.
    """

    name: ClassVar[str] = "rotation"
    num_views: ClassVar[int] = 1
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = STUDENT_ONLY
    info: ClassVar[MethodInfo] = MethodInfo(
        family="pretext classification",
        views="1 crop rotated k * 90 deg in the axial plane, k uniform in 0..3",
        heads="pool4 -> Linear(16E, 4)",
        losses="1.0 loss_rot (cross-entropy on k)",
    )

    def __init__(self, preset: SwinPreset, config: RotationConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else RotationConfig()
        self.encoder = student_encoder(preset, self.config.drop_path_rate, in_channels)
        self.preset = self.encoder.preset
        self.classifier = linear_head(self.preset.feature_dims[4], NUM_ROTATIONS)
        logger.debug("Rotation built: %s, %s", self.preset, self.config)

    def logits(self, x: Tensor) -> Tensor:
        """``(N, C, D, H, W)`` crops -> ``(N, 4)`` rotation logits."""
        return self.classifier(x4_vector(self.encoder(x)[4], self.config.readout))

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Rotate each crop by a random ``k`` (from ``context.generator``) and classify ``k``.

        Args:
            batch: ``{"views": (B, 1, C, D, H, W)}`` in [0, 1].
            context: Training progress (its generator draws the rotations).

        Returns:
            ``loss`` (with graph), detached ``loss_rot`` and ``rotation_accuracy``.
        """
        x = checked_views(batch, self.num_views, self.config.crop_size)
        rotated, labels = random_axial_rotation(x, context.generator)
        logits = self.logits(rotated)
        loss = rotation_loss(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "loss_rot": loss.detach(), "rotation_accuracy": accuracy}

    def student_modules(self) -> nn.Module:
        """Encoder and classifier: everything the optimiser updates."""
        return nn.ModuleDict({"encoder": self.encoder, "classifier": self.classifier})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights (``"default"`` = ``"student"``; there is no teacher or mask token)."""
        return student_encoder_state(self.encoder, source, self.name)
