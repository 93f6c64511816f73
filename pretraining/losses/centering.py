"""EMA centre of the teacher outputs ([DINO] ``update_center``)."""
from __future__ import annotations

import torch
from torch import Tensor

from nnunet_ssl.pretraining.distributed import Collectives


@torch.no_grad()
def updated_center(
    center: Tensor, teacher_logits: Tensor, momentum: float = 0.9, collectives: Collectives | None = None
) -> Tensor:
    """Return ``m * c + (1 - m) * mean(teacher outputs)`` as a new tensor (inputs untouched).

    The mean runs over every axis but the last (views, batch and, for patch tokens, tokens; with
    equally many tokens per sample this equals [iBOT]'s mean over tokens, then over the batch).
    The batch mean is averaged over ranks by ``collectives.mean`` (equal per-rank batch sizes, as
    DDP gives with ``drop_last``), so the centre of a W-process run equals the one-process centre
    of the concatenated batch. This function never calls ``torch.distributed`` itself.

    Args:
        center: ``(1, K)`` or ``(1, 1, K)`` current centre.
        teacher_logits: ``(..., K)`` teacher outputs of this step (raw, before centring).
        momentum: ``m`` in [0, 1].
        collectives: The step's cross-rank operations (``context.collectives``); None means one process.

    Returns:
        New centre with ``center``'s shape and dtype.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must lie in [0, 1], got {momentum}")
    if teacher_logits.shape[-1] != center.shape[-1]:
        raise ValueError(f"teacher logits width {teacher_logits.shape[-1]} != centre width {center.shape[-1]}")
    batch_mean = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(dim=0)
    if collectives is not None:
        batch_mean = collectives.mean(batch_mean)
    new = center.detach().float() * momentum + batch_mean.view(center.shape) * (1.0 - momentum)
    return new.to(center.dtype)
