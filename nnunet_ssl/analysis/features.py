"""Per-layer representations of a :class:`SwinEncoder` for CKA, collected with forward hooks.

Layers, in forward order: ``embed`` (the patch-embedding convolution's output) and every Swin
block's output, ``stage{s}.block{b}`` (1-based). The ``smit`` preset (depths 2-2-8-2) has 1 + 14.

Each example's feature map is flattened to one vector, as in Kornblith et al. 2019 and Nguyen et al.
2021: spatial pooling would discard where a feature fires, which is what a segmentation encoder
encodes. Flattening is affordable because a hook reduces the activation to its ``(B, B)`` Gram matrix
at once (:func:`nnunet_ssl.analysis.cka.compare.gram`, in float64 chunks), so at most one layer's activation
is alive at a time and memory is bounded by the minibatch, not by the data set.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from nnunet_ssl.analysis.cka.compare import gram
from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.networks.segmentation import check_input
from nnunet_ssl.networks.swin import SwinEncoder, SwinStage

EMBED_LAYER = "embed"


def encoder_layer_names(preset: SwinPreset) -> list[str]:
    """``["embed", "stage1.block1", ...]`` in forward order: ``1 + sum(preset.depths)`` names."""
    blocks = [f"stage{s + 1}.block{b + 1}" for s, depth in enumerate(preset.depths) for b in range(depth)]
    return [EMBED_LAYER, *blocks]


def encoder_layer_modules(encoder: SwinEncoder) -> dict[str, nn.Module]:
    """The module whose output is each named layer, in forward order."""
    modules: dict[str, nn.Module] = {EMBED_LAYER: encoder.patch_embed}
    for s, stage in enumerate(encoder.stages):
        for b, block in enumerate(cast(SwinStage, stage).blocks):
            modules[f"stage{s + 1}.block{b + 1}"] = block
    return modules


def select_layers(available: Sequence[str], spec: str) -> list[str]:
    """Parse ``"all"`` or a comma-separated list of layer names, keeping forward order.

    Raises:
        ValueError: naming unknown layers and listing the valid ones.
    """
    if spec.strip() == "all":
        return list(available)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in available]
    if unknown or not wanted:
        raise ValueError(f"unknown layer(s) {unknown or spec!r}; choose 'all' or names from {list(available)}")
    return [name for name in available if name in wanted]


@torch.no_grad()
def layer_grams(encoder: SwinEncoder, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Run ``encoder`` on ``images`` and return each layer's ``(B, B)`` float64 Gram matrix.

    Args:
        encoder: The encoder, in eval mode.
        images: ``(B, C, D, H, W)`` with every spatial axis a multiple of 32 (at least 64).
        layers: Names from :func:`encoder_layer_names`.

    Returns:
        ``{layer: K}`` with ``K = X X^T`` of the flattened ``(B, -1)`` layer output.
    """
    check_input(images, encoder.in_channels)
    modules = encoder_layer_modules(encoder)
    grams: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            grams[name] = gram(output)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        encoder(images)
    finally:
        for handle in handles:
            handle.remove()
    return grams
