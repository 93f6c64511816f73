"""The pretraining command end to end: a short real run, kill -9 and resume, DDP with two CPU processes,
export of a run (real ``nnunet-ssl pretrain`` processes; the engine's in-process tests are in
tests/pretraining/test_pretraining_engine.py, whose settings and version-1 checkpoint helper these use; the
volumes are tests/conftest.py's)."""
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
import torch
from test_pretraining_engine import SMALL, as_version_1

from nnunet_ssl.optim import scheduled_lr
from nnunet_ssl.pretraining.engine import CHECKPOINT_FORMAT, load_checkpoint
from nnunet_ssl.pretraining.metrics_log import read_metrics

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
#: Small DINO heads keep SMIT fast in tests.
SMALL_HEADS = ["--set", "out_dim=64", "head_hidden_dim=64", "head_bottleneck_dim=32"]
METHOD_SETTINGS = {"smit": SMALL_HEADS, "simmim": [], "dino": SMALL_HEADS, "ibot": SMALL_HEADS,
                   "spark3d": ["--preset", "resenc_tiny"]}  # after SMALL's --preset tiny: the last one counts
#: ``(schedule, peak lr at batch 1)`` of the methods the resume test runs: the engine's AdamW + cosine at 2e-4 per 2
#: volumes, Spark3D's own recipe (SGD + poly at 1e-2 per 6 volumes, SSL_METHODS.md card 10).
SCHEDULES = {"smit": ("cosine", 2e-4 / 2), "ibot": ("cosine", 2e-4 / 2), "spark3d": ("poly", 1e-2 / 6)}


def pretrain_command(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "nnunet-ssl"), "pretrain", "--method", method, "--data", str(data), "--out", str(out), *SMALL,
            *METHOD_SETTINGS[method], *extra]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


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


@pytest.mark.parametrize("method", ["smit", "ibot", "spark3d"])  # spark3d: block masks and augmentation resumed
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
    schedule, peak = SCHEDULES[method]
    for record in records:
        # --max-steps shortens the whole schedule (to the end of the shortened run)
        expected = scheduled_lr(schedule, record["step"], peak, steps_per_epoch, total, 1e-6)
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
