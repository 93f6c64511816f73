"""CKA: the estimators against hand-computed values and their invariances, layer hooks, and `nnunet-ssl cka`."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ssl.analysis.cka.compare import (
    MinibatchCKA,
    gram,
    linear_cka,
    unbiased_cka,
    unbiased_hsic,
)
from nnunet_ssl.analysis.cka.gather import (
    FinetunedFold,
    PretrainedEncoder,
    batch_sizes,
    case_patches,
    check_same_architecture,
    encoder_layer_names,
    iter_minibatches,
    layer_grams,
    load_pretrained_encoder,
    select_layers,
    strip_wrapper_prefixes,
)
from nnunet_ssl.cli import main
from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.weights import WeightsError, build_weights_file, save_weights_file


def _minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    accumulator = MinibatchCKA(["x"], ["y"])
    for start in range(0, len(x), batch):
        accumulator.update({"x": gram(x[start : start + batch])}, {"y": gram(y[start : start + batch])})
    return float(accumulator.compute()[0, 0])


def _correlated(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g, dtype=torch.float64)
    y = x[:, :16] @ torch.randn(16, 24, generator=g, dtype=torch.float64) + 2 * torch.randn(n, 24, generator=g, dtype=torch.float64)
    return x, y


# ---------------------------------------------------------------- estimators


def test_cka_of_a_representation_with_itself_is_one() -> None:
    x, _ = _correlated(64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert unbiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert _minibatch_cka(x, x, 16) == pytest.approx(1.0, abs=1e-12)


def test_large_common_offset_keeps_cka_exact() -> None:
    """CKA(x, 0.01 x + 30) is 1 for every estimator (uncentred Gram matrices gave 0.257 here)."""
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = 0.01 * x + 30
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    assert unbiased_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    assert _minibatch_cka(x, y, 8) == pytest.approx(1.0, abs=1e-9)
    # what the centring fixes: the same minibatch estimate from uncentred Gram matrices
    accumulator = MinibatchCKA(["x"], ["y"])
    for start in range(0, 64, 8):
        accumulator.update({"x": gram(x[start : start + 8], center=False)},
                           {"y": gram(y[start : start + 8], center=False)})
    assert not accumulator.compute()[0, 0] > 0.9


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    x, y = _correlated(80, seed=1)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    for estimator in (linear_cka, unbiased_cka, lambda a, b: _minibatch_cka(a, b, 20)):
        reference = estimator(x, y)
        assert estimator(x @ q, y) == pytest.approx(reference, abs=1e-10)
        assert estimator(x, 7.5 * y) == pytest.approx(reference, abs=1e-10)
        assert estimator(0.01 * (x @ q), y) == pytest.approx(reference, abs=1e-10)


def test_known_answer_by_hand() -> None:
    """x = (1, 2, 3, 4), y = (1, -1, 1, -1), one feature each, n = 4.

    K~ (K = x x^T, diagonal zeroed), row sums 9, 16, 21, 24, total 70:
        [0 2 3 4; 2 0 6 8; 3 6 0 12; 4 8 12 0]
    L~ = off-diagonal y_i y_j, every row sum -1, total -4:
        [0 -1 1 -1; -1 0 -1 1; 1 -1 0 -1; -1 1 -1 0]
    n = 4: (n-1)(n-2) = 6, n-2 = 2, n(n-3) = 4.
    HSIC(K, L): tr(K~L~) = -3 + 0 - 15 - 8 = -26; 1^T K~ 1 * 1^T L~ 1 / 6 = 70 * -4 / 6 = -140/3;
        1^T K~ L~ 1 = 9*-1 + 16*-1 + 21*-1 + 24*-1 = -70, times 2/2;
        -> (-26 - 140/3 + 70) / 4 = (-8/3) / 4 = -2/3.
    HSIC(K, K): tr = 2 * (4 + 9 + 16 + 36 + 64 + 144) = 546; 70^2 / 6 = 2450/3;
        1^T K~ K~ 1 = 9^2 + 16^2 + 21^2 + 24^2 = 1354 -> (546 + 2450/3 - 1354) / 4 = 13/6.
    HSIC(L, L): tr = 12; (-4)^2 / 6 = 8/3; 1^T L~ L~ 1 = 4 -> (12 + 8/3 - 4) / 4 = 8/3.
    CKA = (-2/3) / sqrt(13/6 * 8/3) = -1/sqrt(13).
    Biased linear CKA of 1-D features is the squared Pearson correlation: centred x = (-1.5, -0.5, 0.5, 1.5),
    x.y = -2, |x|^2 = 5, |y|^2 = 4 -> 4 / 20 = 0.2.
    """
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    k, l = gram(x), gram(y)
    assert unbiased_hsic(k, l) == pytest.approx(-2 / 3)
    assert unbiased_hsic(k, k) == pytest.approx(13 / 6)
    assert unbiased_hsic(l, l) == pytest.approx(8 / 3)
    assert unbiased_cka(x, y) == pytest.approx(-1 / math.sqrt(13))
    assert _minibatch_cka(x, y, 4) == pytest.approx(-1 / math.sqrt(13))
    assert linear_cka(x.numpy(), y.numpy()) == pytest.approx(0.2)


def test_minibatch_estimate_agrees_with_full_batch_unbiased() -> None:
    x, y = _correlated(1200, seed=3)
    assert _minibatch_cka(x, y, 40) == pytest.approx(unbiased_cka(x, y), abs=0.03)


def test_unbiased_estimates_converge_to_linear_cka_for_large_n() -> None:
    gaps = []
    for n in (64, 4096):
        x, y = _correlated(n, seed=4)
        gaps.append(abs(_minibatch_cka(x, y, 64) - linear_cka(x, y)))
    assert gaps[1] < 0.02 and gaps[1] < gaps[0]
    # independent high-dimensional features: biased CKA is far from 0 at small n, the unbiased one is not
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)
    assert linear_cka(a, b) > 0.5
    assert abs(unbiased_cka(a, b)) < 0.15


def test_too_few_or_mismatched_examples_raise() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_hsic(torch.eye(3), torch.eye(3))
    with pytest.raises(ValueError, match="same"):
        unbiased_hsic(torch.eye(4), torch.eye(5))
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    accumulator = MinibatchCKA(["a"], ["b"])
    with pytest.raises(ValueError, match="at least 4"):
        accumulator.update({"a": torch.eye(3)}, {"b": torch.eye(3)})
    with pytest.raises(ValueError, match="same examples"):
        accumulator.update({"a": torch.eye(4)}, {"b": torch.eye(5)})
    with pytest.raises(ValueError, match="no minibatch"):
        accumulator.compute()


def test_batch_sizes_keep_every_minibatch_at_four_or_more() -> None:
    assert batch_sizes(12, 4) == [4, 4, 4]
    assert batch_sizes(10, 4) == [4, 6]
    assert batch_sizes(13, 8) == [8, 5]
    assert batch_sizes(5, 8) == [5]
    with pytest.raises(ValueError, match="at least 4"):
        batch_sizes(10, 3)
    with pytest.raises(ValueError, match="at least 4"):
        batch_sizes(3, 8)
    blocks = [torch.full((3, 1), float(i)) for i in range(4)]  # 4 cases x 3 patches
    assert [len(b) for b in iter_minibatches(blocks, batch_sizes(12, 5))] == [5, 7]


def test_patches_are_seeded_in_bounds_and_padded() -> None:
    volume = np.arange(2 * 40 * 70 * 66, dtype=np.float32).reshape(2, 40, 70, 66)
    first = case_patches(volume, (64, 64, 64), 3, np.random.default_rng([0, 1]))
    again = case_patches(volume, (64, 64, 64), 3, np.random.default_rng([0, 1]))
    assert first.shape == (3, 2, 64, 64, 64) and torch.equal(first, again)
    # depth 40 is zero-padded 12 + 12 around the centre, as nnU-Net's inference pads
    assert torch.all(first[:, :, :12] == 0) and torch.all(first[:, :, 52:] == 0)
    assert first[:, :, 12:52].abs().amin(dim=(2, 3, 4)).gt(0).all()  # content (arange > 0 off the origin)


# ---------------------------------------------------------------- features and sources


def test_layer_names_follow_the_preset() -> None:
    assert len(encoder_layer_names(PRESETS["smit"])) == 1 + 14
    names = encoder_layer_names(PRESETS["tiny"])
    assert names == ["embed"] + [f"stage{s}.block{b}" for s in range(1, 5) for b in (1, 2)]
    assert select_layers(names, "stage2.block1, embed") == ["embed", "stage2.block1"]
    with pytest.raises(ValueError, match="stage9"):
        select_layers(names, "embed,stage9.block1")


def test_layer_grams_on_the_tiny_preset() -> None:
    torch.manual_seed(0)
    encoder = SwinEncoder(PRESETS["tiny"]).eval()
    images = torch.randn(4, 1, 64, 64, 64)
    names = encoder_layer_names(PRESETS["tiny"])
    grams = layer_grams(encoder, images, names)
    assert list(grams) == names and len(grams) == 1 + sum(PRESETS["tiny"].depths)
    assert all(k.shape == (4, 4) and k.dtype == torch.float64 for k in grams.values())
    embedded = encoder.patch_embed(images).reshape(4, -1).double()
    embedded = embedded - embedded.mean(dim=0, keepdim=True)  # features centred over the minibatch
    torch.testing.assert_close(grams["embed"], embedded @ embedded.T)
    assert not any(module._forward_hooks for module in encoder.modules())  # hooks removed


def test_sources_strip_wrappers_adapt_run_stems_and_refuse_other_presets(tmp_path: Path, monkeypatch) -> None:
    assert list(strip_wrapper_prefixes({"module._orig_mod.encoder.x": torch.zeros(1)})) == ["encoder.x"]
    encoder = SwinEncoder(PRESETS["tiny"], use_mask_token=True)

    def fake_run(run_dir: Path, source: str) -> tuple:
        return encoder.state_dict(), SimpleNamespace(preset="tiny"), "run/ckpt.pt"

    monkeypatch.setattr("nnunet_ssl.weights.export.load_run_encoder", fake_run)  # a 1-channel pretraining run
    loaded = load_pretrained_encoder(tmp_path, in_channels=2)
    assert loaded.encoder.in_channels == 2 and loaded.preset_name == "tiny"
    fold = FinetunedFold(loaded.encoder, "smit", "SwinSMITTrainer", "3d_fullres", {}, {}, tmp_path / "checkpoint_final.pth")
    with pytest.raises(WeightsError, match="checkpoint_final.pth.*'smit'"):
        check_same_architecture(PretrainedEncoder(loaded.encoder, "tiny", "x"), fold, tmp_path / "w.pt")


# ---------------------------------------------------------------- the command


def _plans(patch: int) -> dict:
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

    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
                    "numTraining": 3, "file_ending": ".nii.gz"}
    results = root / "Dataset990_CKA" / "SwinSMITTrainer_tiny_2epochs__nnUNetPlans__3d_fullres"
    fold = results / "fold_0"
    fold.mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(_plans(64)), encoding="utf-8")
    (results / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    checkpoint = {
        "network_weights": {f"_orig_mod.{k}": v for k, v in payload["network_weights"].items()},
        "trainer_name": "SwinSMITTrainer_tiny_2epochs",
        "init_args": {"plans": _plans(64), "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json},
        "current_epoch": np.int64(2),  # nnU-Net's checkpoints hold numpy scalars
    }
    torch.save(checkpoint, fold / "checkpoint_final.pth")

    images = root / "imagesTs"
    images.mkdir()
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in (72, 80, 80)), indexing="ij")
    for i in range(3):
        body = (zz**2 + yy**2 + xx**2 < 0.8).astype(np.float32)
        volume = -1000 + body * (1040 + 80 * np.sin(4 * (i + 1) * xx) + 30 * rng.standard_normal(body.shape))
        image = sitk.GetImageFromArray(volume.astype(np.float32))
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(images / f"case{i}_0000.nii.gz"))
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
    from nnunet_ssl.analysis.cka.gather import stage_layers
    from nnunet_ssl.analysis.cka.run import cka_between_folds

    assert stage_layers("tiny") == [f"stage{s}.block2" for s in range(1, 5)]
    result = cka_between_folds(cka_inputs["fold"], cka_inputs["fold"], cka_inputs["images"], patches_per_case=2,
                               batch_size=4)
    assert result.layers == stage_layers("tiny") and result.examples == 6
    assert all(value == pytest.approx(1.0, abs=1e-6) for _, value in result.per_layer())
