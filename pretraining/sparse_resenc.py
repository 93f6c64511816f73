"""Sparse forward of DNA's ResidualEncoderUNet for Spark3D (SSL_METHODS.md card 10; SparK adapted to 3D).

The network stays DNA's :class:`~dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`
(its state dict is the one nnU-Net builds); nothing here subclasses or replaces its modules.
:func:`sparse_encoder_forward` walks the encoder's own modules (stem, residual stages, skips) and
uses their own parameters, with three changes that make a masked input behave like a sparse one:

- after every convolution (and the residual skips' average pool) the visible mask, nearest-
  downsampled to that resolution, is applied again, so masked positions stay exactly 0 and masked
  regions are not eroded from their borders layer by layer;
- instance norm uses only the visible voxels of each sample (samples may have different visible
  counts), with the module's ``eps`` and affine parameters, and leaves masked positions at 0;
- the non-linearities (ReLU, LeakyReLU) map 0 to 0, so they need no mask.

With every voxel visible this is the dense encoder (``tests/pretraining/test_sparse_resenc.py``).
The pretraining-only parts sit in :class:`MaskTokenDensify`: one learnable mask token per stage
width fills the masked positions of each skip, then a 3^3 "densify" convolution runs at every
resolution except the highest; DNA's decoder then runs densely on the filled skips
(:func:`sparse_reconstruction`).

Masks here are *visible* masks, ``True`` where the voxel is seen (SparK's "active" map); the mask
generators of :mod:`nnunet_ssl.pretraining.masking` return ``True`` where masked.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

#: ``observe(name, tensor)`` is called with the output of every sparse layer (see :func:`sparse_encoder_forward`).
Observer = Callable[[str, Tensor], None]


def downsample_visible(visible: Tensor, spatial: Sequence[int]) -> Tensor:
    """Nearest-downsample a ``(B, 1, D, H, W)`` mask to ``spatial`` ``(d, h, w)``.

    Every axis must shrink by an integer factor ``f``; voxel ``i`` of the result is voxel ``i * f`` of
    the input, which is what ``F.interpolate(mode="nearest")`` picks for integer factors.

    Raises:
        ValueError: A target size that does not divide the mask's size.
    """
    if visible.ndim != 5 or len(spatial) != 3:
        raise ValueError(f"expected a (B, 1, D, H, W) mask and a 3-axis size, got {tuple(visible.shape)} and {tuple(spatial)}")
    full = visible.shape[2:]
    if any(n < 1 or size % n for size, n in zip(full, spatial, strict=True)):
        raise ValueError(f"cannot nearest-downsample a mask of {tuple(full)} to {tuple(spatial)}: not an integer factor")
    factors = [size // n for size, n in zip(full, spatial, strict=True)]
    if factors == [1, 1, 1]:
        return visible
    return visible[:, :, :: factors[0], :: factors[1], :: factors[2]]


class VisibleMasks:
    """The visible mask of one batch at every resolution the encoder reaches, made once per resolution.

    Args:
        visible: ``(B, 1, D, H, W)`` bool, True = visible, at the input resolution.
    """

    def __init__(self, visible: Tensor) -> None:
        if visible.ndim != 5 or visible.shape[1] != 1 or visible.dtype != torch.bool:
            raise ValueError(f"visible must be a (B, 1, D, H, W) bool mask, got {tuple(visible.shape)} {visible.dtype}")
        self.visible = visible
        self._masks: dict[tuple[tuple[int, ...], torch.dtype], Tensor] = {}
        self._counts: dict[tuple[int, ...], Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        """The mask at ``x``'s resolution as ``(B, 1, d, h, w)`` 0/1 in ``x``'s dtype (for multiplying)."""
        key = (tuple(x.shape[2:]), x.dtype)
        mask = self._masks.get(key)
        if mask is None:
            mask = downsample_visible(self.visible, x.shape[2:]).to(x.dtype)
            self._masks[key] = mask
        return mask

    def count(self, x: Tensor) -> Tensor:
        """Visible voxels per sample at ``x``'s resolution, ``(B, 1)`` float32, at least 1."""
        key = tuple(x.shape[2:])
        count = self._counts.get(key)
        if count is None:
            mask = downsample_visible(self.visible, x.shape[2:])
            count = mask.flatten(1).sum(1, keepdim=True).clamp(min=1).float()
            self._counts[key] = count
        return count


def sparse_instance_norm(x: Tensor, visible: Tensor, norm: nn.InstanceNorm3d) -> Tensor:
    """Instance norm over the visible voxels of each sample; masked positions come out 0.

    Per sample and channel, the mean and the biased variance are taken over the visible voxels only
    (as ``nn.InstanceNorm3d`` on those voxels alone), then ``norm``'s ``eps``, ``weight`` and ``bias``
    apply. Values at masked positions of ``x`` are ignored. Half-precision input is normalised in
    float32 (as autocast runs instance norm) and the result is float32; float64 stays float64.

    Args:
        x: ``(B, C, D, H, W)`` features.
        visible: ``(B, 1, D, H, W)`` bool at ``x``'s resolution, True = visible.
        norm: The network's ``InstanceNorm3d`` (its parameters are used; it is not called).

    Returns:
        ``(B, C, D, H, W)`` (float32 or float64), exactly 0 at masked positions.
    """
    if visible.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask {tuple(visible.shape)} does not match the features {tuple(x.shape)}")
    masks = VisibleMasks(visible)
    return _masked_instance_norm(x * masks.like(x), masks, norm)


def _masked_instance_norm(x: Tensor, masks: VisibleMasks, norm: nn.InstanceNorm3d) -> Tensor:
    """:func:`sparse_instance_norm` for ``x`` that is already 0 at every masked position."""
    if norm.track_running_stats:
        raise ValueError("sparse instance norm supports InstanceNorm3d without running statistics (nnU-Net's setting)")
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    vis = masks.like(xf)
    count = masks.count(xf)
    dims = (2, 3, 4)
    mean = xf.sum(dims) / count  # masked positions are 0: the sum runs over the visible voxels
    # two passes (centred first, as precise as InstanceNorm3d); addcmul: x - mean * vis in one kernel
    centred = torch.addcmul(xf, mean[:, :, None, None, None], vis, value=-1.0)
    var = centred.square().sum(dims) / count
    scale = torch.rsqrt(var + norm.eps)
    if norm.affine:
        scale = scale * norm.weight.to(xf.dtype)
    out = centred * scale[:, :, None, None, None]
    if norm.affine:  # + bias at visible positions only, in place (the product's backward does not need it)
        out = out.addcmul_(norm.bias.to(xf.dtype).view(1, -1, 1, 1, 1), vis)
    return out


def _zero_preserving(op: nn.Module) -> bool:
    return isinstance(op, (nn.LeakyReLU, nn.ReLU, nn.Identity, _DropoutNd))


def _sparse_conv_block(layer: ConvDropoutNormReLU, x: Tensor, masks: VisibleMasks, name: str, observe: Observer | None) -> Tensor:
    """One DNA ``ConvDropoutNormReLU``, its modules in their own order (``nonlin_first`` included)."""
    for index, op in enumerate(layer.all_modules):
        if isinstance(op, nn.Conv3d):
            x = op(x)
            x = x * masks.like(x)
        elif isinstance(op, nn.InstanceNorm3d):
            x = _masked_instance_norm(x, masks, op)
        elif _zero_preserving(op):
            x = op(x)  # f(0) = 0: masked positions stay 0
        else:
            raise ValueError(
                f"{name}.all_modules.{index}: the sparse forward supports Conv3d, InstanceNorm3d, ReLU, LeakyReLU and "
                f"dropout, not {type(op).__name__}"
            )
        if observe is not None:
            observe(f"{name}.all_modules.{index}", x)
    return x


def _sparse_skip(skip: nn.Sequential, x: Tensor, masks: VisibleMasks, name: str, observe: Observer | None) -> Tensor:
    """A ``BasicBlockD`` projection skip: average pool (when strided), then a 1x1 conv with norm."""
    for index, op in enumerate(skip):
        if isinstance(op, nn.AvgPool3d):
            x = op(x)
            x = x * masks.like(x)  # a pooling window may straddle a mask edge when blocks are finer than the stride
            if observe is not None:
                observe(f"{name}.{index}", x)
        elif isinstance(op, ConvDropoutNormReLU):
            x = _sparse_conv_block(op, x, masks, f"{name}.{index}", observe)
        else:
            raise ValueError(f"{name}.{index}: unsupported module {type(op).__name__} in a residual skip")
    return x


def _sparse_basic_block(block: nn.Module, x: Tensor, masks: VisibleMasks, name: str, observe: Observer | None) -> Tensor:
    """One DNA ``BasicBlockD``: ``nonlin2(conv2(conv1(x)) + skip(x))``, every part sparse."""
    if not isinstance(block, BasicBlockD):
        raise ValueError(f"{name}: the sparse forward supports BasicBlockD residual blocks, not {type(block).__name__}")
    if block.apply_stochastic_depth or block.apply_se:
        raise ValueError(f"{name}: stochastic depth and squeeze-excitation are not supported by the sparse forward")
    residual = _sparse_skip(block.skip, x, masks, f"{name}.skip", observe) if isinstance(block.skip, nn.Sequential) else x
    out = _sparse_conv_block(block.conv1, x, masks, f"{name}.conv1", observe)
    out = _sparse_conv_block(block.conv2, out, masks, f"{name}.conv2", observe)
    out = out + residual
    if isinstance(block.nonlin2, nn.Module):
        if not _zero_preserving(block.nonlin2):
            raise ValueError(f"{name}.nonlin2: {type(block.nonlin2).__name__} does not map 0 to 0")
        out = block.nonlin2(out)
    if observe is not None:
        observe(name, out)
    return out


def sparse_encoder_forward(
    encoder: ResidualEncoder, x: Tensor, visible: Tensor, mask_input: bool = True, observe: Observer | None = None
) -> list[Tensor]:
    """Run DNA's ``ResidualEncoder`` sparsely: masked positions stay exactly 0 at every layer.

    Args:
        encoder: ``network.encoder`` of a ResidualEncoderUNet (BasicBlockD blocks, InstanceNorm3d,
            ReLU/LeakyReLU; strided-conv down-sampling). Its own modules and parameters are used.
        x: ``(B, C, D, H, W)`` input.
        visible: ``(B, 1, D, H, W)`` bool, True = visible.
        mask_input: True: the input is masked before the first convolution ([S3D]'s paper). False:
            the first convolution reads the unmasked input and only its output is masked ([S3D-code]),
            so masked voxels leak into the visible voxels next to a masked region.
        observe: Optional ``observe(name, tensor)`` called with the output of every sparse layer
            (names like ``"stages.1.blocks.0.conv1.all_modules.0"``), e.g. to check the zeros.

    Returns:
        The skips, one ``(B, C_s, D_s, H_s, W_s)`` per stage (highest resolution first), as
        ``encoder(x)`` returns them with ``return_skips=True``.

    Raises:
        ValueError: An encoder holding a module the sparse forward does not support, or a mask that
            does not fit ``x``.
    """
    if x.ndim != 5 or visible.shape[0] != x.shape[0] or visible.shape[2:] != x.shape[2:]:
        raise ValueError(f"visible {tuple(visible.shape)} must be (B, 1, D, H, W) for the input {tuple(x.shape)}")
    masks = VisibleMasks(visible)
    if mask_input:
        x = x * masks.like(x)
        if observe is not None:
            observe("input", x)
    if encoder.stem is not None:
        for index, layer in enumerate(encoder.stem.convs):
            x = _sparse_conv_block(layer, x, masks, f"stem.convs.{index}", observe)
    skips = []
    for s, stage in enumerate(encoder.stages):
        blocks = getattr(stage, "blocks", None)
        if blocks is None:
            raise ValueError(f"stages.{s}: expected StackedResidualBlocks (pool_type 'conv'), got {type(stage).__name__}")
        for b, block in enumerate(blocks):
            x = _sparse_basic_block(block, x, masks, f"stages.{s}.blocks.{b}", observe)
        skips.append(x)
    return skips


class MaskTokenDensify(nn.Module):
    """The pretraining-only parts between the sparse encoder and DNA's decoder ([S3D] §3, SparK).

    One learnable mask token per stage (``(1, C_s, 1, 1, 1)``, trunc-normal std 0.02 as SparK) fills
    the masked positions of each skip; then a ``kernel_size``^3 "densify" convolution (with bias,
    He-initialised like the network) runs at every resolution except the highest, where there is
    none (``densify[0]`` is ``nn.Identity``). Never exported: fine-tuning uses the network alone.

    Args:
        widths: Channels of each encoder stage (``encoder.output_channels``), highest resolution first.
        kernel_size: Edge of the densify convolutions.
    """

    def __init__(self, widths: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        if len(widths) < 1 or min(widths) < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"need stage widths >= 1 and an odd kernel_size, got {list(widths)} and {kernel_size}")
        self.widths = tuple(int(w) for w in widths)
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, w, 1, 1, 1)) for w in self.widths])
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02)
        layers: list[nn.Module] = [nn.Identity()]
        for w in self.widths[1:]:
            conv = nn.Conv3d(w, w, kernel_size, padding=kernel_size // 2, bias=True)
            nn.init.kaiming_normal_(conv.weight, a=1e-2)  # DNA's InitWeights_He(1e-2), as the network's convs
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            layers.append(conv)
        self.densify = nn.ModuleList(layers)

    def fill(self, skips: Sequence[Tensor], visible: Tensor) -> list[Tensor]:
        """Each skip with its mask token at the masked positions (before densify)."""
        if len(skips) != len(self.widths):
            raise ValueError(f"expected {len(self.widths)} skips, got {len(skips)}")
        filled = []
        for skip, token in zip(skips, self.mask_tokens, strict=True):
            vis = downsample_visible(visible, skip.shape[2:])
            filled.append(torch.where(vis, skip, token.to(skip.dtype)))
        return filled

    def forward(self, skips: Sequence[Tensor], visible: Tensor) -> list[Tensor]:
        """Fill and densify: ``(B, C_s, ...)`` skips -> the decoder's inputs, same shapes.

        Args:
            skips: Sparse encoder outputs, highest resolution first.
            visible: ``(B, 1, D, H, W)`` bool at the input resolution, True = visible.
        """
        return [conv(x) for conv, x in zip(self.densify, self.fill(skips, visible), strict=True)]


def sparse_reconstruction(
    network: ResidualEncoderUNet,
    adapter: MaskTokenDensify,
    x: Tensor,
    visible: Tensor,
    mask_input: bool = True,
    observe: Observer | None = None,
) -> Tensor:
    """Spark3D's forward: sparse encoder, mask tokens and densify, then DNA's decoder densely.

    Args:
        network: DNA ResidualEncoderUNet with ``deep_supervision=False`` and ``num_classes`` equal to
            the image channels (its last seg layer is the reconstruction).
        adapter: The :class:`MaskTokenDensify` for ``network.encoder.output_channels``.
        x: ``(B, C, D, H, W)`` input.
        visible: ``(B, 1, D, H, W)`` bool, True = visible.
        mask_input: See :func:`sparse_encoder_forward`.
        observe: See :func:`sparse_encoder_forward` (encoder layers only).

    Returns:
        ``(B, num_classes, D, H, W)`` reconstruction.
    """
    if network.decoder.deep_supervision:
        raise ValueError("build the network with deep_supervision=False: the reconstruction is one output")
    skips = sparse_encoder_forward(network.encoder, x, visible, mask_input, observe)
    return network.decoder(adapter(skips, visible))
