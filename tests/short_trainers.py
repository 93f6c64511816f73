"""Test-only trainers: the tiny preset for 2 epochs of 2 iterations, enough to pass every nnU-Net stage on CPU.

They are not part of the product (``nnunet-ssl trainers`` does not list them, ``find_trainer`` finds them
only through ``nnUNet_extTrainer``). nnU-Net finds them as it finds any user's own trainer (docs/trainers.md,
"A trainer of your own"): this module is importable (its folder on ``PYTHONPATH``), and :data:`EXT_FOLDER`, which
holds only a re-export of it, is added to ``nnUNet_extTrainer`` next to the plugin's folder
(:func:`with_test_trainers`; the test runner's environment, ``nnunet_runner.NnUNet``, has both).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from nnunet_ssl.nnunet_ext import ext_trainer_path
from nnunet_ssl.trainers.base import SwinTrainerBase
from nnunet_ssl.trainers.named import (
    SwinContrastiveTrainer,
    SwinDINOTrainer,
    SwiniBOTTrainer,
    SwinInpaintingTrainer,
    SwinReconstructionTrainer,
    SwinRotationTrainer,
    SwinScratchTrainer,
    SwinSimMIMTrainer,
    SwinSMITTrainer,
    SwinUNETRTrainer,
)
from nnunet_ssl.trainers.recipe import FineTuneRecipe

#: The folder of this module (put on PYTHONPATH) and the nnUNet_extTrainer folder re-exporting it.
MODULE_FOLDER = Path(__file__).resolve().parent
EXT_FOLDER = MODULE_FOLDER / "trainer_ext"

#: A test schedule: it exercises every nnU-Net stage on CPU and learns nothing.
TEST_RECIPE = FineTuneRecipe(
    initial_lr=1e-3, warmup_epochs=0, num_epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1,
    few_shot_epochs=None, few_shot_early_stopping_patience=None, test_time_mirroring=False,
)


class SwinScratchTrainer_tiny_2epochs(SwinScratchTrainer):  # noqa: N801 (nnU-Net trainer naming)
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinSMITTrainer_tiny_2epochs(SwinSMITTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinSimMIMTrainer_tiny_2epochs(SwinSimMIMTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinInpaintingTrainer_tiny_2epochs(SwinInpaintingTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinReconstructionTrainer_tiny_2epochs(SwinReconstructionTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinContrastiveTrainer_tiny_2epochs(SwinContrastiveTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinRotationTrainer_tiny_2epochs(SwinRotationTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinDINOTrainer_tiny_2epochs(SwinDINOTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwiniBOTTrainer_tiny_2epochs(SwiniBOTTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


class SwinUNETRTrainer_tiny_2epochs(SwinUNETRTrainer):  # noqa: N801
    preset_name, recipe = "tiny", TEST_RECIPE


#: One test trainer per method (scratch included).
TEST_TRAINERS: dict[str, type[SwinTrainerBase]] = {
    cls.__name__: cls
    for cls in (
        SwinScratchTrainer_tiny_2epochs, SwinSMITTrainer_tiny_2epochs, SwinSimMIMTrainer_tiny_2epochs,
        SwinInpaintingTrainer_tiny_2epochs, SwinReconstructionTrainer_tiny_2epochs,
        SwinContrastiveTrainer_tiny_2epochs, SwinRotationTrainer_tiny_2epochs, SwinDINOTrainer_tiny_2epochs,
        SwiniBOTTrainer_tiny_2epochs, SwinUNETRTrainer_tiny_2epochs,
    )
}

__all__ = list(TEST_TRAINERS)


def short_trainer_for(method: str | None) -> str:
    """The test trainer of ``method`` (None: scratch)."""
    names = [name for name, cls in TEST_TRAINERS.items() if cls.method == method]
    assert len(names) == 1, f"no single test trainer for {method}: {names}"
    return names[0]


def with_test_trainers(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` where nnU-Net finds the plugin's and these trainers: both folders first in
    ``nnUNet_extTrainer`` (other folders kept), this module's folder first on ``PYTHONPATH``."""

    def prepend(variable: str, *folders: Path) -> str:
        kept = [p for p in environ.get(variable, "").split(os.pathsep) if p and p not in map(str, folders)]
        return os.pathsep.join([*map(str, folders), *kept])

    return {
        **environ,
        "nnUNet_extTrainer": prepend("nnUNet_extTrainer", ext_trainer_path(), EXT_FOLDER),
        "PYTHONPATH": prepend("PYTHONPATH", MODULE_FOLDER),
    }
