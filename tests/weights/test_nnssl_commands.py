"""nnssl checkpoints through our commands: `convert` reads one for a dataset's plans (its decoder by default),
`export --format nnssl` writes a ResEnc run in nnssl's form, and both refuse what would not fit."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_weights_pretrained_decoder import decoder_body, write_run

from nnunet_ssl.cli import main
from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet
from nnunet_ssl.weights import WeightsError
from nnunet_ssl.weights.convert_file import convert_file
from nnunet_ssl.weights.export import export_nnssl
from nnunet_ssl.weights.nnssl import PLAN_FILE, nnssl_pretrain_plan, read_nnssl_checkpoint, write_nnssl_checkpoint
from nnunet_ssl.weights.targets import DatasetTarget

TINY = RESENC_PRESETS["resenc_tiny"]
ZSCORE_RECORD = {"modality": "MR", "normalization": "zscore", "scheme": "ZScoreNormalization", "per_image": True}


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(21)
    network = build_resenc_unet(TINY, 1, 1, deep_supervision=False)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(1.5).add_(0.01)  # not any seed's init
    return network


def target(tmp_path: Path, in_channels: int = 1, architecture: dict | None = None) -> DatasetTarget:
    return DatasetTarget("Dataset990_Test", tmp_path / "nnUNetResEncPlans.json", "3d_fullres", in_channels=in_channels,
                         num_classes=3, architecture=architecture or TINY.architecture())


def nnssl_file(tmp_path: Path, network: torch.nn.Module) -> Path:
    folder = tmp_path / "nnssl_run"
    folder.mkdir()
    plan = nnssl_pretrain_plan(dataset_name="phantoms", patch_size=[64] * 3, spacing=[1.0] * 3)
    path, _ = write_nnssl_checkpoint(network.state_dict(), {"family": "resenc", "preset": "resenc_tiny"},
                                     folder / "checkpoint_final.pth", pretrain_plan=plan,
                                     recommended_patch_size=[64] * 3, in_channels=1)
    return path


def test_convert_reads_an_nnssl_checkpoint_with_its_decoder(tmp_path: Path, network: torch.nn.Module) -> None:
    path = nnssl_file(tmp_path, network)
    source = network.state_dict()
    for given in (path, path.parent):  # the file, or nnssl's run folder
        payload, report = convert_file(given, target(tmp_path))
        weights = payload["network_weights"]
        assert payload["metadata"]["decoder"] == "pretrained" and payload["metadata"]["family"] == "resenc"
        assert report.layout == "nnssl" and payload["metadata"]["conversion"]["arch_class_name"] == "ResidualEncoderUNet"
        for part in ("encoder.", "decoder."):
            expected = decoder_body(source, part)
            assert expected and all(torch.equal(weights[k], v) for k, v in expected.items())
        assert weights["decoder.seg_layers.4.weight"].shape[0] == 3  # the dataset's heads, fresh
    encoder_only, _ = convert_file(path, target(tmp_path), encoder_only=True)
    assert "decoder" not in encoder_only["metadata"]
    assert any(not torch.equal(encoder_only["network_weights"][k], v) for k, v in decoder_body(source).items())


def test_convert_replicates_the_stem_for_more_channels(tmp_path: Path, network: torch.nn.Module) -> None:
    payload, _ = convert_file(nnssl_file(tmp_path, network), target(tmp_path, in_channels=2))
    stem = network.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert torch.equal(payload["network_weights"]["encoder.stem.convs.0.conv.weight"], torch.cat([stem, stem], 1) / 2)


def test_convert_refuses_plans_of_another_topology_and_another_preset(tmp_path: Path, network: torch.nn.Module) -> None:
    path = nnssl_file(tmp_path, network)
    wider = dataclasses.replace(TINY, name="wider", features_per_stage=(8, 8, 16, 32, 40, 40))
    with pytest.raises(WeightsError, match="features_per_stage.*nnunet-ssl plan -d Dataset990_Test --family resenc "
                                           "--preset resenc_tiny"):
        convert_file(path, target(tmp_path, architecture=wider.architecture()))
    with pytest.raises(ValueError, match="not preset 'resenc_l'; drop --preset"):
        convert_file(path, target(tmp_path), preset_name="resenc_l")


def test_export_writes_a_run_in_nnssls_form_and_it_reads_back_bit_identical(tmp_path: Path,
                                                                             network: torch.nn.Module) -> None:
    run = write_run(tmp_path / "run", network, ZSCORE_RECORD)
    out = tmp_path / "to_nnssl" / "checkpoint_final.pth"
    out.parent.mkdir()
    assert main(["export", str(run), "--format", "nnssl", "--out", str(out)]) == 0
    assert (out.parent / PLAN_FILE).is_file()
    back = read_nnssl_checkpoint(out)
    assert back.preset == "resenc_tiny" and back.in_channels == 1 and back.recommended_patch_size == (64, 64, 64)
    assert back.pretrain_normalization == ("ZScoreNormalization",) and back.pretrain_configuration == "onemmiso"
    assert set(back.network_weights) == set(network.state_dict())
    assert all(torch.equal(back.network_weights[k], v) for k, v in network.state_dict().items())
    assert main(["export", str(run), "--format", "nnssl", "--out", str(out)]) == 1  # no overwrite without --force


def test_export_to_nnssl_refuses_a_window_pretraining_and_a_swin_run(tmp_path: Path, network: torch.nn.Module) -> None:
    window = write_run(tmp_path / "window", network, {"modality": "CT", "window": [-500, 500], "range": [0, 1]})
    with pytest.raises(WeightsError, match="nnssl fine-tunes with per-image z-scores; pretrain with `--intensity zscore`"):
        export_nnssl(window, tmp_path / "a.pth")
    swin = write_run(tmp_path / "swin", network, ZSCORE_RECORD, preset="tiny")
    with pytest.raises(WeightsError, match="nnssl's interchange holds ResEnc U-Nets; this run pretrained a swin network"):
        export_nnssl(swin, tmp_path / "b.pth")
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "b.pth").exists()


def test_convert_and_inspect_through_the_cli_for_resenc_plans(tmp_path: Path, network: torch.nn.Module,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """`convert` an nnssl checkpoint for a dataset's ResEnc plans, then `inspect-weights --trainer` builds the
    plans' network as ResEncSpark3DTrainer would and finds that the file fits."""
    import json

    from test_convert import _plans

    plans = _plans()
    plans["plans_name"] = "nnUNetResEncSSLPlans"
    plans["configurations"]["3d_fullres"].update(architecture=TINY.architecture(),
                                                 normalization_schemes=["ZScoreNormalization"])
    folder = tmp_path / "preprocessed" / "Dataset991_Convert"
    folder.mkdir(parents=True)
    (folder / "nnUNetResEncSSLPlans.json").write_text(json.dumps(plans), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
        "file_ending": ".nii.gz"}), encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    out = tmp_path / "w.pt"
    target_args = ["-d", "991", "-p", "nnUNetResEncSSLPlans"]
    assert main(["convert", str(nnssl_file(tmp_path, network)), *target_args, "--out", str(out)]) == 0
    assert "layout nnssl" in capsys.readouterr().out
    assert main(["inspect-weights", str(out), "--trainer", "ResEncSpark3DTrainer", *target_args]) == 0
    assert "OK: fits ResEncSpark3DTrainer on Dataset991_Convert" in capsys.readouterr().out
    assert main(["inspect-weights", str(out), "--trainer", "SwinSMITTrainer", *target_args]) == 1  # another family
