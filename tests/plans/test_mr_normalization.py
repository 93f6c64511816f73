"""MR normalisation that keeps the anatomy (issue 20): the stand-in is measured on the foreground, a window that
clips an image's anatomy is not chosen, any scheme can be forced, and the labelled structures' contrast is reported."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

from nnunet_ssl.cli import build_parser, mr_normalization_settings
from nnunet_ssl.data.phantoms import MR_LABELS, _case_rng, generate_mr_case
from nnunet_ssl.plans.mr_normalization import (
    CONTRAST_KEPT,
    MAX_EXTRA_CLIPPED,
    ImageSample,
    MRMeasurement,
    choose_mr_scheme,
    dataset_label_names,
    describe_measurement,
    foreground_mask,
    label_pairs,
    measure_mr_normalization,
    sample_image,
    strided,
)
from nnunet_ssl.plans.planner import SwinPlanner, SwinPlanSettings, mr_percentile_approximation, summarize_plans

PCT = (5.0, 95.0)
GREY, WHITE, VESSEL = 300.0, 400.0, 5000.0
GAINS = (0.5, 1.0, 2.0)
NAMES = {1: "grey_matter", 2: "white_matter"}
#: The toy images (image, label, foreground), their samples and their measurement.
Toy = tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], list[ImageSample], MRMeasurement]


def toy_image(gain: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(20, 20, 20) voxels: background noise in [-5, 5] (7/8 of the voxels), a central 10^3 cube of grey (label 1)
    and white matter (label 2) at ``gain`` x 300 / 400, and 8 vessel voxels at ``gain`` x 5000 inside the cube.

    Returns the image, its label and the cube's mask (the foreground by construction).
    """
    image = np.linspace(-5.0, 5.0, 8000)[np.random.default_rng(0).permutation(8000)].reshape(20, 20, 20)
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    cube = np.zeros((20, 20, 20), dtype=bool)
    cube[5:15, 5:15, 5:15] = True
    label[5:15, 5:15, 5:10] = 1
    label[5:15, 5:15, 10:15] = 2
    image[label == 1] = GREY * gain
    image[label == 2] = WHITE * gain
    image[7, 7, 5:9] = image[12, 12, 11:15] = VESSEL * gain
    label[7, 7, 5:9] = label[12, 12, 11:15] = 0
    return image, label, cube


@pytest.fixture(scope="module")
def toy_measurement() -> Toy:
    images = [toy_image(g) for g in GAINS]
    samples = [sample_image(f"case{i}", image, label, PCT) for i, (image, label, _) in enumerate(images)]
    return images, samples, measure_mr_normalization(samples, PCT, NAMES)


def test_foreground_is_the_cube_and_the_window_the_median_percentiles(toy_measurement: Toy) -> None:
    images, samples, measurement = toy_measurement
    for (_, _, cube), sample in zip(images, samples, strict=True):
        np.testing.assert_array_equal(sample.foreground, cube.reshape(-1))  # the noise is out, the vessels in
    bounds = np.array([np.percentile(image, PCT) for image, _, _ in images])
    assert measurement.window == pytest.approx((np.median(bounds[:, 0]), np.median(bounds[:, 1])))
    assert measurement.window[1] == pytest.approx(WHITE)  # the gain-1 image's 95th percentile is its white matter
    assert measurement.foreground_fraction == pytest.approx((1000 / 8000,) * 3)


def test_foreground_errors_and_clipping_by_hand(toy_measurement: Toy) -> None:
    images, _, measurement = toy_measurement
    low, high = measurement.window
    window_errors, minmax_errors, all_voxel_window, clipped_away = [], [], [], []
    for image, _, cube in images:
        p_low, p_high = np.percentile(image, PCT)
        exact = np.clip((image - p_low) / (p_high - p_low), 0, 1)
        window = np.clip((image - low) / (high - low), 0, 1)
        minmax = (image - image.min()) / (image.max() - image.min())
        window_errors.append(np.abs(window - exact)[cube].mean())
        minmax_errors.append(np.abs(minmax - exact)[cube].mean())
        all_voxel_window.append(np.abs(window - exact).mean())
        clipped_away.append((((image < low) | (image > high)) & (np.abs(window - exact) > 0.1))[cube].mean())
    assert measurement.schemes["window"].foreground_error == pytest.approx(window_errors, abs=1e-9)
    assert measurement.schemes["minmax"].foreground_error == pytest.approx(minmax_errors, abs=1e-9)
    assert measurement.schemes["window"].all_voxel_error == pytest.approx(all_voxel_window, abs=1e-9)
    # the gain-2 image: grey (600) and white (800) lie above the window's 400; white is that image's own 95th
    # percentile (1.0 either way), grey is 0.75 under the exact mapping: its 496 voxels are clipped away
    assert measurement.schemes["window"].extra_clipped == pytest.approx(clipped_away)
    assert clipped_away == pytest.approx([0.0, 0.0, 496 / 1000])
    assert measurement.schemes["minmax"].extra_clipped == (0.0, 0.0, 0.0)
    assert measurement.schemes["zscore"].foreground_error is None


def test_the_window_that_clips_the_foreground_is_not_chosen(toy_measurement: Toy) -> None:
    images, _, measurement = toy_measurement
    window, minmax = measurement.schemes["window"], measurement.schemes["minmax"]
    # the vessels squeeze min-max, so the window is closer on average, on all voxels and on the foreground ...
    assert window.mean_foreground_error < minmax.mean_foreground_error
    old = mr_percentile_approximation([image.reshape(-1) for image, _, _ in images], PCT)
    assert old.scheme == "CTNormalization"  # what `nnunet-ssl plan` chose before
    # ... but it clips the gain-2 image's whole brain to 1.0: not eligible
    assert window.max_extra_clipped > MAX_EXTRA_CLIPPED
    choice = choose_mr_scheme(measurement)
    assert (choice.scheme, choice.nnunet_scheme, choice.forced) == ("minmax", "RescaleTo01Normalization", False)
    assert "clips away 50% of case2's foreground" in choice.reason


def test_the_window_wins_when_it_clips_nothing() -> None:
    images = [toy_image(g) for g in (0.95, 1.0, 1.05)]  # one site: the same scale, the window is close to exact
    samples = [sample_image(f"case{i}", image, label, PCT) for i, (image, label, _) in enumerate(images)]
    measurement = measure_mr_normalization(samples, PCT, NAMES)
    assert measurement.schemes["window"].max_extra_clipped <= MAX_EXTRA_CLIPPED
    assert choose_mr_scheme(measurement).scheme == "window"


def test_contrast_before_and_after_by_hand(toy_measurement: Toy) -> None:
    images, samples, measurement = toy_measurement
    (pair,) = measurement.contrasts
    assert (pair.upper, pair.lower, pair.name) == ("white_matter", "grey_matter", "white_matter - grey_matter")
    assert pair.raw == pytest.approx([(WHITE - GREY) * g for g in GAINS])
    low, high = measurement.window
    for i, ((image, _, _), sample) in enumerate(zip(images, samples, strict=True)):
        p_low, p_high = np.percentile(image, PCT)
        grey, white = GREY * GAINS[i], WHITE * GAINS[i]
        exact = (min(white, p_high) - min(grey, p_high)) / (p_high - p_low)
        window = (np.clip(white, low, high) - np.clip(grey, low, high)) / (high - low)
        assert pair.mapped["exact"][i] == pytest.approx(exact)
        assert pair.mapped["window"][i] == pytest.approx(window)
        assert pair.mapped["minmax"][i] == pytest.approx((white - grey) / (image.max() - image.min()))
        assert pair.mapped["zscore"][i] == pytest.approx((white - grey) / sample.std)
    # kept: 1 while both structures are inside the range, 0 when both are clipped to the same bound
    assert pair.kept["window"] == pytest.approx((1.0, 1.0, 0.0))
    assert pair.kept["minmax"] == pytest.approx((1.0, 1.0, 1.0))
    assert pair.kept["zscore"] == pytest.approx((1.0, 1.0, 1.0))
    assert pair.lost("window") == [2] and pair.lost("minmax") == [] and pair.lost("zscore") == []
    record = measurement.to_json()["contrast"][0]
    assert record["images_losing_it"] == {"window": 1, "minmax": 0, "zscore": 0}
    assert record["images_with_contrast"] == 3 and record["pair"] == ["white_matter", "grey_matter"]
    assert CONTRAST_KEPT == 0.5


def test_report_lines_name_the_images_that_lose_the_contrast(toy_measurement: Toy) -> None:
    _, _, measurement = toy_measurement
    lines = describe_measurement(measurement, choose_mr_scheme(measurement))
    assert lines[0].startswith("error to per-image 5-95 % on the foreground (12% of the voxels, 3 image(s)): one "
                               "window ")
    assert "using per-image min-max" in lines[0]
    assert lines[1].startswith("contrast white_matter - grey_matter (median over images): raw 100, per-image 5-95 % ")
    assert "per-image min-max (used) " in lines[1] and "(lost in 0 of 3)" in lines[1]
    low, high = measurement.window
    # the window's contrasts are 50 / (high - low), 100 / (high - low) and 0 (case2, clipped): the median is the first
    assert f"one window {50 / (high - low):.3g} (lost in 1 of 3: case2)" in lines[1]
    assert "one window 0.124 " in lines[1]


def test_forced_schemes_are_used_and_still_measured(toy_measurement: Toy) -> None:
    _, _, measurement = toy_measurement
    for scheme in ("window", "minmax", "zscore"):
        choice = choose_mr_scheme(measurement, scheme)
        assert (choice.scheme, choice.forced) == (scheme, True)
    with pytest.raises(ValueError, match="unknown MR scheme 'percentile'"):
        choose_mr_scheme(measurement, "percentile")


def fake_planner(settings: SwinPlanSettings, labels: dict[str, int] | None = None) -> SwinPlanner:
    """A planner without a dataset on disk, for the adaptation step (as tests/plans/test_plans.py does)."""
    planner = object.__new__(SwinPlanner)
    planner.settings = settings
    planner.mr_notes = {}
    planner.dataset_name = "Dataset902_Head"
    planner.dataset_json = {"channel_names": {"0": "T1"}, "labels": labels or {"background": 0, **{
        v: k for k, v in NAMES.items()}}}
    planner.UNet_featuremap_min_edge_length = 4
    planner.UNet_max_features_3d = 320
    planner.UNet_base_num_features = 32
    planner.UNet_blocks_per_stage_encoder = (2,) * 14
    planner.UNet_blocks_per_stage_decoder = (2,) * 13
    return planner


def nnunet_plans() -> dict:
    return {
        "plans_name": "nnUNetSwinPlans", "dataset_name": "Dataset902_Head",
        "foreground_intensity_properties_per_channel": {"0": {"mean": 300.0, "std": 50.0, "percentile_00_5": 1.0,
                                                              "percentile_99_5": 900.0}},
        "configurations": {"3d_fullres": {
            "spacing": [2.0, 1.5, 1.5], "patch_size": [80, 160, 160], "batch_size": 5,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [True],
            "architecture": {"arch_kwargs": {}},
        }},
    }


@pytest.mark.parametrize(
    ("argv", "scheme", "use_mask"),
    [
        ([], "RescaleTo01Normalization", False),  # measured: the window clips case2
        (["--mr-normalization", "minmax"], "RescaleTo01Normalization", False),
        (["--mr-normalization", "window"], "CTNormalization", False),
        (["--mr-normalization", "zscore"], "ZScoreNormalization", True),  # nnU-Net's own use_mask_for_norm
        (["--mr-window", "0", "400"], "CTNormalization", False),
    ],
)
def test_plan_options_force_the_scheme(toy_measurement: Toy, argv: list[str], scheme: str, use_mask: bool) -> None:
    _, _, measurement = toy_measurement
    args = build_parser().parse_args(["plan", "-d", "902", *argv])
    mode, mr_scheme, window = mr_normalization_settings(args.mr_normalization, args.mr_window)
    settings = SwinPlanSettings(mr_normalization=mode, mr_scheme=mr_scheme, mr_window=window)
    plans = fake_planner(settings).adapt_plans(nnunet_plans(), {0: measurement})
    config = plans["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == [scheme] and config["use_mask_for_norm"] == [use_mask]
    record = plans["nnunet_ssl"]["mr_normalization"]
    measured = record["measurements"]["0"]
    assert measured["nnunet_scheme"] == scheme and measured["forced"] == bool(argv)
    assert measured["schemes"]["window"]["max_extra_clipped_foreground"] == pytest.approx(0.496)
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    if scheme == "CTNormalization":
        expected = (0.0, 400.0) if window else measurement.window
        assert (props["percentile_00_5"], props["percentile_99_5"]) == pytest.approx(expected)
        mapped = CTNormalization(use_mask_for_norm=False, intensityproperties=props).run(
            np.array([expected[0], expected[1], 2 * expected[1]], dtype=np.float32))
        np.testing.assert_allclose(mapped, [0.0, 1.0, 1.0], atol=1e-6)
    else:
        assert props["percentile_99_5"] == 900.0  # nnU-Net's fingerprint, untouched
    if argv == ["--mr-normalization", "minmax"]:
        assert record["0"].startswith("approximates per-image 5-95 % -> [0, 1] with per-image min-max, as asked "
                                      "(mean |difference| ")


def test_mr_window_goes_only_with_a_window() -> None:
    assert mr_normalization_settings("percentile", [0.0, 400.0]) == ("window", "auto", (0.0, 400.0))
    assert mr_normalization_settings("minmax", None) == ("percentile", "minmax", None)
    with pytest.raises(ValueError, match="--mr-window sets a fixed window; it does not go with --mr-normalization "
                                         "zscore"):
        mr_normalization_settings("zscore", [0.0, 400.0])
    with pytest.raises(ValueError, match="MR scheme 'minmax' stands in for the percentile mapping"):
        SwinPlanSettings(mr_normalization="zscore", mr_scheme="minmax")
    assert SwinPlanSettings(mr_scheme="minmax").forced_mr_scheme == "minmax"
    assert SwinPlanSettings().forced_mr_scheme is None


def test_summary_reports_the_contrast_and_the_plan_warns(toy_measurement: Toy, caplog: pytest.LogCaptureFixture) -> None:
    _, _, measurement = toy_measurement
    settings = SwinPlanSettings(mr_scheme="window")  # forced: loses the contrast in case2
    with caplog.at_level(logging.WARNING, logger="nnunet_ssl.plans.planner"):
        plans = fake_planner(settings).adapt_plans(nnunet_plans(), {0: measurement})
    assert ("MR channel 0: one window loses the white_matter - grey_matter contrast in 1 of 3 training images "
            "(case2); --mr-normalization minmax keeps it in every image") in caplog.text
    summary = summarize_plans(plans, settings).splitlines()
    assert summary[-3].startswith("  channel 0   MR window [") and "with one window, as asked" in summary[-3]
    assert summary[-2].strip().startswith("error to per-image 5-95 % on the foreground")
    assert summary[-1].strip().startswith("contrast white_matter - grey_matter (median over images): raw 100")
    assert "one window (used) 0.124 (lost in 1 of 3: case2)" in summary[-1]


def test_foreground_mask_fills_holes_drops_specks_and_keeps_labels() -> None:
    image = np.zeros((30, 30, 30))
    zz, yy, xx = np.mgrid[:30, :30, :30]
    r = np.sqrt((zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2)
    image[r < 10] = 100.0  # a bright shell ...
    image[r < 8] = 5.0     # ... around a dark inside (skull and CSF around the brain look like this)
    image[0, 0, 0] = 100.0  # a noise speck in the air
    label = np.zeros_like(image, dtype=np.uint8)
    label[0, 29, 29] = 1  # a labelled voxel outside the body still counts
    mask = foreground_mask(image, PCT, label)
    np.testing.assert_array_equal(mask, (r < 10) | (label > 0))


def test_sample_image_strides_and_z_score_statistics() -> None:
    volume = np.arange(64 * 64 * 64, dtype=np.float32).reshape(64, 64, 64)
    assert strided(volume, 40_000).shape == (32, 32, 32)  # stride 2: 32768 voxels
    assert strided(volume, 10**9).shape == (64, 64, 64)
    image = np.zeros((20, 20, 20), dtype=np.float32)
    image[5:15, 5:15, 5:15] = np.linspace(100, 200, 1000).reshape(10, 10, 10)
    sample = sample_image("c", image, None, PCT, zscore_nonzero=True)
    inside = image[image != 0]
    assert (sample.mean, sample.std) == pytest.approx((inside.mean(), inside.std()))
    assert (sample.minimum, sample.maximum) == (0.0, 200.0)
    assert sample_image("c", image, None, PCT).mean == pytest.approx(image.mean())
    with pytest.raises(ValueError, match="label shape"):
        sample_image("c", image, np.zeros((2, 2, 2)), PCT)


def test_label_names_and_pairs() -> None:
    names = dataset_label_names({"background": 0, "gm": 1, "wm": 2, "whole": [1, 2], "ignore": 9})
    assert names == {1: "gm", 2: "wm"}
    assert label_pairs({1: "a", 2: "b", 3: "c"}) == [(1, 2), (1, 3), (2, 3)]
    assert label_pairs({v: str(v) for v in range(1, 8)}) == [(v, v + 1) for v in range(1, 7)]


def test_on_mr_phantoms_the_window_is_refused_where_all_voxels_chose_it() -> None:
    """T1-like head phantoms (make-phantoms --modality mr): most voxels are noisy background, gains differ per case."""
    cases = [generate_mr_case(_case_rng(0, 0, j), (32, 48, 48)) for j in range(12)]
    samples = [sample_image(f"Phantom_{j:03d}", image, label, PCT) for j, (image, label, _) in enumerate(cases)]
    measurement = measure_mr_normalization(samples, PCT, dataset_label_names(MR_LABELS))
    assert np.mean(measurement.foreground_fraction) < 0.5
    old = mr_percentile_approximation([image.reshape(-1) for image, _, _ in cases], PCT)
    assert old.scheme == "CTNormalization"  # over all voxels, the background's low error wins
    window, minmax = measurement.schemes["window"], measurement.schemes["minmax"]
    assert window.max_extra_clipped > MAX_EXTRA_CLIPPED  # the brightest head's brain saturates at 1.0
    assert choose_mr_scheme(measurement).scheme == "minmax"
    assert minmax.mean_foreground_error < 2 * window.mean_foreground_error  # the price: a little further on average
    wm_gm = next(p for p in measurement.contrasts if p.name == "white_matter - grey_matter")
    assert all(r is not None and r > 0 for r in wm_gm.raw)  # grey matter darker than white matter in every case
    assert wm_gm.lost("window") and not wm_gm.lost("minmax")
