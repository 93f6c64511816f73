"""The nnU-Net trainer classes behind every named trainer.

:class:`PluginTrainerBase` holds what every plugin trainer does, whatever its network: what an
invocation asks beyond nnU-Net's constructor arguments (``-pretrained_weights``, ``--val``, the
``NNUNET_SSL_*`` variables, read once in the constructor through :mod:`nnunet_ssl.trainers.inputs`),
seeding, the fine-tuning policy (:class:`~nnunet_ssl.trainers.policy_trainer.FineTunePolicyMixin`),
the recipe's optimizer and schedule, few-shot folds and early stopping. Two families build on it:

* :class:`SwinTrainerBase` (here): the Swin encoder + SwinUNETR decoder of a preset, whatever the plans'
  architecture;
* :class:`~nnunet_ssl.trainers.resenc.ResEncTrainerBase`: nnU-Net's ResEnc U-Net built from the plans,
  as nnU-Net's own trainer builds it.

A named trainer sets class attributes and nothing else:

* ``preset_name`` (Swin only): the architecture preset (``nnunet_ssl.networks.PRESETS``);
* ``method``: the SSL method whose weights it expects, or None for training from scratch;
* ``recipe``: a :class:`FineTuneRecipe` (optimizer, schedule, epochs, warm-up fractions).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.networks.segmentation import SwinUNETRSeg, unwrap
from nnunet_ssl.optim import decay_parameter_groups
from nnunet_ssl.splits import FoldEntry, manifest_entry_for_fold
from nnunet_ssl.trainers.epoch_progress import InEpochProgress
from nnunet_ssl.trainers.inputs import (
    EPOCHS_ENV,
    PRETRAINED_WEIGHTS_OPTION,
    SEED_ENV,
    TrainerInputError,
    TrainerInputs,
    refuse_under_nnunet_train,
)
from nnunet_ssl.trainers.policy import FineTunePolicy
from nnunet_ssl.trainers.policy_trainer import NO_POLICY_ORIGIN, FineTunePolicyMixin
from nnunet_ssl.trainers.recipe import (
    SGD_MOMENTUM,
    FineTuneRecipe,
    checkpoint_interval,
    fitted_batch_size,
    recipe_lr,
    scaled_warmups,
    should_stop_early,
    swin_compatible_patch_size,
    with_epochs,
)
from nnunet_ssl.trainers.seeding import CHECKPOINT_KEY, process_seed, seed_process, worker_seeds
from nnunet_ssl.weights.format import WeightsError, encoder_digest
from nnunet_ssl.weights.intensity import intensity_report
from nnunet_ssl.weights.preflight import preflight_weights

#: Output strides of the decoder's heads, highest resolution first (see SwinUNETRDecoder).
HEAD_STRIDES = (1, 2, 4, 8, 16)


def stopping_text(patience: int | None, epochs: int) -> str:
    """How a run of ``epochs`` stops early, for the training log (never a patience longer than the run)."""
    if patience is None:
        return "no early stopping"
    if patience >= epochs:
        return f"no early stopping (its patience of {patience} epochs is not shorter than the run)"
    return f"early stopping after {patience} epochs without a better EMA pseudo-Dice"


class EarlyStop(Exception):
    """Raised at the end of an epoch to leave nnU-Net's training loop early (caught in run_training)."""


class RecipeLRScheduler(_LRScheduler):
    """The recipe's per-epoch schedule, stepped as nnU-Net does: ``step(current_epoch)``.

    The recipe gives the epoch's lr (:func:`~nnunet_ssl.trainers.recipe.recipe_lr`: warm-up + cosine, or
    poly after the policy's warm-ups); each param group then gets ``policy.group_lr(group, lr, epoch)``:
    scaled (LLRD), ramped or zeroed (frozen) for the encoder groups of a fine-tuning policy, ramped
    for every group during a whole-network warm-up.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, recipe: FineTuneRecipe, policy: FineTunePolicy | None = None
    ) -> None:
        self.recipe = recipe
        self.policy = policy or FineTunePolicy()
        self.counter = 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.counter
            self.counter += 1
        policy = self.policy
        lr = recipe_lr(self.recipe, current_step, policy.freeze_encoder_epochs, policy.network_lr_warmup_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = policy.group_lr(group, lr, current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


#: The Swin recipe's scheduler, by the name it had when it was the only one.
WarmupCosineLRScheduler = RecipeLRScheduler


class PluginTrainerBase(FineTunePolicyMixin, nnUNetTrainer):
    """What every nnunet-ssl trainer does, whatever its network (see the module docstring).

    Subclasses say how the plans are adapted (:meth:`adapt_plans`), how a ``-pretrained_weights`` file is
    checked before nnU-Net creates anything (:meth:`check_pretrained_weights_early`) and what is logged
    about the weights when training starts (:meth:`log_weights_provenance`).
    """

    #: The network family (:data:`nnunet_ssl.networks.family.FAMILIES`) the trainer trains.
    family: ClassVar[str] = "swin"
    method: ClassVar[str | None] = None
    recipe: ClassVar[FineTuneRecipe] = FineTuneRecipe()
    #: Set by nnUNetTrainer.__init__ (untyped): the constructor arguments every checkpoint saves as ``init_args``.
    my_init_kwargs: dict[str, Any]

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ) -> None:
        plan_notes = self.adapt_plans(plans, configuration)
        try:  # every input checked before nnU-Net creates the results folder
            self.trainer_inputs = TrainerInputs.read()
            self.weights_metadata = self.check_pretrained_weights_early(
                self.trainer_inputs, plans, configuration, dataset_json)
            requested = self.requested_finetune_policy(self.trainer_inputs, self.weights_metadata)
        except TrainerInputError as error:
            refuse_under_nnunet_train(error)
            raise
        self.seed = self.trainer_inputs.seed
        if self.seed is not None:
            seed_process(self.seed)  # before nnU-Net builds anything that draws random numbers
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.my_init_kwargs[CHECKPOINT_KEY] = self.seed  # saved in every checkpoint's init_args
        for note in plan_notes:
            self.print_to_log_file(note)
        self.print_to_log_file(
            f"{SEED_ENV} not set: unseeded, as nnU-Net (set it for reproducible runs)" if self.seed is None else
            f"{SEED_ENV}={self.seed}: Python, NumPy and torch seeded; data-loader workers get derived seeds"
        )
        self.split_entry: FoldEntry | None = manifest_entry_for_fold(self.preprocessed_dataset_folder_base, fold)
        self.active_recipe = self.recipe_for_fold(self.split_entry)
        epochs = self.trainer_inputs.epochs
        if epochs is not None:
            self.active_recipe = with_epochs(self.active_recipe, epochs)
            self.print_to_log_file(
                f"{EPOCHS_ENV}={epochs}: training for {epochs} epochs (warm-up {self.active_recipe.warmup_epochs}), "
                f"{stopping_text(self.active_recipe.early_stopping_patience, epochs)}")
        self._requested_policy = self.recipe_warmup_policy(*requested)
        self.initial_lr = self.active_recipe.initial_lr
        self.weight_decay = self.active_recipe.weight_decay
        self.num_epochs = self.active_recipe.num_epochs
        self.save_every = checkpoint_interval(self.num_epochs)
        self.num_iterations_per_epoch = self.active_recipe.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.active_recipe.val_iterations_per_epoch
        #: Progress inside the running epoch (set at each epoch's start).
        self._epoch_clock: InEpochProgress | None = None

    def log_intensity_report(self, intensity: dict[str, Any] | None) -> None:
        """Log how the plans map intensities against the weights file's pretraining ``intensity`` record: the
        scheme check and the difference measured on a few of the dataset's raw images (a warning when far)."""
        report = intensity_report(intensity, self.plans_manager.plans, self.configuration_name, self.dataset_json)
        for note in report.notes:
            self.print_to_log_file(f"intensities: {note}")
        for warning in report.warnings:
            self.print_to_log_file(f"WARNING: {warning}")

    @classmethod
    def adapt_plans(cls, plans: dict, configuration: str) -> list[str]:
        """Check (and where the family needs it, change) the plans dict before nnU-Net reads it; log lines."""
        return []

    def recipe_warmup_policy(self, policy: FineTunePolicy, origin: str) -> tuple[FineTunePolicy, str]:
        """The run's policy: the requested one, or, when none was set, the recipe's warm-ups scaled to the run.

        A recipe with warm-up fractions (the Spark3D fine-tuning) turns them into ``freeze_encoder_epochs``
        and ``network_lr_warmup_epochs`` for the epochs this fold trains (:func:`scaled_warmups`), so a
        shortened run (``NNUNET_SSL_EPOCHS``, a CPU trial) keeps the paper's proportions.
        """
        recipe = self.active_recipe
        if origin != NO_POLICY_ORIGIN or not (recipe.decoder_warmup_fraction or recipe.network_warmup_fraction):
            return policy, origin
        decoder, network = scaled_warmups(recipe.decoder_warmup_fraction, recipe.network_warmup_fraction,
                                          recipe.num_epochs)
        scaled = FineTunePolicy(freeze_encoder_epochs=decoder, network_lr_warmup_epochs=network)
        return scaled, (f"recipe of {self.__class__.__name__}: warm-ups of {recipe.decoder_warmup_fraction:.4g} and "
                        f"{recipe.network_warmup_fraction:.4g} of {recipe.num_epochs} epochs")

    def recipe_for_fold(self, entry: FoldEntry | None) -> FineTuneRecipe:
        """The few-shot schedule on folds ``nnunet-ssl split --shots`` made, the recipe otherwise."""
        if entry is None or entry.kind != "few_shot":
            if entry is not None:
                self.print_to_log_file(
                    f"fold {entry.fold}: data-limited fold of {entry.size} cases (seed {entry.seed}) from "
                    "splits_manifest.json; standard schedule"
                )
            return self.recipe
        recipe = self.recipe.for_few_shot()
        self.print_to_log_file(
            f"fold {entry.fold}: {entry.size}-shot fold (seed {entry.seed}) from splits_manifest.json; few-shot "
            f"schedule: {recipe.num_epochs} epochs, {stopping_text(recipe.early_stopping_patience, recipe.num_epochs)}"
        )
        return recipe

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self) -> tuple[Any, ...]:  # noqa: N802 - nnU-Net's name
        """nnU-Net's augmentation settings; test-time mirroring only if the recipe asks for it.

        Training still mirrors as augmentation. ``inference_allowed_mirroring_axes`` is saved in the
        checkpoints, so the final validation, ``--val`` and ``nnUNetv2_predict`` all follow the recipe.
        """
        settings = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.active_recipe.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None
            self.print_to_log_file(
                f"{self.__class__.__name__}: test-time mirroring is off (short variant): the final validation and "
                "nnUNetv2_predict predict each case once, without mirrored copies"
            )
        return settings

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, _LRScheduler]:
        """The recipe's optimizer over the policy's param groups, with :class:`RecipeLRScheduler`.

        ``adamw``: no weight decay on norms, biases and position tables. ``sgd``: nnU-Net's
        (``nnUNetTrainer.configure_optimizers``): momentum 0.99, Nesterov, every parameter decayed.
        """
        adamw = self.active_recipe.optimizer == "adamw"
        groups = self.finetune_parameter_groups(self.weight_decay, exempt_norms_and_biases=adamw)
        if groups is None:  # the empty policy
            groups = decay_parameter_groups(self.network, self.weight_decay) if adamw else \
                [{"params": list(self.network.parameters()), "weight_decay": self.weight_decay}]
        optimizer: torch.optim.Optimizer
        if adamw:
            optimizer = torch.optim.AdamW(groups, lr=self.initial_lr)
        else:
            optimizer = torch.optim.SGD(groups, lr=self.initial_lr, weight_decay=self.weight_decay,
                                        momentum=SGD_MOMENTUM, nesterov=True)
        return optimizer, RecipeLRScheduler(optimizer, self.active_recipe, self.finetune_policy)

    # ------------------------------------------------------------------ seeding
    def get_dataloaders(self) -> tuple[Any, Any]:
        """nnU-Net's data loaders; with a seed, its background workers restarted with derived seeds.

        nnU-Net starts its ``NonDetMultiThreadedAugmenter`` workers with ``seeds=None``. With a seed
        they are stopped and restarted on the same data loaders and transforms with seeds from
        (seed, stream, epoch, DDP rank); the training process is reseeded for the epoch training starts at.
        """
        if self.seed is not None:
            seed_process(process_seed(self.seed, self.current_epoch, self.local_rank))
        train, val = super().get_dataloaders()
        if self.seed is None:
            return train, val
        return self._seeded_augmenter(train, "train", self.seed), self._seeded_augmenter(val, "val", self.seed)

    def _seeded_augmenter(self, augmenter: Any, stream: str, seed: int) -> Any:
        if not isinstance(augmenter, NonDetMultiThreadedAugmenter):
            self.print_to_log_file(f"{stream} data loaded in the training process (seeded with it)")
            return augmenter  # SingleThreadedAugmenter (nnUNet_n_proc_DA=0): the process RNG is seeded
        augmenter._finish()
        seeds = worker_seeds(seed, stream, self.current_epoch, augmenter.num_processes, self.local_rank)
        seeded = NonDetMultiThreadedAugmenter(
            augmenter.generator, augmenter.transform, augmenter.num_processes, num_cached=augmenter.num_cached,
            seeds=seeds, pin_memory=augmenter.pin_memory, wait_time=augmenter.wait_time,
        )
        _ = next(seeded)  # started and primed as nnU-Net does
        order = "" if augmenter.num_processes == 1 else (
            " (batch order across workers still depends on timing; nnUNet_n_proc_DA=1 makes it fixed)"
        )
        self.print_to_log_file(f"{stream} data-loader worker seeds (epoch {self.current_epoch}): {seeds}{order}")
        return seeded

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's loading; the checkpoint's init_args then record this run's seed."""
        super().load_checkpoint(filename_or_checkpoint)
        previous = self.my_init_kwargs.get(CHECKPOINT_KEY)
        if previous != self.seed:
            self.print_to_log_file(f"the checkpoint was trained with {SEED_ENV}={previous}; continuing with {self.seed}")
        self.my_init_kwargs = {**self.my_init_kwargs, CHECKPOINT_KEY: self.seed}

    # ------------------------------------------------------------------ splits and early stopping
    def do_split(self) -> tuple[list[str], list[str]]:
        """nnU-Net's split, plus a log of the exact cases of a fold made by ``nnunet-ssl split``."""
        train_keys, val_keys = super().do_split()
        entry = self.split_entry
        if entry is not None:
            matches = sorted(train_keys) == sorted(entry.train) and sorted(val_keys) == sorted(entry.val)
            self.print_to_log_file(
                f"fold {entry.fold} training cases ({len(train_keys)}): {', '.join(sorted(train_keys))}\n"
                f"fold {entry.fold} validation cases ({len(val_keys)}): {', '.join(sorted(val_keys))}\n"
                + ("(as listed in splits_manifest.json)" if matches else
                   "WARNING: splits_final.json and splits_manifest.json disagree on this fold; training uses "
                   "splits_final.json. Run `nnunet-ssl split --list` to check.")
            )
        return train_keys, val_keys

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        patience = self.active_recipe.early_stopping_patience
        history = [float(v) for v in self.logger.get_value("ema_fg_dice", step=None)]
        if self.current_epoch < self.num_epochs and should_stop_early(history, patience):
            self.print_to_log_file(
                f"Early stopping after epoch {self.current_epoch - 1}: no better EMA pseudo-Dice for {patience} "
                f"epochs (best {max(history):.4f}); checkpoint_best.pth holds the best weights."
            )
            raise EarlyStop

    def run_training(self) -> None:
        try:
            super().run_training()
        except EarlyStop:
            self.on_train_end()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_clock = InEpochProgress(self.num_iterations_per_epoch, self.active_recipe.progress_every_s)

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        line = self._epoch_clock.step(float(result["loss"])) if self._epoch_clock is not None else None
        if line:
            self.print_to_log_file(f"Epoch {self.current_epoch}: {line}")
        return result

    # ------------------------------------------------------------------ pretrained weights
    @classmethod
    def check_pretrained_weights_early(
        cls, inputs: TrainerInputs, plans: dict, configuration: str, dataset_json: dict
    ) -> dict | None:
        """Check ``-pretrained_weights`` before nnU-Net creates the results folder; the file's metadata.

        nnU-Net builds the trainer, initialises it and only then loads the file with bare assertions,
        after the fold folder and its log exist. Returns the file's metadata (None without the option).
        This base checks the network this trainer builds for these plans, key by key and shape by shape.

        Raises:
            TrainerInputError: the file does not fit the network this trainer builds for these plans.
        """
        if inputs.pretrained_weights is None:
            return None
        try:
            return preflight_weights(inputs.pretrained_weights, cls, plans, configuration, dataset_json,
                                     continue_training=bool(plans.get("continue_training")))
        except WeightsError as error:
            raise TrainerInputError(PRETRAINED_WEIGHTS_OPTION, str(error)) from error

    def on_train_start(self) -> None:
        super().on_train_start()
        self.log_weights_provenance()

    def log_weights_provenance(self) -> None:
        """Say which weights the network starts from (nnU-Net has loaded ``-pretrained_weights`` by now)."""

    def warn_no_pretrained_weights(self, scratch_trainer: str) -> None:
        """Log, loudly, that a trainer of a pretraining method starts from scratch."""
        banner = "!" * 80
        self.print_to_log_file(
            f"\n{banner}\nWARNING: {self.__class__.__name__} expects {self.method} pretrained weights, but none "
            f"were loaded: this run starts FROM SCRATCH.\nPass -pretrained_weights FILE "
            f"(made by `nnunet-ssl export`), or use {scratch_trainer} for a scratch baseline.\n{banner}"
        )


class SwinTrainerBase(PluginTrainerBase):
    """nnU-Net trainer for the Swin encoder + SwinUNETR decoder of ``preset_name``."""

    family: ClassVar[str] = "swin"
    preset_name: ClassVar[str] = "smit"

    @classmethod
    def adapt_plans(cls, plans: dict, configuration: str) -> list[str]:
        return cls.fit_plans_to_swin(plans, configuration)

    # ------------------------------------------------------------------ plans and network
    @classmethod
    def fit_plans_to_swin(cls, plans: dict, configuration: str) -> list[str]:
        """Make the configuration's patch size usable by the Swin encoder, in the plans dict itself.

        Done before ``nnUNetTrainer.__init__`` so that training, the saved plans.json and inference
        all use the fitted patch size. Deterministic, so every fold writes the same plans.
        Returns log lines describing the changes.
        """
        manager = PlansManager(plans).get_configuration(configuration)
        patch = list(manager.patch_size)
        if len(patch) != 3:
            raise ValueError(
                f"{cls.__name__} needs a 3D configuration (3d_fullres, 3d_lowres); "
                f"{configuration!r} has a {len(patch)}-D patch size {patch}"
            )
        fitted = swin_compatible_patch_size(patch)
        if fitted == patch:
            return []
        batch = manager.batch_size
        new_batch = fitted_batch_size(batch, patch, fitted)
        entry = plans["configurations"][configuration]
        entry["patch_size"] = fitted
        entry["batch_size"] = new_batch
        return [
            f"{cls.__name__}: patch size {patch} -> {fitted} (every axis a multiple of 32 and >= 64 for the "
            f"Swin encoder); batch size {batch} -> {new_batch}"
        ]

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """Build the Swin network of ``cls.preset_name`` (nnU-Net calls this for training and inference)."""
        return SwinUNETRSeg(
            get_preset(cls.preset_name), num_input_channels, num_output_channels, enable_deep_supervision
        )

    def _get_deep_supervision_scales(self) -> list[list[float]] | None:
        if not self.enable_deep_supervision:
            return None
        return [[1.0 / s] * 3 for s in HEAD_STRIDES]

    def log_weights_provenance(self) -> None:
        """Say which weights the network starts from, or warn loudly when expected weights are absent."""
        network = unwrap(self.network)
        if not isinstance(network, SwinUNETRSeg):
            raise TypeError(f"{self.__class__.__name__} trains a SwinUNETRSeg, not a {type(network).__name__}")
        if self.current_epoch > 0:
            return  # a resumed run: the checkpoint, not an export, defines the weights
        tag = network.provenance()
        if tag is None:
            if self.method is None:
                self.print_to_log_file(f"{self.__class__.__name__}: training from scratch (no pretrained weights).")
                return
            self.warn_no_pretrained_weights("SwinScratchTrainer")
            return
        digest = encoder_digest(network.encoder.state_dict())
        status = "verified" if digest == tag.get("digest") else f"MISMATCH: encoder now has digest {digest}"
        self.print_to_log_file(
            f"Pretrained weights loaded: method={tag.get('method')} preset={tag.get('preset')} "
            f"digest={tag.get('digest')} ({status})"
        )
        if tag.get("channels"):
            self.print_to_log_file(f"Input channels adapted at export: {tag['channels']} (nnunet-ssl export --channels)")
        if self.method is not None and tag.get("method") != self.method:
            self.print_to_log_file(
                f"WARNING: {self.__class__.__name__} is the {self.method} trainer but the weights come from "
                f"{tag.get('method')}; results will be filed under the wrong method."
            )
        self.log_intensity_report((self.weights_metadata or {}).get("intensity"))

