"""A minimal nnU-Net ``3d_fullres`` plans dict and dataset.json for in-process trainer tests.

One CT channel, 64^3 patch at 2 x 1.5 x 1.5 mm, one foreground label. Imported by name (``tests`` is
on ``sys.path`` through ``pytest.ini``); it holds no tests itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

#: dataset.json of the plans below.
TINY_CT_DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 1,
                        "file_ending": ".nii.gz"}


def tiny_ct_plans(dataset_name: str) -> dict[str, Any]:
    """A fresh plans dict (callers may change it) for ``dataset_name``."""
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.5, 1.5],
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 300.0, "mean": -175.0, "median": 0.0, "min": -200.0, "percentile_00_5": -175.0,
                  "percentile_99_5": 250.0, "std": 425.0},
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 1, "patch_size": [64, 64, 64], "median_image_size_in_voxels": [64, 64, 64],
                "spacing": [2.0, 1.5, 1.5], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
                "batch_dice": False,
                "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
            }
        },
    }


def write_nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plans: dict[str, Any],
                     dataset_json: dict[str, Any]) -> Path:
    """nnU-Net's folders under ``tmp_path`` with ``plans`` preprocessed (one empty case), set in the
    environment, and ``sys.argv`` as ``nnUNetv2_train``'s; returns ``tmp_path``."""
    preprocessed = tmp_path / "preprocessed" / plans["dataset_name"]
    (preprocessed / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (preprocessed / "nnUNetPlans_3d_fullres" / "case_000.b2nd").write_bytes(b"")  # nnU-Net infers the format
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans), encoding="utf-8")
    (preprocessed / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train"])
    return tmp_path
