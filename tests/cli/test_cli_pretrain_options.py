"""``nnunet-ssl pretrain``'s recipe options reach the run configuration, and their help says what they do."""
from __future__ import annotations

from pathlib import Path

import pytest

from nnunet_ssl.cli import build_parser, main, run_config_from_args
from nnunet_ssl.pretraining.config import RunConfig


def _config(tmp_path: Path, *flags: str) -> RunConfig:
    args = build_parser().parse_args(["pretrain", "--method", "simmim", "--data", "x", "--out", str(tmp_path), *flags])
    return run_config_from_args(args)


def test_recipe_flags_reach_the_engine_and_data_settings(tmp_path: Path) -> None:
    config = _config(tmp_path, "--optimizer", "sgd", "--momentum", "0.95", "--nesterov", "--schedule", "poly",
                     "--weight-decay", "0.01", "--grad-clip", "5", "--lr-reference-batch", "4",
                     "--intensity", "zscore", "--augmentation", "scale_rotate_mirror")
    engine = config.engine
    assert (engine.optimizer, engine.momentum, engine.nesterov, engine.schedule) == ("sgd", 0.95, True, "poly")
    assert (engine.weight_decay, engine.grad_clip, engine.lr_reference_batch) == (0.01, 5.0, 4)
    assert (config.data.intensity, config.data.augmentation) == ("zscore", "scale_rotate_mirror")
    assert config.preset == "smit"  # the Swin methods' default preset
    assert _config(tmp_path, "--optimizer", "sgd", "--no-nesterov").engine.nesterov is False
    defaults = _config(tmp_path)
    assert (defaults.engine.optimizer, defaults.engine.schedule, defaults.data.intensity) == ("adamw", "cosine", "window")
    assert defaults.data.augmentation == "none" and defaults.data.region_size == 128


def test_invalid_recipe_values_fail_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["pretrain", "--optimizer", "adam"])
    assert exited.value.code == 2 and "invalid choice: 'adam'" in capsys.readouterr().err
    out = tmp_path / "run"
    with caplog.at_level("ERROR"):
        assert main(["pretrain", "--method", "simmim", "--data", "x", "--out", str(out), "--optimizer", "sgd",
                     "--momentum", "0", "--nesterov"]) == 1
        assert main(["pretrain", "--method", "simmim", "--data", "x", "--out", str(out), "--preset", "resenc_l"]) == 1
    assert "nesterov SGD needs a momentum > 0" in caplog.text
    assert "simmim pretrains swin networks; choose --preset" in caplog.text
    assert not out.exists()


def test_pretrain_help_names_the_recipe_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--optimizer {adamw,sgd}", "--schedule {cosine,poly}", "--momentum", "--nesterov, --no-nesterov",
                   "--intensity {window,zscore,zscore_nonzero,minmax}", "--augmentation {none,scale_rotate_mirror}", "--weight-decay",
                   "--grad-clip", "--lr-reference-batch"):
        assert option in text
    assert "resenc_l for the ResEnc ones" in text and "the method's recipe" in text
