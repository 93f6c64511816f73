"""Shared helpers for the CKA tests: a minimal nnU-Net plans dict (also used by the experiment report's tests).

Imported by name (``from test_cka_helpers import nnunet_plans``; ``pytest.ini`` puts this folder on
``sys.path``); it holds no tests itself.
"""
from __future__ import annotations


def nnunet_plans(patch: int) -> dict:
    """nnU-Net plans of one ``3d_fullres`` configuration with a cubic ``patch`` (CT normalization, 1 channel)."""
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
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling,
                "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
                "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
                "architecture": {"network_class_name": "SwinUNETRSeg", "arch_kwargs": {}, "_kw_requires_import": []},
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
