"""Named trainers: one per pretraining method and preset (Swin) or method (ResEnc). Each only sets data on a base.

The name fixes the network (a Swin preset, or for the ResEnc family the plans' ResEnc U-Net), the recipe
and the results folder, so studies of different methods stay apart, and ``nnUNetv2_predict -tr NAME``
rebuilds the same network from the name (and the plans) alone.

Schedules (:data:`SCHEDULES`, a column of ``nnunet-ssl trainers``):

* ``paper``: the Swin paper's fine-tuning recipe (AdamW, 1000 epochs of 250 iterations, 3000 on few-shot
  folds), for a GPU; every Swin trainer of a paper-size preset.
* ``cpu-trial``: ``SwinScratchTrainer_tiny_16epochs`` and ``SwinSMITTrainer_tiny_16epochs``, the tiny
  preset for 16 epochs of 30 iterations, a first try on a CPU that learns on small data (what
  ``nnunet-ssl demo`` trains; about 10 minutes per training on 2 cores at 64^3 patches). They validate
  and predict without test-time mirroring.
* ``nnunet``: ``ResEncScratchTrainer``, nnU-Net's own training of a ResEnc U-Net (SGD, momentum 0.99
  Nesterov, weight decay 3e-5, lr 1e-2, poly over 1000 epochs of 250 iterations): the Spark3D paper's
  scratch baselines, "No (Fixed)" on ``nnunet-ssl plan --family resenc`` plans and "No (Dyn.)" on nnU-Net's
  ``nnUNetResEncUNetLPlans`` (the same trainer, ``-p`` chooses).
* ``spark3d``: ``ResEncSpark3DTrainer``, the Spark3D paper's fine-tuning (SSL_METHODS.md card 10): the same
  SGD and poly at peak lr 1e-3 after a decoder-only warm-up and a whole-network linear warm-up, each
  :data:`~nnunet_ssl.trainers.recipe.SPARK3D_WARMUP_FRACTION` (12.5k of 275k steps, 1/22) of the epochs run:
  45 + 45 of 1000 epochs, then 910 of poly decay. The paper's 275k steps are 1100 nnU-Net epochs; this
  trainer keeps nnU-Net's 1000 so that it costs what the scratch baselines cost, in the paper's proportions.
* ``nnunet-cpu-trial``, ``spark3d-cpu-trial``: the two ResEnc recipes for 16 epochs of 10 iterations without
  test-time mirroring (``..._16epochs``), for ``nnunet-ssl plan --family resenc --preset resenc_tiny`` plans on a CPU.

Any other schedule (another method on the CPU trial, the tests' 2-epoch runs) is a trainer of its
user's own: a 2-line subclass in an importable module, re-exported from a folder added to
``nnUNet_extTrainer`` (docs/trainers.md, "A trainer of your own"; the tests' ``tests/short_trainers.py`` is one).
:func:`find_trainer` finds such trainers by name as nnU-Net does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar, overload

from nnunet_ssl.trainers.base import PluginTrainerBase, SwinTrainerBase
from nnunet_ssl.trainers.inputs import ext_trainer_folders
from nnunet_ssl.trainers.recipe import SPARK3D_WARMUP_FRACTION, FineTuneRecipe
from nnunet_ssl.trainers.resenc import ResEncTrainerBase

#: The paper's recipe: the default of every trainer.
PAPER_RECIPE = FineTuneRecipe()

#: Seconds between progress lines inside an epoch of the CPU trials (a 30-iteration Swin epoch takes about
#: 40 s on 2 cores: a line at least every 15-20 s).
CPU_TRIAL_PROGRESS_S = 15.0

#: A first try on a CPU: the tiny network leaves the background-only phase on small data (the demo's
#: schedule; about 10 min per training on 2 cores with 64^3 patches, docs/benchmarks.md). 480 iterations: on
#: the T1-like MR heads grey matter first appears after about 200 (epoch 6 of 16; with 16 epochs of 10
#: iterations it never did, in either arm). No early stopping and no longer few-shot schedule; no test-time
#: mirroring (8 mirrored copies per tile cost minutes per case on CPU); progress lines inside each epoch.
CPU_TRIAL_RECIPE = FineTuneRecipe(
    initial_lr=1e-3, warmup_epochs=1, num_epochs=16, iterations_per_epoch=30, val_iterations_per_epoch=2,
    few_shot_epochs=None, few_shot_early_stopping_patience=None, test_time_mirroring=False,
    progress_every_s=CPU_TRIAL_PROGRESS_S,
)

#: nnU-Net's own training of a ResEnc U-Net (``nnUNetTrainer``: SGD lr 1e-2, momentum 0.99 Nesterov, weight
#: decay 3e-5 on every parameter, poly decay over 1000 epochs of 250 iterations); the scratch baselines.
#: No longer few-shot schedule and no early stopping (the Spark3D paper trains every fold alike).
RESENC_SCRATCH_RECIPE = FineTuneRecipe(
    initial_lr=1e-2, weight_decay=3e-5, warmup_epochs=0, num_epochs=1000, iterations_per_epoch=250,
    val_iterations_per_epoch=50, few_shot_epochs=None, few_shot_early_stopping_patience=None,
    optimizer="sgd", schedule="poly",
)
#: The Spark3D fine-tuning: nnU-Net's SGD and poly at peak lr 1e-3 (the paper's best of 1e-2, 1e-3, 1e-4) after
#: a decoder-only and a whole-network warm-up of 1/22 of the epochs each.
SPARK3D_RECIPE = replace(RESENC_SCRATCH_RECIPE, initial_lr=1e-3, decoder_warmup_fraction=SPARK3D_WARMUP_FRACTION,
                         network_warmup_fraction=SPARK3D_WARMUP_FRACTION)
#: The two ResEnc recipes as CPU trials (16 epochs of 10 iterations: 1 + 1 warm-up epochs for Spark3D).
RESENC_CPU_TRIAL_RECIPE = replace(RESENC_SCRATCH_RECIPE, num_epochs=16, iterations_per_epoch=10,
                                  val_iterations_per_epoch=2, test_time_mirroring=False,
                                  progress_every_s=CPU_TRIAL_PROGRESS_S)
SPARK3D_CPU_TRIAL_RECIPE = replace(SPARK3D_RECIPE, num_epochs=16, iterations_per_epoch=10,
                                   val_iterations_per_epoch=2, test_time_mirroring=False,
                                   progress_every_s=CPU_TRIAL_PROGRESS_S)

#: The schedules of the named trainers, by the name ``nnunet-ssl trainers`` shows.
SCHEDULES: dict[str, FineTuneRecipe] = {
    "paper": PAPER_RECIPE, "cpu-trial": CPU_TRIAL_RECIPE,
    "nnunet": RESENC_SCRATCH_RECIPE, "spark3d": SPARK3D_RECIPE,
    "nnunet-cpu-trial": RESENC_CPU_TRIAL_RECIPE, "spark3d-cpu-trial": SPARK3D_CPU_TRIAL_RECIPE,
}

TrainerT = TypeVar("TrainerT", bound=PluginTrainerBase)


class UnknownTrainerError(ValueError):
    """No trainer of that name and kind: neither a named trainer nor one in nnUNet_extTrainer's folders."""


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


class ResEncScratchTrainer(ResEncTrainerBase):
    """nnU-Net's ResEnc training from scratch: "No (Fixed)" on ``nnunet-ssl plan --family resenc`` plans, "No (Dyn.)"
    on nnU-Net's ``nnUNetResEncUNetLPlans``."""

    method, recipe = None, RESENC_SCRATCH_RECIPE


class ResEncSpark3DTrainer(ResEncTrainerBase):
    """The Spark3D paper's fine-tuning of a Spark3D-pretrained ResEnc U-Net (``nnunet-ssl export`` of a spark3d run)."""

    method, recipe = "spark3d", SPARK3D_RECIPE


class ResEncScratchTrainer_16epochs(ResEncScratchTrainer):
    schedule_preset, recipe = "resenc_tiny", RESENC_CPU_TRIAL_RECIPE


class ResEncSpark3DTrainer_16epochs(ResEncSpark3DTrainer):
    schedule_preset, recipe = "resenc_tiny", SPARK3D_CPU_TRIAL_RECIPE


#: Every named Swin trainer (the product's), for listings and parametrized tests.
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
#: Every named ResEnc trainer (network built from the plans).
RESENC_TRAINERS: dict[str, type[ResEncTrainerBase]] = {
    cls.__name__: cls
    for cls in (ResEncScratchTrainer, ResEncSpark3DTrainer, ResEncScratchTrainer_16epochs, ResEncSpark3DTrainer_16epochs)
}
#: Every named trainer of every family, in listing order.
ALL_TRAINERS: dict[str, type[PluginTrainerBase]] = {**TRAINERS, **RESENC_TRAINERS}

__all__ = ["TRAINERS", "RESENC_TRAINERS", "ALL_TRAINERS", *ALL_TRAINERS]


@overload
def find_trainer(name: str, ext_folders: Sequence[str] | None = None) -> type[SwinTrainerBase]: ...


@overload
def find_trainer(name: str, ext_folders: Sequence[str] | None = None, *, kind: type[TrainerT]) -> type[TrainerT]: ...


def find_trainer(
    name: str, ext_folders: Sequence[str] | None = None, *, kind: type[PluginTrainerBase] = SwinTrainerBase
) -> type[PluginTrainerBase]:
    """The trainer ``nnUNetv2_train -tr name`` runs: a named trainer, else one in ``ext_folders``.

    ``ext_folders`` defaults to the folders in ``nnUNet_extTrainer``; they are searched with
    nnU-Net's own function, in order, as nnU-Net does (without its progress prints).

    Args:
        name: The trainer's class name.
        ext_folders: Folders of trainers of the user's own.
        kind: The base class the caller can use: ``SwinTrainerBase`` (the default, for code that needs a Swin
            preset), ``ResEncTrainerBase``, or ``PluginTrainerBase`` for a trainer of any family.

    Raises:
        UnknownTrainerError: no such class, or one that is not a ``kind`` (naming what it is).
    """
    if name in ALL_TRAINERS:
        return _of_kind(ALL_TRAINERS[name], name, kind, "the named trainers")
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folders = ext_trainer_folders() if ext_folders is None else list(ext_folders)
    for folder in folders:
        found = recursive_find_python_class(folder, name, None, base_folder=folder,
                                            cleanup_imports_from_base_folder=True)
        if found is None:
            continue
        if not (isinstance(found, type) and issubclass(found, PluginTrainerBase)):
            raise UnknownTrainerError(f"{name} (found in {folder}) is not an nnunet-ssl trainer")
        return _of_kind(found, name, kind, folder)
    searched = f" or in nnUNet_extTrainer's folders ({', '.join(folders)})" if folders else \
        " (nnUNet_extTrainer names no folder of trainers of your own)"
    raise UnknownTrainerError(f"no trainer {name!r} among the named trainers (`nnunet-ssl trainers`){searched}")


def _of_kind(found: type[PluginTrainerBase], name: str, kind: type[PluginTrainerBase], where: str) -> type[PluginTrainerBase]:
    if issubclass(found, kind):
        return found
    wanted = {SwinTrainerBase: "a Swin trainer", ResEncTrainerBase: "a ResEnc trainer"}.get(kind, f"a {kind.__name__}")
    raise UnknownTrainerError(
        f"{name} (in {where}) is a {found.family} trainer, but this needs {wanted}; `nnunet-ssl trainers` lists "
        "each trainer's family"
    )


def schedule_name(trainer_class: type[PluginTrainerBase]) -> str:
    """The :data:`SCHEDULES` name of a trainer's recipe, ``custom`` for any other."""
    return next((name for name, recipe in SCHEDULES.items() if recipe == trainer_class.recipe), "custom")


def trainer_preset(trainer_class: type[PluginTrainerBase]) -> str:
    """The preset a trainer is named for: a Swin trainer's network preset, a ResEnc trainer's schedule preset."""
    if issubclass(trainer_class, SwinTrainerBase):
        return trainer_class.preset_name
    return str(getattr(trainer_class, "schedule_preset", ""))


def describe(trainer_class: type[PluginTrainerBase]) -> dict[str, Any]:
    """Summary of a trainer for listings (``nnunet-ssl trainers``): a ResEnc trainer's network is the plans'."""
    preset = trainer_class.preset_name if issubclass(trainer_class, SwinTrainerBase) else "(plans)"
    return {
        "trainer": trainer_class.__name__,
        "family": trainer_class.family,
        "preset": preset,
        "method": trainer_class.method or "scratch",
        "schedule": schedule_name(trainer_class),
        "epochs": trainer_class.recipe.num_epochs,
        "few_shot_epochs": trainer_class.recipe.for_few_shot().num_epochs,
        "iterations_per_epoch": trainer_class.recipe.iterations_per_epoch,
    }
