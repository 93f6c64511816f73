"""``nnunet-ssl pretrain --intensity-like`` sets the data settings that map like a plans file, and ``export``
warns with the measured difference when the plans map far from the pretraining (issue 20)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from test_intensity_measured import head, plans_with, shared_window, window_properties, write_raw_dataset

from nnunet_ssl.cli import build_parser, log_intensity_report, run_config_from_args
from nnunet_ssl.weights.intensity import pretraining_intensity
from nnunet_ssl.weights.targets import target_from_plans_file

DATASET = "Dataset990_Heads"


def preprocessed(root: Path, plans: dict[str, Any], name: str = "nnUNetSwinPlans", channel: str = "T1") -> Path:
    """``root/nnUNet_preprocessed/DATASET/<name>.json`` with its dataset.json."""
    folder = root / "nnUNet_preprocessed" / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    plans = {**plans, "plans_name": name}
    (folder / f"{name}.json").write_text(json.dumps(plans), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": {"background": 0, "white": 1, "grey": 2}, "numTraining": 3,
        "file_ending": ".nii.gz"}), encoding="utf-8")
    return folder / f"{name}.json"


def pretrain_args(tmp_path: Path, *extra: str, method: str = "simmim") -> Any:
    return build_parser().parse_args(["pretrain", "--method", method, "--data", str(tmp_path / "pool"),
                                      "--out", str(tmp_path / "run"), *extra])


def test_intensity_like_a_plans_file_sets_the_mr_window(tmp_path: Path, caplog) -> None:
    plans_file = preprocessed(tmp_path, plans_with("CTNormalization", window_properties(3.5, 690.0), modality="mr"))
    with caplog.at_level(logging.INFO, logger="nnunet_ssl"):
        config = run_config_from_args(pretrain_args(tmp_path, "--intensity-like", str(plans_file)))
    assert config.data.intensity == "window" and config.data.mr_window == (3.5, 690.0)
    assert config.data.ct_window == (-500.0, 500.0)  # the plans say nothing about CT
    assert "MR window [3.5, 690] -> [0, 1] -> mr_window [3.5, 690]" in caplog.text


def test_intensity_like_a_dataset_uses_the_family_plans(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nnUNet_preprocessed"))
    preprocessed(tmp_path, plans_with("RescaleTo01Normalization", modality="mr"))
    preprocessed(tmp_path, plans_with("ZScoreNormalization", use_mask=True), name="nnUNetResEncSSLPlans")
    assert run_config_from_args(pretrain_args(tmp_path, "--intensity-like", DATASET)).data.intensity == "minmax"
    # spark3d pretrains ResEnc networks: its family's plans, and the plans win over its z-score recipe default
    spark = run_config_from_args(pretrain_args(tmp_path, "--intensity-like", DATASET, method="spark3d"))
    assert spark.data.intensity == "zscore_nonzero"
    named = run_config_from_args(pretrain_args(tmp_path, "--intensity-like", DATASET, "nnUNetResEncSSLPlans"))
    assert named.data.intensity == "zscore_nonzero"
    with pytest.raises(FileNotFoundError, match="nnUNetPlans.json does not exist") as missing:
        run_config_from_args(pretrain_args(tmp_path, "--intensity-like", DATASET, "nnUNetPlans"))
    assert f"`nnunet-ssl pretrain --intensity-like {DATASET} nnUNetResEncSSLPlans`" in str(missing.value)
    build_parser().parse_args(["pretrain", "--intensity-like", DATASET, "nnUNetResEncSSLPlans"])  # the hint parses


def test_intensity_like_refuses_what_cannot_be_matched(tmp_path: Path) -> None:
    window = preprocessed(tmp_path, plans_with("CTNormalization", window_properties(-175.0, 250.0), modality="ct"),
                          channel="CT")
    with pytest.raises(ValueError, match="--intensity zscore contradicts --intensity-like"):
        run_config_from_args(pretrain_args(tmp_path, "--intensity-like", str(window), "--intensity", "zscore"))
    assert run_config_from_args(pretrain_args(tmp_path, "--intensity-like", str(window))).data.ct_window == (-175.0, 250.0)
    stats = {"mean": 99.5, "std": 137.1, "percentile_00_5": -958.0, "percentile_99_5": 327.0}
    nnunet = preprocessed(tmp_path, plans_with("CTNormalization", stats), name="nnUNetPlans", channel="CT")
    with pytest.raises(ValueError, match="CTNormalization with the dataset's statistics"):
        run_config_from_args(pretrain_args(tmp_path, "--intensity-like", str(nnunet)))
    with pytest.raises(ValueError, match="takes DATASET"):
        run_config_from_args(pretrain_args(tmp_path, "--intensity-like", "a", "b", "c"))


def test_export_warns_with_the_measured_difference(tmp_path: Path, monkeypatch, caplog) -> None:
    cases = [head(gain, seed) for seed, gain in enumerate((0.6, 1.0, 1.8))]
    write_raw_dataset(tmp_path / "nnUNet_raw" / DATASET, cases, "T1")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    plans_file = preprocessed(tmp_path, plans_with("CTNormalization", window_properties(*shared_window(cases)),
                                                   modality="mr"))
    target = target_from_plans_file(plans_file)
    with caplog.at_level(logging.INFO, logger="nnunet_ssl"):
        log_intensity_report(pretraining_intensity("mr", [], (-500, 500), (5, 95)), target)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "far from the pretraining" in warnings[0].getMessage()
    assert "mean |difference| 0.19" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nnunet_ssl"):
        log_intensity_report(pretraining_intensity("mr", [], (-500, 500), (5, 95), "window", shared_window(cases)),
                             target)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "intensities: channel 0" in caplog.text and "mean |difference| 0.000" in caplog.text
