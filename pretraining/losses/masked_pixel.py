"""Pixel regression restricted to masked voxels ([SimMIM], SMIT's MIP)."""
from __future__ import annotations

import torch
from torch import Tensor

PIXEL_LOSS_KINDS = ("l1", "l2")


def masked_pixel_loss(prediction: Tensor, target: Tensor, voxel_mask: Tensor, kind: str = "l2") -> Tensor:
    """Mean pixel error over masked voxels only: ``sum(M * err) / sum(M)``.

    ``err`` is ``|x_hat - x|`` (``"l1"``) or ``(x_hat - x)^2`` (``"l2"``); with ``C`` channels the
    denominator is ``C * sum(M)`` (the mean over channels, as [SimMIM] divides by ``in_chans``).
    Visible voxels are excluded with ``where``, so their gradient is exactly 0 even for
    non-finite predictions there. An empty mask gives 0. Computed in float32.

    Args:
        prediction: ``(B, C, D, H, W)`` reconstruction.
        target: ``(B, C, D, H, W)`` original image (never modified; no gradient flows to it).
        voxel_mask: ``(B, 1, D, H, W)`` or ``(B, C, D, H, W)`` bool, True = masked.
        kind: ``"l1"`` or ``"l2"``.

    Returns:
        Scalar loss.
    """
    if kind not in PIXEL_LOSS_KINDS:
        raise ValueError(f"unknown pixel loss {kind!r}; choose one of {PIXEL_LOSS_KINDS}")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    if prediction.ndim != 5 or voxel_mask.ndim != 5:
        raise ValueError("prediction and voxel_mask must be (B, C, D, H, W)")
    mask = voxel_mask.to(device=prediction.device, dtype=torch.bool).expand_as(prediction)
    diff = prediction.float() - target.detach().float()
    err = diff.abs() if kind == "l1" else diff.square()
    total = err.where(mask, err.new_zeros(()))
    return total.sum() / mask.sum().clamp(min=1).to(total.dtype)
