"""Named trainers: one per pretraining method and preset. Each only sets data on SwinTrainerBase.

The name fixes the preset and the results folder, so studies of different methods stay apart, and
``nnUNetv2_predict -tr NAME`` rebuilds the same network from the name alone.

Two schedules are offered (:data:`SCHEDULES`, a column of ``nnunet-ssl trainers``):

* ``paper``: the paper's fine-tuning recipe (1000 epochs of 250 iterations, 3000 on few-shot folds),
  for a GPU; every trainer of a paper-size preset.
* ``cpu-trial``: ``SwinScratchTrainer_tiny_16epochs`` and ``SwinSMITTrainer_tiny_16epochs``, the tiny
  preset for 16 epochs of 10 iterations, a first try on a CPU that learns on small data (what
  ``nnunet-ssl demo`` trains). They validate and predict without test-time mirroring.

Any other schedule (another method on the CPU trial, the tests' 2-epoch runs) is a trainer of its
user's own: a 2-line subclass in an importable module, re-exported from a folder added to
``nnUNet_extTrainer`` (README, "Trainers"; the tests' ``tests/short_trainers.py`` is one).
:func:`find_trainer` finds such trainers by name as nnU-Net does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nnunet_ssl.trainers.base import SwinTrainerBase
from nnunet_ssl.trainers.inputs import ext_trainer_folders
from nnunet_ssl.trainers.recipe import FineTuneRecipe

#: The paper's recipe: the default of every trainer.
PAPER_RECIPE = FineTuneRecipe()

#: A first try on a CPU: the tiny network learns something visible in minutes (the demo's schedule:
#: about 6 min per training on 2 cores with 64^3 patches, docs/benchmarks.md). No early stopping and no
#: longer few-shot schedule; no test-time mirroring (8 mirrored copies per tile cost minutes per case on CPU).
CPU_TRIAL_RECIPE = FineTuneRecipe(
    initial_lr=1e-3, warmup_epochs=1, num_epochs=16, iterations_per_epoch=10, val_iterations_per_epoch=2,
    few_shot_epochs=None, few_shot_early_stopping_patience=None, test_time_mirroring=False,
)

#: The schedules of the named trainers, by the name ``nnunet-ssl trainers`` shows.
SCHEDULES: dict[str, FineTuneRecipe] = {"paper": PAPER_RECIPE, "cpu-trial": CPU_TRIAL_RECIPE}


class UnknownTrainerError(ValueError):
    """No Swin trainer of that name: neither a named trainer nor one in nnUNet_extTrainer's folders."""


class SwinScratchTrainer(SwinTrainerBase):
    method = None


class SwinSMITTrainer(SwinTrainerBase):
    method = "smit"


class SwinSimMIMTrainer(SwinTrainerBase):
    method = "simmim"


class SwinInpaintingTrainer(SwinTrainerBase):
    method = "inpainting"


class SwinReconstructionTrainer(SwinTrainerBase):
    method = "reconstruction"


class SwinContrastiveTrainer(SwinTrainerBase):
    method = "contrastive"


class SwinRotationTrainer(SwinTrainerBase):
    method = "rotation"


class SwinDINOTrainer(SwinTrainerBase):
    method = "dino"


class SwiniBOTTrainer(SwinTrainerBase):
    method = "ibot"


class SwinUNETRTrainer(SwinTrainerBase):
    """SwinUNETR multi-objective pretraining (rotation + contrastive + inpainting) on the smit encoder."""

    method = "swinunetr"


class SwinSMIT128Trainer(SwinTrainerBase):
    preset_name = "smit128"
    method = "smit"


class SwinSMITsTrainer(SwinTrainerBase):
    preset_name = "smit_s"
    method = "smit"


class SwinSMITpTrainer(SwinTrainerBase):
    preset_name = "smit_p"
    method = "smit"


class SwinMONAISSLTrainer(SwinTrainerBase):
    """MONAI's self-supervised Swin UNETR encoder (``nnunet-ssl convert model_swinvit.pt``)."""

    preset_name = "monai_ssl"
    method = "swinunetr"


class SwinMONAIMergingTrainer(SwinTrainerBase):
    """A MONAI SwinUNETR built with ``downsample="merging"`` on MONAI >= 1.5 (``nnunet-ssl convert``)."""

    preset_name = "monai_merging"
    method = "monai_swinunetr"


class SwinMONAIv2Trainer(SwinTrainerBase):
    """A MONAI SwinUNETR built with ``downsample="mergingv2"`` (``nnunet-ssl convert``)."""

    preset_name = "monai_v2"
    method = "monai_swinunetr"


class SwinSMITPublicTrainer(SwinTrainerBase):
    """The SMIT authors' public encoder configuration (``nnunet-ssl convert`` of their checkpoints)."""

    preset_name = "smit_public"
    method = "smit"


class SwinScratchTrainer_tiny_16epochs(SwinScratchTrainer):
    preset_name, recipe = "tiny", CPU_TRIAL_RECIPE


class SwinSMITTrainer_tiny_16epochs(SwinSMITTrainer):
    preset_name, recipe = "tiny", CPU_TRIAL_RECIPE


#: Every named trainer (the product's), for listings and parametrized tests.
TRAINERS: dict[str, type[SwinTrainerBase]] = {
    cls.__name__: cls
    for cls in (
        SwinScratchTrainer, SwinSMITTrainer, SwinSimMIMTrainer, SwinInpaintingTrainer, SwinReconstructionTrainer,
        SwinContrastiveTrainer, SwinRotationTrainer, SwinDINOTrainer, SwiniBOTTrainer, SwinUNETRTrainer,
        SwinSMIT128Trainer, SwinSMITsTrainer, SwinSMITpTrainer,
        SwinMONAISSLTrainer, SwinMONAIMergingTrainer, SwinMONAIv2Trainer, SwinSMITPublicTrainer,
        SwinScratchTrainer_tiny_16epochs, SwinSMITTrainer_tiny_16epochs,
    )
}

__all__ = ["TRAINERS", *TRAINERS]


def find_trainer(name: str, ext_folders: Sequence[str] | None = None) -> type[SwinTrainerBase]:
    """The Swin trainer ``nnUNetv2_train -tr name`` runs: a named trainer, else one in ``ext_folders``.

    ``ext_folders`` defaults to the folders in ``nnUNet_extTrainer``; they are searched with
    nnU-Net's own function, in order, as nnU-Net does (without its progress prints).

    Raises:
        UnknownTrainerError: no such class, or one that is not a Swin trainer.
    """
    if name in TRAINERS:
        return TRAINERS[name]
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folders = ext_trainer_folders() if ext_folders is None else list(ext_folders)
    for folder in folders:
        found = recursive_find_python_class(folder, name, None, base_folder=folder,
                                            cleanup_imports_from_base_folder=True)
        if found is None:
            continue
        if not (isinstance(found, type) and issubclass(found, SwinTrainerBase)):
            raise UnknownTrainerError(f"{name} (found in {folder}) is not an nnunet-ssl Swin trainer")
        return found
    searched = f" or in nnUNet_extTrainer's folders ({', '.join(folders)})" if folders else \
        " (nnUNet_extTrainer names no folder of trainers of your own)"
    raise UnknownTrainerError(f"no trainer {name!r} among the named trainers (`nnunet-ssl trainers`){searched}")


def schedule_name(trainer_class: type[SwinTrainerBase]) -> str:
    """The :data:`SCHEDULES` name of a trainer's recipe, ``custom`` for any other."""
    return next((name for name, recipe in SCHEDULES.items() if recipe == trainer_class.recipe), "custom")


def describe(trainer_class: type[SwinTrainerBase]) -> dict[str, Any]:
    """Summary of a trainer for listings (``nnunet-ssl trainers``)."""
    return {
        "trainer": trainer_class.__name__,
        "preset": trainer_class.preset_name,
        "method": trainer_class.method or "scratch",
        "schedule": schedule_name(trainer_class),
        "epochs": trainer_class.recipe.num_epochs,
        "few_shot_epochs": trainer_class.recipe.for_few_shot().num_epochs,
        "iterations_per_epoch": trainer_class.recipe.iterations_per_epoch,
    }
