"""Whole-volume pixel regression (Inpainting, Reconstruction, SwinUNETR's reconstruction term)."""
from __future__ import annotations

from torch import Tensor

from nnunet_ssl.pretraining.losses.masked_pixel import PIXEL_LOSS_KINDS


def reconstruction_loss(prediction: Tensor, target: Tensor, kind: str = "l2") -> Tensor:
    """Mean ``(x_hat - x)^2`` (``"l2"``, MSE as [P]) or ``|x_hat - x|`` (``"l1"``, [TANG]) over ALL voxels.

    Args:
        prediction: ``(B, C, D, H, W)``.
        target: Same shape (no gradient flows to it).
        kind: ``"l1"`` or ``"l2"``.

    Returns:
        Scalar loss, computed in float32.
    """
    if kind not in PIXEL_LOSS_KINDS:
        raise ValueError(f"unknown pixel loss {kind!r}; choose one of {PIXEL_LOSS_KINDS}")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    diff = prediction.float() - target.detach().float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()
