"""The pretraining engine: a short real run, kill -9 and resume, DDP with two CPU processes, export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ssl.cli import build_parser, run_config_from_args
from nnunet_ssl.optim import warmup_cosine
from nnunet_ssl.pretraining.engine import CHECKPOINT_FORMAT, load_checkpoint
from nnunet_ssl.pretraining.methods import METHODS
from nnunet_ssl.pretraining.metrics_log import read_metrics

BIN = Path(sys.executable).parent
SMALL = ["--preset", "tiny", "--crop-size", "64", "--batch-size", "1", "--workers", "0", "--no-progress", "--amp", "off"]
#: Small DINO heads keep SMIT fast in tests.
SMALL_HEADS = ["--set", "out_dim=64", "head_hidden_dim=64", "head_bottleneck_dim=32"]
METHOD_SETTINGS = {"smit": SMALL_HEADS, "simmim": [], "dino": SMALL_HEADS, "ibot": SMALL_HEADS}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small CT-like volumes (a bright ellipsoid body in air)."""
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:40, :72, :72]
    for i in range(4):
        body = ((y - 36) / 30.0) ** 2 + ((x - 36) / (26.0 + i)) ** 2 < 1
        image = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, body.shape)
        image[(z > 10) & (z < 30) & (((y - 40) / 8.0) ** 2 + ((x - 30) / 8.0) ** 2 < 1)] = 300.0
        itk = sitk.GetImageFromArray(image.astype(np.float32))
        itk.SetSpacing((1.5, 1.5, 2.0))
        sitk.WriteImage(itk, str(folder / f"vol_{i}.nii.gz"))
    return folder


def pretrain_command(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "nnunet-ssl"), "pretrain", "--method", method, "--data", str(data), "--out", str(out), *SMALL,
            *METHOD_SETTINGS[method], *extra]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


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


def test_short_run_writes_checkpoint_metrics_and_curves(volumes: Path, tmp_path: Path) -> None:
    out = tmp_path / "simmim"
    run(pretrain_command("simmim", volumes, out, "--max-steps", "3"))
    checkpoint = load_checkpoint(out / "checkpoint_final.pt")
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["step"] == 3
    assert {"method", "optimizer", "scaler", "rng", "config"} <= set(checkpoint)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["method"] == "simmim"
    # a second run into the same folder without --resume is refused, nothing is lost
    again = subprocess.run(pretrain_command("simmim", volumes, out, "--max-steps", "3"), capture_output=True, encoding="utf-8", errors="replace")
    assert again.returncode == 1 and "--resume" in again.stderr
    assert load_checkpoint(out / "checkpoint_final.pt")["step"] == 3


@pytest.mark.parametrize("method", ["smit", "ibot"])
def test_kill_9_then_resume_continues_at_the_right_step(volumes: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "killed"
    total = 8
    args = ("--max-steps", str(total), "--checkpoint-every", "2", "--epochs", "100", "--warmup-epochs", "1")
    process = subprocess.Popen(pretrain_command(method, volumes, out, *args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = out / "checkpoint_latest.pt"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if latest.is_file() and load_checkpoint(latest)["step"] >= 4:
            break
        if process.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("no checkpoint at step >= 4 in time")
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(latest)["step"]
    assert not (out / "checkpoint_final.pt").exists()

    run(pretrain_command(method, volumes, out, *args, "--resume"))
    final = load_checkpoint(out / "checkpoint_final.pt")
    assert final["step"] == total
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(total))  # every step once, none repeated or lost
    # the schedule continues where it was: lr per step equals the uninterrupted schedule
    steps_per_epoch = 4  # 4 volumes, batch 1
    peak = 2e-4 * 1 / 2
    for record in records:
        # --max-steps shortens the whole schedule (cosine to the end of the shortened run)
        expected = warmup_cosine(record["step"], peak, steps_per_epoch, total, 1e-6)
        assert record["lr"] == pytest.approx(expected, rel=1e-6)
    assert killed_at < total
    # the resumed run drew the crops, masks and drop-paths the uninterrupted run draws: same losses
    reference = tmp_path / "uninterrupted"
    run(pretrain_command(method, volumes, reference, *args))
    expected_losses = [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    assert [r["loss"] for r in records] == expected_losses


@pytest.mark.parametrize("method", ["simmim", "ibot"])  # ibot: centres averaged over ranks, stage 4 frozen
def test_ddp_two_cpu_processes(volumes: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "nnunet_ssl.pretraining", "--method", method, "--data", str(volumes), "--out", str(out), *SMALL,
               *METHOD_SETTINGS[method], "--max-steps", "3"]
    result = run(command)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # only rank 0 writes: no duplicate lines
    for record in records:
        rank0, rank1 = record["volumes"]
        assert set(rank0).isdisjoint(rank1), record["volumes"]  # ranks see different volumes
    assert "ranks in sync" in result.stderr
    checkpoint = load_checkpoint(out / "checkpoint_final.pt")
    assert len(checkpoint["rng"]) == 2  # both ranks' RNG states, for an exact resume
    assert checkpoint["config"]["engine"]["batch_size"] == 1


@pytest.fixture(scope="module")
def smit_run(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of SMIT on the tiny preset, written by the current engine."""
    out = tmp_path_factory.mktemp("runs") / "smit"
    run(pretrain_command("smit", volumes, out, "--max-steps", "2"))
    return out


def test_export_builds_nnunet_weights(smit_run: Path, tmp_path: Path) -> None:
    from nnunet_ssl.networks import PRESETS, SwinUNETRSeg
    from nnunet_ssl.weights import encoder_digest
    from nnunet_ssl.weights.export import export_run, load_run_encoder
    from nnunet_ssl.weights.targets import DatasetTarget

    out = smit_run
    teacher, _, _ = load_run_encoder(out, "default")
    student, _, _ = load_run_encoder(out, "student")
    assert "mask_token" not in teacher and "mask_token" not in student
    assert encoder_digest(teacher) != encoder_digest(student)  # EMA teacher lags the student
    target = DatasetTarget("Dataset501_Phantom", tmp_path / "plans.json", "3d_fullres", in_channels=2, num_classes=4)
    payload = export_run(out, target)
    meta = payload["metadata"]
    assert meta["method"] == "smit" and meta["preset"] == "tiny" and meta["in_channels"] == 2
    assert meta["intensity"]["window"] == [-500.0, 500.0]
    assert meta["channel_adaptation"] == "replicate 1->2: stem copied x2 and scaled by 1/2"
    net = SwinUNETRSeg(PRESETS["tiny"], 2, 4)
    net.load_state_dict(payload["network_weights"])
    torch.testing.assert_close(net.encoder.stages[2].blocks[0].attn.qkv.weight, teacher["stages.2.blocks.0.attn.qkv.weight"])
    # `nnunet-ssl convert` of the run (folder or checkpoint file) writes exactly the export
    from nnunet_ssl.weights.convert_file import convert_file

    for source in (out, out / "checkpoint_final.pt"):
        converted, report = convert_file(source, target)
        assert report.layout == "nnunet_ssl_run" and converted["metadata"]["conversion"]["preset"] == "tiny"
        assert all(torch.equal(v, payload["network_weights"][k]) for k, v in converted["network_weights"].items())
    with pytest.raises(ValueError, match="pretrained with preset 'tiny', not 'smit'"):
        convert_file(out, target, preset_name="smit")


#: The entries of a version-1 checkpoint (before it carried what export reads).
V1_ENTRIES = {"format", "version", "method", "optimizer", "scaler", "step", "epoch", "rng", "config"}
#: What version 2 adds for export: encoders by role, the default role, the intensity mapping.
EXPORT_ENTRIES = {"encoders", "default_encoder", "intensity"}


def as_version_1(run_dir: Path, folder: Path) -> Path:
    """A copy of ``run_dir``'s final checkpoint as the engine of version 1 wrote it (the same entries, less three)."""
    checkpoint = load_checkpoint(run_dir / "checkpoint_final.pt")
    assert set(checkpoint) == V1_ENTRIES | EXPORT_ENTRIES and checkpoint["version"] == 2
    old = {k: v for k, v in checkpoint.items() if k not in EXPORT_ENTRIES} | {"version": 1}
    folder.mkdir()
    torch.save(old, folder / "checkpoint_final.pt")
    return folder


def test_export_of_a_version_1_checkpoint_is_the_same_file_and_needs_no_training_code(smit_run: Path, tmp_path: Path) -> None:
    """A checkpoint of a run from before checkpoints carried the encoders exports exactly as before, and
    export (of either version) imports no module of nnunet_ssl.pretraining."""
    old_run = as_version_1(smit_run, tmp_path / "v1")
    script = f"""
import sys, torch
from pathlib import Path
from nnunet_ssl.weights.export import export_run
from nnunet_ssl.weights.targets import DatasetTarget
target = DatasetTarget("Dataset501_Phantom", Path("plans.json"), "3d_fullres", in_channels=2, num_classes=4)
new, old = (export_run(Path(p), target, source=s) for p in ({str(smit_run)!r}, {str(old_run)!r}) for s in ("default",))
assert new["metadata"].pop("source") != old["metadata"].pop("source")
assert new["metadata"] == old["metadata"], (new["metadata"], old["metadata"])
assert new["network_weights"].keys() == old["network_weights"].keys()
assert all(torch.equal(v, old["network_weights"][k]) for k, v in new["network_weights"].items())
for s in ("teacher", "student"):
    a, b = (export_run(Path(p), target, source=s)["network_weights"] for p in ({str(smit_run)!r}, {str(old_run)!r}))
    assert all(torch.equal(v, b[k]) for k, v in a.items())
loaded = sorted(m for m in sys.modules if m.startswith("nnunet_ssl.pretraining"))
assert not loaded, loaded
"""
    run([sys.executable, "-c", script])
    # the encoders the version-2 file carries are views of the method's tensors: the file did not grow
    checkpoint = load_checkpoint(smit_run / "checkpoint_final.pt")
    key = "stages.0.blocks.0.attn.qkv.weight"
    assert checkpoint["default_encoder"] == "teacher"
    assert checkpoint["encoders"]["teacher"][key].data_ptr() == checkpoint["method"]["teacher.encoder." + key].data_ptr()


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
    torch.manual_seed(0)
    method = build_method(name, "tiny", overrides=overrides)
    with torch.no_grad():  # a teacher that differs from its student, so the roles cannot be confused
        for parameter in getattr(method, "teacher", torch.nn.Module()).parameters():
            parameter.add_(1.0)
    config = RunConfig(method=name, data=DataConfig(inputs=("x",), cache_dir=str(tmp_path / "cache"), modality="mr"),
                       preset="tiny", method_overrides=overrides)
    new_run = tmp_path / "v2"
    new_run.mkdir()
    engine = Engine(config, new_run)
    intensity = {"modality": "MR", "percentiles": [5.0, 95.0], "per_image": True, "range": [0.0, 1.0]}
    optimizer = torch.optim.AdamW(method.student_modules().parameters())
    engine._save(FINAL, method, optimizer, torch.amp.GradScaler("cuda", enabled=False), 3, 2, intensity)
    old_run = as_version_1(new_run, tmp_path / "v1")
    for run_dir in (new_run, old_run):
        exported = read_run(run_dir)
        assert (exported.method, exported.preset, exported.in_channels, exported.step) == (name, "tiny", 1, 3)
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
