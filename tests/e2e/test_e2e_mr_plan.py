"""`nnunet-ssl plan` on T1-like head phantoms (`make-phantoms --modality mr`): the MR normalisation keeps the anatomy.

Four heads whose gains differ (the brightest 1.6 times the median white matter, the darkest half of it): one
shared window saturates the brightest head's brain at 1.0, so the planner uses per-image min-max, reports the
grey/white contrast before and after, and nnU-Net's preprocessed data keep it; forced to the window, the plan
warns and the preprocessed head keeps about a third of it.
Marked ``e2e``: real nnU-Net fingerprinting, planning and preprocessing, twice (45-70 s on 2 shared cores).
"""
from __future__ import annotations

import json

import blosc2
import pytest
from nnunet_runner import NnUNet

from nnunet_ssl.data.phantoms import MR_LABELS, PhantomConfig, write_phantom_datasets

pytestmark = pytest.mark.e2e

CONFIG = PhantomConfig(num_train=4, num_test=0, num_unlabeled=0, shape=(32, 48, 48), dataset_id=502,
                       dataset_name="PhantomMR", modality="mr")
BRIGHT = "Phantom_001"  # the brightest head of the four


def white_minus_grey(runner: NnUNet, plans: str, case: str) -> float:
    """The preprocessed case's mean white-matter minus mean grey-matter intensity (what the network sees)."""
    folder = runner.preprocessed / f"{plans}_3d_fullres"
    data = blosc2.open(str(folder / f"{case}.b2nd"), mode="r")[:]
    seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[:]
    return float(data[0][seg[0] == MR_LABELS["white_matter"]].mean() - data[0][seg[0] == MR_LABELS["grey_matter"]].mean())


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> NnUNet:
    root = tmp_path_factory.mktemp("mr_plan")
    paths = write_phantom_datasets(root, CONFIG)
    return NnUNet(root, paths.raw_root, dataset=CONFIG.dataset_folder_name)


def test_plan_keeps_the_grey_white_contrast_and_a_forced_window_loses_it(heads: NnUNet) -> None:
    result = heads.run("nnunet-ssl", "plan", "-d", "502", "--preset", "tiny", "-np", "1")
    plans = json.loads((heads.preprocessed / "nnUNetSwinPlans.json").read_text(encoding="utf-8"))
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["RescaleTo01Normalization"]
    measured = plans["nnunet_ssl"]["mr_normalization"]["measurements"]["0"]
    assert measured["chosen"] == "minmax" and not measured["forced"]
    assert measured["cases"] == [f"Phantom_{i:03d}" for i in range(4)]
    assert "the window clips away" in measured["reason"] and BRIGHT in measured["reason"]
    wm_gm = next(c for c in measured["contrast"] if c["pair"] == ["white_matter", "grey_matter"])
    assert wm_gm["images_losing_it"]["minmax"] == 0 and wm_gm["images_losing_it"]["window"] >= 1
    output = result.stdout + result.stderr
    assert "contrast white_matter - grey_matter (median over images): raw " in output
    assert f"(lost in 1 of 4: {BRIGHT})" in output
    # nnU-Net's preprocessed head (resampled) shows the contrast the planner measured on the raw image
    bright = measured["cases"].index(BRIGHT)
    kept = white_minus_grey(heads, "nnUNetSwinPlans", BRIGHT)
    assert kept == pytest.approx(wm_gm["minmax"][bright], abs=0.03) and wm_gm["kept"]["minmax"][bright] > 0.99

    forced = heads.run("nnunet-ssl", "plan", "-d", "502", "--preset", "tiny", "-np", "1",
                       "--mr-normalization", "window", "--plans-name", "nnUNetSwinPlansWindow")
    window_plans = json.loads((heads.preprocessed / "nnUNetSwinPlansWindow.json").read_text(encoding="utf-8"))
    assert window_plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert window_plans["nnunet_ssl"]["mr_normalization"]["measurements"]["0"]["forced"] is True
    assert (f"one window loses the white_matter - grey_matter contrast in 1 of 4 training images ({BRIGHT}); "
            "--mr-normalization minmax keeps it in every image") in forced.stdout + forced.stderr
    clipped = white_minus_grey(heads, "nnUNetSwinPlansWindow", BRIGHT)
    assert clipped == pytest.approx(wm_gm["window"][bright], abs=0.03) and wm_gm["kept"]["window"][bright] < 0.5
    unclipped = wm_gm["window"][bright] / wm_gm["kept"]["window"][bright]  # raw difference x the window's slope
    assert clipped < 0.5 * unclipped
