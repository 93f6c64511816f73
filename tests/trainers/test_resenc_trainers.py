"""The ResEnc family's fine-tuning: policy levels asked of the family, the Spark3D warm-ups and schedule, the
stem frozen during the decoder warm-up, and the trainers in process (weights checked early and verified at start)."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, Lin_incr_offset_LRScheduler, PolyLRScheduler_offset
from tiny_ct_plans import TINY_CT_DATASET_JSON, tiny_ct_plans, write_nnunet_env

from nnunet_ssl.networks import PRESETS
from nnunet_ssl.networks.resenc import RESENC_PRESETS, build_resenc_unet
from nnunet_ssl.trainers.base import RecipeLRScheduler
from nnunet_ssl.trainers.named import (
    RESENC_SCRATCH_RECIPE,
    RESENC_TRAINERS,
    SPARK3D_RECIPE,
    ResEncSpark3DTrainer,
    ResEncSpark3DTrainer_16epochs,
    find_trainer,
)
from nnunet_ssl.trainers.policy import (
    EncoderLevels,
    FineTunePolicy,
    PolicyError,
    apply_freezing,
    encoder_levels,
    parse_policy,
    policy_parameter_groups,
)
from nnunet_ssl.trainers.recipe import SPARK3D_WARMUP_FRACTION, FineTuneRecipe, scaled_warmups, staged_poly_lr
from nnunet_ssl.trainers.resenc import PretrainedWeightsMismatch, ResEncTrainerBase
from nnunet_ssl.weights import build_weights_file, save_weights_file
from nnunet_ssl.weights.format import encoder_digest

TINY = RESENC_PRESETS["resenc_tiny"]


@pytest.fixture()
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_resenc_unet(TINY, 2, 3)


# ---------------------------------------------------------------------- policy levels of the resenc family
def test_resenc_levels_are_the_stem_and_dna_stages(network: torch.nn.Module) -> None:
    levels = encoder_levels(network)
    assert levels == EncoderLevels("resenc", "encoder.stem.", 6, "encoder.stages.") and levels.num_levels == 7
    assert levels.level_of("encoder.stem.convs.0.conv.weight") == 0
    assert levels.level_of("encoder.stages.0.blocks.0.conv1.conv.weight") == 1
    assert levels.level_of("encoder.stages.5.blocks.1.conv2.norm.bias") == 6
    assert levels.level_of("decoder.stages.0.convs.0.conv.weight") is None
    assert levels.level_of("decoder.seg_layers.0.weight") is None
    with pytest.raises(TypeError, match="known family"):
        encoder_levels(torch.nn.Conv3d(1, 1, 1))


@pytest.mark.parametrize("exempt", [True, False], ids=["adamw_groups", "sgd_groups"])
def test_resenc_groups_cover_every_parameter_once(network: torch.nn.Module, exempt: bool) -> None:
    groups = policy_parameter_groups(network, 3e-5, FineTunePolicy(llrd=0.5), exempt_norms_and_biases=exempt)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))  # DNA's decoder.encoder is not counted twice
    assert groups[0]["name"] == "decoder/decay"
    assert {g["level"] for g in groups} == {None, *range(7)}
    scales = {g["level"]: g["lr_scale"] for g in groups if g["level"] is not None}
    assert scales == {level: 0.5 ** (7 - level) for level in range(7)}  # stem 0.5^7, deepest stage 0.5
    if not exempt:  # nnU-Net's SGD decays every parameter
        assert all(g["weight_decay"] == 3e-5 for g in groups) and len(groups) == 8


def test_frozen_stages_all_and_levels_of_the_deeper_encoder(network: torch.nn.Module) -> None:
    policy = parse_policy("frozen_stages=all")
    policy_parameter_groups(network, 0.0, policy)
    assert not any(p.requires_grad for n, p in network.named_parameters() if n.startswith("encoder."))
    assert all(p.requires_grad for n, p in network.named_parameters() if n.startswith("decoder.stages."))
    FineTunePolicy(frozen_stages=(6,)).check_levels(7)  # ResEnc-L's deepest stage is level 6
    with pytest.raises(PolicyError, match=r"levels 0 \(stem\) .. 6.*no level 7"):
        FineTunePolicy(frozen_stages=(7,)).check_levels(7)


def test_network_lr_warmup_key_parses_prints_and_describes() -> None:
    policy = parse_policy("freeze_encoder_epochs=45,network_lr_warmup_epochs=45")
    assert policy == FineTunePolicy(freeze_encoder_epochs=45, network_lr_warmup_epochs=45)
    assert policy.to_string() == "freeze_encoder_epochs=45,network_lr_warmup_epochs=45"
    assert parse_policy(policy.to_string()) == policy and FineTunePolicy.from_dict(policy.to_dict()) == policy
    assert policy.warmup_epochs == 90
    text = policy.describe(7)
    assert "encoder frozen for epochs 0-44 (decoder warm-up), trained from epoch 45" in text
    assert "whole-network lr warm-up: every group's lr ramps linearly over epochs 45-89" in text
    assert "stage6 x1" in text
    with pytest.raises(PolicyError, match="network_lr_warmup_epochs must be an integer >= 0"):
        parse_policy("network_lr_warmup_epochs=-2")
    # the ramp: 1 during the decoder warm-up, then 1/W .. 1, on every group
    ramp = FineTunePolicy(freeze_encoder_epochs=2, network_lr_warmup_epochs=4)
    assert [ramp.network_factor(e) for e in range(8)] == [1, 1, 0.25, 0.5, 0.75, 1, 1, 1]
    assert ramp.group_lr({"level": None}, 1.0, 3) == 0.5 and ramp.group_lr({"level": 0}, 1.0, 3) == 0.5
    assert ramp.group_lr({"level": 0}, 1.0, 1) == 0.0 and ramp.group_lr({}, 1.0, 2) == 0.25


# ---------------------------------------------------------------------- warm-ups and schedule
def test_spark3d_warmups_scale_with_the_epochs_run() -> None:
    assert SPARK3D_WARMUP_FRACTION == pytest.approx(12_500 / 275_000) == pytest.approx(1 / 22)
    assert 1000 * SPARK3D_WARMUP_FRACTION == pytest.approx(45.4545, abs=1e-4)
    fraction = SPARK3D_WARMUP_FRACTION
    assert scaled_warmups(fraction, fraction, 1000) == (45, 45)
    assert scaled_warmups(fraction, fraction, 3000) == (136, 136)
    assert scaled_warmups(fraction, fraction, 100) == (5, 5)
    assert scaled_warmups(fraction, fraction, 16) == (1, 1)
    assert scaled_warmups(fraction, fraction, 2) == (1, 0)  # at least one epoch of poly is left
    assert scaled_warmups(fraction, fraction, 1) == (0, 0)
    assert scaled_warmups(0.0, 0.0, 1000) == (0, 0)
    assert SPARK3D_RECIPE.initial_lr == 1e-3 and SPARK3D_RECIPE.decoder_warmup_fraction == fraction
    assert (SPARK3D_RECIPE.optimizer, SPARK3D_RECIPE.schedule, SPARK3D_RECIPE.weight_decay) == ("sgd", "poly", 3e-5)
    assert RESENC_SCRATCH_RECIPE.initial_lr == 1e-2 and RESENC_SCRATCH_RECIPE.network_warmup_fraction == 0.0
    with pytest.raises(ValueError, match="warmup_epochs must be 0"):
        FineTuneRecipe(schedule="poly", warmup_epochs=5)


def test_staged_poly_by_hand_and_against_nnunets_schedulers() -> None:
    """Decoder warm-up K=2, whole-network warm-up W=3, 10 epochs, peak 1e-3: the lr of each group per epoch."""
    peak, epochs, k, w = 1e-3, 10, 2, 3
    by_hand_decoder = [5e-4, 1e-3, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3 * 0.8 ** 0.9, 1e-3 * 0.6 ** 0.9,
                       1e-3 * 0.4 ** 0.9, 1e-3 * 0.2 ** 0.9]
    by_hand_encoder = [0.0, 0.0, *by_hand_decoder[2:]]
    recipe = FineTuneRecipe(initial_lr=peak, warmup_epochs=0, num_epochs=epochs, optimizer="sgd", schedule="poly",
                            few_shot_epochs=None)
    policy = FineTunePolicy(freeze_encoder_epochs=k, network_lr_warmup_epochs=w)
    torch.manual_seed(0)
    network = build_resenc_unet(TINY, 1, 2)
    optimizer = torch.optim.SGD(policy_parameter_groups(network, 3e-5, policy, False), lr=peak, momentum=0.99,
                                nesterov=True)
    scheduler = RecipeLRScheduler(optimizer, recipe, policy)
    # nnU-Net's own schedulers of the three stages (nnunetv2/training/lr_scheduler/warmup.py)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    stages = [Lin_incr_LRScheduler(reference, peak, k), Lin_incr_offset_LRScheduler(reference, peak, w, k),
              PolyLRScheduler_offset(reference, peak, epochs, k + w)]
    for epoch in range(epochs):
        scheduler.step(epoch)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["decoder/decay"] == pytest.approx(by_hand_decoder[epoch], rel=1e-12), epoch
        assert lrs["stem/decay"] == pytest.approx(by_hand_encoder[epoch], abs=1e-18, rel=1e-12), epoch
        assert lrs["stage6/decay"] == lrs["stem/decay"]
        stage = stages[0 if epoch < k else 1 if epoch < k + w else 2]
        stage.step(epoch)
        assert lrs["decoder/decay"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12), epoch
        assert staged_poly_lr(epoch, peak, epochs, k, w) * policy.network_factor(epoch) == \
            pytest.approx(by_hand_decoder[epoch], rel=1e-12)


def test_scratch_schedule_is_nnunets_poly() -> None:
    recipe = RESENC_SCRATCH_RECIPE
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.initial_lr)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.initial_lr)
    ours, theirs = RecipeLRScheduler(optimizer, recipe), PolyLRScheduler(reference, recipe.initial_lr, recipe.num_epochs)
    for epoch in (0, 1, 500, 998, 999):
        ours.step(epoch)
        theirs.step(epoch)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12)


# ---------------------------------------------------------------------- the stem in the decoder warm-up
def test_replicated_stem_stays_frozen_during_the_decoder_warmup_then_trains() -> None:
    """A 1-channel pretrained encoder exported for 2 channels: stem kernel copied and halved; with nnU-Net's SGD
    (large lr and weight decay) the whole encoder, stem included, is bit-identical after decoder warm-up steps."""
    torch.manual_seed(1)
    pretrained = build_resenc_unet(TINY, 1, 2)
    payload = build_weights_file(pretrained.encoder.state_dict(), "resenc_tiny", 2, 3, method="spark3d")
    stem = payload["network_weights"]["encoder.stem.convs.0.conv.weight"]
    one = pretrained.encoder.stem.convs[0].conv.weight.detach()
    assert stem.shape[1] == 2 and torch.equal(stem, torch.cat([one, one], 1) / 2)
    assert payload["metadata"]["channel_mode"] == "replicate"

    network = build_resenc_unet(TINY, 2, 3)
    network.load_state_dict(payload["network_weights"])
    policy = FineTunePolicy(freeze_encoder_epochs=1, network_lr_warmup_epochs=1)
    recipe = FineTuneRecipe(initial_lr=0.5, weight_decay=0.5, warmup_epochs=0, num_epochs=4, optimizer="sgd",
                            schedule="poly", few_shot_epochs=None)
    optimizer = torch.optim.SGD(policy_parameter_groups(network, 0.5, policy, False), lr=0.5, momentum=0.99,
                                nesterov=True)
    scheduler = RecipeLRScheduler(optimizer, recipe, policy)
    before = {k: v.detach().clone() for k, v in network.named_parameters()}

    def steps(epoch: int) -> None:
        apply_freezing(network, policy, epoch)
        scheduler.step(epoch)
        generator = torch.Generator().manual_seed(epoch)
        optimizer.zero_grad(set_to_none=True)  # 32 x 32 x 64: a 1 x 1 x 2 bottleneck, enough for instance norm
        outputs = network(torch.randn(1, 2, 32, 32, 64, generator=generator))
        sum(o.square().mean() for o in outputs).backward()
        optimizer.step()

    steps(0)
    after = dict(network.named_parameters())
    assert not network.encoder.stem.convs[0].conv.weight.requires_grad
    for name, value in before.items():
        if name.startswith("encoder."):
            assert torch.equal(after[name], value), name
    assert not torch.equal(after["decoder.stages.0.convs.0.conv.weight"], before["decoder.stages.0.convs.0.conv.weight"])
    steps(1)
    assert network.encoder.stem.convs[0].conv.weight.requires_grad
    assert not torch.equal(after["encoder.stem.convs.0.conv.weight"], before["encoder.stem.convs.0.conv.weight"])


# ---------------------------------------------------------------------- the trainers, in process
DATASET = "Dataset991_ResEncTest"


def resenc_plans(preset: str = "resenc_tiny") -> dict[str, Any]:
    """The tiny CT plans with a ResEnc architecture (what ``nnunet-ssl plan --family resenc`` names)."""
    plans = tiny_ct_plans(DATASET)
    plans["configurations"]["3d_fullres"]["architecture"] = RESENC_PRESETS[preset].architecture()
    return plans


@pytest.fixture()
def nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("NNUNET_SSL_FINETUNE", raising=False)
    monkeypatch.delenv("NNUNET_SSL_EPOCHS", raising=False)
    return write_nnunet_env(tmp_path, monkeypatch, resenc_plans(), TINY_CT_DATASET_JSON)


def _trainer(cls: type[ResEncTrainerBase] = ResEncSpark3DTrainer_16epochs, plans: dict | None = None) -> Any:
    plans = copy.deepcopy(plans or resenc_plans())
    plans["continue_training"] = False
    return cls(plans, "3d_fullres", 0, dict(TINY_CT_DATASET_JSON), torch.device("cpu"))


def _log(trainer: Any) -> str:
    return Path(trainer.log_file).read_text(encoding="utf-8")


def _weights(folder: Path, preset: str = "resenc_tiny", method: str = "spark3d", seed: int = 5) -> Path:
    torch.manual_seed(seed)
    encoder = build_resenc_unet(RESENC_PRESETS[preset], 1, 2).encoder if preset in RESENC_PRESETS else None
    assert encoder is not None
    return save_weights_file(build_weights_file(encoder.state_dict(), preset, 1, 2, method=method), folder / "w.pt")


def test_spark3d_trainer_builds_nnunets_network_with_scaled_warmups_and_sgd(nnunet_env: Path) -> None:
    trainer = _trainer()
    trainer.initialize()
    network = trainer.network
    assert type(network) is type(build_resenc_unet(TINY, 1, 2))
    assert [tuple(v.shape) for v in network.state_dict().values()] == \
        [tuple(v.shape) for v in build_resenc_unet(TINY, 1, 2).state_dict().values()]
    assert trainer.finetune_policy == FineTunePolicy(freeze_encoder_epochs=1, network_lr_warmup_epochs=1)
    log = _log(trainer)
    assert "Fine-tuning policy (from recipe of ResEncSpark3DTrainer_16epochs: warm-ups of 0.04545 and 0.04545 of 16 " \
           "epochs): freeze_encoder_epochs=1,network_lr_warmup_epochs=1" in log
    assert "nnU-Net's ResidualEncoderUNet from plans 'nnUNetPlans' (3d_fullres): preset 'resenc_tiny'" in log
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.99 and g["nesterov"] and g["weight_decay"] == 3e-5 for g in optimizer.param_groups)
    assert (trainer.initial_lr, trainer.num_epochs, trainer.num_iterations_per_epoch) == (1e-3, 16, 10)
    assert trainer.save_every == 2  # checkpoint_latest every 2 epochs: an interrupted trial continues with --c
    lrs = []
    for epoch in range(4):
        trainer.lr_scheduler.step(epoch)
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
    assert [e["decoder/decay"] for e in lrs] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3 * (1 - 1 / 14) ** 0.9])
    assert [e["stem/decay"] for e in lrs] == pytest.approx([0.0, 1e-3, 1e-3, 1e-3 * (1 - 1 / 14) ** 0.9])
    assert "training from scratch" not in log


def test_environment_policy_wins_over_the_recipes_warmups(nnunet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNUNET_SSL_FINETUNE", "network_lr_warmup_epochs=3")
    trainer = _trainer()
    trainer.initialize()
    assert trainer.finetune_policy == FineTunePolicy(network_lr_warmup_epochs=3)


def test_pretrained_weights_are_verified_at_train_start_and_a_mismatch_stops_training(
    nnunet_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _weights(nnunet_env)
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "991", "3d_fullres", "0", "-pretrained_weights", str(path)])
    trainer = _trainer()
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(path))  # what nnUNetv2_train does between initialize and start
    trainer.log_weights_provenance()
    digest = encoder_digest(trainer.network.encoder.state_dict())
    assert f"pretrained weights verified: spark3d encoder digest {digest} (resenc preset 'resenc_tiny'" in _log(trainer)

    with torch.no_grad():
        trainer.network.encoder.stages[2].blocks[0].conv1.conv.weight.add_(1.0)
    with pytest.raises(PretrainedWeightsMismatch, match=f"holds encoder digest {digest}"):
        trainer.log_weights_provenance()
    assert "ERROR: pretrained weights NOT verified" in _log(trainer)


def test_spark3d_trainer_without_weights_warns_and_scratch_says_so(nnunet_env: Path) -> None:
    trainer = _trainer()
    trainer.initialize()
    trainer.log_weights_provenance()
    assert "expects spark3d pretrained weights, but none were loaded" in _log(trainer)
    assert "use ResEncScratchTrainer for a scratch baseline" in _log(trainer)
    scratch = _trainer(RESENC_TRAINERS["ResEncScratchTrainer"])
    scratch.initialize()
    scratch.log_weights_provenance()
    assert "training from scratch (no pretrained weights)" in _log(scratch)
    assert scratch.finetune_policy.is_default and scratch.initial_lr == 1e-2


def _refusal(monkeypatch: pytest.MonkeyPatch, path: Path, plans: dict | None = None) -> str:
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "991", "3d_fullres", "0", "-pretrained_weights", str(path)])
    with pytest.raises(SystemExit) as exit_:
        _trainer(plans=plans)
    return str(exit_.value.code)


def test_a_file_of_another_topology_is_refused_naming_the_plan_command(
    nnunet_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _weights(nnunet_env, "resenc_tiny")
    message = _refusal(monkeypatch, path, resenc_plans("resenc_l"))
    assert message.startswith("nnunet-ssl: refusing -pretrained_weights, nothing was written.\n")
    line = message.splitlines()[1]
    assert len(message.splitlines()) == 2
    assert re.search(r"holds a resenc preset 'resenc_tiny' encoder, but plans 'nnUNetPlans' \(3d_fullres\) build another "
                     r"ResEnc topology \(features_per_stage: file \[4, 8", line)
    assert line.endswith(f"Fix: plan the dataset with `nnunet-ssl plan -d {DATASET} --family resenc --preset resenc_tiny` "
                         "and train with -p nnUNetResEncSSLPlans")
    assert not (nnunet_env / "results").exists()


def test_a_swin_file_and_plans_of_another_network_are_refused(nnunet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunet_ssl.networks import SwinEncoder

    torch.manual_seed(3)
    swin = save_weights_file(build_weights_file(SwinEncoder(PRESETS["tiny"], 1).state_dict(), "tiny", 1, 2,
                                                method="smit"), nnunet_env / "swin.pt")
    message = _refusal(monkeypatch, swin)
    assert "holds a swin preset 'tiny' network, but ResEncSpark3DTrainer_16epochs trains nnU-Net's ResEnc U-Net" in message
    plain = tiny_ct_plans(DATASET)
    plain["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train"])
    with pytest.raises(ValueError, match=r"build 'dynamic_network_architectures.architectures.unet.PlainConvUNet'.*"
                                         r"nnunet-ssl plan -d Dataset991_ResEncTest --family resenc"):
        _trainer(plans=plain)


def test_find_trainer_finds_resenc_trainers_only_when_asked_for_their_kind() -> None:
    from nnunet_ssl.trainers.base import PluginTrainerBase

    assert find_trainer("ResEncSpark3DTrainer", [], kind=PluginTrainerBase) is ResEncSpark3DTrainer
    assert find_trainer("ResEncSpark3DTrainer", [], kind=ResEncTrainerBase) is ResEncSpark3DTrainer
    with pytest.raises(ValueError, match="ResEncSpark3DTrainer .* is a resenc trainer, but this needs a Swin trainer"):
        find_trainer("ResEncSpark3DTrainer", [])
    with pytest.raises(ValueError, match="is a swin trainer, but this needs a ResEnc trainer"):
        find_trainer("SwinSMITTrainer", [], kind=ResEncTrainerBase)


def test_test_trainers_and_shims_export_the_resenc_trainers() -> None:
    import importlib

    from resenc_short_trainers import RESENC_TEST_TRAINERS
    from short_trainers import EXT_FOLDER

    from nnunet_ssl.trainers.base import PluginTrainerBase

    shim = importlib.import_module("nnunet_ssl.nnunet_ext.nnunet_ssl_trainers")
    assert {name: getattr(shim, name) for name in RESENC_TRAINERS} == RESENC_TRAINERS
    found = find_trainer("ResEncSpark3DTrainer_2epochs", [str(EXT_FOLDER)], kind=PluginTrainerBase)
    assert found is RESENC_TEST_TRAINERS["ResEncSpark3DTrainer_2epochs"]
