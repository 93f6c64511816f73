"""A pretrained U-Net decoder travels into the weights file (Spark3D's default), heads stay fresh, ``encoder_only``
gives the paper's other variant, and plans of another topology are refused with the fix."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ssl.checkpoints import CHECKPOINT_FORMAT, FINAL
from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet
from nnunet_ssl.weights import WeightsError, build_weights_file, save_weights_file
from nnunet_ssl.weights.export import export_run
from nnunet_ssl.weights.targets import DatasetTarget

TINY = RESENC_PRESETS["resenc_tiny"]


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    """A 'pretrained' ResEnc U-Net: its last head reconstructs the one image channel, as in Spark3D."""
    torch.manual_seed(11)
    network = build_resenc_unet(TINY, 1, 1, deep_supervision=False)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.01)  # not the init of any seed
    return network


def decoder_body(state: dict[str, torch.Tensor], part: str = "decoder.") -> dict[str, torch.Tensor]:
    """The ``part`` entries (the decoder's, or ``"encoder."``) a weights file takes from pretraining: no heads,
    no DNA decoder's reference to the encoder."""
    return {k: v for k, v in state.items() if k.startswith(part) and not k.startswith(("decoder.seg_layers.",
                                                                                           "decoder.encoder."))}


def test_the_pretrained_decoder_is_in_the_file_and_nnunet_loads_it(pretrained: torch.nn.Module, tmp_path: Path) -> None:
    payload = build_weights_file(pretrained.encoder.state_dict(), "resenc_tiny", 1, 3, method="spark3d",
                                 decoder_state=pretrained.decoder.state_dict())
    assert payload["metadata"]["decoder"] == "pretrained"
    weights = payload["network_weights"]
    expected = decoder_body({f"decoder.{k}": v for k, v in pretrained.decoder.state_dict().items()})
    assert expected and all(torch.equal(weights[k], v) for k, v in expected.items())
    assert weights["decoder.seg_layers.4.weight"].shape[0] == 3  # the dataset's heads, fresh
    architecture = TINY.architecture()
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, 3, deep_supervision=True)
    load_pretrained_weights(network, str(save_weights_file(payload, tmp_path / "w.pt")), verbose=False)
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert all(torch.equal(loaded[f"encoder.{k}"], v) for k, v in pretrained.encoder.state_dict().items())


def test_without_a_decoder_the_file_has_the_seeded_fresh_one(pretrained: torch.nn.Module) -> None:
    payload = build_weights_file(pretrained.encoder.state_dict(), "resenc_tiny", 1, 3, method="spark3d", decoder_seed=4)
    assert "decoder" not in payload["metadata"]  # fresh, as every file before pretrained decoders
    fresh = decoder_body(payload["network_weights"])
    pretrained_body = decoder_body({f"decoder.{k}": v for k, v in pretrained.decoder.state_dict().items()})
    assert any(not torch.equal(fresh[k], v) for k, v in pretrained_body.items())
    again = build_weights_file(pretrained.encoder.state_dict(), "resenc_tiny", 1, 3, method="spark3d", decoder_seed=4)
    assert all(torch.equal(again["network_weights"][k], v) for k, v in fresh.items())


def test_a_decoder_of_another_topology_is_refused_naming_encoder_only(pretrained: torch.nn.Module) -> None:
    wider = dataclasses.replace(TINY, name="wider", features_per_stage=(8, 16, 16, 32, 40, 40))
    other = build_resenc_unet(wider, 1, 1, deep_supervision=False)
    with pytest.raises(WeightsError, match="pretrained decoder does not fit.*--encoder-only"):
        build_weights_file(pretrained.encoder.state_dict(), "resenc_tiny", 1, 3, method="spark3d",
                           decoder_state=other.decoder.state_dict())


def write_run(run_dir: Path, network: torch.nn.Module, intensity: dict | None = None, preset: str = "resenc_tiny",
              step: int = 5) -> Path:
    """A version-2 pretraining checkpoint as the engine writes it for a method that pretrains a decoder (Spark3D)."""
    run_dir.mkdir()
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": 2, "method": {}, "step": step,
        "config": {"method": "spark3d", "preset": preset, "in_channels": 1,
                   "data": {"spacing": [1.0, 1.0, 1.0], "crop_size": 64}},
        "encoders": {"student": network.encoder.state_dict()}, "default_encoder": "student",
        "decoders": {"student": network.decoder.state_dict()},
        "intensity": intensity if intensity is not None else {"modality": "MR", "normalization": "zscore"},
    }
    torch.save(checkpoint, run_dir / FINAL)
    return run_dir


def target(tmp_path: Path, architecture: dict | None) -> DatasetTarget:
    return DatasetTarget("Dataset990_Test", tmp_path / "nnUNetResEncPlans.json", "3d_fullres", in_channels=2,
                         num_classes=3, architecture=architecture)


def test_export_takes_the_runs_decoder_unless_encoder_only(pretrained: torch.nn.Module, tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", pretrained)
    fits = target(tmp_path, TINY.architecture())
    with_decoder = export_run(run, fits)
    assert with_decoder["metadata"]["decoder"] == "pretrained"
    assert with_decoder["metadata"]["in_channels"] == 2  # the stem replicated for a 2-channel dataset
    expected = decoder_body({f"decoder.{k}": v for k, v in pretrained.decoder.state_dict().items()})
    assert all(torch.equal(with_decoder["network_weights"][k], v) for k, v in expected.items())
    encoder_only = export_run(run, fits, encoder_only=True, decoder_seed=3)
    assert "decoder" not in encoder_only["metadata"]
    assert any(not torch.equal(encoder_only["network_weights"][k], v) for k, v in expected.items())


def test_export_refuses_plans_of_another_topology_naming_the_plan_command(pretrained: torch.nn.Module,
                                                                          tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", pretrained)
    five_stages = dataclasses.replace(TINY, name="five", features_per_stage=(4, 8, 16, 32, 40), blocks_per_stage=(1, 1, 2, 2, 2),
                                      strides=(1, 2, 2, 2, 2), input_size=64)
    with pytest.raises(WeightsError) as refused:
        export_run(run, target(tmp_path, five_stages.architecture()))
    message = str(refused.value)
    assert "n_stages: file 6, plans 5" in message
    assert "nnunet-ssl plan -d Dataset990_Test --family resenc --preset resenc_tiny" in message
    with pytest.raises(WeightsError, match="plans name no architecture"):
        export_run(run, target(tmp_path, None))
