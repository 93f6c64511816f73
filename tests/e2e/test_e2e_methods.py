"""Every SSL method end to end through the CLIs: `nnunet-ssl pretrain`, `nnunet-ssl export`, then the
method's own test trainer ``Swin<Method>Trainer_tiny_2epochs`` (``short_trainers``, found by nnU-Net through
``nnUNet_extTrainer``) in a real ``nnUNetv2_train -pretrained_weights FILE``.

Marked ``e2e``. To fit the suite's budget each method pretrains 2 steps of 2 volumes (32^3 crops, or
64^3 where the conv up-sampling head needs them) with small heads, and each training runs one epoch
(``NNUNET_SSL_EPOCHS=1``: nnU-Net's own epoch loop, checkpoint and final validation, one epoch of them).
SMIT's training runs both epochs under a fine-tuning policy from ``NNUNET_SSL_FINETUNE`` (encoder frozen
in epoch 0, unfrozen in epoch 1, layer-wise lr decay), i.e. a policy through nnU-Net's own CLI.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from nnunet_runner import NnUNet
from short_trainers import short_trainer_for

from nnunet_ssl.data.phantoms import PhantomConfig
from nnunet_ssl.pretraining.methods import METHODS, build_config, method_family
from nnunet_ssl.pretraining.metrics_log import read_metrics
from nnunet_ssl.weights import load_weights_file

pytestmark = pytest.mark.e2e

POLICY = "freeze_encoder_epochs=1,llrd=0.5"


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory: pytest.TempPathFactory) -> NnUNet:
    config = PhantomConfig(num_train=5, num_test=0, num_unlabeled=2, shape=(40, 64, 64))
    runner = NnUNet.with_phantoms(tmp_path_factory.mktemp("methods"), config)
    runner.env["NNUNET_SSL_EPOCHS"] = "1"
    return runner


def small_head_settings(method: str) -> list[str]:
    fields = {f.name for f in dataclasses.fields(METHODS[method][1])}
    wanted = {"out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32}
    pairs = [f"{k}={v}" for k, v in wanted.items() if k in fields]
    return ["--set", *pairs] if pairs else []


def smallest_crop(method: str) -> int:
    """32^3 where the method accepts it, else 64^3 (the conv up-sampling head needs >= 64^3)."""
    try:
        build_config(method, {"crop_size": 32})
    except ValueError:
        return 64
    return 32


#: The Swin-family methods (Spark3D, the ResEnc family's, runs through tests/e2e/test_e2e_spark3d.py).
SWIN_METHODS = [name for name in METHODS if method_family(name).name == "swin"]


@pytest.mark.parametrize("method", SWIN_METHODS)
def test_method_pretrains_exports_and_its_trainer_loads_the_weights(nnunet: NnUNet, method: str) -> None:
    run_dir = nnunet.root / f"{method}_run"
    nnunet.run(
        "nnunet-ssl", "pretrain", "--method", method, "--data", str(nnunet.root / "unlabeled"),
        "--out", str(run_dir), "--cache-dir", str(nnunet.root / "pretraining_cache"), "--preset", "tiny",
        # batch 2: the contrastive methods need another volume for their negatives
        "--crop-size", str(smallest_crop(method)), "--batch-size", "2", "--workers", "0", "--max-steps", "2",
        "--no-progress", *small_head_settings(method),
    )
    # every loss term the method names is in every metrics record, and the curves were drawn
    terms = set(re.findall(r"[\d.]+ (loss_\w+)", METHODS[method][0].info.losses))
    assert terms and all(terms <= set(record) for record in read_metrics(run_dir / "metrics.jsonl"))
    assert (run_dir / "loss_curves.png").stat().st_size > 1000

    path = nnunet.root / f"{method}_tiny_501.pt"
    nnunet.run("nnunet-ssl", "export", str(run_dir), "-d", "501", "-c", "3d_fullres", "--out", str(path))
    _, metadata = load_weights_file(path)
    assert metadata["method"] == method

    trainer = short_trainer_for(method)
    policy = {"NNUNET_SSL_FINETUNE": POLICY, "NNUNET_SSL_EPOCHS": ""} if method == "smit" else {}
    nnunet.run("nnUNetv2_train", "501", "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "-pretrained_weights", str(path),
               env=policy)
    assert (nnunet.fold_dir(trainer) / "checkpoint_final.pth").is_file()
    log = nnunet.training_log(trainer)
    assert f"Pretrained weights loaded: method={method} preset=tiny digest={metadata['encoder_digest']} (verified)" in log
    assert "but pretraining mapped intensities to [0, 1]" in log  # nnU-Net's default plans z-score: warned
    if policy:
        check_policy_was_applied(nnunet.fold_dir(trainer), log, path)


def check_policy_was_applied(fold_dir: Path, log: str, weights: Path) -> None:
    assert f"Fine-tuning policy (from environment variable NNUNET_SSL_FINETUNE): {POLICY}" in log
    assert "Epoch 1: encoder unfrozen" in log and "Learning rates: decoder" in log
    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    assert checkpoint["init_args"]["nnunet_ssl_finetune_policy"]["text"] == POLICY
    # unfrozen at epoch 1, the encoder trained after all
    exported, _ = load_weights_file(weights)
    key = "encoder.stages.3.blocks.0.attn.qkv.weight"
    assert not torch.equal(checkpoint["network_weights"][key], exported[key])
