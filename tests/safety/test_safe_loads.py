"""No pickle from a user's file is run: nnU-Net checkpoints are read with ``weights_only=True`` and an
allow-list (numpy scalars), which a checkpoint written by nnU-Net's own ``save_checkpoint`` passes and a
planted one does not, in ``cka``, ``report`` and the trainers' resume."""
from __future__ import annotations

import copy
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_ct_plans import TINY_CT_DATASET_JSON, tiny_ct_plans, write_nnunet_env

from nnunet_ssl.checkpoints import UnsafeCheckpointError, load_nnunet_checkpoint, read_torch_file
from nnunet_ssl.cli import main

DATASET = "Dataset991_SafeLoads"
DATASET_JSON = TINY_CT_DATASET_JSON
TRAINER = "SwinScratchTrainer_tiny_2epochs"
PLANS = tiny_ct_plans(DATASET)


class Planted:
    """Unpickling this creates ``path``: what a crafted checkpoint in a shared results folder could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


def plant(path: Path, marker: Path, **extra: object) -> Path:
    """A checkpoint-shaped file whose ``logging`` entry runs code when unpickled unsafely."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"trainer_name": TRAINER, "logging": Planted(marker), **extra}, path)
    return path


def test_planted_object_is_refused_in_one_line_naming_the_file_and_type(tmp_path: Path) -> None:
    marker = tmp_path / "created_by_the_checkpoint"
    path = plant(tmp_path / "checkpoint_final.pth", marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_nnunet_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused") and "io.open" in message
    assert "\n" not in message and "weights_only" not in message and "trust" not in message
    assert isinstance(refused.value, ValueError)  # the CLI's error boundary prints it as one line
    assert not marker.exists()
    # the unsafe load it replaces would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_legacy_format_and_non_checkpoint_files(tmp_path: Path) -> None:
    marker = tmp_path / "created"
    legacy = tmp_path / "legacy.pth"
    torch.save({"x": Planted(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"legacy\.pth: refused: .*io\.open"):
        load_nnunet_checkpoint(legacy)
    assert not marker.exists()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.pth: not a readable nnU-Net checkpoint \(UnpicklingError: ") as bad:
        load_nnunet_checkpoint(garbage)
    assert "\n" not in str(bad.value) and "weights_only" not in str(bad.value)
    with pytest.raises(IsADirectoryError, match="is a folder; expected the nnU-Net checkpoint file"):
        load_nnunet_checkpoint(tmp_path)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not an nnU-Net checkpoint"):
        load_nnunet_checkpoint(tmp_path / "list.pth")
    # numpy arrays are not among the types nnU-Net stores: refused by name
    torch.save({"a": np.zeros(2)}, tmp_path / "array.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\._core\.multiarray\._reconstruct, numpy\.ndarray"):
        load_nnunet_checkpoint(tmp_path / "array.pth")
    # the safe loaders of weights files and pretraining checkpoints refuse the same way, in one line
    with pytest.raises(UnsafeCheckpointError, match=r"legacy\.pth: refused: the checkpoint holds io\.open"):
        read_torch_file(legacy)


def test_weights_file_with_a_planted_object_is_refused_in_one_line(tmp_path: Path) -> None:
    from nnunet_ssl.weights import WeightsError
    from nnunet_ssl.weights.format import load_weights_file

    marker = tmp_path / "created"
    path = tmp_path / "w.pt"
    torch.save({"network_weights": {}, "metadata": Planted(marker)}, path)
    with pytest.raises(WeightsError, match=r"w\.pt: refused: the weights file holds io\.open") as refused:
        load_weights_file(path)
    assert "\n" not in str(refused.value) and not marker.exists()


def test_numpy_scalars_of_numpy_1_are_read(tmp_path: Path) -> None:
    """numpy 1.x pickled scalars as ``numpy.core.multiarray.scalar``; checkpoints written then still load."""
    buffer = io.BytesIO()
    torch.save({"_best_ema": np.float32(0.25), "losses": [np.float64(0.5)]}, buffer)
    numpy1 = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(numpy1, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            target.writestr(item, data)
    checkpoint = load_nnunet_checkpoint(numpy1)
    assert checkpoint["_best_ema"] == np.float32(0.25) and checkpoint["losses"] == [0.5]


# ---------------------------------------------------------------------- what nnU-Net itself writes


@pytest.fixture()
def nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_nnunet_env(tmp_path, monkeypatch, PLANS, DATASET_JSON)
    monkeypatch.setenv("NNUNET_SSL_FINETUNE", "llrd=0.5")  # a policy in init_args, as a policy run stores it
    return tmp_path


def _trained_one_epoch(device: torch.device):
    """A trainer after one epoch of nnU-Net's own hooks (train and validation step, logger, best checkpoint)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from short_trainers import TEST_TRAINERS

    plans = copy.deepcopy(PLANS)
    plans["continue_training"] = False
    trainer = TEST_TRAINERS[TRAINER](plans, "3d_fullres", 0, dict(DATASET_JSON), device)
    trainer.initialize()
    # nnU-Net's default (the short test recipe turns test-time mirroring off): a tuple of axes
    nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(trainer)
    assert isinstance(trainer.inference_allowed_mirroring_axes, tuple)
    if trainer.grad_scaler is None:  # CPU: a GradScaler as on CUDA, so its state is in the checkpoint too
        trainer.grad_scaler = torch.amp.GradScaler("cpu")
    trainer.logger.local_logger.plot_progress_png = lambda folder: None  # the figure is not what is tested
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(1, 1, 64, 64, 64, generator=generator)
    target = (data > 0.5).float()
    batch = {"data": data, "target": [target[:, :, ::s, ::s, ::s] for s in (1, 2, 4, 8, 16)]}
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([trainer.train_step(batch)])
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        trainer.on_validation_epoch_end([trainer.validation_step(batch)])
    trainer.on_epoch_end()  # nnU-Net's: saves checkpoint_best.pth (first EMA pseudo-Dice is a new best)
    trainer.current_epoch -= 1  # as on_train_end writes checkpoint_final.pth
    trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
    trainer.current_epoch += 1
    return trainer


def test_a_checkpoint_nnunet_writes_loads_safely_with_every_entry(nnunet_env: Path) -> None:
    trainer = _trained_one_epoch(torch.device("cpu"))
    fold = Path(trainer.output_folder)
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        unsafe = torch.load(fold / name, map_location="cpu", weights_only=False)
        safe = load_nnunet_checkpoint(fold / name)
        assert set(safe) == {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                             "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
        assert repr(safe["logging"]) == repr(unsafe["logging"])  # numpy scalars, same types and values
        assert isinstance(safe["logging"]["train_losses"][0], np.floating)
        assert isinstance(safe["_best_ema"], np.floating) and safe["_best_ema"] == unsafe["_best_ema"]
        assert safe["init_args"] == unsafe["init_args"] and safe["init_args"]["device"] == torch.device("cpu")
        assert safe["grad_scaler_state"] == unsafe["grad_scaler_state"] and safe["grad_scaler_state"]
        assert safe["inference_allowed_mirroring_axes"] == unsafe["inference_allowed_mirroring_axes"]
        assert all(torch.equal(safe["network_weights"][k], v) for k, v in unsafe["network_weights"].items())
        assert repr(safe["optimizer_state"]) == repr(unsafe["optimizer_state"])

    # resuming reads the policy through the safe loader, and nnU-Net then loads the same file
    from short_trainers import TEST_TRAINERS

    plans = copy.deepcopy(PLANS)
    plans["continue_training"] = True
    resumed = TEST_TRAINERS[TRAINER](plans, "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    resumed.load_checkpoint(str(fold / "checkpoint_final.pth"))
    assert resumed.current_epoch == 1 and resumed.finetune_policy.llrd == 0.5


def test_resume_refuses_a_planted_checkpoint_before_nnunet_unpickles_it(nnunet_env: Path) -> None:
    from short_trainers import TEST_TRAINERS

    plans = copy.deepcopy(PLANS)
    plans["continue_training"] = True
    trainer = TEST_TRAINERS[TRAINER](plans, "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    marker = nnunet_env / "created"
    path = plant(Path(trainer.output_folder) / "checkpoint_latest.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match="checkpoint_latest.pth: refused"):
        trainer.load_checkpoint(str(path))
    assert not marker.exists()


# ---------------------------------------------------------------------- through the commands


def _results_fold(root: Path, trainer: str = TRAINER) -> Path:
    """``<results>/<Dataset>/<Trainer>__nnUNetPlans__3d_fullres/fold_0`` with plans.json and dataset.json."""
    model = root / "results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(PLANS), encoding="utf-8")
    (model / "dataset.json").write_text(json.dumps(DATASET_JSON), encoding="utf-8")
    return model / "fold_0"


def _one_line_error(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], path: Path) -> str:
    captured = capsys.readouterr()
    text = captured.err + captured.out + caplog.text
    lines = [line for line in text.splitlines() if str(path) in line]
    assert lines, text
    assert "Traceback" not in text and "weights_only" not in text, text
    return lines[0]


def test_cka_refuses_a_planted_finetuned_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    marker = tmp_path / "created_by_cka"
    fold = _results_fold(tmp_path)
    checkpoint = plant(fold / "checkpoint_final.pth", marker)
    from nnunet_ssl.networks import PRESETS, SwinEncoder
    from nnunet_ssl.weights import build_weights_file, save_weights_file

    weights = save_weights_file(build_weights_file(SwinEncoder(PRESETS["tiny"]).state_dict(), "tiny", 1, 2,
                                                   method="smit", source="unit-test"), tmp_path / "smit.pt")
    images = tmp_path / "images"
    images.mkdir()
    code = main(["cka", "--finetuned", str(fold), "--pretrained", str(weights), "--data", str(images),
                 "--out", str(tmp_path / "cka")])
    assert code != 0
    assert not marker.exists()
    line = _one_line_error(caplog, capsys, checkpoint)
    assert "refused" in line and "io.open" in line


def test_report_refuses_a_planted_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``report -d`` reads the training curves of every fold folder: the checkpoint there is refused."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    dataset_dir = tmp_path / "preprocessed" / DATASET
    dataset_dir.mkdir(parents=True)
    (dataset_dir / "dataset.json").write_text(json.dumps(DATASET_JSON), encoding="utf-8")
    marker = tmp_path / "created_by_report"
    checkpoint = plant(_results_fold(tmp_path) / "checkpoint_final.pth", marker)
    code = main(["report", "-d", "991", "--trainers", TRAINER, "-f", "0", "--out", str(tmp_path / "report")])
    assert code != 0
    assert not marker.exists()
    line = _one_line_error(caplog, capsys, checkpoint)
    assert "refused" in line and "io.open" in line


def test_report_test_set_refuses_the_checkpoint_before_nnunet_predicts_with_it(tmp_path: Path) -> None:
    """With a test set, nnU-Net's predictor would unpickle ``checkpoint_best.pth`` unsafely: it is checked first."""
    from nnunet_ssl.analysis.results import ResultsLayout, dataset_info
    from nnunet_ssl.analysis.testset import TestRunSettings, TestSet, collect_test_run

    fold = _results_fold(tmp_path)
    torch.save({"logging": {"train_losses": [np.float32(0.5)]}}, fold / "checkpoint_final.pth")
    marker = tmp_path / "created_by_predict"
    best = plant(fold / "checkpoint_best.pth", marker)
    test_set = TestSet({"t1": [tmp_path / "t1_0000.nii.gz"]}, {"t1": tmp_path / "t1.nii.gz"})
    settings = TestRunSettings(test_set, tmp_path / "predictions", checkpoint="best", device="cpu")
    layout = ResultsLayout(tmp_path / "results", DATASET)
    with pytest.raises(UnsafeCheckpointError, match=f"{best}: refused"):
        collect_test_run(layout, dataset_info(DATASET_JSON), TRAINER, 0, settings)
    assert not marker.exists() and not (tmp_path / "predictions").exists()


def test_safe_but_malformed_checkpoints_are_named_not_tracebacks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nnunet_ssl.analysis.cka.gather import load_finetuned_fold
    from nnunet_ssl.analysis.curves import load_curves
    from nnunet_ssl.weights import WeightsError

    fold = _results_fold(tmp_path)
    path = fold / "checkpoint_final.pth"
    for payload in ({"trainer_name": ["x"]}, {"trainer_name": TRAINER}, {"trainer_name": TRAINER, "network_weights": {},
                                                                         "init_args": []}):
        torch.save(payload, path)
        with pytest.raises(WeightsError, match=f"{path}: "):
            load_finetuned_fold(fold)
    torch.save({"logging": [1, 2]}, path)
    assert load_curves(fold, TRAINER, 0) is None and "'logging' is not nnU-Net's per-epoch log" in caplog.text
    torch.save({"logging": {"train_losses": 3}}, path)
    assert load_curves(fold, TRAINER, 0) is None
