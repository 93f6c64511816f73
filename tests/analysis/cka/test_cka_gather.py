"""Gathering CKA inputs (``analysis/cka/gather.py``): encoders, layers, seeded patches and minibatches, layer hooks."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_ssl.analysis.cka.gather import (
    FinetunedFold,
    PretrainedEncoder,
    batch_sizes,
    case_patches,
    check_same_architecture,
    encoder_layer_names,
    iter_minibatches,
    layer_grams,
    load_pretrained_encoder,
    select_layers,
    stage_layers,
    strip_wrapper_prefixes,
)
from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.weights import WeightsError


def test_batch_sizes_keep_every_minibatch_at_four_or_more() -> None:
    assert batch_sizes(12, 4) == [4, 4, 4]
    assert batch_sizes(10, 4) == [4, 6]
    assert batch_sizes(13, 8) == [8, 5]
    assert batch_sizes(5, 8) == [5]
    with pytest.raises(ValueError, match="at least 4"):
        batch_sizes(10, 3)
    with pytest.raises(ValueError, match="at least 4"):
        batch_sizes(3, 8)
    blocks = [torch.full((3, 1), float(i)) for i in range(4)]  # 4 cases x 3 patches
    assert [len(b) for b in iter_minibatches(blocks, batch_sizes(12, 5))] == [5, 7]


def test_patches_are_seeded_in_bounds_and_padded() -> None:
    volume = np.arange(2 * 40 * 70 * 66, dtype=np.float32).reshape(2, 40, 70, 66)
    first = case_patches(volume, (64, 64, 64), 3, np.random.default_rng([0, 1]))
    again = case_patches(volume, (64, 64, 64), 3, np.random.default_rng([0, 1]))
    assert first.shape == (3, 2, 64, 64, 64) and torch.equal(first, again)
    # depth 40 is zero-padded 12 + 12 around the centre, as nnU-Net's inference pads
    assert torch.all(first[:, :, :12] == 0) and torch.all(first[:, :, 52:] == 0)
    assert first[:, :, 12:52].abs().amin(dim=(2, 3, 4)).gt(0).all()  # content (arange > 0 off the origin)


def test_layer_names_follow_the_preset() -> None:
    assert len(encoder_layer_names(PRESETS["smit"])) == 1 + 14
    names = encoder_layer_names(PRESETS["tiny"])
    assert names == ["embed"] + [f"stage{s}.block{b}" for s in range(1, 5) for b in (1, 2)]
    assert select_layers(names, "stage2.block1, embed") == ["embed", "stage2.block1"]
    with pytest.raises(ValueError, match="stage9"):
        select_layers(names, "embed,stage9.block1")


def test_stage_layers_are_the_last_block_of_each_stage() -> None:
    assert stage_layers("tiny") == [f"stage{s}.block2" for s in range(1, 5)]
    assert stage_layers("smit") == ["stage1.block2", "stage2.block2", "stage3.block8", "stage4.block2"]


def test_layer_grams_on_the_tiny_preset() -> None:
    torch.manual_seed(0)
    encoder = SwinEncoder(PRESETS["tiny"]).eval()
    images = torch.randn(4, 1, 64, 64, 64)
    names = encoder_layer_names(PRESETS["tiny"])
    grams = layer_grams(encoder, images, names)
    assert list(grams) == names and len(grams) == 1 + sum(PRESETS["tiny"].depths)
    assert all(k.shape == (4, 4) and k.dtype == torch.float64 for k in grams.values())
    embedded = encoder.patch_embed(images).reshape(4, -1).double()
    embedded = embedded - embedded.mean(dim=0, keepdim=True)  # features centred over the minibatch
    torch.testing.assert_close(grams["embed"], embedded @ embedded.T)
    assert not any(module._forward_hooks for module in encoder.modules())  # hooks removed


def test_sources_strip_wrappers_adapt_run_stems_and_refuse_other_presets(tmp_path: Path, monkeypatch) -> None:
    assert list(strip_wrapper_prefixes({"module._orig_mod.encoder.x": torch.zeros(1)})) == ["encoder.x"]
    encoder = SwinEncoder(PRESETS["tiny"], use_mask_token=True)

    def fake_run(run_dir: Path, source: str) -> tuple:
        return encoder.state_dict(), SimpleNamespace(preset="tiny"), "run/ckpt.pt"

    monkeypatch.setattr("nnunet_ssl.weights.export.load_run_encoder", fake_run)  # a 1-channel pretraining run
    loaded = load_pretrained_encoder(tmp_path, in_channels=2)
    assert loaded.encoder.in_channels == 2 and loaded.preset_name == "tiny"
    fold = FinetunedFold(loaded.encoder, {"family": "swin", "preset": "smit"}, "SwinSMITTrainer", "3d_fullres", {}, {},
                         tmp_path / "checkpoint_final.pth")
    with pytest.raises(WeightsError, match="checkpoint_final.pth.*'smit'"):
        check_same_architecture(PretrainedEncoder(loaded.encoder, loaded.record, "x"), fold, tmp_path / "w.pt")
