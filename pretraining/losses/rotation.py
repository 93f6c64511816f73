"""Rotation prediction: cross-entropy over the four 90-degree classes ([TANG] ``rot_loss``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rotation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (N, K)`` against labels ``(N,)`` in ``0..K-1``, in float32.

    Uniform logits give ``ln K`` (``ln 4`` for the four rotations).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)}, {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.to(device=logits.device, dtype=torch.long))
