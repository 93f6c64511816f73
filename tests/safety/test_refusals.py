"""Refusals name the problem and a fix that exists: every suggested command parses, weights are checked
from the plans alone before nnU-Net creates anything."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from short_trainers import SwinSMITTrainer_tiny_2epochs

from nnunet_ssl.cli import build_parser, training_hint
from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.plans.planner import SwinPlanSettings
from nnunet_ssl.trainers.inputs import TrainerInputError
from nnunet_ssl.trainers.named import TRAINERS
from nnunet_ssl.weights import WeightsError, build_weights_file, save_weights_file
from nnunet_ssl.weights.intensity import ChannelMapping, intensity_warnings
from nnunet_ssl.weights.preflight import preflight_weights
from nnunet_ssl.weights.targets import resolve_target

COMMAND = re.compile(r"`((?:nnunet-ssl|nnUNetv2_\w+) [^`]*)`")


def suggested_commands(message: str) -> list[list[str]]:
    """Every backticked command line in ``message``, split as a shell would."""
    return [shlex.split(c) for c in COMMAND.findall(message)]


@contextlib.contextmanager
def argv(*args: str):
    saved = sys.argv
    sys.argv = list(args)
    try:
        yield
    finally:
        sys.argv = saved


def nnunet_train_help() -> str:
    from nnunetv2.run.run_training import run_training_entry

    out = io.StringIO()
    with argv("nnUNetv2_train", "-h"), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run_training_entry()
    return out.getvalue()


def assert_commands_exist(message: str) -> None:
    commands = suggested_commands(message)
    assert commands, f"no command suggested in: {message}"
    parser = build_parser()
    for command in commands:
        if command[0] == "nnunet-ssl":
            parser.parse_args(command[1:])  # exits (fails the test) on an unknown option
        else:
            assert command[0] == "nnUNetv2_train", command
            usage = nnunet_train_help()
            for option in (a for a in command if a.startswith("-")):
                assert re.search(rf"\[{re.escape(option)}[ \]]", usage), f"{option} is no nnUNetv2_train option"
            assert command[command.index("-tr") + 1] in TRAINERS


def plans_and_dataset(channels: int, preset_note: str = "") -> tuple[dict, dict]:
    """Minimal nnU-Net plans and dataset.json: what the trainer's early check reads."""
    plans = {
        "dataset_name": "Dataset900_Unit", "plans_name": "nnUNetSwinPlans", "continue_training": False,
        "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {"patch_size": [64, 64, 64], "batch_size": 2,
                                          "normalization_schemes": ["ZScoreNormalization"] * channels,
                                          "use_mask_for_norm": [False] * channels, "spacing": [2.0, 1.5, 1.5],
                                          "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor",
                                          "architecture": {"network_class_name": "unused", "arch_kwargs": {},
                                                           "_kw_requires_import": []}}},
    }
    dataset_json = {"channel_names": {str(c): f"T{c}" for c in range(channels)},
                    "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}
    return plans, dataset_json


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    encoder = SwinEncoder(PRESETS["tiny"], in_channels=1)
    payload = build_weights_file(encoder.state_dict(), "tiny", 1, 3, method="smit")
    return save_weights_file(payload, tmp_path_factory.mktemp("w") / "tiny.pt")


def test_preflight_accepts_a_fitting_file(tiny_weights: Path) -> None:
    plans, dataset_json = plans_and_dataset(1)
    metadata = preflight_weights(tiny_weights, SwinSMITTrainer_tiny_2epochs, plans, "3d_fullres", dataset_json)
    assert metadata["preset"] == "tiny"


def test_preflight_refuses_another_preset_with_existing_fixes(tiny_weights: Path) -> None:
    plans, dataset_json = plans_and_dataset(1)
    with pytest.raises(WeightsError, match=r"preset 'tiny' but SwinSMITTrainer builds preset 'smit'") as error:
        preflight_weights(tiny_weights, TRAINERS["SwinSMITTrainer"], plans, "3d_fullres", dataset_json)
    assert_commands_exist(str(error.value))
    assert "--preset smit" in str(error.value)  # on pretrain, which has the option


def test_preflight_refuses_other_channel_count_with_existing_fixes(tiny_weights: Path) -> None:
    plans, dataset_json = plans_and_dataset(2)
    with pytest.raises(WeightsError, match=r"1 input channel\(s\), the dataset 2") as error:
        preflight_weights(tiny_weights, SwinSMITTrainer_tiny_2epochs, plans, "3d_fullres", dataset_json)
    assert_commands_exist(str(error.value))


def test_preflight_refuses_continue_with_weights(tiny_weights: Path) -> None:
    plans, dataset_json = plans_and_dataset(1)
    with pytest.raises(WeightsError, match="cannot be combined with --c"):
        preflight_weights(tiny_weights, SwinSMITTrainer_tiny_2epochs, plans, "3d_fullres", dataset_json,
                          continue_training=True)


def test_trainer_exits_cleanly_before_creating_its_folder(tiny_weights: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    plans, dataset_json = plans_and_dataset(2)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "900", "3d_fullres", "0", "-pretrained_weights", str(tiny_weights)])
    with pytest.raises(SystemExit) as error:
        SwinSMITTrainer_tiny_2epochs(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert "nothing was written" in str(error.value.code) and "input channel" in str(error.value.code)
    assert str(error.value.code).startswith("nnunet-ssl: refusing -pretrained_weights, nothing was written.\n")
    assert error.value.__suppress_context__  # nnU-Net's command prints the message only, no traceback


def test_trainer_inputs_are_read_from_nnunet_train_only_and_refused_as_errors_elsewhere(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-pretrained_weights``/``--val`` are nnUNetv2_train's: another program's argv is not read as its options,
    and a bad environment value raises a TrainerInputError there (no SystemExit outside nnU-Net's command)."""
    from nnunet_ssl.trainers.inputs import TrainerInputs

    args = ["501", "3d_fullres", "0", "-pretrained_weights", str(tiny_weights)]
    assert TrainerInputs.read(["/venv/bin/nnUNetv2_train", *args], {}).pretrained_weights == str(tiny_weights)
    assert TrainerInputs.read(["nnUNetv2_train", *args[:3], f"-pretrained_weights={tiny_weights}"], {}).pretrained_weights \
        == str(tiny_weights)
    assert TrainerInputs.read(["/x/nnunetv2/run/run_training.py", *args], {}).nnunet_train
    assert TrainerInputs.read(["nnUNetv2_train", *args, "--val"], {}).pretrained_weights is None  # nnU-Net ignores it
    assert TrainerInputs.read(["pytest", *args], {}) == TrainerInputs()
    inputs = TrainerInputs.read(["pytest"], {"NNUNET_SSL_SEED": "7", "NNUNET_SSL_EPOCHS": "3",
                                             "NNUNET_SSL_FINETUNE": "llrd=0.5"})
    assert (inputs.seed, inputs.epochs, inputs.finetune_policy.llrd) == (7, 3, 0.5)

    plans, dataset_json = plans_and_dataset(1)
    monkeypatch.setattr(sys, "argv", ["python", "-c", "..."])
    monkeypatch.setenv("NNUNET_SSL_SEED", "seven")
    with pytest.raises(TrainerInputError, match="NNUNET_SSL_SEED='seven' is not an integer seed"):
        SwinSMITTrainer_tiny_2epochs(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "900", "3d_fullres", "0"])
    with pytest.raises(SystemExit, match="^nnunet-ssl: refusing NNUNET_SSL_SEED, nothing was written.\n"):
        SwinSMITTrainer_tiny_2epochs(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def test_export_without_plans_names_the_swin_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "Dataset900_Unit"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}), encoding="utf-8")
    (folder / "nnUNetSwinPlans.json").write_text(
        json.dumps({"plans_name": "nnUNetSwinPlans", "configurations": {}}), encoding="utf-8")
    monkeypatch.setattr("nnunet_ssl.weights.targets.preprocessed_dataset_folder", lambda dataset: folder)
    with pytest.raises(FileNotFoundError, match=r"nnUNetSwinPlans\.json.*-p nnUNetSwinPlans") as error:
        resolve_target("900")
    assert_commands_exist(str(error.value))


@pytest.mark.parametrize("preset", ["tiny", "smit", "smit128"])
def test_plan_hint_names_a_trainer_of_the_planned_preset(preset: str) -> None:
    hint = training_hint(501, SwinPlanSettings(preset=preset))
    assert_commands_exist(hint)
    trainer = suggested_commands(hint)[0][suggested_commands(hint)[0].index("-tr") + 1]
    assert TRAINERS[trainer].preset_name == preset


def test_intensity_warning_only_on_a_real_mismatch() -> None:
    ct = {"modality": "CT", "window": [-500.0, 500.0], "range": [0.0, 1.0]}
    mr = {"modality": "MR", "percentiles": [5.0, 95.0], "range": [0.0, 1.0]}
    ct_window = ChannelMapping("CTNormalization", "ct", True, "CT window [-175, 250] -> [0, 1]")
    mr_rescale = ChannelMapping("RescaleTo01Normalization", "mr", True, "per image")
    zscore = ChannelMapping("ZScoreNormalization", "mr", False, "ZScoreNormalization")
    assert intensity_warnings(ct, [ct_window]) == []  # another window still maps to [0, 1]
    assert intensity_warnings(mr, [mr_rescale]) == []
    assert "not mapped" not in " ".join(intensity_warnings(mr, [zscore])) and intensity_warnings(mr, [zscore])
    assert "cross-modality" in intensity_warnings(ct, [mr_rescale])[0]
    for warning in intensity_warnings(mr, [zscore]):
        assert_commands_exist(warning)
