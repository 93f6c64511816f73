"""``resenc_l`` is the network nnU-Net itself builds from its ``nnUNetResEncUNetLPlans``.

nnU-Net's own command (``nnUNetv2_plan_experiment -pl nnUNetPlannerResEncL``) plans a generated isotropic
dataset (1 mm, 160^3 after cropping: what the Spark3D paper pretrains on), in a subprocess with the test's own
nnU-Net folders. The network is then built from that plans file exactly as nnU-Net's trainer builds it
(``PlansManager`` -> ``nnUNetTrainer.build_network_architecture``) and compared with ours: the plans'
architecture entry, the module tree, every state-dict key and shape, and, with the same seed, every
initial value. No class of ours is involved on nnU-Net's side, so weights made for ``resenc_l`` load into
nnU-Net's network (shown with nnU-Net's own ``load_pretrained_weights``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet

DATASET = "Dataset990_ResEncIso"
PLANS = "nnUNetResEncUNetLPlans"
#: Two labels besides background, two input channels: heads and stem both depend on the dataset.
CHANNELS = {"0": "T1", "1": "T2"}
LABELS = {"background": 0, "a": 1, "b": 2}


def write_isotropic_dataset(root: Path, shape: int = 160) -> tuple[Path, Path]:
    """A raw dataset (two small cases) and the fingerprint nnU-Net would extract from 1 mm scans of ``shape``^3.

    The planner reads the fingerprint (spacings, shapes after cropping, intensities), not the images.
    """
    raw, preprocessed = root / "raw" / DATASET, root / "preprocessed" / DATASET
    for folder in (raw / "imagesTr", raw / "labelsTr", preprocessed):
        folder.mkdir(parents=True)
    for case in ("case_000", "case_001"):
        for channel in CHANNELS:
            image = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32))
            sitk.WriteImage(image, str(raw / "imagesTr" / f"{case}_{int(channel):04d}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.uint8)), str(raw / "labelsTr" / f"{case}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps(
        {"channel_names": CHANNELS, "labels": LABELS, "numTraining": 2, "file_ending": ".nii.gz"}), encoding="utf-8")
    intensities = {"mean": 0.0, "std": 1.0, "min": -3.0, "max": 3.0, "median": 0.0,
                   "percentile_00_5": -2.5, "percentile_99_5": 2.5}
    (preprocessed / "dataset_fingerprint.json").write_text(json.dumps({
        "foreground_intensity_properties_per_channel": {c: intensities for c in CHANNELS},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [[shape] * 3, [shape] * 3],
        "spacings": [[1.0] * 3, [1.0] * 3],
    }), encoding="utf-8")
    return raw, preprocessed


@pytest.fixture(scope="module")
def nnunet_plans(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """nnU-Net's ResEnc-L plans of the isotropic dataset, made by nnU-Net's own command, and its dataset.json."""
    root = tmp_path_factory.mktemp("resenc_plans")
    raw, preprocessed = write_isotropic_dataset(root)
    env = {**os.environ, "nnUNet_raw": str(raw.parent), "nnUNet_preprocessed": str(preprocessed.parent),
           "nnUNet_results": str(root / "results"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [str(Path(sys.executable).parent / "nnUNetv2_plan_experiment"), "-d", "990", "-pl", "nnUNetPlannerResEncL"]
    result = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text(encoding="utf-8"))
    return plans, json.loads((preprocessed / "dataset.json").read_text(encoding="utf-8"))


def nnunet_network(plans: dict[str, Any], dataset_json: dict[str, Any], deep_supervision: bool = True) -> torch.nn.Module:
    """The network nnU-Net's trainer builds for ``3d_fullres`` of ``plans`` (nnUNetTrainer.initialize's calls)."""
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    in_channels = determine_num_input_channels(manager, configuration, dataset_json)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(manager, configuration, in_channels, heads, deep_supervision)


def layout(network: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(key, tuple(value.shape), value.dtype) for key, value in network.state_dict().items()]


def test_nnunets_resenc_l_plans_are_our_architecture(nnunet_plans: tuple[dict, dict]) -> None:
    plans, _ = nnunet_plans
    configuration = plans["configurations"]["3d_fullres"]
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncL"
    assert configuration["patch_size"] == [160, 160, 160] and configuration["spacing"] == [1.0, 1.0, 1.0]
    assert configuration["architecture"] == RESENC_PRESETS["resenc_l"].architecture()


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_resenc_l_has_the_keys_and_shapes_of_nnunets_network(nnunet_plans: tuple[dict, dict], deep_supervision: bool) -> None:
    plans, dataset_json = nnunet_plans
    with torch.device("meta"):
        theirs = nnunet_network(plans, dataset_json, deep_supervision)
        ours = build_resenc_unet(RESENC_PRESETS["resenc_l"], len(CHANNELS), len(LABELS), deep_supervision)
    assert type(theirs) is type(ours)
    assert layout(ours) == layout(theirs)  # same keys in the same order, same shapes and dtypes
    assert repr(ours) == repr(theirs)  # same module tree: kernels, strides, norms, eps, activations
    assert ours.decoder.deep_supervision == theirs.decoder.deep_supervision == deep_supervision
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)


def test_tiny_builds_and_initialises_as_nnunet_and_loads_with_nnunets_loader(
    nnunet_plans: tuple[dict, dict], tmp_path: Path
) -> None:
    """The small variant in nnU-Net's plans (a user's edited plans file) builds the same network, value for
    value from the same seed, and nnU-Net's ``-pretrained_weights`` loader takes our weights into its network."""
    plans, dataset_json = nnunet_plans
    plans = json.loads(json.dumps(plans))
    plans["configurations"]["3d_fullres"]["architecture"] = RESENC_PRESETS["resenc_tiny"].architecture()
    torch.manual_seed(11)
    theirs = nnunet_network(plans, dataset_json)
    torch.manual_seed(11)
    ours = build_resenc_unet(RESENC_PRESETS["resenc_tiny"], len(CHANNELS), len(LABELS))
    assert layout(ours) == layout(theirs)
    assert all(torch.equal(value, theirs.state_dict()[key]) for key, value in ours.state_dict().items())

    torch.manual_seed(12)
    pretrained = build_resenc_unet(RESENC_PRESETS["resenc_tiny"], len(CHANNELS), 5)  # another head count
    torch.save({"network_weights": pretrained.state_dict()}, tmp_path / "w.pt")
    load_pretrained_weights(theirs, str(tmp_path / "w.pt"))
    loaded = theirs.state_dict()
    for key, value in pretrained.state_dict().items():
        if ".seg_layers." not in key:
            assert torch.equal(loaded[key], value), key
