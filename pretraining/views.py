"""View generation and augmentations for pretraining: pure functions on tensors.

Every function takes a ``torch.Generator`` (the step's ``context.generator``), never edits its
input and never reads the global RNG, so masks and augmentations are reproducible per
``(seed, rank, step)``. Arrays are ``(N, C, D, H, W)`` in the cached axis order, where ``D`` is
the slice axis (2 mm) and ``(H, W)`` the axial plane (1.5 mm).
"""
from __future__ import annotations

import torch
from torch import Tensor


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
