"""CKA of nnU-Net's residual encoder (ResEnc), per residual block: layers, input checks, the run path, refusals.

The fine-tuned folds are written as nnU-Net writes them for its own ``nnUNetTrainer`` (and one for
nnunet-ssl's ``ResEncSpark3DTrainer``) on plans whose ``3d_fullres`` architecture is ``resenc_tiny``'s:
the network nnU-Net builds from the plans. The pretrained encoder is a ``resenc_tiny`` weights file
as ``nnunet-ssl export`` writes it for Spark3D.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_cka_helpers import nnunet_plans, write_nnunet_fold, write_raw_ct_cases

from nnunet_ssl.analysis.cka.gather import (
    check_encoder_input,
    encoder_layer_names,
    layer_grams,
    load_finetuned_fold,
    load_pretrained_encoder,
    stage_layers,
)
from nnunet_ssl.analysis.cka.layers import resenc_total_stride
from nnunet_ssl.analysis.cka.run import CKASettings, cka_between_folds, run_cka
from nnunet_ssl.cli import main
from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet, network_from_architecture
from nnunet_ssl.weights import WeightsError, build_weights_file, save_weights_file

TINY = RESENC_PRESETS["resenc_tiny"]
#: resenc_tiny's layer names by hand: the stem, then blocks 1-1-2-2-2-2 of stages 1..6.
TINY_LAYERS = ["stem", "stage1.block1", "stage2.block1", "stage3.block1", "stage3.block2", "stage4.block1",
               "stage4.block2", "stage5.block1", "stage5.block2", "stage6.block1", "stage6.block2"]
#: nnU-Net's plain U-Net: a network of no family nnunet-ssl knows.
PLAIN_UNET = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
              "arch_kwargs": {"n_stages": 2}, "_kw_requires_import": []}


def _randomise_norms(network: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every InstanceNorm a random affine: DNA zeroes each residual block's last norm at init, which would make
    a block's output its skip path whatever its convolutions hold."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def _with_new_stage6(weights: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The network with every tensor of encoder stage 6 perturbed (DNA's decoder holds the same tensors as
    ``decoder.encoder.*``: both keys get the same new tensor), everything else unchanged."""
    new: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        encoder_key = key.removeprefix("decoder.")
        if encoder_key.startswith("encoder.stages.5.") and value.is_floating_point():
            if encoder_key not in new:
                scale = float(value.std()) if value.numel() > 1 else 0.1
                new[encoder_key] = value + scale * torch.randn(value.shape, generator=generator)
            new[key] = new[encoder_key]
        else:
            new.setdefault(key, value)
    return new


@pytest.fixture(scope="module")
def resenc_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A resenc_tiny weights file, folds of nnUNetTrainer (same network; another topology; a network of no family;
    a ResEnc naming a class we do not build) and of ResEncSpark3DTrainer (stage 6 changed), and 2 raw CT cases."""
    root = tmp_path_factory.mktemp("cka_resenc")
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(3)
    network = build_resenc_unet(TINY, 1, 2)
    _randomise_norms(network.encoder, generator)
    payload = build_weights_file(network.encoder.state_dict(), "resenc_tiny", 1, 2, method="spark3d")
    weights = save_weights_file(payload, root / "resenc_tiny.pt")
    plans = nnunet_plans(64, TINY.architecture(), "ZScoreNormalization")
    results = root / "Dataset990_CKA"
    same = write_nnunet_fold(results / "nnUNetTrainer__same__3d_fullres", dict(payload["network_weights"]),
                             "nnUNetTrainer", plans)
    stage6 = write_nnunet_fold(results / "ResEncSpark3DTrainer__stage6__3d_fullres",  # nnunet-ssl's ResEnc trainer
                               _with_new_stage6(payload["network_weights"], generator), "ResEncSpark3DTrainer", plans)
    other = dataclasses.replace(TINY, name="other", blocks_per_stage=(1, 1, 1, 2, 2, 2))
    other_fold = write_nnunet_fold(results / "nnUNetTrainer__other__3d_fullres",
                                   build_resenc_unet(other, 1, 2).state_dict(), "nnUNetTrainer",
                                   nnunet_plans(64, other.architecture(), "ZScoreNormalization"))
    plain_fold = write_nnunet_fold(results / "nnUNetTrainer__plain__3d_fullres", dict(payload["network_weights"]),
                                   "nnUNetTrainer", nnunet_plans(64, PLAIN_UNET, "ZScoreNormalization"))
    unbuildable = TINY.architecture()
    unbuildable["arch_kwargs"]["norm_op"] = "torch.nn.GroupNorm"  # a class a recorded architecture may not name
    bad_fold = write_nnunet_fold(results / "nnUNetTrainer__bad__3d_fullres", dict(payload["network_weights"]),
                                 "nnUNetTrainer", nnunet_plans(64, unbuildable, "ZScoreNormalization"))
    swin = build_weights_file(SwinEncoder(PRESETS["tiny"]).state_dict(), "tiny", 1, 2, method="smit")
    return {
        "weights": weights, "same": same, "stage6": stage6, "other": other_fold, "plain": plain_fold, "bad": bad_fold,
        "swin": save_weights_file(swin, root / "swin_tiny.pt"), "images": write_raw_ct_cases(root / "imagesTs", 2),
    }


def test_layer_names_are_the_stem_and_every_residual_block() -> None:
    assert len(TINY_LAYERS) == 1 + sum(TINY.blocks_per_stage)
    record = {"family": "resenc", "preset": "", "architecture": TINY.architecture()}
    assert encoder_layer_names("resenc_tiny") == encoder_layer_names(TINY) == encoder_layer_names(record) == TINY_LAYERS
    assert encoder_layer_names(build_resenc_unet(TINY, 1, 2).encoder) == TINY_LAYERS
    assert stage_layers("resenc_tiny") == ["stage1.block1", "stage2.block1", "stage3.block2", "stage4.block2",
                                           "stage5.block2", "stage6.block2"]
    # ResEnc-L: blocks 1-3-4-6-6-6, 6 stages
    assert len(encoder_layer_names("resenc_l")) == 1 + 26
    assert stage_layers("resenc_l") == ["stage1.block1", "stage2.block3", "stage3.block4", "stage4.block6",
                                        "stage5.block6", "stage6.block6"]


def test_layer_grams_hook_the_stem_and_blocks() -> None:
    torch.manual_seed(0)
    encoder = build_resenc_unet(TINY, 1, 2).encoder.eval()
    images = torch.randn(4, 1, 64, 64, 64)
    grams = layer_grams(encoder, images, ["stem", "stage6.block2"])
    with torch.no_grad():
        stem = encoder.stem(images).reshape(4, -1).double()
        bottleneck = encoder(images)[-1].reshape(4, -1).double()  # the last block of the last stage
    for name, features in (("stem", stem), ("stage6.block2", bottleneck)):
        features = features - features.mean(dim=0, keepdim=True)
        torch.testing.assert_close(grams[name], features @ features.T)
    assert not any(module._forward_hooks for module in encoder.modules())


def test_input_must_be_a_multiple_of_the_total_stride_on_every_axis() -> None:
    encoder = build_resenc_unet(TINY, 1, 2).encoder
    assert resenc_total_stride(encoder) == (32, 32, 32)
    check_encoder_input(encoder, torch.zeros(1, 1, 64, 96, 32))
    with pytest.raises(ValueError, match=r"\(64, 48, 64\).*multiple of it; use a patch size such as \(64, 64, 64\)"):
        check_encoder_input(encoder, torch.zeros(1, 1, 64, 48, 64))
    with pytest.raises(ValueError, match="1 input channel"):
        check_encoder_input(encoder, torch.zeros(1, 2, 64, 64, 64))
    # an anisotropic plan (nnU-Net's planners keep a thick-slice axis at stride 1): strides per axis
    architecture = TINY.architecture()
    architecture["arch_kwargs"]["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    anisotropic = network_from_architecture(architecture, 1, 2).encoder
    assert resenc_total_stride(anisotropic) == (16, 32, 32)
    check_encoder_input(anisotropic, torch.zeros(1, 1, 48, 64, 64))
    with pytest.raises(ValueError, match=r"\(16, 32, 32\)"):
        check_encoder_input(anisotropic, torch.zeros(1, 1, 40, 64, 64))


def test_sources_give_the_resenc_record(resenc_inputs: dict[str, Any]) -> None:
    fold = load_finetuned_fold(resenc_inputs["same"])
    assert fold.record == {"family": "resenc", "preset": "resenc_tiny", "architecture": TINY.architecture()}
    assert fold.trainer_name == "nnUNetTrainer" and fold.family.name == "resenc"
    assert fold.plans["configurations"]["3d_fullres"]["patch_size"] == [64, 64, 64]  # no patch fitting
    pretrained = load_pretrained_encoder(resenc_inputs["weights"], 1)
    assert pretrained.record["family"] == "resenc" and pretrained.preset_name == "resenc_tiny"
    for a, b in zip(pretrained.encoder.state_dict().values(), fold.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = load_finetuned_fold(resenc_inputs["other"])
    assert other.preset_name == "" and other.family.describe(other.record) == "resenc network of a topology no preset has"


def test_a_resenc_pretraining_run_gets_its_stem_adapted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-channel run for a 2-channel fold: the stem (registered twice by DNA) replicated as export would."""
    encoder = build_resenc_unet(TINY, 1, 2).encoder
    state = encoder.state_dict()

    def fake_run(run_dir: Path, source: str) -> tuple:
        return state, SimpleNamespace(preset="resenc_tiny"), "run/checkpoint_final.pt"

    monkeypatch.setattr("nnunet_ssl.weights.export.load_run_encoder", fake_run)
    loaded = load_pretrained_encoder(tmp_path, in_channels=2)
    assert loaded.record == {"family": "resenc", "preset": "resenc_tiny", "architecture": TINY.architecture()}
    assert loaded.source == "run/checkpoint_final.pt (default)"
    stem = loaded.encoder.state_dict()["stem.convs.0.conv.weight"]
    torch.testing.assert_close(stem, state["stem.convs.0.conv.weight"].repeat(1, 2, 1, 1, 1) / 2)
    assert torch.equal(loaded.encoder.state_dict()["stages.5.blocks.1.conv2.conv.weight"],
                       state["stages.5.blocks.1.conv2.conv.weight"])


def test_cka_command_on_one_resenc_encoder_is_one_at_every_block(resenc_inputs: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cka"
    argv = ["cka", "--pretrained", str(resenc_inputs["weights"]), "--finetuned", str(resenc_inputs["same"]),
            "--data", str(resenc_inputs["images"]), "--out", str(out), "--patches-per-case", "2", "--batch-size", "4",
            "--device", "cpu"]
    assert main(argv) == 0
    with open(out / "cka_per_layer.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == TINY_LAYERS
    assert all(float(r["cka"]) == pytest.approx(1.0, abs=1e-6) for r in rows)
    summary = json.loads((out / "cka_settings.json").read_text(encoding="utf-8"))
    assert (summary["family"], summary["preset"], summary["trainer"]) == ("resenc", "resenc_tiny", "nnUNetTrainer")
    assert summary["patch_size"] == [64, 64, 64] and summary["examples"] == 4


def test_a_new_stage_6_leaves_every_earlier_block_at_one(resenc_inputs: dict[str, Any], tmp_path: Path) -> None:
    settings = CKASettings(str(resenc_inputs["weights"]), str(resenc_inputs["stage6"]), str(resenc_inputs["images"]),
                           str(tmp_path), patches_per_case=2, batch_size=4, device="cpu")
    per_layer = dict(run_cka(settings).per_layer())
    assert list(per_layer) == TINY_LAYERS
    before = {name: value for name, value in per_layer.items() if not name.startswith("stage6.")}
    assert len(before) == 9 and all(value == pytest.approx(1.0, abs=1e-6) for value in before.values())
    assert per_layer["stage6.block1"] < 0.99 and per_layer["stage6.block2"] < 0.99  # 0.907, 0.108 here


def test_two_folds_per_stage(resenc_inputs: dict[str, Any]) -> None:
    result = cka_between_folds(resenc_inputs["stage6"], resenc_inputs["same"], resenc_inputs["images"],
                               patches_per_case=2, batch_size=4)
    assert result.layers == stage_layers("resenc_tiny")
    assert (result.provenance["family"], result.provenance["trainer"]) == ("resenc", "ResEncSpark3DTrainer")
    values = [value for _, value in result.per_layer()]
    assert values[:5] == pytest.approx([1.0] * 5, abs=1e-6) and values[5] < 0.99


def test_refusals_name_both_networks(resenc_inputs: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    common = ["--data", str(resenc_inputs["images"]), "--out", str(tmp_path / "out")]
    # another topology: the blocks per stage differ
    assert main(["cka", "--pretrained", str(resenc_inputs["weights"]), "--finetuned", str(resenc_inputs["other"]),
                 *common]) == 1
    line = caplog.records[-1].getMessage()
    assert "resenc_tiny.pt holds a resenc preset 'resenc_tiny' encoder" in line
    assert "nnUNetTrainer__other__3d_fullres/fold_0/checkpoint_final.pth was trained by nnUNetTrainer" in line
    assert "n_blocks_per_stage: file [1, 1, 2, 2, 2, 2], plans [1, 1, 1, 2, 2, 2]" in line and "\n" not in line
    # another family
    assert main(["cka", "--pretrained", str(resenc_inputs["swin"]), "--finetuned", str(resenc_inputs["same"]),
                 *common]) == 1
    assert "swin preset 'tiny'" in caplog.text and "family: swin vs resenc" in caplog.text
    # a network of no family we know
    assert main(["cka", "--pretrained", str(resenc_inputs["weights"]), "--finetuned", str(resenc_inputs["plain"]),
                 *common]) == 1
    line = caplog.records[-1].getMessage()
    assert "nnUNetTrainer__plain__3d_fullres/plans.json: nnUNetTrainer builds the 3d_fullres network from the plans, " \
           "a dynamic_network_architectures.architectures.unet.PlainConvUNet, which is of no network family" in line
    assert "\n" not in line
    with pytest.raises(WeightsError, match="of no network family"):
        load_finetuned_fold(resenc_inputs["plain"])
    # a ResEnc the family cannot build
    with pytest.raises(WeightsError, match=r"__bad__3d_fullres/fold_0/checkpoint_final.pth: norm_op 'torch.nn.GroupNorm'"):
        load_finetuned_fold(resenc_inputs["bad"])
    # two folds of different topologies
    with pytest.raises(ValueError, match=r"__same__.*resenc preset 'resenc_tiny'.*__other__.*n_blocks_per_stage"):
        cka_between_folds(resenc_inputs["same"], resenc_inputs["other"], resenc_inputs["images"])
