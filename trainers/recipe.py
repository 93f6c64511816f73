"""The fine-tuning recipe as data (paper defaults), and the trainer's plan adjustments."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nnunet_ssl.networks.presets import ENCODER_STRIDE


@dataclass(frozen=True)
class FineTuneRecipe:
    """Optimisation settings of a Swin trainer.

    Paper defaults: AdamW, peak lr 2e-4, linear warm-up then cosine, CE + Dice with nnU-Net's deep
    supervision. Epoch counts follow nnU-Net (1000 epochs of 250 iterations); the paper uses
    1000 epochs for many-shot and 3000 for few-shot fine-tuning, with early stopping.

    Attributes:
        few_shot_epochs: Epochs on a few-shot fold (listed as ``few_shot`` in the dataset's
            ``splits_manifest.json``); None keeps ``num_epochs``.
        early_stopping_patience: Stop when the EMA validation pseudo-Dice has not improved for this
            many epochs (every fold); None = off, nnU-Net's behaviour.
        few_shot_early_stopping_patience: The same for few-shot folds.
        test_time_mirroring: Mirror along every axis when predicting (nnU-Net's default). Off in
            the short test and demo variants: on CPU the mirrored final validation costs minutes
            per case. Saved in the checkpoint, so ``nnUNetv2_predict`` follows it too.
    """

    initial_lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 50
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    final_lr: float = 0.0
    few_shot_epochs: int | None = 3000
    early_stopping_patience: int | None = None
    few_shot_early_stopping_patience: int | None = 300
    test_time_mirroring: bool = True

    def __post_init__(self) -> None:
        if self.num_epochs < 1 or self.iterations_per_epoch < 1 or self.val_iterations_per_epoch < 1:
            raise ValueError("epochs and iterations must be >= 1")
        if not 0 <= self.warmup_epochs < self.num_epochs:
            raise ValueError(f"warmup_epochs must be in [0, num_epochs), got {self.warmup_epochs}")
        if self.initial_lr <= 0:
            raise ValueError(f"initial_lr must be positive, got {self.initial_lr}")
        if self.few_shot_epochs is not None and self.few_shot_epochs <= self.warmup_epochs:
            raise ValueError(f"few_shot_epochs must exceed warmup_epochs, got {self.few_shot_epochs}")
        for patience in (self.early_stopping_patience, self.few_shot_early_stopping_patience):
            if patience is not None and patience < 1:
                raise ValueError(f"early stopping patience must be >= 1 epoch or None, got {patience}")

    def for_few_shot(self) -> FineTuneRecipe:
        """The schedule for a few-shot fold: longer, with early stopping (paper: 3000 epochs)."""
        return replace(
            self,
            num_epochs=self.few_shot_epochs or self.num_epochs,
            early_stopping_patience=self.few_shot_early_stopping_patience,
        )


def should_stop_early(ema_dice_per_epoch: list[float], patience: int | None) -> bool:
    """True when the best EMA pseudo-Dice is at least ``patience`` epochs old.

    Computed from nnU-Net's own log on every call (no state), so a resumed run decides the same.
    A NaN (no foreground in a validation batch) never counts as an improvement.
    """
    if patience is None or not ema_dice_per_epoch:
        return False
    values = [v if math.isfinite(v) else -math.inf for v in ema_dice_per_epoch]
    best_epoch = max(range(len(values)), key=lambda i: (values[i], -i))  # first epoch reaching the best
    return len(values) - 1 - best_epoch >= patience


def swin_compatible_patch_size(patch_size: list[int] | tuple[int, ...]) -> list[int]:
    """Round every axis to the nearest multiple of the encoder stride (32, ties up), at least 64.

    Rounding to the nearest multiple keeps the patch volume close to what nnU-Net planned for the
    GPU budget; the floor of 64 avoids a 1-voxel bottleneck, which fails in training.
    """
    return [max(2 * ENCODER_STRIDE, math.floor(n / ENCODER_STRIDE + 0.5) * ENCODER_STRIDE) for n in patch_size]


def fitted_batch_size(batch_size: int, old_patch: list[int], new_patch: list[int]) -> int:
    """Shrink the batch size when the patch volume grew, keeping voxels per step roughly constant.

    Never below 2 (nnU-Net's minimum) unless the plans already asked for less.
    """
    old_volume = old_patch[0] * old_patch[1] * old_patch[2]
    new_volume = new_patch[0] * new_patch[1] * new_patch[2]
    if new_volume <= old_volume:
        return batch_size
    return max(min(2, batch_size), int(batch_size * old_volume / new_volume))


def with_epochs(recipe: FineTuneRecipe, epochs: int) -> FineTuneRecipe:
    """``recipe`` trained for ``epochs`` epochs; the warm-up is shortened when it would not fit."""
    return replace(recipe, num_epochs=epochs, warmup_epochs=min(recipe.warmup_epochs, epochs - 1))
