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


class ConvUpHead(nn.Module):
    """[TANG] ``SSLHead`` reconstruction head (``upsample="vae"``; SSL_METHODS.md §1).

    Five times ``Conv3d(3^3) -> InstanceNorm3d -> LeakyReLU -> 2x trilinear upsampling``, then a
    1x1x1 conv to the image channels; widths halve from ``in_dim`` as in [TANG] (``dim // 2``,
    ``// 4``, ``// 8``, ``// 16``, ``// 16``: 384, 192, 96, 48, 48 on x4 at embed 48). It sees x4
    only (no skip connections), upsampling stride 32 back to the crop size. InstanceNorm needs
    more than one voxel per channel, so x4 must be at least 2 voxels along some axis (crops >= 64).

    The forward pass applies the final 1x1x1 conv *before* the last upsampling: both are linear, the
    conv mixes channels at each voxel and trilinear upsampling mixes voxels within each channel with
    weights that sum to 1, so they commute (bias included) and the output is [TANG]'s up to float
    rounding. Upsampling ``out_channels`` maps instead of ``in_dim // 16`` spares the largest tensors of
    the step (e.g. 48 x 96^3 floats per crop and their gradients; docs/benchmarks.md). The module
    layout, and so the state dict, is [TANG]'s.

    Args:
        in_dim: Channels of x4 (``16 E``); a multiple of 16.
        out_channels: Image channels to predict.
    """

    def __init__(self, in_dim: int, out_channels: int = 1) -> None:
        super().__init__()
        if in_dim < 16 or in_dim % 16 or out_channels < 1:
            raise ValueError(f"in_dim must be a positive multiple of 16 and out_channels >= 1: {in_dim}, {out_channels}")
        widths = [in_dim // 2, in_dim // 4, in_dim // 8, in_dim // 16, in_dim // 16]
        layers: list[nn.Module] = []
        previous = in_dim
        for width in widths:
            layers += [
                nn.Conv3d(previous, width, kernel_size=3, padding=1),
                nn.InstanceNorm3d(width),
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
            previous = width
        layers.append(nn.Conv3d(previous, out_channels, kernel_size=1))
        self.layers = nn.Sequential(*layers)
        self.widths = tuple(widths)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim, d, h, w)`` -> ``(B, out_channels, 32 d, 32 h, 32 w)``."""
        *blocks, last_upsampling, to_image = self.layers
        for block in blocks:
            x = block(x)
        return last_upsampling(to_image(x))


#: How a vector per crop is read from x4: the token mean, or one token as [TANG] does.
READOUTS = ("pool", "token0", "token1")


def x4_vector(x4: Tensor, readout: str = "pool") -> Tensor:
    """One feature vector per crop from x4 ``(B, C, d, h, w)`` -> ``(B, C)``.

    ``"pool"`` is ``pool4`` (the token mean, SSL_METHODS.md §1); ``"token0"`` / ``"token1"`` are
    the first and second tokens of the flattened ``(d, h, w)`` grid, which [TANG] ``SSLHead``
    feeds to its rotation and contrastive heads (a corner of the grid).
    """
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
    if x4.ndim != 5:
        raise ValueError(f"expected x4 (B, C, d, h, w), got shape {tuple(x4.shape)}")
    tokens = x4.flatten(2)
    if readout == "pool":
        return tokens.mean(dim=2)
    index = int(readout[-1])
    if tokens.shape[2] <= index:
        raise ValueError(f"x4 has {tokens.shape[2]} token(s); readout {readout!r} needs more (larger crops)")
    return tokens[:, :, index]


def linear_head(in_dim: int, out_dim: int) -> nn.Linear:
    """``Linear(in_dim, out_dim)`` with trunc-normal (std 0.02) weights and zero bias.

    The encoder's own ``Linear`` init; small logits make the rotation loss start at ``ln 4`` and
    NT-Xent near ``ln(2B - 1)`` (PyTorch's default init gives larger logits).
    """
    if min(in_dim, out_dim) < 1:
        raise ValueError(f"head sizes must be positive: {in_dim}, {out_dim}")
    layer = nn.Linear(in_dim, out_dim)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer
