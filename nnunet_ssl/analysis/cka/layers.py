"""Layers: which outputs of an encoder CKA compares, per network family, and the input each encoder takes.

One :class:`EncoderLayers` per family in :data:`ENCODER_LAYERS` (keyed by the family's name in
:data:`nnunet_ssl.networks.family.FAMILIES`): what the input projection is called and where it is,
the residual/transformer blocks of every stage, and the input check. Every name below comes from
those, so a new family is one entry here; the networks package knows nothing about CKA.

Layer names, in forward order:

* ``swin``: ``embed`` (the patch-embedding convolution's output), then every Swin block's output
  ``stage{s}.block{b}`` (1-based). The ``smit`` preset (depths 2-2-8-2) has 1 + 14.
* ``resenc``: ``stem`` (the stem convolution block's output), then every residual block's output
  ``stage{s}.block{b}`` (1-based). ResEnc-L (blocks 1-3-4-6-6-6) has 1 + 26, ``resenc_tiny`` 1 + 10.

One layer per stage (:func:`stage_layers`) is the last block of every stage.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import Tensor, nn

from nnunet_ssl.networks.family import NetworkFamily, family_of, family_of_preset
from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.networks.resenc import ResEncPreset
from nnunet_ssl.networks.segmentation import check_batch_channels
from nnunet_ssl.networks.segmentation import check_input as check_swin_input
from nnunet_ssl.networks.swin import SwinEncoder, SwinStage

#: What names an encoder's layers: an encoder module, a network record
#: (:mod:`nnunet_ssl.networks.family`), a preset name, or a preset of a family's table.
EncoderSpec = nn.Module | Mapping[str, Any] | str | SwinPreset | ResEncPreset


@dataclass(frozen=True)
class EncoderLayers:
    """How to find the compared layers of one family's encoder.

    Attributes:
        family: Name of the family in :data:`~nnunet_ssl.networks.family.FAMILIES`.
        encoder_class: The class of that family's encoder (``family.encoder(network)``).
        stem_name: Name of the first layer, the input projection's output.
        stem: Encoder -> the module whose output is the stem layer.
        stages: Encoder -> the blocks of every stage in forward order (``stage{s}.block{b}``).
        check_input: ``(encoder, images)`` -> None, or a ValueError that says what to change.
    """

    family: str
    encoder_class: type[nn.Module]
    stem_name: str
    stem: Callable[[nn.Module], nn.Module]
    stages: Callable[[nn.Module], list[list[nn.Module]]]
    check_input: Callable[[nn.Module, Tensor], None]


# ---------------------------------------------------------------- swin


def _swin_stages(encoder: nn.Module) -> list[list[nn.Module]]:
    return [list(cast(SwinStage, stage).blocks) for stage in cast(SwinEncoder, encoder).stages]


def _swin_check(encoder: nn.Module, images: Tensor) -> None:
    check_swin_input(images, cast(SwinEncoder, encoder).in_channels)


# ---------------------------------------------------------------- resenc


def _resenc_stages(encoder: nn.Module) -> list[list[nn.Module]]:
    """DNA's stages are ``StackedResidualBlocks``, or ``Sequential(pool, StackedResidualBlocks)`` with pooling."""
    stages = []
    for stage in cast(ResidualEncoder, encoder).stages:
        stacked = stage if isinstance(stage, StackedResidualBlocks) else stage[-1]
        stages.append(list(cast(StackedResidualBlocks, stacked).blocks))
    return stages


def _resenc_stem(encoder: nn.Module) -> nn.Module:
    stem = cast(ResidualEncoder, encoder).stem
    if stem is None:
        raise ValueError("this ResidualEncoder was built without its stem (disable_default_stem); CKA needs one")
    return cast(nn.Module, stem)


def resenc_total_stride(encoder: nn.Module) -> tuple[int, ...]:
    """Down-sampling from the input to the bottleneck along each axis (the product of the stage strides)."""
    strides = cast(ResidualEncoder, encoder).strides
    return tuple(math.prod(int(stride[axis]) for stride in strides) for axis in range(len(strides[0])))


def _resenc_check(encoder: nn.Module, images: Tensor) -> None:
    """A 5-D batch with the stem's channels and every axis a multiple of that axis's total stride."""
    check_batch_channels(images, encoder_in_channels(encoder), "encoder")
    stride = resenc_total_stride(encoder)
    size = tuple(int(n) for n in images.shape[2:])
    if any(n % s or n < s for n, s in zip(size, stride, strict=True)):
        fixed = tuple(max(s, -(-n // s) * s) for n, s in zip(size, stride, strict=True))
        raise ValueError(
            f"spatial size {size} is not usable: the ResEnc encoder down-samples by {stride}, so every axis must be "
            f"a multiple of it; use a patch size such as {fixed}"
        )


#: The layer scheme of every family CKA knows, by family name.
ENCODER_LAYERS: dict[str, EncoderLayers] = {
    "swin": EncoderLayers(
        family="swin",
        encoder_class=SwinEncoder,
        stem_name="embed",
        stem=lambda encoder: cast(SwinEncoder, encoder).patch_embed,
        stages=_swin_stages,
        check_input=_swin_check,
    ),
    "resenc": EncoderLayers(
        family="resenc",
        encoder_class=ResidualEncoder,
        stem_name="stem",
        stem=_resenc_stem,
        stages=_resenc_stages,
        check_input=_resenc_check,
    ),
}


def layers_of(encoder: nn.Module) -> EncoderLayers:
    """The layer scheme of ``encoder``'s family, found by its class.

    Raises:
        TypeError: for an encoder of no family in :data:`ENCODER_LAYERS`.
    """
    for scheme in ENCODER_LAYERS.values():
        if isinstance(encoder, scheme.encoder_class):
            return scheme
    known = ", ".join(f"{s.family} ({s.encoder_class.__name__})" for s in ENCODER_LAYERS.values())
    raise TypeError(f"CKA knows the layers of {known} encoders, not of {type(encoder).__name__}")


def encoder_layer_modules(encoder: nn.Module) -> dict[str, nn.Module]:
    """The module whose output is each named layer, in forward order (stem, then ``stage{s}.block{b}``)."""
    scheme = layers_of(encoder)
    modules = {scheme.stem_name: scheme.stem(encoder)}
    for s, blocks in enumerate(scheme.stages(encoder)):
        for b, block in enumerate(blocks):
            modules[f"stage{s + 1}.block{b + 1}"] = block
    return modules


def encoder_layer_names(spec: EncoderSpec) -> list[str]:
    """Layer names in forward order: ``1 + blocks`` of them (``["embed", "stage1.block1", ...]`` for Swin).

    Args:
        spec: An encoder, or what builds one (:func:`spec_encoder`).
    """
    return list(encoder_layer_modules(spec_encoder(spec)))


def stage_layers(spec: EncoderSpec) -> list[str]:
    """The last block of every encoder stage (``stage1.block2``, ...): one layer per stage."""
    encoder = spec_encoder(spec)
    return [f"stage{s + 1}.block{len(blocks)}" for s, blocks in enumerate(layers_of(encoder).stages(encoder))]


def spec_encoder(spec: EncoderSpec) -> nn.Module:
    """``spec`` itself when it is a module, else the encoder of the network its record describes, on the meta device.

    A preset object must be the one its family's table holds under its name (a modified copy has no record).

    Raises:
        ValueError: for an unknown preset or family, or a preset object that is not in its table.
    """
    if isinstance(spec, nn.Module):
        return spec
    record = spec_record(spec)
    family = family_of(record)
    with torch.device("meta"):
        return family.encoder(family.build(record, 1, 1, False))


def spec_record(spec: Mapping[str, Any] | str | SwinPreset | ResEncPreset) -> dict[str, Any]:
    """The network record of a record, a preset name or a preset of a family's table."""
    if isinstance(spec, Mapping):
        return dict(spec)
    name = spec if isinstance(spec, str) else spec.name
    family: NetworkFamily = family_of_preset(name)
    if not isinstance(spec, str) and family.presets[name] != spec:
        raise ValueError(f"preset {name!r} differs from the {family.name} preset of that name; pass a network record")
    return family.record(name)


def encoder_in_channels(encoder: nn.Module) -> int:
    """Input channels of an encoder, from the stem's kernel ``(E, C, k, k, k)``."""
    stem = layers_of(encoder).stem(encoder)
    weight = next((p for p in stem.parameters() if p.ndim == 5), None)
    if weight is None:
        raise TypeError(f"{type(stem).__name__} has no 3D convolution kernel")
    return int(weight.shape[1])


def check_encoder_input(encoder: nn.Module, images: Tensor) -> None:
    """Raise a ValueError that says what to change when ``images`` cannot pass through ``encoder``."""
    layers_of(encoder).check_input(encoder, images)


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
