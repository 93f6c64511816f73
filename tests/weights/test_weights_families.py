"""Weights files name their network family: Swin files as before (old ones read as Swin), ResEnc files that
nnU-Net's own network loads, and mismatches across families named with the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ssl.networks import PRESETS, SwinEncoder, SwinUNETRSeg
from nnunet_ssl.networks.family import FAMILIES
from nnunet_ssl.networks.resenc import RESENC_PRESETS, STEM_KEYS, build_resenc_unet
from nnunet_ssl.weights import WeightsError, build_weights_file, check_weights_against_network, load_weights_file, save_weights_file
from nnunet_ssl.weights.format import weights_family

DATA = Path(__file__).parent / "data"
#: Metadata of a Swin file written by nnunet-ssl 239ad09 (before families) from :func:`deterministic_swin_encoder`
#: with the arguments of :func:`swin_payload`.
LEGACY_METADATA = DATA / "swin_tiny_metadata_239ad09.json"


def deterministic_swin_encoder() -> dict[str, torch.Tensor]:
    """A tiny-preset encoder state with values from a formula (no RNG), so its digest is the same on every torch."""
    with torch.device("meta"):
        encoder = SwinEncoder(PRESETS["tiny"], in_channels=1, use_mask_token=True)
    return {
        key: torch.sin(torch.arange(value.numel(), dtype=torch.float64) * 0.37 + i).to(value.dtype).reshape(value.shape) * 0.05
        for i, (key, value) in enumerate(sorted(encoder.state_dict().items()))
    }


def swin_payload() -> dict:
    return build_weights_file(
        deterministic_swin_encoder(), "tiny", 1, 3, method="smit", source="legacy fixture",
        intensity={"modality": "CT", "window": [-500, 500], "range": [0, 1]}, decoder_seed=0,
    )


@pytest.fixture(scope="module")
def resenc_encoder() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return build_resenc_unet(RESENC_PRESETS["resenc_tiny"], 1, 2).encoder.state_dict()


def nnunet_built(architecture: dict, in_channels: int, num_classes: int) -> torch.nn.Module:
    """nnU-Net's own network for a plans architecture entry (``get_network_from_plans``, as its trainer calls it)."""
    return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                  architecture["_kw_requires_import"], in_channels, num_classes, deep_supervision=True)


# ---------------------------------------------------------------- swin: as before


def test_swin_metadata_is_the_legacy_metadata_plus_the_family() -> None:
    legacy = json.loads(LEGACY_METADATA.read_text(encoding="utf-8"))
    assert "family" not in legacy
    assert swin_payload()["metadata"] == {**legacy, "family": "swin"}  # no 'architecture' entry for Swin


def test_a_file_written_before_families_reads_as_swin(tmp_path: Path) -> None:
    legacy = json.loads(LEGACY_METADATA.read_text(encoding="utf-8"))
    path = tmp_path / "old.pt"
    torch.save({"network_weights": swin_payload()["network_weights"], "metadata": legacy}, path)
    _, metadata = load_weights_file(path)
    assert metadata == {**legacy, "family": "swin"}
    assert weights_family(metadata, path) is FAMILIES["swin"]
    assert check_weights_against_network(path, SwinUNETRSeg(PRESETS["tiny"], 1, 3), "SwinSMITTrainer") == metadata
    with torch.device("meta"):
        smit = SwinUNETRSeg(PRESETS["smit"], 1, 3)
    with pytest.raises(WeightsError, match=r"holds an encoder of preset 'tiny' but SwinSMITTrainer builds preset 'smit': train with"):
        check_weights_against_network(path, smit, "SwinSMITTrainer")


def test_a_file_without_metadata_has_no_family(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save({"network_weights": {}}, path)
    _, metadata = load_weights_file(path)
    assert metadata == {} and weights_family(metadata, path) is None


# ---------------------------------------------------------------- resenc


def test_a_resenc_file_loads_into_nnunets_own_network(tmp_path: Path, resenc_encoder: dict[str, torch.Tensor]) -> None:
    payload = build_weights_file(resenc_encoder, "resenc_tiny", 1, 3, method="spark3d", decoder_seed=4)
    path = save_weights_file(payload, tmp_path / "r.pt")
    weights, metadata = load_weights_file(path)
    architecture = RESENC_PRESETS["resenc_tiny"].architecture()
    assert metadata["family"] == "resenc" and metadata["preset"] == "resenc_tiny" and metadata["architecture"] == architecture
    assert weights_family(metadata, path) is FAMILIES["resenc"]
    assert "weights_provenance" not in weights  # DNA's network has no buffer for it
    # nnU-Net builds the network from the recorded architecture and loads the file with its own loader
    network = nnunet_built(metadata["architecture"], 1, 5)  # another head count: heads are skipped
    load_pretrained_weights(network, str(path))
    for key, value in resenc_encoder.items():
        assert torch.equal(network.encoder.state_dict()[key], value), key
    assert check_weights_against_network(path, network, "nnUNetTrainer") == metadata
    # reproducible, decoder included
    again = build_weights_file(resenc_encoder, "resenc_tiny", 1, 3, method="spark3d", decoder_seed=4)
    assert all(torch.equal(v, again["network_weights"][k]) for k, v in payload["network_weights"].items())


def test_a_resenc_stem_is_adapted_under_both_of_its_keys(resenc_encoder: dict[str, torch.Tensor]) -> None:
    payload = build_weights_file(resenc_encoder, "resenc_tiny", 3, 2, method="spark3d")
    original = resenc_encoder[STEM_KEYS[0]]
    for key in STEM_KEYS:
        for prefix in ("encoder.", "decoder.encoder."):  # DNA's decoder keeps a reference to the encoder
            stem = payload["network_weights"][prefix + key]
            assert stem.shape[1] == 3
            torch.testing.assert_close(stem.sum(dim=1, keepdim=True), original)
    assert payload["metadata"]["channel_mode"] == "replicate" and payload["metadata"]["source_in_channels"] == 1


def test_resenc_mismatches_are_named_with_the_fix(tmp_path: Path, resenc_encoder: dict[str, torch.Tensor]) -> None:
    path = save_weights_file(build_weights_file(resenc_encoder, "resenc_tiny", 1, 2, method="spark3d"), tmp_path / "r.pt")
    with pytest.raises(WeightsError, match=r"1 input channel\(s\), the dataset 2"):
        check_weights_against_network(path, build_resenc_unet(RESENC_PRESETS["resenc_tiny"], 2, 2), "T")
    with torch.device("meta"):
        large = build_resenc_unet(RESENC_PRESETS["resenc_l"], 1, 2)
        planned = nnunet_built({**RESENC_PRESETS["resenc_l"].architecture(), "arch_kwargs": {
            **RESENC_PRESETS["resenc_l"].arch_kwargs(), "n_blocks_per_stage": [1, 3, 4, 6, 6, 5]}}, 1, 2)
        swin = SwinUNETRSeg(PRESETS["tiny"], 1, 2)
    with pytest.raises(WeightsError, match=r"encoder of preset 'resenc_tiny' but T builds preset 'resenc_l'"):
        check_weights_against_network(path, large, "T")
    with pytest.raises(WeightsError, match=r"builds a resenc network of a topology no preset has from these plans: train with "
                                           r"plans whose architecture is the file's \(resenc preset 'resenc_tiny'\)"):
        check_weights_against_network(path, planned, "T")
    with pytest.raises(WeightsError, match=r"encoder of resenc preset 'resenc_tiny' but T builds swin preset 'tiny'"):
        check_weights_against_network(path, swin, "T")


def test_a_swin_encoder_is_not_a_resenc_encoder(resenc_encoder: dict[str, torch.Tensor]) -> None:
    with pytest.raises(WeightsError, match=r"no 'stem.convs.0.conv.weight'; is this the encoder state dict of a resenc network"):
        build_weights_file(deterministic_swin_encoder(), "resenc_tiny", 1, 2, method="smit")
    with pytest.raises(WeightsError, match=r"no 'patch_embed.weight'; is this the encoder state dict of a swin network"):
        build_weights_file(resenc_encoder, "tiny", 1, 2, method="spark3d")
    with pytest.raises(WeightsError, match=r"shape .* but preset 'resenc_l' needs"):
        build_weights_file(resenc_encoder, "resenc_l", 1, 2, method="spark3d")


def test_an_unknown_family_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    payload = swin_payload()
    torch.save({"network_weights": payload["network_weights"], "metadata": {**payload["metadata"], "family": "vit"}}, path)
    _, metadata = load_weights_file(path)  # readable (inspect-weights shows it) ...
    with pytest.raises(WeightsError, match=r"future\.pt: unknown network family 'vit'"):
        weights_family(metadata, path)  # ... but not usable
