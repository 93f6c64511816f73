"""The Swin planner's pure parts: settings validation, the CT window as CTNormalization properties, modalities."""
from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

from nnunet_ssl.plans.planner import SwinPlanSettings, channel_modalities, window_properties


def test_window_properties_make_ctnormalization_the_window():
    props = window_properties(-175, 250, {"median": 40.0, "percentile_00_5": -900.0})
    assert props["median"] == 40.0  # fingerprint statistics kept
    hu = np.array([-1000.0, -175.0, 0.0, 37.5, 250.0, 3000.0], dtype=np.float32)
    mapped = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(hu.copy())
    np.testing.assert_allclose(mapped, [0.0, 0.0, 175 / 425, 212.5 / 425, 1.0, 1.0], atol=1e-7)


def test_settings_defaults_and_axis_order():
    settings = SwinPlanSettings()
    assert settings.spacing_nnunet == [2.0, 1.5, 1.5]  # x, y, z = 1.5, 1.5, 2 -> nnU-Net's z, y, x
    assert settings.patch == [96, 96, 96] and settings.batch_size == 2
    assert SwinPlanSettings(preset="smit128").patch == [128, 128, 128]
    assert SwinPlanSettings(patch_size=(64, 128, 128)).patch == [64, 128, 128]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "nope"},
        {"modality": "pet"},
        {"hu_window": (250.0, -175.0)},
        {"spacing_xyz": (1.5, 0.0, 2.0)},
        {"patch_size": (96, 96, 80)},
        {"patch_size": (32, 64, 64)},
        {"batch_size": 0},
        {"plans_name": "nnUNetPlans"},
    ],
)
def test_settings_refuse_bad_values(kwargs):
    with pytest.raises((ValueError, KeyError)):
        SwinPlanSettings(**kwargs)


def test_channel_modalities_from_dataset_json_or_flag():
    dataset = {"channel_names": {"1": "T2", "0": "CT"}}
    assert channel_modalities(dataset, None) == ["ct", "mr"]
    assert channel_modalities(dataset, "mr") == ["mr", "mr"]
    assert channel_modalities({"modality": {"0": "ct"}}, None) == ["ct"]


def test_adapt_plans_keeps_3d_fullres_windows_ct_and_zscores_mr():
    from nnunet_ssl.plans.planner import SwinPlanner

    planner = object.__new__(SwinPlanner)  # no dataset on disk needed for the adaptation step
    planner.settings = SwinPlanSettings(mr_normalization="zscore")
    planner.mr_notes = {}
    planner.dataset_name = "Dataset900_Mixed"
    planner.dataset_json = {"channel_names": {"0": "CT", "1": "T1"}}
    planner.UNet_featuremap_min_edge_length = 4
    planner.UNet_max_features_3d = 320
    planner.UNet_base_num_features = 32
    planner.UNet_blocks_per_stage_encoder = (2,) * 14
    planner.UNet_blocks_per_stage_decoder = (2,) * 13
    mr_props = {"mean": 300.0, "std": 50.0, "percentile_00_5": 10.0, "percentile_99_5": 900.0}
    plans = {
        "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0}, "1": dict(mr_props)},
        "configurations": {
            "2d": {},
            "3d_lowres": {},
            "3d_fullres": {
                "spacing": [2.0, 1.5, 1.5], "patch_size": [80, 160, 160], "batch_size": 5, "next_stage": "x",
                "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
                "use_mask_for_norm": [False, True], "architecture": {"arch_kwargs": {}},
            },
        },
    }
    adapted = planner.adapt_plans(plans)
    config = adapted["configurations"]["3d_fullres"]
    assert list(adapted["configurations"]) == ["3d_fullres"] and "next_stage" not in config
    assert config["patch_size"] == [96, 96, 96] and config["batch_size"] == 2
    assert config["normalization_schemes"] == ["CTNormalization", "ZScoreNormalization"]
    assert config["use_mask_for_norm"] == [False, True]
    props = adapted["foreground_intensity_properties_per_channel"]
    assert (props["0"]["mean"], props["0"]["std"]) == (-175.0, 425.0)
    assert props["1"] == mr_props
    arch = config["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == len(arch["strides"]) and list(arch["strides"][0]) == [1, 1, 1]
    assert adapted["nnunet_ssl"]["modalities"] == ["ct", "mr"]


def test_mr_percentile_approximation_by_hand():
    from nnunet_ssl.plans.planner import mr_percentile_approximation, percentile_map

    rng = np.random.default_rng(0)
    # same tissue distribution in every image, plus a few very bright voxels (fat, vessels): one window is exact
    base = rng.gamma(4.0, 50.0, size=20000)
    images = []
    for i in range(3):
        images.append(np.concatenate([rng.permutation(base), np.full(20, 5000.0 * (i + 1))]))
    fit = mr_percentile_approximation(images, (5.0, 95.0))
    low, high = np.percentile(images[0], [5, 95])
    assert fit.window == pytest.approx((low, high))
    assert fit.scheme == "CTNormalization" and fit.window_difference == pytest.approx(0.0, abs=1e-12)
    expected = np.mean([np.abs((x - x.min()) / np.ptp(x) - percentile_map(x, (5, 95))).mean() for x in images])
    assert fit.rescale_difference == pytest.approx(expected)
    # uniform intensities under very different gains: per-image min-max is the closer stand-in
    gains = [rng.uniform(0, 100, 20000) * g for g in (1.0, 3.0, 9.0)]
    fit = mr_percentile_approximation(gains, (5.0, 95.0))
    assert fit.scheme == "RescaleTo01Normalization" and fit.rescale_difference < fit.window_difference
    assert "per-image min-max" in fit.note((5.0, 95.0))


def test_coarsening_hint_gives_a_spacing_that_parses():
    import shlex

    from nnunet_ssl.cli import build_parser
    from nnunet_ssl.plans.planner import coarsening_hint

    settings = SwinPlanSettings()
    assert coarsening_hint([[2.0, 1.5, 1.5]] * 3, settings, "501") is None
    hint = coarsening_hint([[1.5, 1.5, 1.5]] * 3, settings, "501")  # nnU-Net order z, y, x: 1.5 mm isotropic
    assert "coarsens this dataset along z" in hint
    command = shlex.split(hint.split("`")[1])
    args = build_parser().parse_args(command[1:])
    assert args.spacing == [1.5, 1.5, 1.5]


def test_mr_settings_are_validated():
    with pytest.raises(ValueError, match="MR window"):
        SwinPlanSettings(mr_normalization="window")
    with pytest.raises(ValueError, match="MR normalization"):
        SwinPlanSettings(mr_normalization="minmax")
    assert SwinPlanSettings(mr_normalization="window", mr_window=(0.0, 400.0)).mr_window == (0.0, 400.0)
