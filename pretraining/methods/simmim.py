"""SimMIM ([P] item 1; [SimMIM]): reconstruct masked 16^3 units from the stride-32 tokens.

One crop per volume is masked (ratio 0.75, 16^3 units), encoded with the mask token, and x4
(the stride-32 output) goes through :class:`LinearPixelHead`; the loss covers masked voxels only.
There is no teacher, so SimMIM defines neither optional hook (``before_optimizer_step``,
``after_step``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from nnunet_ssl.networks.presets import ENCODER_STRIDE, SwinPreset
from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.pretraining.heads import LinearPixelHead
from nnunet_ssl.pretraining.losses import masked_pixel_loss
from nnunet_ssl.pretraining.masking import random_unit_masks, spatial_size
from nnunet_ssl.pretraining.methods.base import STUDENT_ONLY, MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import checked_views, validate_masked_image_settings, with_drop_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimMIMConfig:
    """SimMIM settings (SSL_METHODS.md card 1).

    Attributes:
        mask_ratio: Fraction of 16^3 units masked per crop ([P]: 0.75).
        unit: Mask unit edge in voxels.
        pixel_loss: ``"l2"`` ([P]'s formula) or ``"l1"`` ([SimMIM] and [SMIT] code).
        crop_size: Cubic crop edge the loader delivers (a multiple of 32 and of ``unit``).
        drop_path_rate: Stochastic depth of the encoder (SSL_METHODS.md §0: 0.1); None keeps the preset's.
    """

    mask_ratio: float = 0.75
    unit: int = 16
    pixel_loss: str = "l2"
    crop_size: int = 96
    drop_path_rate: float | None = 0.1

    def __post_init__(self) -> None:
        validate_masked_image_settings(self.pixel_loss, self.mask_ratio, self.crop_size, self.unit, self.drop_path_rate)


class SimMIM(nn.Module):
    """Masked image modelling with a linear pixel head on x4.

    Args:
        preset: Encoder shape.
        config: Method settings (defaults: :class:`SimMIMConfig`).
        in_channels: Image channels (also the channels the head predicts).
    """

    name: ClassVar[str] = "simmim"
    num_views: ClassVar[int] = 1
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = STUDENT_ONLY
    info: ClassVar[MethodInfo] = MethodInfo(
        family="masked image modelling",
        views="1 crop, masked 0.75 (16^3 units)",
        heads="x4 -> LinearPixelHead",
        losses="1.0 loss_mip (L2, masked voxels)",
    )

    def __init__(self, preset: SwinPreset, config: SimMIMConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else SimMIMConfig()
        preset = with_drop_path(preset, self.config.drop_path_rate)
        self.preset = preset
        self.encoder = SwinEncoder(preset, in_channels, use_mask_token=True)
        self.pixel_head = LinearPixelHead(preset.feature_dims[4], ENCODER_STRIDE, in_channels)
        logger.debug("SimMIM built: %s, %s", preset, self.config)

    def _images(self, batch: dict[str, Tensor]) -> Tensor:
        """``batch["views"] (B, 1, C, D, H, W)`` -> ``(B, C, D, H, W)`` after shape checks."""
        return checked_views(batch, self.num_views, self.config.crop_size)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Mask, encode, reconstruct, and score masked voxels.

        Masks come from ``context.generator`` (keyed by seed, rank and step).

        Args:
            batch: ``{"views": (B, 1, C, D, H, W)}`` in [0, 1].
            context: Training progress (unused: SimMIM has no schedules of its own).

        Returns:
            ``{"loss", "loss_mip"}`` scalars; ``"loss"`` carries the graph.
        """
        x = self._images(batch)
        masks = random_unit_masks(
            x.shape[0], spatial_size(x), self.config.unit, self.preset.patch_size, self.config.mask_ratio,
            generator=context.generator, device=x.device,
        )
        features = self.encoder(x, masks.token)
        reconstruction = self.pixel_head(features[4])
        loss = masked_pixel_loss(reconstruction, x, masks.voxel, self.config.pixel_loss)
        return {"loss": loss, "loss_mip": loss.detach()}

    def student_modules(self) -> nn.Module:
        """Encoder (with mask token) and pixel head: everything the optimiser updates."""
        return nn.ModuleDict({"encoder": self.encoder, "pixel_head": self.pixel_head})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights without ``mask_token``; ``"default"`` and ``"student"`` are the same.

        Raises:
            ValueError: For ``"teacher"`` (SimMIM has none) or an unknown source.
        """
        if source not in ("default", "student"):
            raise ValueError(f"SimMIM has no {source!r} encoder; choose 'default' or 'student'")
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items() if k != "mask_token"}
