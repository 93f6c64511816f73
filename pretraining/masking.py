"""Random unit masks for masked image modelling (SimMIM, iBOT, SMIT).

A crop is divided into cubic *units* (16^3 voxels by default: 6^3 = 216 units at 96^3). Exactly
``ceil(ratio * n_units)`` units per sample are masked, chosen uniformly at random. One draw gives
three aligned views of the same mask (SSL_METHODS.md, "MaskGenerator"):

- ``unit``  ``(B, u, u, u)``: one entry per unit (= one stride-16 token when ``unit == 16``);
- ``token`` ``(B, D/p, H/p, W/p)``: per patch token, fed to the encoder's mask token;
- ``voxel`` ``(B, 1, D, H, W)``: per voxel, for pixel losses.

Everything here is a pure function: no state, no global RNG use when a generator is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

Size3 = tuple[int, int, int]


@dataclass(frozen=True)
class MaskSet:
    """One mask draw at three resolutions (True = masked).

    Attributes:
        unit: ``(B, D/unit, H/unit, W/unit)`` bool.
        token: ``(B, D/patch, H/patch, W/patch)`` bool, each unit repeated ``unit/patch`` times per axis.
        voxel: ``(B, 1, D, H, W)`` bool, each unit repeated ``unit`` times per axis.
    """

    unit: Tensor
    token: Tensor
    voxel: Tensor


def spatial_size(x: Tensor) -> Size3:
    """``(D, H, W)`` of a ``(N, C, D, H, W)`` batch."""
    d, h, w = x.shape[2:]
    return d, h, w


def masked_unit_count(n_units: int, ratio: float) -> int:
    """Number of masked units: ``ceil(ratio * n_units)``, robust to float noise (0.6 * 5 -> 3)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return min(n_units, math.ceil(round(ratio * n_units, 9)))


def validate_mask_settings(crop_size: Size3, unit: int, ratio: float, patch: int = 2) -> None:
    """Raise ``ValueError`` unless ``unit`` tiles ``crop_size`` and ``patch`` tiles ``unit``.

    Args:
        crop_size: Spatial crop size ``(D, H, W)``.
        unit: Mask unit edge in voxels.
        ratio: Mask ratio, in [0, 1].
        patch: Patch-embedding stride (token edge in voxels).
    """
    if len(crop_size) != 3:
        raise ValueError(f"crop_size needs three axes, got {crop_size}")
    if patch < 1 or unit < 1 or unit % patch:
        raise ValueError(f"mask unit ({unit}) must be a positive multiple of the patch size ({patch})")
    if any(n <= 0 or n % unit for n in crop_size):
        raise ValueError(f"every crop axis {tuple(crop_size)} must be a positive multiple of the mask unit {unit}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")


def expand_mask(mask: Tensor, factor: int) -> Tensor:
    """Repeat every entry of a ``(B, d, h, w)`` mask ``factor`` times along each spatial axis.

    Args:
        mask: ``(B, d, h, w)`` tensor (any dtype).
        factor: Positive repeat count per axis.

    Returns:
        ``(B, d * factor, h * factor, w * factor)``, same dtype; a new tensor.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if mask.ndim != 4:
        raise ValueError(f"expected a (B, d, h, w) mask, got shape {tuple(mask.shape)}")
    out = mask
    for axis in (1, 2, 3):
        out = out.repeat_interleave(factor, dim=axis)
    return out if factor > 1 else out.clone()


def random_unit_masks(
    batch: int,
    crop_size: Size3,
    unit: int = 16,
    patch: int = 2,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskSet:
    """Mask exactly ``ceil(ratio * n_units)`` random units in each of ``batch`` crops.

    Random numbers are drawn on the generator's device (CPU when ``generator`` is None, from the
    global CPU generator), so a seed gives the same masks on every device; the masks are then
    moved to ``device``.

    Args:
        batch: Number of crops ``B``.
        crop_size: Spatial size ``(D, H, W)``; every axis a multiple of ``unit``.
        unit: Edge of a mask unit in voxels; a multiple of ``patch``.
        patch: Patch-embedding stride of the encoder (token edge in voxels).
        ratio: Fraction of units to mask, in [0, 1].
        generator: Optional ``torch.Generator`` for reproducible draws.
        device: Device of the returned masks (default: the generator's device, else CPU).

    Returns:
        A :class:`MaskSet` with ``unit (B, D/unit, H/unit, W/unit)``, ``token (B, D/patch, ...)``
        and ``voxel (B, 1, D, H, W)`` bool masks.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    validate_mask_settings(crop_size, unit, ratio, patch)
    grid = tuple(n // unit for n in crop_size)
    n_units = grid[0] * grid[1] * grid[2]
    n_masked = masked_unit_count(n_units, ratio)

    draw_device = generator.device if generator is not None else torch.device("cpu")
    scores = torch.rand(batch, n_units, generator=generator, device=draw_device)
    chosen = scores.argsort(dim=1)[:, :n_masked]
    flat = torch.zeros(batch, n_units, dtype=torch.bool, device=draw_device)
    flat.scatter_(1, chosen, True)
    target = torch.device(device) if device is not None else draw_device
    unit_mask = flat.view(batch, *grid).to(target)
    token_mask = expand_mask(unit_mask, unit // patch)
    voxel_mask = expand_mask(unit_mask, unit).unsqueeze(1)
    return MaskSet(unit=unit_mask, token=token_mask, voxel=voxel_mask)


@dataclass(frozen=True)
class BlockMasks:
    """One draw of block masks for a sparse CNN (Spark3D, SSL_METHODS.md card 10); True = masked.

    Attributes:
        grid: ``(B, D/block, H/block, W/block)`` bool, one entry per block.
        voxel: ``(B, 1, D, H, W)`` bool, each block repeated ``block`` times per axis.
    """

    grid: Tensor
    voxel: Tensor


def bottleneck_block_masks(
    batch: int,
    spatial: Size3,
    block: int = 32,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> BlockMasks:
    """Mask exactly ``ceil(ratio * n_blocks)`` random, non-overlapping ``block``^3 blocks per sample.

    [S3D] draws the masked positions on the CNN's bottleneck grid (5^3 at 160^3 with a total stride
    of 32) and upsamples them, i.e. 32^3 blocks; ``block=16`` gives [S3D-code]'s 10^3 grid of 16^3
    blocks. Draws follow :func:`random_unit_masks` (on the generator's device, then moved), so one
    generator state gives the same masks on every device.

    Args:
        batch: Number of crops ``B``.
        spatial: ``(D, H, W)``; every axis a multiple of ``block``.
        block: Block edge in voxels.
        ratio: Fraction of blocks to mask, in [0, 1].
        generator: ``torch.Generator`` of the step (the engine's ``context.generator``).
        device: Device of the returned masks (default: the generator's device, else CPU).

    Returns:
        :class:`BlockMasks` with the ``grid`` and ``voxel`` masks.
    """
    masks = random_unit_masks(batch, spatial, unit=block, patch=block, ratio=ratio, generator=generator, device=device)
    return BlockMasks(grid=masks.unit, voxel=masks.voxel)


def uniform_mask_ratio(low: float, high: float, generator: torch.Generator | None = None) -> float:
    """One mask ratio drawn from U[low, high] (Spark3D-B: U[0.6, 0.9], once per batch).

    Args:
        low: Lower bound, in [0, 1].
        high: Upper bound, in [low, 1].
        generator: CPU ``torch.Generator`` to draw from (the step's), or None for the global one.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1 for a mask ratio range, got ({low}, {high})")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = float(torch.rand((), generator=generator, device=draw_device))
    return low + (high - low) * u
