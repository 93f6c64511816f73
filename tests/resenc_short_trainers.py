"""Test-only ResEnc trainers: the Spark3D and scratch recipes for 2 epochs of 2 iterations (every nnU-Net stage on CPU).

Like ``short_trainers`` (the Swin ones), not part of the product: nnU-Net finds them through the re-export in
``trainer_ext/`` (``short_trainers.with_test_trainers`` puts that folder in ``nnUNet_extTrainer`` and this
folder on ``PYTHONPATH``). Train them on ``nnunet-ssl plan --family resenc --preset resenc_tiny`` plans.
"""
from __future__ import annotations

from dataclasses import replace

from nnunet_ssl.trainers.named import ResEncScratchTrainer, ResEncSpark3DTrainer
from nnunet_ssl.trainers.resenc import ResEncTrainerBase

#: 2 epochs of 2 iterations, no test-time mirroring: the Spark3D warm-ups scale to 1 decoder-only epoch, then poly.
SPARK3D_TEST_RECIPE = replace(ResEncSpark3DTrainer.recipe, num_epochs=2, iterations_per_epoch=2,
                              val_iterations_per_epoch=1, test_time_mirroring=False)
RESENC_SCRATCH_TEST_RECIPE = replace(ResEncScratchTrainer.recipe, num_epochs=2, iterations_per_epoch=2,
                                     val_iterations_per_epoch=1, test_time_mirroring=False)


class ResEncSpark3DTrainer_2epochs(ResEncSpark3DTrainer):  # noqa: N801 (nnU-Net trainer naming)
    recipe = SPARK3D_TEST_RECIPE


class ResEncScratchTrainer_2epochs(ResEncScratchTrainer):  # noqa: N801
    recipe = RESENC_SCRATCH_TEST_RECIPE


#: The test-only ResEnc trainers, by name.
RESENC_TEST_TRAINERS: dict[str, type[ResEncTrainerBase]] = {
    cls.__name__: cls for cls in (ResEncSpark3DTrainer_2epochs, ResEncScratchTrainer_2epochs)
}

__all__ = list(RESENC_TEST_TRAINERS)
