"""Shared helpers for the CKA tests: a minimal nnU-Net plans dict (also used by the experiment report's tests) and raw CT cases.

Imported by name (``from test_cka_helpers import nnunet_plans``; ``pytest.ini`` puts this folder on
``sys.path``); it holds no tests itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: The architecture entry the Swin trainers' plans carry (they build their preset whatever it says).
SWIN_ARCHITECTURE = {"network_class_name": "SwinUNETRSeg", "arch_kwargs": {}, "_kw_requires_import": []}


def nnunet_plans(
    patch: int, architecture: dict[str, Any] | None = None, normalization: str = "CTNormalization"
) -> dict:
    """nnU-Net plans of one ``3d_fullres`` configuration with a cubic ``patch`` (1 channel).

    Args:
        patch: Patch edge.
        architecture: The configuration's ``architecture`` entry (default: the Swin trainers' placeholder).
        normalization: nnU-Net's normalization scheme of the channel, e.g. ``"ZScoreNormalization"``.
    """
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset990_CKA",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [72, 80, 80],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [patch, patch, patch],
                "median_image_size_in_voxels": [72, 80, 80],
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": [normalization],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": dict(architecture or SWIN_ARCHITECTURE),
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": 40.0, "std": 60.0, "percentile_00_5": -150.0, "percentile_99_5": 250.0,
                  "min": -1000.0, "max": 1000.0, "median": 40.0}
        },
    }


def write_raw_ct_cases(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` CT-like cases ``case{i}_0000.nii.gz`` of 72 x 80 x 80 voxels (1 mm) in ``folder``: a noisy ball
    whose texture differs per case, in air. Returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in (72, 80, 80)), indexing="ij")
    for i in range(count):
        body = (zz**2 + yy**2 + xx**2 < 0.8).astype(np.float32)
        volume = -1000 + body * (1040 + 80 * np.sin(4 * (i + 1) * xx) + 30 * rng.standard_normal(body.shape))
        image = sitk.GetImageFromArray(volume.astype(np.float32))
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(folder / f"case{i}_0000.nii.gz"))
    return folder


#: dataset.json of the CKA tests' folds: one CT channel, two foreground classes.
CKA_DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 3,
                    "file_ending": ".nii.gz"}


def write_nnunet_fold(
    results: Path, network_weights: dict[str, Any], trainer_name: str, plans: dict[str, Any],
    dataset_json: dict[str, Any] | None = None,
) -> Path:
    """``results/fold_0/checkpoint_final.pth`` with plans.json and dataset.json beside it, as nnU-Net writes a fold.

    The checkpoint holds what ``cka`` reads of nnU-Net's: ``network_weights``, ``init_args`` (with the
    configuration ``3d_fullres``), ``trainer_name``, and a numpy scalar as nnU-Net's checkpoints do.
    Returns the fold folder.
    """
    import torch

    dataset_json = dataset_json or CKA_DATASET_JSON
    fold = results / "fold_0"
    fold.mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    (results / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    checkpoint = {
        "network_weights": network_weights,
        "trainer_name": trainer_name,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json},
        "current_epoch": np.int64(2),  # nnU-Net's checkpoints hold numpy scalars
    }
    torch.save(checkpoint, fold / "checkpoint_final.pth")
    return fold
