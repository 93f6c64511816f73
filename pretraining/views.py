"""View generation and augmentations for pretraining: pure functions on tensors.

Every function takes a ``torch.Generator`` (the step's ``context.generator``), never edits its
input and never reads the global RNG, so masks and augmentations are reproducible per
``(seed, rank, step)``. Arrays are ``(N, C, D, H, W)`` in the cached axis order, where ``D`` is
the slice axis (2 mm) and ``(H, W)`` the axial plane (1.5 mm).

The cached volumes are SimpleITK arrays of LPS-oriented images, axes ``(z, y, x)`` (see
``pretraining/data/config.py`` and ``preprocess.py``), resampled to ``(x, y, z) = (1.5, 1.5, 2)``
mm: the two in-plane 1.5 mm axes of a crop ``(C, D, H, W)`` are ``H`` (y) and ``W`` (x), so
rotations act on dims ``(-2, -1)`` and never mix the 2 mm slice spacing into the plane.

Cutout and paste follow ``patch_rand_drop``, ``aug_rand`` and ``rot_rand`` in Project-MONAI
research-contributions, SwinUNETR/Pretrain/utils/ops.py ([TANG]); differences are noted per function.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Dims of the axial (in-plane, 1.5 mm) axes in ``(N, C, D, H, W)`` and ``(C, D, H, W)`` crops.
AXIAL_DIMS = (-2, -1)
#: Number of 90-degree rotation classes.
NUM_ROTATIONS = 4
#: Candidate cuboids drawn at once while filling a cutout budget.
_BLOCK_CHUNK = 64


def device_generator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator`` (``generator`` itself on the CPU).

    Large draws (noise fills) then happen on the accelerator, still keyed by the step's
    ``(seed, rank, step)`` through the one number drawn from ``generator``.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------------------ rotations
def _check_volumes(x: Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected a batch of crops (N, C, D, H, W), got shape {tuple(x.shape)}")


def rotate_axial(x: Tensor, k: Tensor | int) -> Tensor:
    """Rotate every crop by ``k * 90`` degrees in the axial plane (dims ``H``, ``W``).

    ``torch.rot90(crop, k, dims=(H, W))``, as [TANG] ``rot_rand`` rotates dims (2, 3) of its
    ``(C, X, Y, Z)`` crops. Rotating by ``k`` and then by ``4 - k`` (or ``-k``) is the identity.

    Args:
        x: ``(N, C, D, H, W)`` with ``H == W`` (so rotated crops stack).
        k: One int for all crops or ``(N,)`` integers (any, taken modulo 4).

    Returns:
        A new ``(N, C, D, H, W)`` tensor.
    """
    _check_volumes(x)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"axial rotation needs square in-plane crops (H == W), got {tuple(x.shape[-2:])}")
    k = torch.as_tensor(k, dtype=torch.long).to("cpu").remainder(NUM_ROTATIONS)
    if k.ndim == 0:
        k = k.expand(x.shape[0])
    if k.shape != (x.shape[0],):
        raise ValueError(f"k must be one int or ({x.shape[0]},) integers, got shape {tuple(k.shape)}")
    out = x.clone()
    for quarter in range(1, NUM_ROTATIONS):
        index = (k == quarter).nonzero().flatten()
        if index.numel():
            index = index.to(x.device)
            out[index] = torch.rot90(x[index], quarter, dims=AXIAL_DIMS)
    return out


def random_axial_rotation(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rotate each crop by an independent uniform ``k`` in {0, 1, 2, 3} (axial plane).

    [TANG] ``rot_rand`` draws ``k`` with NumPy's global RNG; here it comes from ``generator``.

    Args:
        x: ``(N, C, D, H, W)``, ``H == W``.
        generator: CPU generator of the step.

    Returns:
        ``(rotated (N, C, D, H, W), labels (N,) int64 on x.device)``; labels are the ``k`` applied.
    """
    _check_volumes(x)
    labels = torch.randint(0, NUM_ROTATIONS, (x.shape[0],), generator=generator)
    return rotate_axial(x, labels), labels.to(x.device)


# -------------------------------------------------------------------------------------- cutouts
@dataclass(frozen=True)
class CutoutSettings:
    """``patch_rand_drop`` parameters ([TANG] defaults; SSL_METHODS.md card 2).

    Attributes:
        max_fraction: A pass covers a fraction ``U(0, max_fraction)`` of the voxels (``max_drop``).
        min_block: Smallest cuboid side as a fraction of the crop side (``tolr``), also the margin
            a block's start keeps from the far edge.
        max_block: Largest cuboid side (exclusive) as a fraction of the crop side (``max_block_sz``).
    """

    max_fraction: float = 0.3
    min_block: float = 0.05
    max_block: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction must lie in [0, 1], got {self.max_fraction}")
        if not 0.0 < self.min_block < self.max_block <= 1.0:
            raise ValueError(f"need 0 < min_block < max_block <= 1, got {self.min_block}, {self.max_block}")

    def side_limits(self, size: int) -> tuple[int, int]:
        """``(shortest side, exclusive longest side)`` in voxels for an axis of ``size`` voxels."""
        low, high = int(self.min_block * size), int(self.max_block * size)
        if low < 1 or high <= low:
            raise ValueError(
                f"crop side {size} is too small for cutout blocks of {self.min_block}-{self.max_block} of it"
            )
        return low, high


def draw_blocks(spatial: tuple[int, int, int], settings: CutoutSettings, generator: torch.Generator) -> Tensor:
    """The cuboids of one ``patch_rand_drop`` pass: ``(J, 6)`` rows ``(d0, d1, h0, h1, w0, w1)``.

    As [TANG]: the budget is ``U(0, max_fraction) * D * H * W`` voxels; each cuboid starts at
    ``randint(0, size - low)`` and has side ``randint(low, high)`` per axis (clipped at the far
    edge); cuboids are added while the summed volumes (overlaps counted twice) are below the
    budget. The union therefore covers at most ``max_fraction`` of the crop plus one cuboid.
    Candidates are drawn in vectorised chunks of independent cuboids (the same distribution as
    [TANG]'s one-at-a-time draws) and accepted up to where that loop would stop.
    """
    limits = [settings.side_limits(s) for s in spatial]
    budget = float(torch.rand((), generator=generator)) * settings.max_fraction * spatial[0] * spatial[1] * spatial[2]
    accepted: list[Tensor] = []
    covered = 0
    while covered < budget:
        columns = []
        for size, (low, high) in zip(spatial, limits, strict=True):
            start = torch.randint(0, size - low, (_BLOCK_CHUNK,), generator=generator)
            end = (start + torch.randint(low, high, (_BLOCK_CHUNK,), generator=generator)).clamp(max=size)
            columns += [start, end]
        chunk = torch.stack(columns, dim=1)
        volumes = (chunk[:, 1] - chunk[:, 0]) * (chunk[:, 3] - chunk[:, 2]) * (chunk[:, 5] - chunk[:, 4])
        before = covered + torch.cumsum(volumes, 0) - volumes  # covered volume before each candidate
        take = int((before < budget).sum())
        accepted.append(chunk[:take])
        covered += int(volumes[:take].sum())
    return torch.cat(accepted) if accepted else torch.zeros(0, 6, dtype=torch.long)


def block_owner(spatial: tuple[int, int, int], blocks: Tensor, device: torch.device | str) -> Tensor:
    """``(D, H, W)`` int64: index of the last cuboid covering each voxel, -1 where none does.

    Later cuboids overwrite earlier ones, as the sequential in-place writes of [TANG] do. One
    slice assignment per cuboid (tens per crop), never a loop over voxels.
    """
    owner = torch.full(spatial, -1, dtype=torch.long, device=device)
    for j, (d0, d1, h0, h1, w0, w1) in enumerate(blocks.tolist()):
        owner[d0:d1, h0:h1, w0:w1] = j
    return owner


def noise_fill(owner: Tensor, channels: int, num_blocks: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Gaussian noise min-max scaled to [0, 1] per cuboid: ``(C, D, H, W)`` (0 outside cuboids).

    [TANG] draws ``normal_()`` per cuboid (all channels) and min-max scales it over that cuboid.
    Here one field is drawn and each cuboid is scaled over its visible voxels (where a later
    cuboid overlaps, [TANG] scales over the whole cuboid before part of it is overwritten).
    """
    inside = owner >= 0
    if num_blocks == 0:
        return torch.zeros((channels, *owner.shape), dtype=dtype, device=owner.device)
    noise = torch.randn((channels, *owner.shape), generator=generator, device=owner.device, dtype=torch.float32)
    bins = owner.where(inside, num_blocks).flatten()  # voxels outside every cuboid go to an extra bin
    values = noise.flatten(1)
    ids = bins.expand_as(values)
    low = values.new_full((num_blocks + 1,), float("inf")).scatter_reduce(0, ids.flatten(), values.flatten(), "amin")
    high = values.new_full((num_blocks + 1,), float("-inf")).scatter_reduce(0, ids.flatten(), values.flatten(), "amax")
    span = (high - low).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (values - low[bins]) / span[bins]
    scaled = scaled.view_as(noise)
    return scaled.where(inside, scaled.new_zeros(())).to(dtype)


@dataclass(frozen=True)
class Corrupted:
    """Result of :func:`aug_rand`.

    Attributes:
        images: ``(N, C, D, H, W)`` corrupted crops (a new tensor).
        mask: ``(N, 1, D, H, W)`` bool, True where a noise or paste cuboid was written.
        noise_fraction: ``(N,)`` fraction of voxels the noise pass covered (union of its cuboids).
        paste_source: ``(N,)`` int64 index of the crop pasted from, -1 where no paste pass ran.
    """

    images: Tensor
    mask: Tensor
    noise_fraction: Tensor
    paste_source: Tensor


def aug_rand(
    x: Tensor, generator: torch.Generator, settings: CutoutSettings | None = None, paste: bool = True
) -> Corrupted:
    """[TANG] ``aug_rand``: a noise-cutout pass per crop, then a paste pass from another crop.

    For each crop ``i`` in order: ``patch_rand_drop`` fills random cuboids with noise
    (:func:`draw_blocks`, :func:`noise_fill`); then ``r = randint(0, N)`` and, if ``r != i``, a
    second pass with new cuboids copies crop ``r``'s current content into them (crop ``r`` is
    already corrupted when ``r < i``, as in [TANG]'s in-place loop). The input is not modified.

    Args:
        x: ``(N, C, D, H, W)`` crops in [0, 1].
        generator: CPU generator of the step (cuboids, paste indices; it seeds the noise).
        settings: Cutout parameters (default: [TANG]'s).
        paste: Run the cross-sample paste pass (off: noise cutout only, ``patch_rand_drop`` alone).

    Returns:
        :class:`Corrupted`.
    """
    _check_volumes(x)
    settings = settings if settings is not None else CutoutSettings()
    n, channels, *spatial_list = x.shape
    spatial = (spatial_list[0], spatial_list[1], spatial_list[2])
    noise_generator = device_generator(generator, x.device)
    out = x.detach().clone()
    mask = torch.zeros((n, 1, *spatial), dtype=torch.bool, device=x.device)
    noise_fraction = torch.zeros(n, device=x.device)
    paste_source = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        blocks = draw_blocks(spatial, settings, generator)
        owner = block_owner(spatial, blocks, x.device)
        inside = owner >= 0
        fill = noise_fill(owner, channels, len(blocks), noise_generator, x.dtype)
        out[i] = fill.where(inside, out[i])
        mask[i, 0] |= inside
        noise_fraction[i] = inside.float().mean()  # stays on the device: no synchronisation
        source = int(torch.randint(0, n, (), generator=generator))
        if paste and source != i:
            owner = block_owner(spatial, draw_blocks(spatial, settings, generator), x.device)
            inside = owner >= 0
            out[i] = out[source].where(inside, out[i])
            mask[i, 0] |= inside
            paste_source[i] = source
    return Corrupted(out, mask, noise_fraction, paste_source)


def local_crops(views: Tensor, count: int, size: int, generator: torch.Generator) -> Tensor:
    """DINO-style student-only local crops: ``count`` random ``size^3`` crops per sample.

    Each local crop is cut from one of the sample's global views (chosen uniformly) at a uniform
    random corner, so it lies inside the overlapping region the loader sampled. [DINO] also
    rescales its local crops; here they keep the voxel spacing (SSL_METHODS.md §1: "smaller
    local crops", off by default).

    Args:
        views: ``(B, V, C, D, H, W)`` global views; every spatial axis >= ``size``.
        count: Local crops per sample, >= 1.
        size: Edge of a local crop in voxels.
        generator: Source of randomness (the step's ``context.generator``).

    Returns:
        ``(B, count, C, size, size, size)``, a new tensor on ``views``' device.
    """
    if views.ndim != 6:
        raise ValueError(f"expected views (B, V, C, D, H, W), got shape {tuple(views.shape)}")
    if count < 1 or size < 1 or any(n < size for n in views.shape[3:]):
        raise ValueError(f"cannot cut {count} local crop(s) of {size}^3 from views {tuple(views.shape)}")
    b, v = views.shape[:2]
    which = torch.randint(v, (b, count), generator=generator, device=generator.device)
    corners = [
        torch.randint(n - size + 1, (b, count), generator=generator, device=generator.device) for n in views.shape[3:]
    ]
    out = views.new_empty(b, count, views.shape[2], size, size, size)
    for i in range(b):
        for j in range(count):
            z, y, x = (int(c[i, j]) for c in corners)
            out[i, j] = views[i, int(which[i, j]), :, z : z + size, y : y + size, x : x + size]
    return out
