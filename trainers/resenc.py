"""Trainers of the ResEnc family: nnU-Net's residual-encoder U-Net, built from the plans as nnU-Net builds it.

The network is whatever the plans' ``architecture`` entry says, built by nnU-Net's own
``nnUNetTrainer.build_network_architecture`` (DNA's ``ResidualEncoderUNet``, no class of ours), so one
trainer serves both plans of the Spark3D paper's comparison (SSL_METHODS.md card 10):

* ``nnunet-ssl plan -d D --family resenc`` (plans ``nnUNetResEncSSLPlans``): the pretraining topology
  (``resenc_l``: 1 mm, ResEnc-L), so a Spark3D weights file always fits; the Spark3D fine-tuning and
  the "No (Fixed)" scratch baseline train on these;
* ``nnUNetv2_plan_and_preprocess -d D -pl nnUNetPlannerResEncL`` (plans ``nnUNetResEncUNetLPlans``):
  nnU-Net's dynamic ResEnc-L plans, the "No (Dyn.)" scratch baseline.

What the family adds to :class:`~nnunet_ssl.trainers.base.PluginTrainerBase` (inputs, seeding, policies,
recipe, few-shot folds):

* the plans must name a ``ResidualEncoderUNet`` (refused before nnU-Net creates anything otherwise);
* ``-pretrained_weights``: the file's network record (family, preset, architecture) is compared with the
  plans' architecture before nnU-Net creates anything; a file of another topology is refused in one line
  naming the ``nnunet-ssl plan`` command that plans its topology;
* the network has no provenance buffer (it is DNA's class), so when training starts the encoder's digest
  is compared with the file's ``encoder_digest`` (nnU-Net loaded the file between ``initialize()`` and
  ``on_train_start``, with no hook of ours): ``pretrained weights verified: ...`` in the training log, or
  training stops on a mismatch.
"""
from __future__ import annotations

from typing import Any, ClassVar

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ssl.checkpoints import read_torch_file
from nnunet_ssl.networks import resenc
from nnunet_ssl.networks.family import get_family, shown_differences
from nnunet_ssl.networks.segmentation import unwrap
from nnunet_ssl.trainers.base import PluginTrainerBase
from nnunet_ssl.trainers.inputs import PRETRAINED_WEIGHTS_OPTION, TrainerInputError, TrainerInputs
from nnunet_ssl.weights.format import WeightsError, encoder_digest, weights_family

#: The plans ``nnunet-ssl plan --family resenc`` writes by default (the family's name for them).
SSL_PLANS_NAME = get_family("resenc").ssl_plans


class PretrainedWeightsMismatch(RuntimeError):
    """The network's encoder is not the one the ``-pretrained_weights`` file holds (raised at train start)."""


class ResEncTrainerBase(PluginTrainerBase):
    """nnU-Net trainer of the ResEnc family: the plans' ``ResidualEncoderUNet``, with the plugin's recipe and policies."""

    family: ClassVar[str] = "resenc"
    #: The preset this trainer's schedule is meant for (its network comes from the plans): what an experiment
    #: arm's ``preset`` picks, as a Swin trainer's ``preset_name`` does.
    schedule_preset: ClassVar[str] = "resenc_l"
    #: Scratch trainer named in the warning when a pretrained trainer gets no weights.
    scratch_trainer: ClassVar[str] = "ResEncScratchTrainer"

    @classmethod
    def adapt_plans(cls, plans: dict, configuration: str) -> list[str]:
        """Refuse plans whose configuration is not a 3D ``ResidualEncoderUNet``; the plans are not changed.

        Raises:
            ValueError: naming the plans, the class they build and the commands that plan a ResEnc.
        """
        manager = PlansManager(plans).get_configuration(configuration)
        architecture = plans["configurations"][configuration].get("architecture") or {}
        class_name = architecture.get("network_class_name")
        dataset = plans.get("dataset_name", "DATASET")
        if resenc.ALLOWED_CLASSES.get(str(class_name)) is not ResidualEncoderUNet or len(manager.patch_size) != 3:
            raise ValueError(
                f"{cls.__name__} trains nnU-Net's 3D ResidualEncoderUNet, but plans {plans.get('plans_name')!r} "
                f"({configuration}) build {class_name!r} with a {len(manager.patch_size)}-D patch: plan the dataset "
                f"with `nnunet-ssl plan -d {dataset} --family resenc` (-p {SSL_PLANS_NAME}) or "
                f"`nnUNetv2_plan_and_preprocess -d {dataset} -pl nnUNetPlannerResEncL` (-p nnUNetResEncUNetLPlans)"
            )
        preset = resenc.preset_of_architecture(architecture)
        topology = f"preset {preset!r}" if preset else "a topology no preset has (nnU-Net's dynamic plans)"
        return [f"{cls.__name__}: nnU-Net's ResidualEncoderUNet from plans {plans.get('plans_name')!r} "
                f"({configuration}): {topology}, patch {list(manager.patch_size)}"]

    # ------------------------------------------------------------------ pretrained weights
    @classmethod
    def check_pretrained_weights_early(
        cls, inputs: TrainerInputs, plans: dict, configuration: str, dataset_json: dict
    ) -> dict | None:
        """The file's network record against the plans' architecture, then every key and shape (the base's check).

        Raises:
            TrainerInputError: a file of another family or topology (naming the plan command of its
                topology), or one that does not fit key by key.
        """
        path = inputs.pretrained_weights
        if path is None:
            return None
        try:
            payload = read_torch_file(path, "weights file", mmap=True)  # only the metadata is read here
        except (OSError, ValueError):
            payload = None  # the base's check words the error
        metadata = payload.get("metadata") if isinstance(payload, dict) else None
        if isinstance(metadata, dict):
            try:
                cls.check_weights_record(str(path), metadata, plans, configuration)
            except WeightsError as error:
                raise TrainerInputError(PRETRAINED_WEIGHTS_OPTION, str(error)) from error
        return super().check_pretrained_weights_early(inputs, plans, configuration, dataset_json)

    @classmethod
    def check_weights_record(cls, path: str, metadata: dict[str, Any], plans: dict, configuration: str) -> None:
        """Refuse a weights file whose network record is not the plans' ResEnc topology.

        A file without a record (nnU-Net's or nnssl's own checkpoints) is left to the key-and-shape check.

        Raises:
            WeightsError: one line naming the file, what it holds, how the plans differ and the fix.
        """
        family = weights_family(metadata, path)
        if family is None:
            return
        if family.name != cls.family:
            raise WeightsError(
                f"{path}: holds a {family.describe(metadata)} network, but {cls.__name__} trains nnU-Net's ResEnc U-Net "
                "from the plans: train it with a trainer of its family (`nnunet-ssl trainers`), or export a ResEnc "
                "pretraining run (e.g. `nnunet-ssl pretrain --method spark3d`) for this trainer"
            )
        architecture = plans["configurations"][configuration].get("architecture")
        differences = family.plans_differences(metadata, architecture)
        if not differences:
            return
        plan = family.plan_command(metadata, plans.get("dataset_name", "DATASET"))
        fix = (f"{plan} and train with -p {SSL_PLANS_NAME}" if plan
               else "plans whose architecture is the file's (its metadata 'architecture')")
        raise WeightsError(
            f"{path}: holds a {family.describe(metadata)} encoder, but plans {plans.get('plans_name')!r} "
            f"({configuration}) build another ResEnc topology ({shown_differences(differences, 3)}). Fix: plan the "
            f"dataset with {fix}"
        )

    def log_weights_provenance(self) -> None:
        """Verify the weights nnU-Net loaded: the encoder's digest against the file's ``encoder_digest``.

        Raises:
            PretrainedWeightsMismatch: the encoder is not the file's (after the reason was logged).
        """
        if self.current_epoch > 0:
            return  # a resumed run: the checkpoint, not an export, defines the weights
        path = self.trainer_inputs.pretrained_weights
        name = self.__class__.__name__
        if path is None:
            if self.method is None:
                self.print_to_log_file(f"{name}: training from scratch (no pretrained weights).")
            else:
                self.warn_no_pretrained_weights(self.scratch_trainer)
            return
        metadata = self.weights_metadata or {}
        expected = metadata.get("encoder_digest")
        encoder = get_family(self.family).encoder(unwrap(self.network))
        digest = encoder_digest(encoder.state_dict())
        if not expected:
            self.print_to_log_file(
                f"WARNING: {path} has no nnunet-ssl metadata (encoder_digest): nnU-Net loaded it, but which encoder it "
                f"holds cannot be verified (encoder digest now {digest}); `nnunet-ssl export` writes verifiable files"
            )
            return
        if digest != expected:
            message = (
                f"pretrained weights NOT verified: {path} holds encoder digest {expected}, but {name}'s encoder has "
                f"{digest} at the start of training; the weights were not loaded as exported. Training stopped."
            )
            self.print_to_log_file(f"ERROR: {message}")
            raise PretrainedWeightsMismatch(message)
        channels = metadata.get("channel_adaptation", "none")
        self.print_to_log_file(
            f"pretrained weights verified: {metadata.get('method')} encoder digest {digest} "
            f"({get_family(self.family).describe(metadata)}, decoder {metadata.get('decoder', 'fresh')}, "
            f"input channels: {channels}; {path})"
        )
        if self.method is not None and metadata.get("method") != self.method:
            self.print_to_log_file(
                f"WARNING: {name} is the {self.method} trainer but the weights come from {metadata.get('method')}; "
                "results will be filed under the wrong method."
            )
        self.log_intensity_report(metadata.get("intensity"))
