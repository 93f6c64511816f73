"""The -pretrained_weights file: round trip, nnU-Net's loader, stem adaptation and clear mismatches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from nnunet_ssl.networks import PRESETS, SwinEncoder, SwinUNETRSeg
from nnunet_ssl.weights import (
    WeightsError,
    build_weights_file,
    check_weights_against_network,
    encoder_digest,
    load_weights_file,
    save_weights_file,
)
from nnunet_ssl.weights.format import adapt_stem


@pytest.fixture(scope="module")
def pretrained_encoder() -> SwinEncoder:
    torch.manual_seed(123)
    return SwinEncoder(PRESETS["tiny"], in_channels=1, use_mask_token=True)


def test_round_trip_and_nnunet_loader(tmp_path: Path, pretrained_encoder: SwinEncoder) -> None:
    payload = build_weights_file(pretrained_encoder.state_dict(), "tiny", 1, 3, method="smit", source="unit-test")
    path = save_weights_file(payload, tmp_path / "w.pt")
    weights, metadata = load_weights_file(path)
    assert metadata["method"] == "smit" and metadata["preset"] == "tiny"
    assert metadata["encoder_digest"] == encoder_digest(pretrained_encoder.state_dict())
    assert "encoder.mask_token" not in weights
    # nnU-Net's own loader accepts it and the encoder then equals the pretrained one
    target = SwinUNETRSeg(PRESETS["tiny"], 1, 5)  # another class count: heads are skipped
    load_pretrained_weights(target, str(path))
    for key, value in pretrained_encoder.state_dict().items():
        if key != "mask_token":
            assert torch.equal(target.encoder.state_dict()[key], value), key
    assert target.provenance() == {"method": "smit", "preset": "tiny", "digest": metadata["encoder_digest"]}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def test_export_is_reproducible(pretrained_encoder: SwinEncoder) -> None:
    a = build_weights_file(pretrained_encoder.state_dict(), "tiny", 1, 2, method="smit", decoder_seed=7)
    b = build_weights_file(pretrained_encoder.state_dict(), "tiny", 1, 2, method="smit", decoder_seed=7)
    for key in a["network_weights"]:
        assert torch.equal(a["network_weights"][key], b["network_weights"][key]), key


def test_stem_replicated_and_scaled_for_multichannel(pretrained_encoder: SwinEncoder) -> None:
    payload = build_weights_file(pretrained_encoder.state_dict(), "tiny", 3, 2, method="smit")
    stem = payload["network_weights"]["encoder.patch_embed.weight"]
    original = pretrained_encoder.state_dict()["patch_embed.weight"]
    assert stem.shape[1] == 3
    torch.testing.assert_close(stem.sum(dim=1, keepdim=True), original)
    assert "x3" in payload["metadata"]["channel_adaptation"] and payload["metadata"]["channel_mode"] == "replicate"
    # identical channels give the pretrained response of the stem
    net = SwinUNETRSeg(PRESETS["tiny"], 3, 2)
    net.load_state_dict(payload["network_weights"])
    x = torch.randn(1, 1, 64, 64, 64)
    single = torch.nn.functional.conv3d(x, original, pretrained_encoder.patch_embed.bias, stride=2)
    torch.testing.assert_close(net.encoder.patch_embed(x.repeat(1, 3, 1, 1, 1)), single, rtol=1e-5, atol=1e-5)


def test_adapt_stem_refuses_multi_to_other_multi() -> None:
    with pytest.raises(WeightsError, match="replicate needs a 1-channel source"):
        adapt_stem(torch.zeros(4, 2, 2, 2, 2), 3)


def test_wrong_preset_is_named_with_the_fix(tmp_path: Path, pretrained_encoder: SwinEncoder) -> None:
    with pytest.raises(WeightsError, match="preset 'monai'"):
        build_weights_file(pretrained_encoder.state_dict(), "monai", 1, 2, method="smit")
    path = save_weights_file(build_weights_file(pretrained_encoder.state_dict(), "tiny", 1, 2, method="smit"), tmp_path / "t.pt")
    with torch.device("meta"):
        smit_net = SwinUNETRSeg(PRESETS["smit"], 1, 2)
    with pytest.raises(WeightsError, match=r"t\.pt.*encoder\.patch_embed\.weight.*preset 'tiny'.*'smit'"):
        check_weights_against_network(path, smit_net, "SwinSMITTrainer")


def test_wrong_channel_count_is_named_with_the_fix(tmp_path: Path, pretrained_encoder: SwinEncoder) -> None:
    path = save_weights_file(build_weights_file(pretrained_encoder.state_dict(), "tiny", 1, 2, method="smit"), tmp_path / "c.pt")
    with pytest.raises(WeightsError, match=r"patch_embed.*1 input channel\(s\), the dataset 2"):
        check_weights_against_network(path, SwinUNETRSeg(PRESETS["tiny"], 2, 2), "SwinSMITTrainer")


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights_file(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match=r"corrupt\.pt: not a readable weights file \(UnpicklingError: "):
        load_weights_file(corrupt)
    bare = tmp_path / "bare.pt"
    torch.save({"a": torch.zeros(1)}, bare)
    with pytest.raises(WeightsError, match="no 'network_weights'"):
        load_weights_file(bare)


def test_digest_ignores_mask_token_and_detects_changes(pretrained_encoder: SwinEncoder) -> None:
    state = dict(pretrained_encoder.state_dict())
    without_token = {k: v for k, v in state.items() if k != "mask_token"}
    assert encoder_digest(state) == encoder_digest(without_token)
    changed = dict(without_token)
    changed["patch_embed.bias"] = changed["patch_embed.bias"] + 1e-3
    assert encoder_digest(changed) != encoder_digest(without_token)
