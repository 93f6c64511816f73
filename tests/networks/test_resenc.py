"""ResEnc presets and builder: topology, shapes, the recorded architecture and what a record may name."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from nnunet_ssl.networks.resenc import (
    ALLOWED_CLASSES,
    RESENC_PRESETS,
    STEM_KEYS,
    ResEncPreset,
    build_resenc_unet,
    get_resenc_preset,
    network_from_architecture,
    preset_of_architecture,
)


def test_resenc_l_is_card_10s_topology() -> None:
    preset = RESENC_PRESETS["resenc_l"]
    assert preset.features_per_stage == (32, 64, 128, 256, 320, 320)
    assert preset.blocks_per_stage == (1, 3, 4, 6, 6, 6)
    assert preset.strides == (1, 2, 2, 2, 2, 2) and preset.kernel_size == 3 and preset.total_stride == 32
    assert preset.input_size == 160
    with torch.device("meta"):
        network = build_resenc_unet(preset, 1, 3)
    assert type(network) is ResidualEncoderUNet
    assert sum(p.numel() for p in network.parameters()) == 102_350_575  # 1 channel in, 3 out
    norms = [m for m in network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.eps == 1e-5 and m.affine for m in norms)
    assert {type(m) for m in network.modules() if type(m).__module__ == "torch.nn.modules.activation"} == {torch.nn.LeakyReLU}
    convs = [m for m in network.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert {m.kernel_size for m in convs} == {(3, 3, 3), (1, 1, 1)}  # 1^3: DNA's residual projections
    assert all(m.bias is not None for m in convs if m.kernel_size == (3, 3, 3))  # conv_bias=True


def test_tiny_has_the_same_structure_and_runs_at_64() -> None:
    tiny, large = RESENC_PRESETS["resenc_tiny"], RESENC_PRESETS["resenc_l"]
    assert (tiny.n_stages, tiny.strides, tiny.kernel_size, tiny.conv_per_stage_decoder) == (
        large.n_stages, large.strides, large.kernel_size, large.conv_per_stage_decoder)
    assert [f * 8 for f in tiny.features_per_stage] == list(large.features_per_stage)
    assert all(t <= b for t, b in zip(tiny.blocks_per_stage, large.blocks_per_stage, strict=True))
    # same arch kwargs except the widths and block counts
    a, b = tiny.arch_kwargs(), large.arch_kwargs()
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"features_per_stage", "n_blocks_per_stage"}
    torch.manual_seed(0)
    network = build_resenc_unet(tiny, 2, 3, deep_supervision=True).eval()
    assert sum(p.numel() for p in network.parameters()) < 1_000_000
    with torch.no_grad():
        outputs = network(torch.randn(1, 2, 64, 64, 64))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 64 // 2**i, 64 // 2**i, 64 // 2**i) for i in range(5)]
    network.decoder.deep_supervision = False
    with torch.no_grad():
        assert tuple(network(torch.randn(1, 2, 64, 64, 64)).shape) == (1, 3, 64, 64, 64)


def test_stem_keys_are_the_one_input_projection() -> None:
    network = build_resenc_unet(RESENC_PRESETS["resenc_tiny"], 3, 2)
    state = network.encoder.state_dict()
    first, second = (state[k] for k in STEM_KEYS)
    assert first.shape == (4, 3, 3, 3, 3) and first.data_ptr() == second.data_ptr()
    # DNA's own record of where the input projection is
    assert [f"encoder.{k}" for k in STEM_KEYS] == [f"{k}.weight" for k in network.keys_to_in_proj]


def test_architecture_record_is_json_and_builds_the_same_network() -> None:
    preset = RESENC_PRESETS["resenc_tiny"]
    record = json.loads(json.dumps(preset.architecture()))
    torch.manual_seed(3)
    a = build_resenc_unet(preset, 1, 2)
    torch.manual_seed(3)
    b = network_from_architecture(record, 1, 2)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert preset_of_architecture(record) == "resenc_tiny"


def test_preset_of_architecture_compares_classes_not_spellings() -> None:
    record = RESENC_PRESETS["resenc_l"].architecture()
    spelled = {**record, "arch_kwargs": {**record["arch_kwargs"], "conv_op": "torch.nn.Conv3d",
                                         "strides": tuple(tuple(s) for s in record["arch_kwargs"]["strides"])}}
    assert preset_of_architecture(spelled) == "resenc_l"
    wider = {**record, "arch_kwargs": {**record["arch_kwargs"], "features_per_stage": [32, 64, 128, 256, 320, 512]}}
    assert preset_of_architecture(wider) is None
    assert preset_of_architecture({"arch_kwargs": []}) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"network_class_name": "os.system"}, "network_class_name 'os.system' is not one of"),
        ({"network_class_name": "torch.nn.Conv3d"}, "is not dynamic_network_architectures"),
        ({"arch_kwargs_nonlin": "builtins.eval"}, "nonlin 'builtins.eval' is not one of"),
        ({"arch_kwargs": None}, "needs network_class_name and arch_kwargs"),
    ],
)
def test_a_record_names_only_allowed_classes(change: dict, message: str) -> None:
    record = RESENC_PRESETS["resenc_tiny"].architecture()
    if "arch_kwargs_nonlin" in change:
        record["arch_kwargs"]["nonlin"] = change["arch_kwargs_nonlin"]
    else:
        record.update(change)
    with pytest.raises(ValueError, match=message):
        network_from_architecture(record, 1, 2)


def test_allowed_classes_are_torch_and_dna_only() -> None:
    assert {cls.__module__.split(".")[0] for cls in ALLOWED_CLASSES.values()} == {"torch", "dynamic_network_architectures"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features_per_stage": (8,), "blocks_per_stage": (1,), "strides": (1,)}, "at least 2 stages"),
        ({"features_per_stage": (8, 16), "blocks_per_stage": (1,), "strides": (1, 2)}, "one entry per stage"),
        ({"features_per_stage": (8, 0), "blocks_per_stage": (1, 1), "strides": (1, 2)}, ">= 1"),
        ({"features_per_stage": (8, 16), "blocks_per_stage": (1, 1), "strides": (1, 2), "kernel_size": 2}, "odd"),
        ({"features_per_stage": (8, 16), "blocks_per_stage": (1, 1), "strides": (1, 2), "input_size": 63},
         "not a multiple of the total stride 2"),
    ],
)
def test_bad_presets_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ResEncPreset("bad", **kwargs)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'resenc_xl'.*\['resenc_l', 'resenc_tiny'\]"):
        get_resenc_preset("resenc_xl")
    assert dataclasses.replace(RESENC_PRESETS["resenc_l"], name="x").architecture() == RESENC_PRESETS["resenc_l"].architecture()
