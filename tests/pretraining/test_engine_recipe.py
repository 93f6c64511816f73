"""A method's own recipe in the engine: network family and preset, recipe defaults under the config file and
flags, SGD + poly, decoders in checkpoints, and resume refusals; with a small fake ResEnc-family method
registered for the test (it does not depend on any real method of that family)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from nnunet_ssl.checkpoints import FINAL, load_checkpoint
from nnunet_ssl.cli import build_parser, main, run_config_from_args
from nnunet_ssl.networks.presets import PRESETS
from nnunet_ssl.networks.resenc import RESENC_PRESETS
from nnunet_ssl.optim import warmup_poly
from nnunet_ssl.pretraining.config import EngineConfig, RunConfig
from nnunet_ssl.pretraining.data import DataConfig
from nnunet_ssl.pretraining.engine import validate_run_config
from nnunet_ssl.pretraining.methods import METHODS, build_method, default_preset, method_defaults
from nnunet_ssl.pretraining.methods.base import MethodInfo, StepContext, decoder_states, encoder_states
from nnunet_ssl.pretraining.metrics_log import read_metrics
from nnunet_ssl.pretraining.resume import ResumePoint, check_resume_config

#: What the fake method declares: card 10's recipe, as Spark3D declares it.
ENGINE_DEFAULTS = {"optimizer": "sgd", "momentum": 0.99, "nesterov": True, "base_lr": 1e-2, "lr_reference_batch": 6,
                   "weight_decay": 3e-5, "schedule": "poly", "warmup_epochs": 0.0, "batch_size": 6, "grad_clip": 12.0}
DATA_DEFAULTS = {"spacing": (1.0, 1.0, 1.0), "intensity": "zscore", "crop_size": 160, "augmentation": "scale_rotate_mirror"}


@dataclass(frozen=True)
class FakeConfig:
    """The fake method's settings (a crop size, taken from the data settings like the real methods')."""

    crop_size: int = 32


class FakeResEncMethod(nn.Module):
    """A two-conv "U-Net" of the resenc family: an encoder and a decoder that reconstruct the crop."""

    name: ClassVar[str] = "fake_resenc"
    num_views: ClassVar[int] = 1
    family: ClassVar[str] = "resenc"
    info: ClassVar[MethodInfo] = MethodInfo("test", "1 crop", "conv -> conv", "1.0 loss_l2")
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]] = (("student", "net.encoder"),)
    decoder_modules: ClassVar[tuple[tuple[str, str], ...]] = (("student", "net.decoder"),)
    engine_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType(ENGINE_DEFAULTS)
    data_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType(DATA_DEFAULTS)

    def __init__(self, preset: Any, config: FakeConfig | None = None, in_channels: int = 1) -> None:
        super().__init__()
        self.preset, self.config = preset, config or FakeConfig()
        self.net = nn.ModuleDict({"encoder": nn.Conv3d(in_channels, 2, 3, padding=1), "decoder": nn.Conv3d(2, in_channels, 1)})

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        x = batch["views"][:, 0]
        loss = ((self.net["decoder"](self.net["encoder"](x)) - x) ** 2).mean()
        return {"loss": loss, "loss_l2": loss.detach()}

    def student_modules(self) -> nn.Module:
        return self.net

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        return dict(self.net["encoder"].state_dict())


@pytest.fixture()
def fake_method(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(METHODS, FakeResEncMethod.name, (FakeResEncMethod, FakeConfig))
    return FakeResEncMethod.name


def _data(tmp_path: Path, **changes: Any) -> DataConfig:
    return DataConfig(inputs=("x",), cache_dir=str(tmp_path / "cache"), **changes)


def test_engine_config_recipe_defaults_and_errors() -> None:
    engine = EngineConfig()
    assert (engine.optimizer, engine.momentum, engine.nesterov, engine.schedule) == ("adamw", 0.9, False, "cosine")
    for changes, message in (
        ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd, got 'adam'"),
        ({"schedule": "step"}, "schedule must be one of cosine, poly, got 'step'"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"nesterov": "yes"}, "nesterov must be true or false"),
        ({"optimizer": "sgd", "momentum": 0.0, "nesterov": True}, "nesterov SGD needs a momentum > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            EngineConfig(**changes)
    # AdamW ignores the SGD settings: a method's SGD recipe switched to adamw stays valid
    assert EngineConfig(optimizer="adamw", momentum=0.0, nesterov=True).nesterov is True


# ---------------------------------------------------------------------------------- families and presets
def test_the_preset_follows_the_methods_family(fake_method: str, tmp_path: Path) -> None:
    assert default_preset("smit") == "smit" and default_preset(fake_method) == "resenc_l"
    assert RunConfig(method="smit", data=_data(tmp_path)).preset == "smit"
    assert RunConfig(method=fake_method, data=_data(tmp_path)).preset == "resenc_l"
    assert RunConfig(method=fake_method, data=_data(tmp_path)).to_dict()["preset"] == "resenc_l"  # recorded resolved
    assert build_method(fake_method, "resenc_tiny").preset is RESENC_PRESETS["resenc_tiny"]
    assert build_method(fake_method, RESENC_PRESETS["resenc_l"]).preset is RESENC_PRESETS["resenc_l"]


def test_a_preset_of_another_family_is_refused_in_one_line(fake_method: str, tmp_path: Path) -> None:
    message = "fake_resenc pretrains resenc networks; choose --preset resenc_l or resenc_tiny"
    for preset in ("smit", PRESETS["tiny"]):
        with pytest.raises(ValueError, match=f"^{message}$"):
            build_method(fake_method, preset)
    with pytest.raises(ValueError, match=r"^smit pretrains swin networks; choose --preset .*smit, .* or tiny$"):
        build_method("smit", "resenc_l")
    with pytest.raises(ValueError, match=f"^{message}$"):
        validate_run_config(RunConfig(method=fake_method, data=_data(tmp_path), preset="tiny"))
    with pytest.raises(ValueError, match="unknown preset 'huge'; fake_resenc pretrains resenc networks: choose resenc_l or"):
        validate_run_config(RunConfig(method=fake_method, data=_data(tmp_path), preset="huge"))


def test_old_run_configs_read_back_unchanged(tmp_path: Path) -> None:
    """A config.json written before these settings existed: the defaults are what it trained with."""
    current = RunConfig(method="simmim", data=_data(tmp_path), preset="tiny").to_dict()
    old = json.loads(json.dumps(current))
    for key in ("optimizer", "momentum", "nesterov", "schedule"):
        del old["engine"][key]
    for key in ("intensity", "augmentation"):
        del old["data"][key]
    assert RunConfig.from_dict(old).to_dict() == current


# ---------------------------------------------------------------------------------- recipe defaults
def _args(tmp_path: Path, *extra: str) -> Any:
    return build_parser().parse_args(["pretrain", "--data", "x", "--out", str(tmp_path / "run"), *extra])


def test_method_defaults_sit_under_the_config_file_and_the_flags(
    fake_method: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert method_defaults(fake_method) == (ENGINE_DEFAULTS, DATA_DEFAULTS)
    assert method_defaults("smit") == ({}, {})
    with caplog.at_level("INFO", logger="nnunet_ssl.pretraining.config"):
        config = run_config_from_args(_args(tmp_path, "--method", fake_method))
    assert {k: getattr(config.engine, k) for k in ENGINE_DEFAULTS} == ENGINE_DEFAULTS
    assert {k: getattr(config.data, k) for k in DATA_DEFAULTS} == DATA_DEFAULTS
    assert config.preset == "resenc_l" and config.engine.epochs == EngineConfig().epochs  # not declared: the default
    assert "fake_resenc recipe: engine.optimizer='sgd', engine.momentum=0.99" in caplog.text
    assert "data.intensity='zscore'" in caplog.text and "overridden" not in caplog.text
    caplog.clear()
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"engine": {"batch_size": 2, "schedule": "cosine"}, "data": {"crop_size": 64}}),
                           encoding="utf-8")
    with caplog.at_level("INFO", logger="nnunet_ssl.pretraining.config"):
        config = run_config_from_args(_args(tmp_path, "--method", fake_method, "--config", str(config_file),
                                            "--batch-size", "3", "--optimizer", "adamw", "--no-nesterov",
                                            "--intensity", "window", "--preset", "resenc_tiny"))
    assert (config.engine.batch_size, config.engine.schedule, config.data.crop_size) == (3, "cosine", 64)
    assert (config.engine.optimizer, config.engine.nesterov, config.data.intensity) == ("adamw", False, "window")
    assert config.engine.momentum == 0.99 and config.data.augmentation == "scale_rotate_mirror"  # still the method's
    assert config.preset == "resenc_tiny"
    assert "engine.batch_size=3 (method default 6)" in caplog.text and "data.crop_size=64 (method default 160)" in caplog.text
    # a method without a recipe keeps the engine's and data defaults
    plain = run_config_from_args(_args(tmp_path, "--method", "smit"))
    assert plain.engine == EngineConfig() and plain.data.intensity == "window" and plain.preset == "smit"


def test_a_method_declaring_an_unknown_setting_is_a_clear_error(
    fake_method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeResEncMethod, "engine_defaults", {"learning_rate": 1.0})
    with pytest.raises(ValueError, match=r"method 'fake_resenc' declares engine_defaults for \['learning_rate'\], "
                                         "which EngineConfig does not have"):
        run_config_from_args(_args(tmp_path, "--method", fake_method))


# ---------------------------------------------------------------------------------- resume
def test_resume_refuses_another_optimizer_schedule_or_data_mapping(fake_method: str, tmp_path: Path) -> None:
    saved = RunConfig(method=fake_method, data=_data(tmp_path), engine=EngineConfig(optimizer="sgd", schedule="poly"))
    point = ResumePoint(tmp_path / "checkpoint_latest.pt", {"step": 2}, saved)
    assert check_resume_config(point, saved.with_engine(max_steps=9)) == {"engine.max_steps": (None, 9)}
    changed = RunConfig(method=fake_method, data=_data(tmp_path, intensity="zscore", augmentation="scale_rotate_mirror"),
                        engine=EngineConfig(optimizer="adamw", schedule="cosine", momentum=0.99, nesterov=True))
    with pytest.raises(ValueError) as refused:
        check_resume_config(point, changed)
    for line in ("engine.optimizer: 'sgd' in the run, 'adamw' now", "engine.schedule: 'poly' in the run, 'cosine' now",
                 "engine.momentum: 0.9 in the run, 0.99 now", "engine.nesterov: False in the run, True now",
                 "data.intensity: 'window' in the run, 'zscore' now",
                 "data.augmentation: 'none' in the run, 'scale_rotate_mirror' now"):
        assert line in str(refused.value)


# ---------------------------------------------------------------------------------- decoders in checkpoints
def test_decoder_states_by_role_sharing_the_methods_tensors() -> None:
    method = FakeResEncMethod(None)
    decoders = decoder_states(method)
    assert list(decoders) == ["student"] and set(decoders["student"]) == {"weight", "bias"}
    assert decoders["student"]["weight"].data_ptr() == method.net["decoder"].weight.data_ptr()
    assert decoder_states(build_method("simmim", "tiny", overrides={"crop_size": 64})) == {}  # declares none


def test_a_run_of_the_recipe_writes_decoders_and_follows_sgd_poly(
    fake_method: str, volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three steps with the method's recipe (SGD + Nesterov, poly, z-score, augmentation) and a smaller batch
    and crop (and coarser voxels) from the flags; then a resume that changes the schedule is refused."""
    out = tmp_path / "run"
    argv = ["pretrain", "--method", fake_method, "--data", str(volumes), "--out", str(out), "--crop-size", "32", "--spacing", "2", "2", "2",
            "--batch-size", "2", "--workers", "0", "--max-steps", "3", "--amp", "off", "--no-progress"]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert "optimiser sgd (momentum 0.99, nesterov), poly schedule after 0 warm-up step(s)" in caplog.text
    peak = 1e-2 * 2 / 6  # base_lr at the reference batch of 6, scaled to the global batch of 2
    lrs = [record["lr"] for record in read_metrics(out / "metrics.jsonl")]
    assert lrs == pytest.approx([warmup_poly(step, peak, 0, 3) for step in range(3)])
    assert lrs == pytest.approx([peak, peak * (2 / 3) ** 0.9, peak * (1 / 3) ** 0.9])
    checkpoint = load_checkpoint(out / FINAL)
    assert checkpoint["intensity"]["normalization"] == "zscore" and checkpoint["version"] == 2
    assert checkpoint["config"]["preset"] == "resenc_l" and checkpoint["config"]["engine"]["optimizer"] == "sgd"
    assert checkpoint["config"]["data"]["augmentation"] == "scale_rotate_mirror"
    assert set(checkpoint["optimizer"]["state"][0]) == {"momentum_buffer"}  # SGD's state
    weight = checkpoint["decoders"]["student"]["weight"]
    assert torch.equal(weight, checkpoint["method"]["net.decoder.weight"])
    assert weight.untyped_storage().data_ptr() == checkpoint["method"]["net.decoder.weight"].untyped_storage().data_ptr()
    assert set(checkpoint["encoders"]["student"]) == {"weight", "bias"} == set(encoder_states(FakeResEncMethod(None))["student"])
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert main([*argv[:-5], "--max-steps", "4", "--schedule", "cosine", "--no-progress", "--resume"]) == 1  # no --amp
    assert "engine.schedule: 'poly' in the run, 'cosine' now" in caplog.text
