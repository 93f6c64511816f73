"""The pretraining engine in process: settings, resume, checkpoints, export of each method's encoders (the
real ``nnunet-ssl pretrain`` runs, kill -9 and DDP are end to end: tests/e2e/test_e2e_pretraining.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_ssl.cli import build_parser, run_config_from_args
from nnunet_ssl.pretraining.engine import CHECKPOINT_FORMAT, load_checkpoint
from nnunet_ssl.pretraining.methods import METHODS, method_family
from nnunet_ssl.pretraining.metrics_log import read_metrics

SMALL = ["--preset", "tiny", "--crop-size", "64", "--batch-size", "1", "--workers", "0", "--no-progress", "--amp", "off"]


def test_config_precedence_defaults_file_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"engine": {"epochs": 7, "weight_decay": 0.1}, "method_overrides": {"mask_ratio": 0.6}}), encoding="utf-8")
    args = build_parser().parse_args(
        ["pretrain", "--method", "smit", "--data", "x", "--out", str(tmp_path / "r"), "--config", str(config_file),
         "--epochs", "3", "--set", "lambda_mpd=0.2"]
    )
    config = run_config_from_args(args)
    assert config.engine.epochs == 3  # flag beats file
    assert config.engine.weight_decay == 0.1  # file beats default
    assert config.engine.base_lr == 2e-4 and config.engine.warmup_epochs == 30  # paper defaults
    assert config.method_overrides == {"mask_ratio": 0.6, "lambda_mpd": 0.2}
    assert config.data.cache_dir == str(tmp_path / "r" / "cache")


#: The entries of a version-1 checkpoint (before it carried what export reads).
V1_ENTRIES = {"format", "version", "method", "optimizer", "scaler", "step", "epoch", "rng", "config"}
#: What version 2 adds for export: encoders by role, the default role, the intensity mapping.
EXPORT_ENTRIES = {"encoders", "default_encoder", "intensity"}
#: What version 2 adds for a method that declares decoders (only then).
DECODER_ENTRIES = {"decoders"}
#: The small preset of each network family, for the tests that build every method.
TINY_PRESETS = {"swin": "tiny", "resenc": "resenc_tiny"}


def as_version_1(run_dir: Path, folder: Path) -> Path:
    """A copy of ``run_dir``'s final checkpoint as the engine of version 1 wrote it (the same entries, less three)."""
    checkpoint = load_checkpoint(run_dir / "checkpoint_final.pt")
    assert set(checkpoint) - DECODER_ENTRIES == V1_ENTRIES | EXPORT_ENTRIES and checkpoint["version"] == 2
    old = {k: v for k, v in checkpoint.items() if k not in EXPORT_ENTRIES | DECODER_ENTRIES} | {"version": 1}
    folder.mkdir()
    torch.save(old, folder / "checkpoint_final.pt")
    return folder


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_reads_each_methods_encoders_from_a_checkpoint_of_either_version(name: str, tmp_path: Path) -> None:
    """For every method, the encoders export reads from the engine's checkpoint (version 2) and from the
    method state of a version-1 checkpoint are exactly ``method.encoder_state(source)``."""
    import dataclasses

    from nnunet_ssl.checkpoints import FINAL
    from nnunet_ssl.pretraining.config import RunConfig
    from nnunet_ssl.pretraining.data import DataConfig
    from nnunet_ssl.pretraining.engine import Engine
    from nnunet_ssl.pretraining.methods import build_method
    from nnunet_ssl.weights.export import read_run

    fields = {f.name for f in dataclasses.fields(METHODS[name][1])}
    overrides = {k: v for k, v in {"crop_size": 64, "out_dim": 64}.items() if k in fields}
    preset = TINY_PRESETS[method_family(name).name]
    torch.manual_seed(0)
    method = build_method(name, preset, overrides=overrides)
    with torch.no_grad():  # a teacher that differs from its student, so the roles cannot be confused
        for parameter in getattr(method, "teacher", torch.nn.Module()).parameters():
            parameter.add_(1.0)
    config = RunConfig(method=name, data=DataConfig(inputs=("x",), cache_dir=str(tmp_path / "cache"), modality="mr"),
                       preset=preset, method_overrides=overrides)
    new_run = tmp_path / "v2"
    new_run.mkdir()
    engine = Engine(config, new_run)
    intensity = {"modality": "MR", "percentiles": [5.0, 95.0], "per_image": True, "range": [0.0, 1.0]}
    optimizer = torch.optim.AdamW(method.student_modules().parameters())
    engine._save(FINAL, method, optimizer, torch.amp.GradScaler("cuda", enabled=False), 3, 2, intensity)
    # version 1 predates network families and decoders: only the Swin methods of that time wrote it
    runs = (new_run, as_version_1(new_run, tmp_path / "v1")) if method_family(name).name == "swin" else (new_run,)
    for run_dir in runs:
        exported = read_run(run_dir)
        assert (exported.method, exported.preset, exported.in_channels, exported.step) == (name, preset, 1, 3)
        assert exported.intensity == intensity  # version 1: from the run's settings (modality mr)
        for source in ("default", "teacher", "student"):
            try:
                expected = method.encoder_state(source)
            except ValueError:
                with pytest.raises(ValueError, match=f"{name} has no 'teacher' encoder"):
                    exported.encoder(source)
                continue
            got = exported.encoder(source)
            assert got.keys() == expected.keys() and "mask_token" not in got
            assert all(torch.equal(got[k], expected[k]) for k in expected), (run_dir.name, source)


def test_export_of_a_version_1_checkpoint_reads_the_modalities_of_its_cache(tmp_path: Path) -> None:
    """Without a modality setting, a version-1 run's intensity record comes from its cache manifest, as then."""
    from nnunet_ssl.pretraining.config import RunConfig
    from nnunet_ssl.pretraining.data import DataConfig, Manifest, ManifestEntry
    from nnunet_ssl.pretraining.methods import build_method
    from nnunet_ssl.weights.export import read_run
    from nnunet_ssl.weights.intensity import pretraining_intensity

    cache = tmp_path / "cache"
    entries = [ManifestEntry(key=f"v{i}", source=f"v{i}.nii.gz", kind="file", modality=m, status=status)
               for i, (m, status) in enumerate([("mr", "ok"), ("mr", "ok"), ("ct", "unreadable")])]
    manifest = Manifest(str(cache / "manifest.json"), entries)
    manifest.save()
    data = DataConfig(inputs=("x",), cache_dir=str(cache))
    config = RunConfig(method="simmim", data=data, preset="tiny")
    method = build_method("simmim", "tiny", overrides={"crop_size": 64})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "method": method.state_dict(), "step": 1,
                "config": config.to_dict()}, run_dir / "checkpoint_final.pt")
    expected = pretraining_intensity(None, [e.modality for e in Manifest.load(str(cache)).usable()],
                                     data.ct_window, data.mr_percentiles)  # what the engine records now
    assert read_run(run_dir).intensity == expected and expected["modality"] == "MR"


def test_argument_errors_and_resume_without_checkpoint_leave_nothing_behind(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nnunet_ssl.cli import main

    out = tmp_path / "run"
    with caplog.at_level("ERROR"):
        assert main(["pretrain", "--method", "nosuch", "--data", str(volumes), "--out", str(out), *SMALL]) == 1
        assert main(["pretrain", "--method", "smit", "--data", str(volumes), "--out", str(out), *SMALL,
                     "--set", "no_such_setting=1"]) == 1
    assert "nosuch" in caplog.text and "no_such_setting" in caplog.text
    assert not out.exists()  # neither the run folder nor its cache was created
    caplog.clear()
    out.mkdir()
    with caplog.at_level("ERROR"):
        assert main(["pretrain", "--method", "smit", "--data", str(volumes), "--out", str(out), *SMALL, "--resume"]) == 1
    assert "no checkpoint_latest.pt or checkpoint_final.pt" in caplog.text and "leave out --resume" in caplog.text
    assert list(out.iterdir()) == []


def _run_in_process(volumes: Path, out: Path, *extra: str) -> int:
    from nnunet_ssl.cli import main

    return main(["pretrain", "--method", "simmim", "--data", str(volumes), "--out", str(out), *SMALL, *extra])


def test_resume_refuses_other_settings_and_keeps_the_run_as_it_was(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    assert _run_in_process(volumes, out, "--max-steps", "2") == 0
    recorded = {name: (out / name).read_bytes() for name in ("config.json", "checkpoint_final.pt", "metrics.jsonl")}
    with caplog.at_level("ERROR"):
        code = _run_in_process(volumes, out, "--max-steps", "3", "--resume", "--set", "mask_ratio=0.3", "--lr", "1e-3")
    assert code == 1
    assert "method_overrides.mask_ratio: None in the run, 0.3 now" in caplog.text
    assert "engine.base_lr: 0.0002 in the run, 0.001 now" in caplog.text
    assert "engine.max_steps" not in caplog.text  # extending the run is allowed
    assert {name: (out / name).read_bytes() for name in recorded} == recorded  # the record is untouched
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert _run_in_process(volumes, out, "--max-steps", "1", "--resume") == 1
    assert "below the step 2" in caplog.text
    # a longer run continues it, from the recorded settings alone, and the record says so
    from nnunet_ssl.cli import main

    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert load_checkpoint(out / "checkpoint_final.pt")["step"] == 3
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["engine"]["max_steps"] == 3 and config["method_overrides"] == {}
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    volumes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nnunet_ssl.checkpoints import FINAL, LATEST, PREVIOUS

    out = tmp_path / "run"
    assert _run_in_process(volumes, out, "--max-steps", "2") == 0
    (out / FINAL).rename(out / PREVIOUS)  # as a kill leaves it: the previous checkpoint, a damaged latest
    (out / LATEST).write_bytes(b"cut short")
    with caplog.at_level("INFO"):
        assert _run_in_process(volumes, out, "--max-steps", "3", "--resume") == 0
    assert f"cannot resume from {out / LATEST}" in caplog.text
    assert "resumed from checkpoint_previous.pt at step 2 of 3" in caplog.text
    assert load_checkpoint(out / FINAL)["step"] == 3
    assert not (out / LATEST).exists() and not (out / PREVIOUS).exists()  # a finished run keeps only its final
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]


def test_saving_a_latest_checkpoint_keeps_the_one_before(tmp_path: Path) -> None:
    from nnunet_ssl.checkpoints import LATEST, PREVIOUS
    from nnunet_ssl.pretraining.config import RunConfig
    from nnunet_ssl.pretraining.data import DataConfig
    from nnunet_ssl.pretraining.engine import Engine

    engine = Engine(RunConfig(method="simmim", data=DataConfig(inputs=("x",), cache_dir=str(tmp_path / "c"))), tmp_path)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 2)})
    model.encoder_modules = (("student", "encoder"),)  # what a method declares (see methods.base)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    engine._save(LATEST, model, optimizer, scaler, 4, 2, {})
    assert not (tmp_path / PREVIOUS).exists()
    engine._save(LATEST, model, optimizer, scaler, 6, 2, {})
    assert load_checkpoint(tmp_path / PREVIOUS)["step"] == 4 and load_checkpoint(tmp_path / LATEST)["step"] == 6
