"""Token outputs of the Swin encoder that the distillation heads read (SSL_METHODS.md §1).

- ``dense6``: LayerNorm of the stride-16 tokens (``features[3]``, the stage-3 merge output;
  6^3 = 216 tokens of width 8E at 96^3);
- ``pool6``: the mean of ``dense6`` over tokens, the [CLS] stand-in.

Methods flatten their views sample-major (``(B * V, ...)``); the losses want them view-major
(``(V, B, ...)``): :func:`by_view` converts.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.pretraining.masking import expand_mask

#: Stride of the distillation tokens (``features[3]``).
DENSE_STRIDE = 16


def dense_and_pooled(norm: nn.Module, features: list[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    """``dense6`` ``(N, T, 8E)`` = ``norm`` of the stride-16 tokens, and ``pool6`` ``(N, 8E)`` its token mean.

    Args:
        norm: LayerNorm of width ``8E``.
        features: The encoder's five outputs (``features[3]`` is ``(N, 8E, d, h, w)``), or the
            stride-16 tokens ``(N, T, 8E)`` from :func:`stride16_tokens`.
    """
    tokens = features if isinstance(features, Tensor) else features[3].flatten(2).transpose(1, 2)
    dense = norm(tokens)
    return dense, dense.mean(dim=1)


def by_view(x: Tensor, batch: int) -> Tensor:
    """``(B * V, ...)`` sample-major -> ``(V, B, ...)``."""
    return x.reshape(batch, -1, *x.shape[1:]).transpose(0, 1)


def dense_token_mask(unit_mask: Tensor, unit: int) -> Tensor:
    """Per-token mask of the stride-16 tokens: ``(N, u, u, u)`` units -> ``(N, T)`` bool.

    ``unit`` is the mask unit edge in voxels, a multiple of :data:`DENSE_STRIDE` (16: one unit is
    one token; 32: a unit covers 2^3 tokens).
    """
    if unit % DENSE_STRIDE:
        raise ValueError(f"mask unit must be a multiple of {DENSE_STRIDE}, got {unit}")
    return expand_mask(unit_mask, unit // DENSE_STRIDE).flatten(1)


def stride16_tokens(encoder: SwinEncoder, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """``features[3]`` of ``encoder(x, token_mask)`` as tokens ``(N, T, 8E)``, without running stage 4.

    DINO and iBOT read only the stride-16 tokens, so the last stage (and its merge) is skipped:
    the result equals ``encoder(x, token_mask)[3].flatten(2).transpose(1, 2)``.
    """
    tokens = encoder.embed(x, token_mask)
    for stage in encoder.stages[:3]:
        tokens = stage(tokens)
    return F.layer_norm(tokens, tokens.shape[-1:]).flatten(1, 3)


def freeze_skipped_stage(encoder: SwinEncoder) -> None:
    """``requires_grad = False`` on the last stage, which :func:`stride16_tokens` never runs.

    A method that reads only the stride-16 tokens (DINO, iBOT) would otherwise hold parameters
    that get no gradient: DDP refuses those ("parameters that were not used in producing loss"),
    and the optimiser would carry dead weights. The stage keeps its initialisation and is exported
    as such; fine-tuning trains it.
    """
    encoder.stages[3].requires_grad_(False)
