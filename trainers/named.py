"""Named trainers: one per pretraining method and preset. Each only sets data on SwinTrainerBase.

The name fixes the preset and the results folder, so studies of different methods stay apart.
``*_tiny_2epochs`` variants (tiny preset, 2 epochs of 2 iterations) exercise every nnU-Net stage in tests;
the two ``*_tiny_16epochs`` variants run the demo. Both validate and predict without test-time mirroring.
"""
from __future__ import annotations

from nnunet_ssl.trainers.base import SwinTrainerBase
from nnunet_ssl.trainers.recipe import FineTuneRecipe

#: Recipe of the short variants: a few iterations, enough to exercise every nnU-Net stage on CPU.
SHORT_RECIPE = FineTuneRecipe(
    initial_lr=1e-3, warmup_epochs=0, num_epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1,
    few_shot_epochs=None, test_time_mirroring=False,
)

#: Recipe of the demo variants: long enough on a 2-core CPU for the tiny network to learn something.
DEMO_RECIPE = FineTuneRecipe(
    initial_lr=1e-3, warmup_epochs=1, num_epochs=16, iterations_per_epoch=10, val_iterations_per_epoch=2,
    few_shot_epochs=None, test_time_mirroring=False,
)


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


class SwinScratchTrainer_tiny_2epochs(SwinScratchTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinSMITTrainer_tiny_2epochs(SwinSMITTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinSimMIMTrainer_tiny_2epochs(SwinSimMIMTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinInpaintingTrainer_tiny_2epochs(SwinInpaintingTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinReconstructionTrainer_tiny_2epochs(SwinReconstructionTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinContrastiveTrainer_tiny_2epochs(SwinContrastiveTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinRotationTrainer_tiny_2epochs(SwinRotationTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinDINOTrainer_tiny_2epochs(SwinDINOTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwiniBOTTrainer_tiny_2epochs(SwiniBOTTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinUNETRTrainer_tiny_2epochs(SwinUNETRTrainer):
    preset_name, recipe = "tiny", SHORT_RECIPE


class SwinScratchTrainer_tiny_16epochs(SwinScratchTrainer):
    preset_name, recipe = "tiny", DEMO_RECIPE


class SwinSMITTrainer_tiny_16epochs(SwinSMITTrainer):
    preset_name, recipe = "tiny", DEMO_RECIPE


#: Every named trainer, for listings and parametrized tests.
TRAINERS: dict[str, type[SwinTrainerBase]] = {
    cls.__name__: cls
    for cls in (
        SwinScratchTrainer, SwinSMITTrainer, SwinSimMIMTrainer, SwinInpaintingTrainer, SwinReconstructionTrainer,
        SwinContrastiveTrainer, SwinRotationTrainer, SwinDINOTrainer, SwiniBOTTrainer, SwinUNETRTrainer,
        SwinSMIT128Trainer, SwinSMITsTrainer, SwinSMITpTrainer,
        SwinMONAISSLTrainer, SwinMONAIMergingTrainer, SwinMONAIv2Trainer, SwinSMITPublicTrainer,
        SwinScratchTrainer_tiny_2epochs, SwinSMITTrainer_tiny_2epochs, SwinSimMIMTrainer_tiny_2epochs,
        SwinInpaintingTrainer_tiny_2epochs, SwinReconstructionTrainer_tiny_2epochs,
        SwinContrastiveTrainer_tiny_2epochs, SwinRotationTrainer_tiny_2epochs, SwinDINOTrainer_tiny_2epochs,
        SwiniBOTTrainer_tiny_2epochs, SwinUNETRTrainer_tiny_2epochs,
        SwinScratchTrainer_tiny_16epochs, SwinSMITTrainer_tiny_16epochs,
    )
}

__all__ = ["TRAINERS", *TRAINERS]
