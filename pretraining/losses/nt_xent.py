"""NT-Xent (InfoNCE with every other view a negative; [TANG] losses/loss.py ``Contrast``, SimCLR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nnunet_ssl.pretraining.distributed import Collectives


def nt_xent_loss(
    view1: Tensor, view2: Tensor, temperature: float = 0.5, collectives: Collectives | None = None
) -> Tensor:
    """Normalised-temperature cross-entropy over two views of a batch, negatives across ranks.

    With unit vectors ``v`` and ``2M`` views in the gathered batch (``M`` = global batch), each
    anchor ``i`` with positive ``j`` (the other view of its sample) scores
    ``l_i = -log( exp(cos(v_i, v_j)/t) / sum_{k != i} exp(cos(v_i, v_k)/t) )``; the denominator
    holds the positive and all other ``2M - 2`` views, as [TANG]'s ``neg_mask`` does. The loss is
    the mean over this rank's ``2B`` anchors; DDP's gradient averaging over ranks then gives the
    mean over all ``2M`` anchors, the one-process loss on the concatenated batch. Random
    embeddings give about ``ln(2M - 1)``. Symmetric in the two views. Computed in (at least) float32.

    Args:
        view1: ``(B, F)`` projections of the first views on this rank.
        view2: ``(B, F)`` projections of the second views (row ``b`` pairs with ``view1[b]``).
        temperature: ``t`` (0.5 in [TANG]).
        collectives: Cross-rank gather (default: a single process).

    Returns:
        Scalar loss.

    Raises:
        ValueError: Mismatched views, ``temperature <= 0``, or a global batch of one volume (no
            negatives: the loss would be 0 with no gradient).
    """
    if view1.shape != view2.shape or view1.ndim != 2:
        raise ValueError(f"views must both be (B, F), got {tuple(view1.shape)} and {tuple(view2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    collectives = collectives if collectives is not None else Collectives()
    rows = view1.shape[0]
    dtype = torch.promote_types(view1.dtype, torch.float32)  # at least float32 under autocast
    pairs = F.normalize(torch.stack([view1, view2], dim=1).to(dtype), dim=-1)  # (B, 2, F)
    everything = collectives.gather(pairs)  # (M, 2, F), rank order
    if everything.shape[0] < 2:
        raise ValueError(
            "NT-Xent needs at least 2 volumes in the global batch (the other volumes' views are the "
            f"negatives), got {everything.shape[0]}: raise --batch-size or the number of processes"
        )
    anchors = everything[collectives.local_slice(rows)].flatten(0, 1)  # (2B, F): b0v1, b0v2, b1v1, ...
    logits = anchors @ everything.flatten(0, 1).T / temperature  # (2B, 2M)
    own = torch.arange(2 * rows, device=logits.device) + 2 * rows * collectives.rank
    positive = own ^ 1  # the other view of the same sample
    logits = logits.masked_fill(F.one_hot(own, logits.shape[1]).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)
