"""Network families: which kind of network a weights file holds, and how to build it back.

A family is one frozen :class:`NetworkFamily` in :data:`FAMILIES` (a literal dict, like the method
and preset tables): its name, its presets, the class it builds, where its encoder and input stem are,
and two functions (a preset -> its record, a record -> the network). Code that handles weights asks
the family instead of branching on the name, so a new family is one entry here plus its network module.

A *record* is the part of a weights file's metadata that says what architecture it holds, plain JSON:

* ``swin``: ``{"family": "swin", "preset": "smit"}`` (:data:`~nnunet_ssl.networks.presets.PRESETS`).
* ``resenc``: ``{"family": "resenc", "preset": "resenc_l", "architecture": {...}}``, the architecture as
  nnU-Net's plans write it (DNA class name, ``arch_kwargs``, ``_kw_requires_import``;
  :meth:`~nnunet_ssl.networks.resenc.ResEncPreset.architecture`). The record builds the network by
  itself, also when no preset of ours has that topology (``preset`` is then ``""``).

A record without ``"family"`` is a Swin record: every weights file written before families existed
holds a Swin network (:data:`LEGACY_FAMILY`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnunet_ssl.networks import resenc
from nnunet_ssl.networks.presets import PRESETS, get_preset
from nnunet_ssl.networks.segmentation import SwinUNETRSeg

#: The family of a record that names none: files written before families held Swin networks.
LEGACY_FAMILY = "swin"


@dataclass(frozen=True)
class NetworkFamily:
    """One kind of segmentation network that weights files may hold.

    Attributes:
        name: Key in :data:`FAMILIES`, written as ``"family"`` in a record.
        summary: One line for humans.
        presets: This family's preset table, by name (the table itself, so presets added to it at run time count;
            names are disjoint from every other family's).
        network_class: The class :meth:`build` returns (the network nnU-Net trains).
        stem_keys: Encoder-relative state-dict keys of the input projection, the tensor whose shape
            depends on the input channels (several keys when a network registers it more than once).
        provenance_buffer: Name of a uint8 buffer of the network that carries the provenance tag of an
            export through nnU-Net's loader; None when the network has no such buffer.
        make_record: Preset name -> record (see the module docstring); raises ValueError for an unknown one.
        make_network: ``(record, in_channels, num_classes, deep_supervision)`` -> network.
        network_preset: A built network of this family -> the name of the preset it has, or None.
        ssl_plans: The plans identifier ``nnunet-ssl plan --family NAME`` writes (``-p`` of its trainers).
        built_from_plans: Whether trainers build this family's network from the plans' ``architecture``
            entry (nnU-Net's own way, ResEnc), so that a weights file must have the plans' architecture;
            False when the trainer builds it from a preset whatever the plans say (Swin).
    """

    name: str
    summary: str
    presets: Mapping[str, Any]
    network_class: type[nn.Module]
    stem_keys: tuple[str, ...]
    provenance_buffer: str | None
    make_record: Callable[[str], dict[str, Any]]
    make_network: Callable[[Mapping[str, Any], int, int, bool], nn.Module]
    network_preset: Callable[[nn.Module], str | None]
    ssl_plans: str
    built_from_plans: bool = False

    #: Every family's network keeps its encoder in this attribute (state-dict prefix ``encoder.``).
    encoder_attribute: ClassVar[str] = "encoder"

    def record(self, preset_name: str) -> dict[str, Any]:
        """The metadata entries describing a network of ``preset_name`` (``family``, ``preset``, ...)."""
        return self.make_record(preset_name)

    def build(
        self, record: Mapping[str, Any], in_channels: int, num_classes: int, deep_supervision: bool = True
    ) -> nn.Module:
        """The network a record describes, freshly initialised (builds on ``torch.device("meta")`` too)."""
        return self.make_network(record, in_channels, num_classes, deep_supervision)

    def encoder(self, network: nn.Module) -> nn.Module:
        """The encoder submodule of a network of this family."""
        encoder = getattr(network, self.encoder_attribute)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"{type(network).__name__}.{self.encoder_attribute} is not a module")
        return encoder

    def owns(self, network: nn.Module) -> bool:
        """Whether ``network`` (unwrapped) is a network of this family."""
        return isinstance(network, self.network_class)

    def in_channels(self, encoder_state: Mapping[str, torch.Tensor]) -> int:
        """Input channels of an encoder state dict (from its stem kernel ``(E, C, k, k, k)``).

        Raises:
            KeyError: naming the stem key when the state has none.
        """
        return int(encoder_state[self.stem_keys[0]].shape[1])

    def plans_differences(self, record: Mapping[str, Any], plans_architecture: Mapping[str, Any] | None) -> list[str]:
        """How the plans' ``architecture`` differs from the record's (empty when it fits or the family ignores plans).

        Only families :attr:`built_from_plans` compare; the items name each differing entry, e.g.
        ``"n_stages: file 6, plans 5"``.
        """
        if not self.built_from_plans:
            return []
        if plans_architecture is None:
            return ["the plans name no architecture"]
        architecture = record.get("architecture")
        if architecture is None:
            architecture = self.make_record(_record_preset(record, self.name)).get("architecture", {})
        return resenc.architecture_differences(architecture, plans_architecture)

    def plan_command(self, record: Mapping[str, Any], dataset: str) -> str | None:
        """The `nnunet-ssl plan` command whose plans build the record's network on ``dataset``: that of the record's
        preset (for a record without one, of the preset its architecture equals); None when no preset has it."""
        preset = record.get("preset") or (resenc.preset_of_architecture(record["architecture"])
                                          if self.built_from_plans and record.get("architecture") else None)
        return f"`nnunet-ssl plan -d {dataset} --family {self.name} --preset {preset}`" if preset else None

    def describe(self, record: Mapping[str, Any]) -> str:
        """``"swin preset 'smit'"``, or ``"resenc network of a topology no preset has"``."""
        preset = record.get("preset")
        return f"{self.name} preset {preset!r}" if preset else f"{self.name} network of a topology no preset has"


# ---------------------------------------------------------------- swin


def _swin_record(preset_name: str) -> dict[str, Any]:
    get_preset(preset_name)  # raises, listing the presets
    return {"family": "swin", "preset": preset_name}


def _swin_network(record: Mapping[str, Any], in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    return SwinUNETRSeg(get_preset(_record_preset(record, "swin")), in_channels, num_classes, deep_supervision)


def _swin_network_preset(network: nn.Module) -> str | None:
    return network.preset.name if isinstance(network, SwinUNETRSeg) else None


# ---------------------------------------------------------------- resenc


def _resenc_record(preset_name: str) -> dict[str, Any]:
    preset = resenc.get_resenc_preset(preset_name)
    return {"family": "resenc", "preset": preset.name, "architecture": preset.architecture()}


def _resenc_network(record: Mapping[str, Any], in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    architecture = record.get("architecture")
    if architecture is None:  # a record naming only a preset
        architecture = resenc.get_resenc_preset(_record_preset(record, "resenc")).architecture()
    if not isinstance(architecture, Mapping):
        raise ValueError(f"a resenc record's architecture must be a mapping, got {type(architecture).__name__}")
    return resenc.network_from_architecture(architecture, in_channels, num_classes, deep_supervision)


def _resenc_network_preset(network: nn.Module) -> str | None:
    """The preset whose state-dict layout (keys and shapes) ``network`` has, built on the meta device to compare."""
    if not isinstance(network, ResidualEncoderUNet):
        return None
    layout = _layout(network)
    stem = network.state_dict()[f"encoder.{resenc.STEM_KEYS[0]}"]
    heads = network.decoder.seg_layers[-1].out_channels
    for name, preset in resenc.RESENC_PRESETS.items():
        with torch.device("meta"):
            candidate = resenc.build_resenc_unet(preset, int(stem.shape[1]), int(heads), network.decoder.deep_supervision)
        if _layout(candidate) == layout:
            return name
    return None


def _layout(network: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in network.state_dict().items()]


def _record_preset(record: Mapping[str, Any], family: str) -> str:
    preset = record.get("preset")
    if not isinstance(preset, str) or not preset:
        raise ValueError(f"a {family} record needs a preset name, got {preset!r}")
    return preset


#: The families, by name. Preset names are unique across families (:func:`family_of_preset`).
FAMILIES: dict[str, NetworkFamily] = {
    "swin": NetworkFamily(
        name="swin",
        summary="3D Swin encoder + SwinUNETR decoder (nnunet_ssl.networks.segmentation.SwinUNETRSeg)",
        presets=PRESETS,
        network_class=SwinUNETRSeg,
        stem_keys=("patch_embed.weight",),
        provenance_buffer="weights_provenance",
        make_record=_swin_record,
        make_network=_swin_network,
        network_preset=_swin_network_preset,
        ssl_plans="nnUNetSwinPlans",
    ),
    "resenc": NetworkFamily(
        name="resenc",
        summary=f"nnU-Net's residual-encoder U-Net ({resenc.RESENC_CLASS_NAME})",
        presets=resenc.RESENC_PRESETS,
        network_class=ResidualEncoderUNet,
        stem_keys=resenc.STEM_KEYS,
        provenance_buffer=None,
        make_record=_resenc_record,
        make_network=_resenc_network,
        network_preset=_resenc_network_preset,
        ssl_plans="nnUNetResEncSSLPlans",
        built_from_plans=True,
    ),
}


def shown_differences(differences: list[str], limit: int) -> str:
    """The first ``limit`` differences joined for a message, with how many more there are."""
    more = f" (and {len(differences) - limit} more)" if len(differences) > limit else ""
    return "; ".join(differences[:limit]) + more


def get_family(name: str) -> NetworkFamily:
    """Look up a family by name with an error that lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown network family {name!r}; this nnunet-ssl knows {sorted(FAMILIES)} (a newer nnunet-ssl may have "
            "written it)"
        ) from None


def family_of(record: Mapping[str, Any]) -> NetworkFamily:
    """The family a record (a weights file's metadata) names; :data:`LEGACY_FAMILY` when it names none."""
    name = record.get("family", LEGACY_FAMILY)
    if not isinstance(name, str):
        raise ValueError(f"a record's family must be a name, got {name!r}")
    return get_family(name)


def family_of_preset(preset_name: str) -> NetworkFamily:
    """The family that offers ``preset_name``.

    Raises:
        ValueError: listing every family's presets when none offers it.
    """
    for family in FAMILIES.values():
        if preset_name in family.presets:
            return family
    offered = "; ".join(f"{f.name}: {', '.join(sorted(f.presets))}" for f in FAMILIES.values())
    raise ValueError(f"unknown preset {preset_name!r}; choose one of {offered}")


def family_of_network(network: nn.Module) -> NetworkFamily | None:
    """The family whose class ``network`` is (unwrap DDP/compile first); None for a network of no family."""
    return next((family for family in FAMILIES.values() if family.owns(network)), None)
