"""Fine-tuning recipe pieces: schedule, weight-decay groups, patch fitting, trainer registry."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_ssl.networks import PRESETS, SwinUNETRSeg
from nnunet_ssl.optim import decay_parameter_groups, warmup_cosine
from nnunet_ssl.trainers.base import WarmupCosineLRScheduler
from nnunet_ssl.trainers.named import CPU_TRIAL_RECIPE, SCHEDULES, TRAINERS, UnknownTrainerError, find_trainer
from nnunet_ssl.trainers.recipe import FineTuneRecipe, fitted_batch_size, swin_compatible_patch_size


def test_warmup_cosine_hand_values() -> None:
    assert warmup_cosine(0, 1.0, 4, 12) == pytest.approx(0.25)
    assert warmup_cosine(3, 1.0, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(4, 1.0, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(8, 1.0, 4, 12) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(12, 1.0, 4, 12, final=0.1) == pytest.approx(0.1)
    assert warmup_cosine(50, 1.0, 4, 12) == pytest.approx(0.0)
    assert warmup_cosine(6, 2.0, 0, 8) == pytest.approx(1.0 + math.cos(math.pi * 6 / 8))


def test_scheduler_follows_nnunet_step_convention() -> None:
    recipe = FineTuneRecipe(initial_lr=1e-3, warmup_epochs=2, num_epochs=10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.initial_lr)
    scheduler = WarmupCosineLRScheduler(optimizer, recipe)
    lrs = []
    for epoch in range(10):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_no_weight_decay_on_norms_biases_and_position_tables() -> None:
    net = SwinUNETRSeg(PRESETS["tiny"], 1, 2)
    decay, no_decay = decay_parameter_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert any("relative_position_bias_table" in n for n in no_decay_names)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all("relative_position_bias_table" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


@pytest.mark.parametrize(
    "patch,expected",
    [([96, 96, 96], [96, 96, 96]), ([80, 160, 112], [96, 160, 128]), ([40, 224, 192], [64, 224, 192]), ([47, 70, 70], [64, 64, 64])],
)
def test_patch_sizes_become_multiples_of_32_and_at_least_64(patch, expected) -> None:
    assert swin_compatible_patch_size(patch) == expected


def test_batch_size_shrinks_only_when_the_patch_grows() -> None:
    assert fitted_batch_size(2, [80, 160, 112], [64, 160, 96]) == 2
    assert fitted_batch_size(8, [64, 64, 64], [128, 128, 128]) == 2
    assert fitted_batch_size(4, [64, 64, 64], [96, 64, 64]) == 2


def test_short_runs_write_checkpoint_latest_often_long_runs_as_nnunet() -> None:
    from nnunet_ssl.trainers.recipe import checkpoint_interval

    assert [checkpoint_interval(n) for n in (1, 2, 8, 16, 100, 400, 1000, 3000)] == [1, 1, 1, 2, 12, 50, 50, 50]


def test_recipe_validates() -> None:
    with pytest.raises(ValueError, match="warmup"):
        FineTuneRecipe(warmup_epochs=10, num_epochs=10)
    with pytest.raises(ValueError, match="progress_every_s"):
        FineTuneRecipe(progress_every_s=0.0)
    assert FineTuneRecipe().progress_every_s is None  # the paper's GPU runs: nnU-Net's lines only


def test_every_design_trainer_exists_with_its_preset() -> None:
    expected = {
        "SwinSMITTrainer": "smit", "SwinSimMIMTrainer": "smit", "SwinInpaintingTrainer": "smit",
        "SwinReconstructionTrainer": "smit", "SwinContrastiveTrainer": "smit", "SwinRotationTrainer": "smit",
        "SwinDINOTrainer": "smit", "SwiniBOTTrainer": "smit", "SwinUNETRTrainer": "smit", "SwinScratchTrainer": "smit",
        "SwinSMIT128Trainer": "smit128", "SwinSMITsTrainer": "smit_s", "SwinSMITpTrainer": "smit_p",
    }
    for name, preset in expected.items():
        assert TRAINERS[name].preset_name == preset
    assert TRAINERS["SwinScratchTrainer"].method is None
    assert TRAINERS["SwinSMITTrainer"].method == "smit"


def test_trainers_are_found_by_nnunet_through_the_shim(monkeypatch) -> None:
    from nnunetv2.utilities import find_objects

    from nnunet_ssl.nnunet_ext import ext_trainer_path

    monkeypatch.setattr(find_objects.nnUNet_extTrainer, "get", lambda: str(ext_trainer_path()))
    monkeypatch.setattr(find_objects.nnUNet_extTrainer, "is_set", lambda: True)
    found = find_objects.recursive_find_trainer_class_by_name("SwinSMITTrainer_tiny_16epochs")
    assert found is TRAINERS["SwinSMITTrainer_tiny_16epochs"]


def test_every_named_trainer_has_a_product_schedule_and_only_the_cpu_trial_skips_mirroring() -> None:
    """What users are offered: the paper's recipe, or the CPU trial (tiny preset); no test schedule."""
    from nnunet_ssl.trainers.named import describe

    for name, cls in TRAINERS.items():
        schedule = describe(cls)["schedule"]
        assert schedule in SCHEDULES, name
        assert (schedule == "cpu-trial") == (cls.preset_name == "tiny"), name
        assert cls.recipe.test_time_mirroring is (schedule == "paper"), name
    assert {n for n, c in TRAINERS.items() if c.recipe is CPU_TRIAL_RECIPE} == {
        "SwinScratchTrainer_tiny_16epochs", "SwinSMITTrainer_tiny_16epochs"}
    # the demo's schedule: grey matter on the MR heads first appears after about 200 iterations (docs/benchmarks.md)
    assert (CPU_TRIAL_RECIPE.num_epochs, CPU_TRIAL_RECIPE.iterations_per_epoch) == (16, 30)


def test_trainers_command_lists_no_test_only_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    from short_trainers import TEST_TRAINERS

    from nnunet_ssl.cli import main

    assert main(["trainers"]) == 0
    listing = capsys.readouterr().out
    assert "SwinSMITTrainer_tiny_16epochs" in listing and "cpu-trial" in listing
    assert not [name for name in TEST_TRAINERS if name in listing]
    assert not set(TEST_TRAINERS) & set(TRAINERS)


def test_find_trainer_finds_named_trainers_and_own_trainers_only_through_nnunet_ext_trainer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from short_trainers import EXT_FOLDER, TEST_TRAINERS

    from nnunet_ssl.nnunet_ext import ext_trainer_path

    assert find_trainer("SwinSMITTrainer", ext_folders=[]) is TRAINERS["SwinSMITTrainer"]
    with pytest.raises(UnknownTrainerError, match="SwinSMITTrainer_tiny_2epochs"):
        find_trainer("SwinSMITTrainer_tiny_2epochs", ext_folders=[str(ext_trainer_path())])
    found = find_trainer("SwinSMITTrainer_tiny_2epochs", ext_folders=[str(ext_trainer_path()), str(EXT_FOLDER)])
    assert found is TEST_TRAINERS["SwinSMITTrainer_tiny_2epochs"]  # the class itself: its module stays importable
    monkeypatch.setenv("nnUNet_extTrainer", str(EXT_FOLDER))
    assert find_trainer("SwinScratchTrainer_tiny_2epochs") is TEST_TRAINERS["SwinScratchTrainer_tiny_2epochs"]
    with pytest.raises(UnknownTrainerError, match=r"no trainer 'NoSuchTrainer'.*trainer_ext"):
        find_trainer("NoSuchTrainer")
