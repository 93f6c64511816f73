"""``nnunet-ssl cka`` end to end on a tiny preset (``analysis/cka/run.py`` through the CLI): files, refusals, two folds."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from test_cka_helpers import nnunet_plans, write_nnunet_fold, write_raw_ct_cases

from nnunet_ssl.analysis.cka.gather import encoder_layer_names, stage_layers
from nnunet_ssl.analysis.cka.run import cka_between_folds
from nnunet_ssl.cli import main
from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.weights import build_weights_file, save_weights_file


@pytest.fixture(scope="module")
def cka_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An export file, a fold whose encoder is the same (saved with wrapper prefixes), and 3 raw CT cases."""
    root = tmp_path_factory.mktemp("cka")
    torch.manual_seed(7)
    pretrained = SwinEncoder(PRESETS["tiny"], use_mask_token=True)
    payload = build_weights_file(pretrained.state_dict(), "tiny", 1, 3, method="smit", source="unit-test")
    weights = save_weights_file(payload, root / "smit_tiny.pt")
    tampered = {**payload, "metadata": {**payload["metadata"], "preset": "monai"}}
    save_weights_file(tampered, root / "wrong_preset.pt")

    results = root / "Dataset990_CKA" / "SwinSMITTrainer_tiny_16epochs__nnUNetPlans__3d_fullres"
    fold = write_nnunet_fold(results, {f"_orig_mod.{k}": v for k, v in payload["network_weights"].items()},
                             "SwinSMITTrainer_tiny_16epochs", nnunet_plans(64))
    images = write_raw_ct_cases(root / "imagesTs", 3)
    return {"weights": weights, "wrong_preset": root / "wrong_preset.pt", "fold": fold, "images": images}


def test_cka_command_writes_tables_and_figures_and_identical_encoders_score_one(
    cka_inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cka"
    argv = ["cka", "--pretrained", str(cka_inputs["weights"]), "--finetuned", str(cka_inputs["fold"]),
            "--data", str(cka_inputs["images"]), "--out", str(out), "--patches-per-case", "3", "--batch-size", "4"]
    assert main(argv) == 0
    for name in ("cka_per_layer.csv", "cka_matrix.csv", "cka_per_layer.png", "cka_heatmap.png", "cka_settings.json"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "cka_per_layer.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["layer"] for r in rows] == encoder_layer_names(PRESETS["tiny"])
    assert all(float(r["cka"]) == pytest.approx(1.0, abs=1e-6) for r in rows)
    with open(out / "cka_matrix.csv", encoding="utf-8") as handle:
        matrix = list(csv.reader(handle))
    assert len(matrix) == 1 + 9 and all(len(row) == 1 + 9 for row in matrix)
    summary = json.loads((out / "cka_settings.json").read_text(encoding="utf-8"))
    assert summary["examples"] == 9 and summary["minibatches"] == 2 and summary["preset"] == "tiny"


def test_cka_command_refuses_mismatches_naming_the_file(cka_inputs: dict[str, Path], tmp_path: Path, caplog) -> None:
    common = ["--finetuned", str(cka_inputs["fold"]), "--data", str(cka_inputs["images"]), "--out", str(tmp_path)]
    assert main(["cka", "--pretrained", str(cka_inputs["wrong_preset"]), *common]) == 1
    assert "wrong_preset.pt" in caplog.text and "'monai'" in caplog.text
    assert main(["cka", "--pretrained", str(cka_inputs["weights"]), *common, "--checkpoint", "best"]) == 1
    assert "checkpoint_best.pth does not exist" in caplog.text
    assert main(["cka", "--pretrained", str(cka_inputs["weights"]), *common, "--batch-size", "2"]) == 1
    assert "--batch-size must be at least 4" in caplog.text


def test_cka_between_two_finetuned_folds_per_stage(cka_inputs: dict[str, Path]) -> None:
    """Few-shot vs full-data feature reuse: a fold against itself is 1 at every stage's last block."""
    assert stage_layers("tiny") == [f"stage{s}.block2" for s in range(1, 5)]
    result = cka_between_folds(cka_inputs["fold"], cka_inputs["fold"], cka_inputs["images"], patches_per_case=2,
                               batch_size=4)
    assert result.layers == stage_layers("tiny") and result.examples == 6
    assert all(value == pytest.approx(1.0, abs=1e-6) for _, value in result.per_layer())
