"""Projection and pixel heads shared by the pretraining methods."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """[DINO]/[iBOT] projection head with a weight-normalised last layer (SSL_METHODS.md §1).

    ``Linear(in, hidden) -> GELU -> Linear(hidden, hidden) -> GELU -> Linear(hidden, bottleneck)
    -> L2-normalise -> Linear(bottleneck, out, bias=False)`` whose weight rows are normalised to
    unit length in every forward pass. This is weight normalisation with the gain fixed at 1 and
    frozen ([DINO] ``norm_last_layer=True``), written out explicitly so there is no frozen gain
    parameter to carry around. MLP weights are trunc-normal (std 0.02) with zero biases, no
    BatchNorm; the last layer keeps PyTorch's default init as in [DINO]/[iBOT] (its scale is
    normalised away).

    Args:
        in_dim: Input feature width.
        out_dim: Number of prototypes ``K``.
        hidden: Width of the two hidden layers.
        bottleneck: Width before the L2 normalisation.

    Attributes:
        last_layer: The weight-normalised ``Linear`` (zero its grads in epoch 0: freeze_last_layer).
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden: int = 2048, bottleneck: int = 256) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden, bottleneck) < 1:
            raise ValueError(
                f"head sizes must be positive: in {in_dim}, out {out_dim}, hidden {hidden}, bottleneck {bottleneck}"
            )
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.Linear(bottleneck, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Project features to prototype logits.

        Args:
            x: ``(..., in_dim)``, e.g. ``(N, in_dim)`` or ``(B, T, in_dim)``.

        Returns:
            Logits ``(..., out_dim)``.
        """
        z = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(z, F.normalize(self.last_layer.weight, dim=1, p=2))


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """3D pixel shuffle: ``(B, C * r^3, D, H, W)`` -> ``(B, C, D * r, H * r, W * r)``.

    The 3D analogue of :func:`torch.nn.functional.pixel_shuffle`: input channel
    ``c * r^3 + i * r^2 + j * r + k`` lands at output ``(c, d * r + i, h * r + j, w * r + k)``.

    Args:
        x: ``(B, C * r^3, D, H, W)``.
        factor: Upscaling factor ``r`` >= 1.

    Returns:
        ``(B, C, D * r, H * r, W * r)`` (a new tensor).
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    b, channels, d, h, w = x.shape
    cube = factor**3
    if channels % cube:
        raise ValueError(f"channels {channels} are not divisible by factor^3 = {cube}")
    c = channels // cube
    out = x.reshape(b, c, factor, factor, factor, d, h, w)
    out = out.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return out.reshape(b, c, d * factor, h * factor, w * factor)


class LinearPixelHead(nn.Module):
    """[SMIT] ``decoder1`` / 3D [SimMIM] decoder: a 1x1x1 conv to ``stride^3 * C`` and a pixel shuffle.

    On x4 (``16E`` channels at stride 32) it predicts every voxel of the crop from its own
    stride-32 token alone, with no skip connection (≈25 M parameters at E = 48).

    Args:
        in_dim: Channels of the input feature map.
        stride: Stride of the feature map relative to the image (the shuffle factor).
        out_channels: Image channels to predict.
    """

    def __init__(self, in_dim: int, stride: int = 32, out_channels: int = 1) -> None:
        super().__init__()
        if min(in_dim, stride, out_channels) < 1:
            raise ValueError(
                f"in_dim, stride and out_channels must be positive: {in_dim}, {stride}, {out_channels}"
            )
        self.stride = stride
        self.out_channels = out_channels
        self.proj = nn.Conv3d(in_dim, stride**3 * out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim, d, h, w)`` -> ``(B, out_channels, d * stride, h * stride, w * stride)``."""
        return pixel_shuffle_3d(self.proj(x), self.stride)
