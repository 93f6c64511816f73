"""Spark3D ([S3D]; SSL_METHODS.md card 10): sparse masked image modelling on nnU-Net's ResEnc U-Net.

One crop per volume (160^3, per-image z-scores from the data pipeline) is masked in 32^3 blocks
drawn on the bottleneck grid (ratio 0.75; S3D-B: U[0.6, 0.9] per batch). The encoder of DNA's
``ResidualEncoderUNet`` runs sparsely (:mod:`nnunet_ssl.pretraining.sparse_resenc`: masks re-applied
after every conv, instance norm over visible voxels only); mask tokens fill the masked positions of
every skip and a 3^3 densify conv runs at every resolution but the highest; DNA's own decoder runs
densely and its last seg layer (one output per image channel) is the reconstruction. The loss is the
mean squared error over the masked voxels (all channels), with no per-patch target normalisation.

The network is DNA's class itself, so its state dict (``network.*``) is what nnU-Net builds; the
mask tokens and densify convs (``sparse.*``) are pretraining-only and never exported. There is no
teacher, so Spark3D defines neither optional hook.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.resenc import ResEncPreset, build_resenc_unet
from nnunet_ssl.pretraining.losses import masked_pixel_loss
from nnunet_ssl.pretraining.masking import BlockMasks, bottleneck_block_masks, masked_unit_count, uniform_mask_ratio
from nnunet_ssl.pretraining.methods.base import MethodInfo, StepContext
from nnunet_ssl.pretraining.methods.common import checked_views
from nnunet_ssl.pretraining.sparse_resenc import MaskTokenDensify, sparse_reconstruction

logger = logging.getLogger(__name__)

#: Mask block edges Spark3D allows: 32 (the bottleneck grid at total stride 32, [S3D]) and 16 ([S3D-code]).
BLOCK_SIZES = (16, 32)
#: The mask grid [S3D] draws on: the bottleneck of a network with total stride 32.
BOTTLENECK_STRIDE = 32


@dataclass(frozen=True)
class Spark3DConfig:
    """Spark3D settings (SSL_METHODS.md card 10).

    Attributes:
        mask_ratio: Fraction of blocks masked per crop when ``mask_ratio_range`` is None ([S3D] base: 0.75).
        mask_ratio_range: None, or ``(low, high)``: one ratio per batch drawn from U[low, high]
            (S3D-B: ``(0.6, 0.9)``).
        block: Mask block edge in voxels: 32 (the paper: the 5^3 bottleneck grid at 160^3) or 16
            ([S3D-code]'s 10^3 grid).
        mask_input: True: the input is masked before the first conv (the paper). False: the input
            stays unmasked and only the first conv's output is masked ([S3D-code]; masked voxels leak
            one voxel into the visible borders).
        crop_size: Cubic crop edge the loader delivers; a multiple of 32 and of ``block``.
    """

    mask_ratio: float = 0.75
    mask_ratio_range: tuple[float, float] | None = None
    block: int = 32
    mask_input: bool = True
    crop_size: int = 160

    def __post_init__(self) -> None:
        if self.block not in BLOCK_SIZES:
            raise ValueError(f"block must be one of {BLOCK_SIZES}, got {self.block}")
        if self.crop_size <= 0 or self.crop_size % BOTTLENECK_STRIDE or self.crop_size % self.block:
            raise ValueError(
                f"crop_size must be a positive multiple of {BOTTLENECK_STRIDE} and of block {self.block}, got {self.crop_size}"
            )
        if not isinstance(self.mask_input, bool):
            raise ValueError(f"mask_input must be True or False, got {self.mask_input!r}")
        n_blocks = self.n_blocks
        bounds: tuple[float, ...] = (self.mask_ratio,)
        if self.mask_ratio_range is not None:
            if len(self.mask_ratio_range) != 2 or not 0.0 < self.mask_ratio_range[0] <= self.mask_ratio_range[1] < 1.0:
                raise ValueError(f"mask_ratio_range must be (low, high) with 0 < low <= high < 1, got {self.mask_ratio_range}")
            object.__setattr__(self, "mask_ratio_range", tuple(float(r) for r in self.mask_ratio_range))  # YAML gives a list
            bounds += self.mask_ratio_range
        for ratio in bounds:
            if not 0.0 < ratio < 1.0:
                raise ValueError(f"mask ratios must lie in (0, 1), got {ratio}")
            if masked_unit_count(n_blocks, ratio) >= n_blocks:
                raise ValueError(
                    f"a mask ratio of {ratio} masks all {n_blocks} blocks of {self.block}^3 in a {self.crop_size}^3 crop; "
                    "lower it, or use a larger crop or block 16"
                )

    @property
    def n_blocks(self) -> int:
        """Mask blocks per crop: ``(crop_size / block)^3``."""
        return (self.crop_size // self.block) ** 3


class Spark3D(nn.Module):
    """Sparse masked image modelling with DNA's ResidualEncoderUNet and its full decoder.

    Args:
        preset: ResEnc topology (``resenc_l`` for the paper); its total stride must divide ``crop_size``.
        config: Method settings (defaults: :class:`Spark3DConfig`).
        in_channels: Image channels (also the reconstruction's channels).
    """

    name: ClassVar[str] = "spark3d"
    num_views: ClassVar[int] = 1
    family: ClassVar[str] = "resenc"
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = (("student", "network.encoder"),)
    decoder_modules: ClassVar[tuple[tuple[str, str], ...]] = (("student", "network.decoder"),)
    engine_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({
        "optimizer": "sgd", "momentum": 0.99, "nesterov": True, "base_lr": 1e-2, "lr_reference_batch": 6,
        "weight_decay": 3e-5, "schedule": "poly", "warmup_epochs": 0.0, "batch_size": 6, "grad_clip": 12.0,
    })
    data_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({
        "spacing": (1.0, 1.0, 1.0), "intensity": "zscore", "crop_size": 160, "augmentation": "scale_rotate_mirror",
    })
    info: ClassVar[MethodInfo] = MethodInfo(
        family="masked image modelling (sparse CNN)",
        views="1 crop, 32^3 blocks masked 0.75 (S3D-B: U[0.6, 0.9] per batch)",
        heads="sparse ResEnc encoder -> mask tokens + 3^3 densify -> U-Net decoder",
        losses="1.0 loss_masked_l2 (L2, masked voxels)",
    )

    def __init__(self, preset: ResEncPreset, config: Spark3DConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.config = config if config is not None else Spark3DConfig()
        if not isinstance(preset, ResEncPreset):
            raise ValueError(f"Spark3D pretrains a ResEnc U-Net: give a ResEncPreset (e.g. resenc_l), got {preset!r}")
        if self.config.crop_size % preset.total_stride:
            raise ValueError(
                f"crop_size {self.config.crop_size} is not a multiple of preset {preset.name!r}'s total stride {preset.total_stride}"
            )
        self.preset = preset
        self.in_channels = in_channels
        self.network = build_resenc_unet(preset, in_channels, num_classes=in_channels, deep_supervision=False)
        self.sparse = MaskTokenDensify(self.network.encoder.output_channels, kernel_size=3)
        logger.debug("Spark3D built: %s, %s", preset, self.config)

    def _images(self, batch: dict[str, Tensor]) -> Tensor:
        """``batch["views"] (B, 1, C, D, H, W)`` -> ``(B, C, D, H, W)`` after shape checks."""
        x = checked_views(batch, self.num_views, self.config.crop_size)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Spark3D was built for {self.in_channels} image channel(s), the batch has {x.shape[1]}")
        return x

    def draw_masks(self, batch_size: int, generator: torch.Generator, device: torch.device) -> tuple[float, BlockMasks]:
        """This step's mask ratio and block masks, from ``generator`` (the step's, keyed by seed, rank and step).

        With ``mask_ratio_range`` one ratio is drawn for the whole batch first, then the blocks.
        """
        config = self.config
        if config.mask_ratio_range is None:
            ratio = config.mask_ratio
        else:
            ratio = uniform_mask_ratio(*config.mask_ratio_range, generator=generator)
        crop = (config.crop_size,) * 3
        return ratio, bottleneck_block_masks(batch_size, crop, config.block, ratio, generator=generator, device=device)

    def reconstruct(self, x: Tensor, visible: Tensor) -> Tensor:
        """Sparse encoder, mask tokens and densify, dense decoder: ``(B, C, D, H, W)`` -> same shape.

        Args:
            x: ``(B, C, D, H, W)`` images.
            visible: ``(B, 1, D, H, W)`` bool, True = visible.
        """
        return sparse_reconstruction(self.network, self.sparse, x, visible, mask_input=self.config.mask_input)

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Mask, reconstruct, and score the masked voxels.

        Args:
            batch: ``{"views": (B, 1, C, D, H, W)}``, per-image z-scores.
            context: Training progress; masks (and the S3D-B ratio) come from ``context.generator``.

        Returns:
            ``{"loss", "loss_masked_l2", "mask_ratio"}`` scalars; ``"loss"`` carries the graph;
            ``"mask_ratio"`` is the fraction of blocks masked in this step (``ceil(r * n) / n``).
        """
        x = self._images(batch)
        _, masks = self.draw_masks(x.shape[0], context.generator, x.device)
        reconstruction = self.reconstruct(x, ~masks.voxel)
        loss = masked_pixel_loss(reconstruction, x, masks.voxel, "l2")
        masked_fraction = masks.grid.flatten(1).float().mean()
        return {"loss": loss, "loss_masked_l2": loss.detach(), "mask_ratio": masked_fraction.to(loss.device)}

    def student_modules(self) -> nn.Module:
        """The network (encoder and decoder), mask tokens and densify convs: everything the optimiser updates."""
        return nn.ModuleDict({"network": self.network, "sparse": self.sparse})

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """The encoder's weights (``stem.*``, ``stages.*``); ``"default"`` and ``"student"`` are the same.

        Raises:
            ValueError: For ``"teacher"`` (Spark3D has none) or an unknown source.
        """
        if source not in ("default", "student"):
            raise ValueError(f"Spark3D has no {source!r} encoder; choose 'default' or 'student'")
        return {k: v.detach().clone() for k, v in self.network.encoder.state_dict().items()}

