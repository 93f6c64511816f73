"""The ResEnc planner's pure parts: the patch rule, the adapted plans (architecture, spacing, z-scoring), refusals,
and that nnU-Net's own nnUNetTrainer builds our preset's network from them."""
from __future__ import annotations

import json

import pytest
import torch

from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet
from nnunet_ssl.plans.resenc_planner import (
    RESENC_PLANS_NAME,
    SCRATCH_TRAINER,
    SPARK3D_TRAINER,
    PlanRefusal,
    ResEncPlanSettings,
    ResEncSSLPlanner,
    fitted_patch,
    resenc_training_hint,
)


@pytest.mark.parametrize(
    "median,max_edge,expected",
    [
        ([80, 64, 64], 64, [64, 64, 64]),  # the tiny preset caps every axis at its 64
        ([80, 64, 64], 160, [96, 64, 64]),  # rounded up to a multiple of 32
        ([100.4, 200, 65], 160, [128, 160, 96]),  # capped at resenc_l's 160
        ([64, 64, 64], 160, [64, 64, 64]),
        ([500, 480, 480], 160, [160, 160, 160]),  # the paper's patch
        ([300, 300, 300], 150, [128, 128, 128]),  # a cap that is no multiple of 32 is rounded down
    ],
)
def test_patch_is_the_median_rounded_up_to_32_within_64_and_the_presets(median, max_edge, expected) -> None:
    assert fitted_patch(median, max_edge) == expected


def test_images_too_small_for_a_64_patch_are_refused_naming_the_alternatives() -> None:
    with pytest.raises(PlanRefusal, match=r"Dataset7_Small: the median image is 40 x 200 x 200 voxels at 1 mm.*under 64.*"
                                          r"nnUNetv2_plan_and_preprocess -d Dataset7_Small -pl nnUNetPlannerResEncL.*"
                                          r"--patch-size"):
        fitted_patch([40, 200, 200], 160, dataset="Dataset7_Small")


@pytest.mark.parametrize(
    "kwargs",
    [{"preset": "smit"}, {"patch_size": (64, 64, 48)}, {"patch_size": (32, 64, 64)}, {"batch_size": 0},
     {"plans_name": "nnUNetResEncUNetLPlans"}, {"plans_name": "nnUNetPlans"}],
)
def test_settings_refuse_bad_values(kwargs) -> None:
    with pytest.raises(ValueError):
        ResEncPlanSettings(**kwargs)


def _planner(settings: ResEncPlanSettings) -> ResEncSSLPlanner:
    planner = object.__new__(ResEncSSLPlanner)  # no dataset on disk needed for the adaptation step
    planner.settings = settings
    planner.dataset_name = "Dataset900_TwoChannels"
    return planner


def _nnunet_plans(median: list[float]) -> dict:
    """What nnU-Net's ExperimentPlanner hands save_plans at 1 mm (the entries the adaptation reads or replaces)."""
    return {
        "dataset_name": "Dataset900_TwoChannels", "plans_name": RESENC_PLANS_NAME,
        "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0}, "1": {"mean": 2.0}},
        "configurations": {
            "2d": {"patch_size": [256, 256]},
            "3d_lowres": {"patch_size": [64, 64, 64]},
            "3d_fullres": {
                "data_identifier": f"{RESENC_PLANS_NAME}_3d_fullres", "spacing": [1.0, 1.0, 1.0],
                "patch_size": [112, 128, 128], "batch_size": 5, "next_stage": "3d_cascade_fullres",
                "median_image_size_in_voxels": median,
                "normalization_schemes": ["CTNormalization", "ZScoreNormalization"], "use_mask_for_norm": [False, True],
                "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                 "arch_kwargs": {"n_stages": 5}, "_kw_requires_import": ["conv_op"]},
            },
        },
    }


@pytest.mark.parametrize("preset", ["resenc_l", "resenc_tiny"])
def test_adapted_plans_hold_the_pretrained_architecture_1mm_and_zscore(preset: str) -> None:
    adapted = _planner(ResEncPlanSettings(preset=preset)).adapt_plans(_nnunet_plans([180.0, 300.0, 70.0]))
    config = adapted["configurations"]["3d_fullres"]
    assert list(adapted["configurations"]) == ["3d_fullres"] and "next_stage" not in config
    assert config["architecture"] == RESENC_PRESETS[preset].architecture()
    assert json.loads(json.dumps(config["architecture"])) == RESENC_PRESETS[preset].architecture()  # JSON as saved
    assert config["spacing"] == [1.0, 1.0, 1.0]
    assert config["normalization_schemes"] == ["ZScoreNormalization"] * 2 and config["use_mask_for_norm"] == [False] * 2
    assert config["patch_size"] == ([160, 160, 96] if preset == "resenc_l" else [64, 64, 64])
    assert config["batch_size"] == 2 and config["data_identifier"] == f"{RESENC_PLANS_NAME}_3d_fullres"
    assert adapted["nnunet_ssl"]["preset"] == preset and adapted["nnunet_ssl"]["family"] == "resenc"


def test_an_explicit_patch_is_kept_and_small_data_refused_without_one() -> None:
    adapted = _planner(ResEncPlanSettings(preset="resenc_l", patch_size=(64, 128, 128))).adapt_plans(
        _nnunet_plans([40.0, 300.0, 300.0]))
    assert adapted["configurations"]["3d_fullres"]["patch_size"] == [64, 128, 128]
    assert adapted["nnunet_ssl"]["patch_rule"] == "--patch-size"
    with pytest.raises(PlanRefusal, match="Dataset900_TwoChannels: the median image is 40 x 300 x 300"):
        _planner(ResEncPlanSettings()).adapt_plans(_nnunet_plans([40.0, 300.0, 300.0]))


def test_nnunets_own_trainer_builds_the_presets_network_from_the_plans() -> None:
    """As saved (JSON), the plans make nnU-Net's nnUNetTrainer build DNA's ResidualEncoderUNet with resenc_l's
    modules, keys and shapes (on the meta device: shapes only)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(json.dumps(_planner(ResEncPlanSettings()).adapt_plans(_nnunet_plans([200.0] * 3))))
    manager = PlansManager(plans)
    with torch.device("meta"):
        theirs = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 2, 4, True)
        ours = build_resenc_unet(RESENC_PRESETS["resenc_l"], 2, 4, True)
    assert type(theirs) is type(ours) and repr(theirs) == repr(ours)
    assert [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]


def test_plans_and_trainers_agree_on_names() -> None:
    from nnunet_ssl.trainers.named import RESENC_TRAINERS
    from nnunet_ssl.trainers.resenc import SSL_PLANS_NAME

    assert SSL_PLANS_NAME == RESENC_PLANS_NAME == "nnUNetResEncSSLPlans"
    assert RESENC_TRAINERS[SPARK3D_TRAINER].method == "spark3d" and RESENC_TRAINERS[SCRATCH_TRAINER].method is None
    hint = resenc_training_hint(501, ResEncPlanSettings())
    assert "`nnUNetv2_train 501 3d_fullres FOLD -tr ResEncSpark3DTrainer -p nnUNetResEncSSLPlans -pretrained_weights " \
           "FILE`" in hint and "-tr ResEncScratchTrainer -p nnUNetResEncSSLPlans" in hint


def test_cli_family_resenc_refuses_swin_options_and_defaults_to_resenc_l(monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunet_ssl import cli

    calls = []
    monkeypatch.setattr("nnunet_ssl.plans.plan_command.plan_and_preprocess",
                        lambda dataset, settings, **kwargs: calls.append(settings) or {"dataset_name": "Dataset501_X"})
    assert cli.main(["plan", "-d", "501", "--family", "resenc"]) == 0
    assert calls[-1] == ResEncPlanSettings(preset="resenc_l", plans_name=RESENC_PLANS_NAME)
    assert cli.main(["plan", "-d", "501", "--family", "resenc", "--preset", "resenc_tiny", "--patch-size", "64", "64",
                     "96"]) == 0
    assert calls[-1] == ResEncPlanSettings(preset="resenc_tiny", patch_size=(64, 64, 96))
    assert cli.main(["plan", "-d", "501", "--family", "resenc", "--hu-window", "-100", "200"]) == 1
    assert len(calls) == 2
    assert cli.main(["plan", "-d", "501"]) == 0  # the Swin plans stay the default
    assert type(calls[-1]).__name__ == "SwinPlanSettings" and calls[-1].plans_name == "nnUNetSwinPlans"
