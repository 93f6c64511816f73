"""Fine-tuning policies: parsing, per-group learning rates, frozen parameters, and resume through nnU-Net's checkpoint."""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from tiny_ct_plans import TINY_CT_DATASET_JSON, tiny_ct_plans, write_nnunet_env

from nnunet_ssl.networks import PRESETS, SwinUNETRSeg
from nnunet_ssl.trainers.base import WarmupCosineLRScheduler
from nnunet_ssl.trainers.inputs import FINETUNE_ENV as ENV_VAR
from nnunet_ssl.trainers.inputs import TrainerInputError
from nnunet_ssl.trainers.policy import (
    SWIN_LEVELS,
    FineTunePolicy,
    PolicyError,
    apply_freezing,
    encoder_level,
    encoder_levels,
    parse_policy,
    policy_parameter_groups,
)
from nnunet_ssl.trainers.policy_trainer import INIT_ARGS_KEY
from nnunet_ssl.trainers.recipe import FineTuneRecipe


# ---------------------------------------------------------------------- parsing
def test_parse_and_canonical_string() -> None:
    policy = parse_policy(" freeze_encoder_epochs=50, encoder_lr_warmup_epochs=10,llrd=0.75,frozen_stages=0-1 ")
    assert policy == FineTunePolicy(50, 10, 0.75, (0, 1))
    assert policy.to_string() == "freeze_encoder_epochs=50,encoder_lr_warmup_epochs=10,llrd=0.75,frozen_stages=0-1"
    assert parse_policy(policy.to_string()) == policy
    assert FineTunePolicy.from_dict(policy.to_dict()) == policy
    assert parse_policy("frozen_stages=0+3+4").frozen_stages == (0, 3, 4)
    assert parse_policy("frozen_stages=0+3+4").to_string() == "frozen_stages=0+3-4"
    everything = parse_policy("frozen_stages=all")
    assert everything == FineTunePolicy(frozen_encoder=True) and everything.to_string() == "frozen_stages=all"
    assert all(everything.permanently_frozen(level) for level in range(7))  # whatever the encoder's depth
    assert FineTunePolicy.from_dict(everything.to_dict()) == everything
    assert FineTunePolicy.from_dict({"llrd": 0.5, "frozen_stages": [1]}) == FineTunePolicy(llrd=0.5, frozen_stages=(1,))
    assert parse_policy("none").is_default and parse_policy("").is_default and parse_policy(None).is_default


@pytest.mark.parametrize(
    "text,message",
    [
        ("freeze_encoder=5", "unknown key 'freeze_encoder'; known keys: freeze_encoder_epochs"),
        ("llrd=1.5", r"llrd must be a number in \(0, 1\], got 1.5"),
        ("llrd=0", r"llrd must be a number in \(0, 1\]"),
        ("llrd=fast", "llrd='fast' is not a number"),
        ("freeze_encoder_epochs=2.5", "is not a whole number of epochs"),
        ("freeze_encoder_epochs=-1", "must be an integer >= 0"),
        ("frozen_stages=2-1", "must go up"),
        ("frozen_stages=stem", "is not a level list"),
        ("llrd", "is not key=value"),
        ("llrd=0.5,llrd=0.6", "given twice"),
    ],
)
def test_invalid_policy_strings_are_named(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        parse_policy(text, origin=f"{ENV_VAR}={text!r}")
    assert ENV_VAR in str(info.value)


def test_levels_beyond_the_encoder_are_refused() -> None:
    with pytest.raises(PolicyError, match="levels 0 \\(stem\\) .. 4.*no level 5"):
        FineTunePolicy(frozen_stages=(5,)).check_levels(5)


# ---------------------------------------------------------------------- learning rates
@pytest.fixture()
def network() -> SwinUNETRSeg:
    torch.manual_seed(0)
    return SwinUNETRSeg(PRESETS["tiny"], 1, 3)


def test_groups_cover_every_parameter_once_with_weight_decay_rules(network: SwinUNETRSeg) -> None:
    groups = policy_parameter_groups(network, 0.05, FineTunePolicy(llrd=0.5))
    assert groups[0]["name"] == "decoder/decay" and groups[0]["level"] is None  # what nnU-Net logs as the lr
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))
    names = {id(p): n for n, p in network.named_parameters()}
    for group in groups:
        for p in group["params"]:
            level = encoder_level(names[id(p)])
            assert level == group["level"]
            assert (group["weight_decay"] == 0.0) == (p.ndim <= 1 or "relative_position_bias_table" in names[id(p)])
    assert encoder_level("encoder.patch_embed.weight") == 0
    assert encoder_level("encoder.stages.3.downsample.norm.weight") == 4
    assert encoder_levels(network) == SWIN_LEVELS


def _lrs_by_level(optimizer: torch.optim.Optimizer) -> dict:
    return {g["level"]: g["lr"] for g in optimizer.param_groups}


def test_llrd_and_encoder_warmup_follow_hand_computed_rates(network: SwinUNETRSeg) -> None:
    policy = FineTunePolicy(freeze_encoder_epochs=2, encoder_lr_warmup_epochs=2, llrd=0.5, frozen_stages=(1,))
    recipe = FineTuneRecipe(initial_lr=1e-3, warmup_epochs=0, num_epochs=10)
    optimizer = torch.optim.AdamW(policy_parameter_groups(network, 0.01, policy), lr=1e-3)
    scheduler = WarmupCosineLRScheduler(optimizer, recipe, policy)
    expected_scale = {0: 0.5 ** 5, 1: 0.0, 2: 0.5 ** 3, 3: 0.5 ** 2, 4: 0.5}  # level 1 frozen throughout
    encoder_factor = {0: 0.0, 1: 0.0, 2: 0.5, 3: 1.0, 4: 1.0}  # frozen for 2 epochs, then a 2-epoch ramp
    for epoch in range(5):
        scheduler.step(epoch)
        base = 0.5 * 1e-3 * (1 + torch.cos(torch.tensor(torch.pi * epoch / 10))).item()  # recipe's cosine
        lrs = _lrs_by_level(optimizer)
        assert lrs[None] == pytest.approx(base)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(base)
        for level, scale in expected_scale.items():
            assert lrs[level] == pytest.approx(base * scale * encoder_factor[epoch]), (epoch, level)


def test_empty_policy_keeps_the_plain_schedule() -> None:
    recipe = FineTuneRecipe(initial_lr=1e-3, warmup_epochs=2, num_epochs=10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = WarmupCosineLRScheduler(optimizer, recipe)
    scheduler.step(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


# ---------------------------------------------------------------------- frozen parameters
def _train_steps(network: SwinUNETRSeg, optimizer, scheduler, epoch: int, policy: FineTunePolicy,
                 toggle: bool, steps: int = 1) -> None:
    apply_freezing(network, policy, epoch, toggle_requires_grad=toggle)
    scheduler.step(epoch)
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = network(torch.randn(1, 1, 64, 64, 64, generator=generator))
        sum(o.square().mean() for o in out).backward()
        optimizer.step()


@pytest.mark.parametrize("toggle", [True, False], ids=["requires_grad", "zero_lr_ddp_mode"])
def test_frozen_parameters_are_bit_identical_after_steps(network: SwinUNETRSeg, toggle: bool) -> None:
    """Large weight decay and lr: anything AdamW touched would move. Stem and stage 1 frozen throughout,
    the whole encoder for epoch 0; epoch 1 trains stages 2-4 and the decoder only. One step per epoch: the
    step of epoch 1 runs on the AdamW state (moments of the frozen stages included) that epoch 0 left."""
    policy = FineTunePolicy(freeze_encoder_epochs=1, llrd=0.9, frozen_stages=(0, 1))
    recipe = FineTuneRecipe(initial_lr=1e-2, weight_decay=0.5, warmup_epochs=0, num_epochs=4)
    optimizer = torch.optim.AdamW(policy_parameter_groups(network, 0.5, policy), lr=1e-2)
    scheduler = WarmupCosineLRScheduler(optimizer, recipe, policy)
    before = {k: v.detach().clone() for k, v in network.named_parameters()}

    _train_steps(network, optimizer, scheduler, 0, policy, toggle)
    after0 = {k: v.detach().clone() for k, v in network.named_parameters()}
    for name in before:
        if name.startswith("encoder."):
            assert torch.equal(after0[name], before[name]), name
    assert not torch.equal(after0["decoder.bottleneck.conv1.conv.weight"], before["decoder.bottleneck.conv1.conv.weight"])

    _train_steps(network, optimizer, scheduler, 1, policy, toggle)
    after1 = dict(network.named_parameters())
    for name in before:
        if name.startswith(("encoder.patch_embed.", "encoder.stages.0.")):
            assert torch.equal(after1[name], before[name]), name
    moved = [n for n in before if n.startswith("encoder.stages.3.") and not torch.equal(after1[n], before[n])]
    assert moved, "stage 4 should train from epoch 1"
    if toggle:
        assert not network.encoder.patch_embed.weight.requires_grad and network.encoder.stages[3].blocks[0].attn.qkv.weight.requires_grad


# ---------------------------------------------------------------------- the trainer, in process
PLANS = tiny_ct_plans("Dataset990_PolicyTest")
DATASET_JSON = TINY_CT_DATASET_JSON


@pytest.fixture()
def nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return write_nnunet_env(tmp_path, monkeypatch, PLANS, DATASET_JSON)


def _trainer():
    from nnunet_ssl.trainers.named import TRAINERS

    plans = copy.deepcopy(PLANS)
    plans["continue_training"] = False
    trainer = TRAINERS["SwinScratchTrainer_tiny_16epochs"](plans, "3d_fullres", 0, dict(DATASET_JSON), torch.device("cpu"))
    return trainer


def _epoch(trainer) -> None:
    """One training epoch of one step on random data, as nnU-Net's run_training does it (a second step adds
    no path: the next epoch's step already runs on the optimizer state of this one)."""
    trainer.on_train_epoch_start()
    generator = torch.Generator().manual_seed(trainer.current_epoch)
    data = torch.randn(1, 1, 64, 64, 64, generator=generator)
    target = (data > 0.5).float()
    targets = [target[:, :, ::s, ::s, ::s] for s in (1, 2, 4, 8, 16)]
    trainer.train_step({"data": data, "target": targets})
    trainer.current_epoch += 1


def _save(trainer, path: Path) -> None:
    """Save as nnU-Net's on_epoch_end does: before it increments the epoch counter."""
    trainer.current_epoch -= 1
    trainer.save_checkpoint(str(path))
    trainer.current_epoch += 1


def _log(trainer) -> str:
    return Path(trainer.log_file).read_text(encoding="utf-8")


def test_trainer_unfreezes_at_epoch_k_also_after_a_resume(nnunet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "freeze_encoder_epochs=2,encoder_lr_warmup_epochs=2,llrd=0.5")
    trainer = _trainer()
    trainer.initialize()
    assert "Fine-tuning policy (from environment variable NNUNET_SSL_FINETUNE): freeze_encoder_epochs=2" in _log(trainer)
    start = {k: v.detach().clone() for k, v in trainer.network.encoder.named_parameters()}
    assert trainer.active_recipe.progress_every_s == 15.0  # the CPU trial's lines inside an epoch
    trainer.active_recipe = dataclasses.replace(trainer.active_recipe, progress_every_s=1e-9)  # one after each step
    _epoch(trainer)  # epoch 0: frozen
    assert f"Epoch 0: 1/{trainer.num_iterations_per_epoch} training iterations (" in _log(trainer)
    for name, value in trainer.network.encoder.named_parameters():
        assert torch.equal(value, start[name]), name
    checkpoint = nnunet_env / "checkpoint_epoch1.pth"
    _save(trainer, checkpoint)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)["init_args"][INIT_ARGS_KEY]
    assert stored["text"] == "freeze_encoder_epochs=2,encoder_lr_warmup_epochs=2,llrd=0.5"

    # resume with another policy in the environment: the checkpoint's wins, with a warning in the log
    monkeypatch.setenv(ENV_VAR, "llrd=0.9")
    resumed = _trainer()
    resumed.load_checkpoint(str(checkpoint))
    assert resumed.finetune_policy == FineTunePolicy(2, 2, 0.5)
    assert resumed.current_epoch == 1
    assert "resuming keeps the checkpoint's policy" in _log(resumed)
    _epoch(resumed)  # epoch 1: still frozen
    for name, value in resumed.network.encoder.named_parameters():
        assert torch.equal(value, start[name]), name
    _epoch(resumed)  # epoch 2 = K: unfrozen, encoder lr ramps at 1/2
    assert "Epoch 2: encoder unfrozen" in _log(resumed)
    moved = [n for n, v in resumed.network.encoder.named_parameters() if not torch.equal(v, start[n])]
    assert moved
    lrs = {g["name"]: g["lr"] for g in resumed.optimizer.param_groups}
    base = resumed.optimizer.param_groups[0]["lr"]
    assert lrs["stage4/decay"] == pytest.approx(base * 0.5 * 0.5)  # llrd d^1, ramp 1/2
    assert lrs["stem/decay"] == pytest.approx(base * 0.5 ** 5 * 0.5)
    assert "Learning rates: decoder" in _log(resumed)
    # the next checkpoint carries the policy on
    _save(resumed, nnunet_env / "checkpoint_epoch3.pth")
    again = torch.load(nnunet_env / "checkpoint_epoch3.pth", map_location="cpu", weights_only=False)
    assert again["init_args"][INIT_ARGS_KEY]["policy"] == FineTunePolicy(2, 2, 0.5).to_dict()


def test_bad_environment_policy_is_refused_before_nnunet_creates_anything(
    nnunet_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under nnUNetv2_train: one line naming the variable, exit 1, no results folder; from Python: the error itself."""
    monkeypatch.setenv(ENV_VAR, "llrd=2")
    with pytest.raises(SystemExit) as exit_:
        _trainer()
    message = str(exit_.value.code)
    assert message.startswith("nnunet-ssl: refusing NNUNET_SSL_FINETUNE, nothing was written.")
    assert re.search(r"NNUNET_SSL_FINETUNE='llrd=2'.*llrd must be a number in \(0, 1\]", message)
    assert not (nnunet_env / "results").exists()
    monkeypatch.setattr("sys.argv", ["python", "my_script.py"])
    with pytest.raises(TrainerInputError, match=r"NNUNET_SSL_FINETUNE='llrd=2'") as error:
        _trainer()
    assert error.value.input_name == ENV_VAR and isinstance(error.value.__cause__, PolicyError)


def test_policy_from_the_weights_file_and_the_environment_over_it(nnunet_env: Path, monkeypatch) -> None:
    from nnunet_ssl.networks import SwinEncoder
    from nnunet_ssl.weights import build_weights_file, save_weights_file

    torch.manual_seed(3)
    encoder = SwinEncoder(PRESETS["tiny"], 1)
    path = save_weights_file(build_weights_file(encoder.state_dict(), "tiny", 1, 2, method="smit",
                                                finetune_policy="frozen_stages=0-1"), nnunet_env / "w.pt")
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "990", "3d_fullres", "0", "-pretrained_weights", str(path)])
    monkeypatch.delenv(ENV_VAR, raising=False)
    trainer = _trainer()
    trainer.initialize()
    assert trainer.finetune_policy == FineTunePolicy(frozen_stages=(0, 1))
    assert f"Fine-tuning policy (from weights file {path}): frozen_stages=0-1" in _log(trainer)
    assert not trainer.network.encoder.stages[0].blocks[0].attn.qkv.weight.requires_grad  # frozen from the start
    assert trainer.network.encoder.stages[1].blocks[0].attn.qkv.weight.requires_grad

    monkeypatch.setenv(ENV_VAR, "llrd=0.8")
    other = _trainer()
    other.initialize()
    assert other.finetune_policy == FineTunePolicy(llrd=0.8)
