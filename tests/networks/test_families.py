"""The network families: every preset's record builds its network back, and a network names its family and preset."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nnunet_ssl.networks.family import (
    FAMILIES,
    LEGACY_FAMILY,
    NetworkFamily,
    family_of,
    family_of_network,
    family_of_preset,
    get_family,
)
from nnunet_ssl.networks.presets import PRESETS
from nnunet_ssl.networks.resenc import RESENC_PRESETS

ALL_PRESETS = [(family.name, preset) for family in FAMILIES.values() for preset in family.presets]


def test_families_and_their_presets() -> None:
    assert set(FAMILIES) == {"swin", "resenc"} and all(name == f.name for name, f in FAMILIES.items())
    assert FAMILIES["swin"].presets is PRESETS and FAMILIES["resenc"].presets is RESENC_PRESETS
    names = [preset for _, preset in ALL_PRESETS]
    assert len(names) == len(set(names)), "a preset name must say which family it belongs to"


@pytest.mark.parametrize(("family_name", "preset"), ALL_PRESETS)
def test_a_records_network_names_its_family_and_preset(family_name: str, preset: str) -> None:
    family = family_of_preset(preset)
    assert family is FAMILIES[family_name]
    record = json.loads(json.dumps(family.record(preset)))  # plain JSON, as a weights file keeps it
    assert record["family"] == family_name and record["preset"] == preset
    assert family_of(record) is family
    with torch.device("meta"):
        network = family.build(record, 2, 3, deep_supervision=True)
    assert family.owns(network) and family_of_network(network) is family
    assert family.network_preset(network) == preset
    encoder_state = family.encoder(network).state_dict()
    assert all(key in encoder_state for key in family.stem_keys)
    assert family.in_channels(encoder_state) == 2
    if family.provenance_buffer is not None:
        assert family.provenance_buffer in dict(network.named_buffers())
    assert family.describe(record) == f"{family_name} preset {preset!r}"


def test_a_record_without_a_family_is_swin() -> None:
    assert LEGACY_FAMILY == "swin"
    assert family_of({"preset": "smit"}) is FAMILIES["swin"] and family_of({}) is FAMILIES["swin"]


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown network family 'vit'; this nnunet-ssl knows \['resenc', 'swin'\]"):
        family_of({"family": "vit"})
    with pytest.raises(ValueError, match="must be a name"):
        family_of({"family": 3})
    with pytest.raises(ValueError, match=r"unknown preset 'resenc_m'; choose one of swin: .*smit.*; resenc: resenc_l, resenc_tiny"):
        family_of_preset("resenc_m")
    with pytest.raises(ValueError, match="unknown ResEnc preset 'smit'"):
        get_family("resenc").record("smit")
    with pytest.raises(ValueError, match="unknown preset 'resenc_l'"):
        get_family("swin").record("resenc_l")


def test_a_resenc_record_builds_from_its_architecture_also_without_a_preset() -> None:
    resenc = get_family("resenc")
    custom = resenc.record("resenc_tiny")
    custom["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32, 48, 48]
    custom["preset"] = ""
    network = resenc.build(custom, 1, 2)
    assert network.encoder.stages[-1].output_channels == 48
    assert resenc.network_preset(network) is None
    assert resenc.describe(custom) == "resenc network of a topology no preset has"
    # a record naming only a preset builds that preset
    torch.manual_seed(0)
    by_name = resenc.build({"family": "resenc", "preset": "resenc_tiny"}, 1, 2)
    torch.manual_seed(0)
    by_architecture = resenc.build(resenc.record("resenc_tiny"), 1, 2)
    assert all(torch.equal(v, by_architecture.state_dict()[k]) for k, v in by_name.state_dict().items())


def test_a_network_of_no_family() -> None:
    assert family_of_network(nn.Conv3d(1, 1, 3)) is None
    assert all(not family.owns(nn.Identity()) for family in FAMILIES.values())
    assert isinstance(FAMILIES["swin"], NetworkFamily)
