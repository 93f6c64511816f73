"""SwinUNETR-style convolutional decoder with deep-supervision heads.

Residual blocks are dynamic-network-architectures' :class:`BasicBlockD` (conv, norm, LeakyReLU,
conv, norm, residual, LeakyReLU), the same blocks nnU-Net's residual U-Nets use. Heads live in
``seg_layers`` so nnU-Net's ``-pretrained_weights`` loader skips them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class FastInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same parameters and state-dict keys) with a faster CPU path.

    On CPU, affine instance norm without running statistics runs as group norm with one channel
    per group (the same normalisation, equal to 1e-6 relative): PyTorch's CPU instance norm goes
    through batch norm on a reshaped view, whose in-place LeakyReLU then needs a copy in backward;
    group norm is about 2x faster forward+backward. Inputs are made contiguous first because the
    channels-last CPU group-norm backward is inaccurate for inputs with a large mean.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 5 or self.track_running_stats or not self.affine:
            return super().forward(x)
        return F.group_norm(x.contiguous(), x.shape[1], self.weight, self.bias, self.eps)


def residual_block(in_channels: int, out_channels: int) -> BasicBlockD:
    """3x3x3 residual conv block with instance norm and LeakyReLU (nnU-Net's defaults)."""
    return BasicBlockD(
        nn.Conv3d,
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        conv_bias=False,
        norm_op=FastInstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 0.01, "inplace": True},
    )


class UpBlock(nn.Module):
    """Transposed-conv up-sampling, concatenation with the skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.transp_conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
        self.block = residual_block(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat((self.transp_conv(x), skip), dim=1))


class SwinUNETRDecoder(nn.Module):
    """Decoder of SwinUNETR with a segmentation head at each decoder scale.

    Args:
        in_channels: Image channels (the first skip block sees the raw image).
        feature_dims: Channels of the encoder's five outputs, ``(E, 2E, 4E, 8E, 16E)``.
        num_classes: Segmentation outputs.
        deep_supervision: Return logits at every decoder scale (highest resolution first).
        gradient_checkpointing: Recompute the two full/half resolution blocks in backward; they hold
            most of the activation memory.
    """

    def __init__(
        self,
        in_channels: int,
        feature_dims: tuple[int, int, int, int, int],
        num_classes: int,
        deep_supervision: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        e = feature_dims
        self.deep_supervision = deep_supervision
        self.gradient_checkpointing = gradient_checkpointing
        # bridges from the image and the first three encoder scales into the decoder
        self.skip_blocks = nn.ModuleList(
            [residual_block(in_channels, e[0]), residual_block(e[0], e[0]), residual_block(e[1], e[1]),
             residual_block(e[2], e[2])]
        )
        self.bottleneck = residual_block(e[4], e[4])
        # up blocks from the bottleneck (stride 32) to full resolution
        self.up_blocks = nn.ModuleList(
            [UpBlock(e[4], e[3]), UpBlock(e[3], e[2]), UpBlock(e[2], e[1]), UpBlock(e[1], e[0]), UpBlock(e[0], e[0])]
        )
        # heads, highest resolution first: strides 1, 2, 4, 8, 16
        head_channels = (e[0], e[0], e[1], e[2], e[3])
        self.seg_layers = nn.ModuleList(nn.Conv3d(c, num_classes, kernel_size=1) for c in head_channels)

    @property
    def num_scales(self) -> int:
        """Number of deep-supervision outputs."""
        return len(self.seg_layers)

    def _run(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, image: Tensor, features: list[Tensor]) -> Tensor | list[Tensor]:
        """Decode encoder features.

        Args:
            image: The network input ``(B, C, D, H, W)``.
            features: The encoder's five feature maps.

        Returns:
            Logits ``(B, K, D, H, W)``, or with deep supervision a list of logits at strides
            1, 2, 4, 8, 16 (highest resolution first, as nnU-Net's loss expects).
        """
        skip_full = self._run(self.skip_blocks[0], image)
        skip_2 = self._run(self.skip_blocks[1], features[0])
        skip_4 = self.skip_blocks[2](features[1])
        skip_8 = self.skip_blocks[3](features[2])
        x16 = self.up_blocks[0](self.bottleneck(features[4]), features[3])
        x8 = self.up_blocks[1](x16, skip_8)
        x4 = self.up_blocks[2](x8, skip_4)
        x2 = self._run(self.up_blocks[3], x4, skip_2)
        x1 = self._run(self.up_blocks[4], x2, skip_full)
        if not self.deep_supervision:
            return self.seg_layers[0](x1)
        return [head(x) for head, x in zip(self.seg_layers, (x1, x2, x4, x8, x16), strict=True)]
