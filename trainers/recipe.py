"""The fine-tuning recipe as data (paper defaults), the learning-rate schedules, and the trainer's plan adjustments.

Two optimisations, one recipe type:

* the Swin paper's: AdamW, linear warm-up then cosine (``optimizer="adamw"``, ``schedule="cosine"``);
* nnU-Net's, for the ResEnc family and Spark3D (SSL_METHODS.md card 10): SGD with Nesterov momentum
  0.99 and polynomial decay (``optimizer="sgd"``, ``schedule="poly"``). Its warm-ups are fine-tuning
  policy keys (a decoder-only warm-up ``freeze_encoder_epochs``, then ``network_lr_warmup_epochs``),
  whose lengths the recipe gives as fractions of the epochs run (:func:`scaled_warmups`), and the
  polynomial decay starts after them (:func:`staged_poly_lr`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nnunet_ssl.networks.presets import ENCODER_STRIDE
from nnunet_ssl.optim import warmup_cosine

#: The recipe's optimizers and learning-rate schedules (see the module docstring).
RECIPE_OPTIMIZERS = ("adamw", "sgd")
RECIPE_SCHEDULES = ("cosine", "poly")
#: Exponent of nnU-Net's ``PolyLRScheduler`` (nnunetv2/training/lr_scheduler/polylr.py).
POLY_EXPONENT = 0.9
#: Momentum of nnU-Net's SGD (``nnUNetTrainer.configure_optimizers``: 0.99, Nesterov).
SGD_MOMENTUM = 0.99
#: The Spark3D paper's fine-tuning: a 12.5k-step decoder-only warm-up, a 12.5k-step whole-network warm-up,
#: then 250k steps at peak lr (275k steps in all). Each warm-up is 12.5k / 275k = 1/22 of the steps: at
#: nnU-Net's 1000 epochs of 250 steps, round(1000 / 22) = 45 epochs each, then 910 epochs of poly decay.
SPARK3D_WARMUP_FRACTION = 12_500 / 275_000


@dataclass(frozen=True)
class FineTuneRecipe:
    """Optimisation settings of a Swin trainer.

    Paper defaults (the Swin paper): AdamW, peak lr 2e-4, linear warm-up then cosine, CE + Dice with
    nnU-Net's deep supervision. Epoch counts follow nnU-Net (1000 epochs of 250 iterations); the paper
    uses 1000 epochs for many-shot and 3000 for few-shot fine-tuning, with early stopping.

    Attributes:
        few_shot_epochs: Epochs on a few-shot fold (listed as ``few_shot`` in the dataset's
            ``splits_manifest.json``); None keeps ``num_epochs``.
        early_stopping_patience: Stop when the EMA validation pseudo-Dice has not improved for this
            many epochs (every fold); None = off, nnU-Net's behaviour.
        few_shot_early_stopping_patience: The same for few-shot folds.
        test_time_mirroring: Mirror along every axis when predicting (nnU-Net's default). Off in
            the short test and demo variants: on CPU the mirrored final validation costs minutes
            per case. Saved in the checkpoint, so ``nnUNetv2_predict`` follows it too.
        optimizer: ``"adamw"`` (no decay on norms, biases and position tables) or ``"sgd"`` (nnU-Net's:
            momentum 0.99, Nesterov, every parameter decayed).
        schedule: ``"cosine"`` (``warmup_epochs`` of linear warm-up, then cosine to ``final_lr``) or
            ``"poly"`` (nnU-Net's polynomial decay after the policy's warm-ups, :func:`staged_poly_lr`).
        decoder_warmup_fraction: The trainer's default decoder-only warm-up (``freeze_encoder_epochs``)
            as a fraction of the epochs run (:func:`scaled_warmups`); 0 = none.
        network_warmup_fraction: The same for the whole-network warm-up (``network_lr_warmup_epochs``).
        progress_every_s: Seconds between progress lines inside a training epoch (iterations done,
            time, loss), for epochs that take long on a CPU; None: nnU-Net's one line set per epoch.
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
    optimizer: str = "adamw"
    schedule: str = "cosine"
    decoder_warmup_fraction: float = 0.0
    network_warmup_fraction: float = 0.0
    progress_every_s: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in RECIPE_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {RECIPE_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in RECIPE_SCHEDULES:
            raise ValueError(f"schedule must be one of {RECIPE_SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "poly" and self.warmup_epochs:
            raise ValueError("the poly schedule's warm-ups are policy keys (decoder_warmup_fraction, "
                             f"network_warmup_fraction); warmup_epochs must be 0, got {self.warmup_epochs}")
        for name in ("decoder_warmup_fraction", "network_warmup_fraction"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {getattr(self, name)!r}")
        if self.num_epochs < 1 or self.iterations_per_epoch < 1 or self.val_iterations_per_epoch < 1:
            raise ValueError("epochs and iterations must be >= 1")
        if not 0 <= self.warmup_epochs < self.num_epochs:
            raise ValueError(f"warmup_epochs must be in [0, num_epochs), got {self.warmup_epochs}")
        if self.initial_lr <= 0:
            raise ValueError(f"initial_lr must be positive, got {self.initial_lr}")
        if self.few_shot_epochs is not None and self.few_shot_epochs <= self.warmup_epochs:
            raise ValueError(f"few_shot_epochs must exceed warmup_epochs, got {self.few_shot_epochs}")
        if self.progress_every_s is not None and self.progress_every_s <= 0:
            raise ValueError(f"progress_every_s must be positive or None, got {self.progress_every_s}")
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


#: nnU-Net's interval of ``checkpoint_latest.pth`` writes (``nnUNetTrainer.save_every``), for long runs.
NNUNET_SAVE_EVERY = 50


def checkpoint_interval(num_epochs: int) -> int:
    """Epochs between ``checkpoint_latest.pth`` writes: nnU-Net's 50 for long runs, an eighth of a short run
    (at least every epoch), so that an interrupted CPU trial of 16 epochs continues with ``--c`` from at most
    2 epochs back instead of from zero (nnU-Net writes none before epoch 50)."""
    return max(1, min(NNUNET_SAVE_EVERY, num_epochs // 8))


def with_epochs(recipe: FineTuneRecipe, epochs: int) -> FineTuneRecipe:
    """``recipe`` trained for ``epochs`` epochs; the warm-up is shortened when it would not fit."""
    return replace(recipe, num_epochs=epochs, warmup_epochs=min(recipe.warmup_epochs, epochs - 1))


def scaled_warmups(decoder_fraction: float, network_fraction: float, epochs: int) -> tuple[int, int]:
    """The decoder-only and whole-network warm-up epochs of a run of ``epochs`` epochs.

    Each is ``round(fraction * epochs)``, at least 1 when its fraction is not 0, and together they
    leave at least one epoch of the schedule proper (the whole-network warm-up is shortened first,
    then the decoder's): 1000 epochs at the Spark3D fractions (:data:`SPARK3D_WARMUP_FRACTION`) give
    (45, 45), 3000 give (136, 136), 16 give (1, 1), 2 give (1, 0), 1 gives (0, 0).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")

    def scaled(fraction: float) -> int:
        return max(1, round(fraction * epochs)) if fraction > 0 else 0

    decoder, network = scaled(decoder_fraction), scaled(network_fraction)
    while decoder + network >= epochs and decoder + network > 0:
        if network >= decoder and network:
            network -= 1
        else:
            decoder -= 1
    return decoder, network


def staged_poly_lr(
    epoch: int, peak: float, num_epochs: int, decoder_warmup: int, network_warmup: int, exponent: float = POLY_EXPONENT
) -> float:
    """The recipe's lr of ``epoch`` under the poly schedule with the policy's two warm-ups (before group factors).

    * epochs ``0 .. K-1`` (``K = decoder_warmup``, the encoder frozen): a linear ramp ``peak * (e + 1) / K``
      (nnU-Net's ``Lin_incr_LRScheduler``), which only the decoder uses;
    * epochs ``K .. K+W-1`` (``W = network_warmup``): ``peak``; the policy's whole-network factor
      ``(e - K + 1) / W`` makes it the linear ramp of every group (:meth:`FineTunePolicy.network_factor`);
    * from ``S = K + W`` on: nnU-Net's poly decay over the remaining epochs,
      ``peak * (1 - (e - S) / (num_epochs - S)) ** 0.9`` (``PolyLRScheduler_offset``); without warm-ups
      exactly nnU-Net's ``PolyLRScheduler``.
    """
    if epoch < decoder_warmup:
        return peak * (epoch + 1) / decoder_warmup
    start = decoder_warmup + network_warmup
    if epoch < start:
        return peak
    remaining = max(0.0, 1.0 - (epoch - start) / max(1, num_epochs - start))
    return peak * remaining**exponent


def recipe_lr(recipe: FineTuneRecipe, epoch: int, decoder_warmup: int = 0, network_warmup: int = 0) -> float:
    """The recipe's lr of ``epoch`` (before the policy's per-group factors); the warm-ups are the policy's
    ``freeze_encoder_epochs`` and ``network_lr_warmup_epochs`` (used by the poly schedule only)."""
    if recipe.schedule == "poly":
        return staged_poly_lr(epoch, recipe.initial_lr, recipe.num_epochs, decoder_warmup, network_warmup)
    return warmup_cosine(epoch, recipe.initial_lr, recipe.warmup_epochs, recipe.num_epochs, recipe.final_lr)
