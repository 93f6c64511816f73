"""nnU-Net hooks of the fine-tuning policies (:mod:`nnunet_ssl.trainers.policy`).

Where a run's policy comes from, first match wins:

1. ``nnUNetv2_train ... --c`` (resume) and ``--val``: the policy stored in the nnU-Net checkpoint
   (``init_args["nnunet_ssl_finetune_policy"]``). A different ``NNUNET_SSL_FINETUNE`` is ignored with a
   warning in the training log, so a resumed run unfreezes at the same epoch with the same
   learning rates and its optimizer state fits its param groups. A checkpoint without the key
   (written before policies existed) resumes with the empty policy.
2. The environment variable ``NNUNET_SSL_FINETUNE`` (e.g. ``freeze_encoder_epochs=50,llrd=0.75``):
   works with every trainer, scratch included, through nnU-Net's own command line.
3. The policy stored in the ``-pretrained_weights`` file by ``nnunet-ssl export --policy``: travels
   with the weights it was chosen for.
4. The trainer class's ``finetune_policy_default`` (empty for every trainer today).

2 and 3 are the trainer's inputs (:mod:`nnunet_ssl.trainers.inputs`), read once when it is built;
:meth:`FineTunePolicyMixin.requested_finetune_policy` picks from them.

Why ``init_args``: nnU-Net 2.8.1's ``save_checkpoint`` writes a fixed set of keys (an extra
top-level key would need a copy of that method), and ``load_checkpoint`` restores ``init_args`` into
``my_init_kwargs``, which the next ``save_checkpoint`` writes again. The predictor reads only
``init_args["configuration"]``.
"""
from __future__ import annotations

from typing import Any, ClassVar

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.checkpoints import load_nnunet_checkpoint
from nnunet_ssl.networks.segmentation import unwrap
from nnunet_ssl.trainers.inputs import FINETUNE_ENV, PRETRAINED_WEIGHTS_OPTION, TrainerInputError, TrainerInputs
from nnunet_ssl.trainers.policy import (
    FineTunePolicy,
    PolicyError,
    apply_freezing,
    level_name,
    num_encoder_levels,
    parse_policy,
    policy_parameter_groups,
)

#: Key of the policy in the nnU-Net checkpoint's ``init_args``.
INIT_ARGS_KEY = "nnunet_ssl_finetune_policy"
#: Origin of the empty policy when nothing asked for one (a trainer's recipe may then set its own warm-ups).
NO_POLICY_ORIGIN = "default (none set)"


def policy_from_checkpoint(checkpoint: dict[str, Any], origin: str) -> FineTunePolicy | None:
    """The policy stored in an nnU-Net checkpoint dict, or None for a checkpoint without one."""
    stored = (checkpoint.get("init_args") or {}).get(INIT_ARGS_KEY)
    if stored is None:
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("policy"), dict):
        raise PolicyError(f"{origin}: init_args[{INIT_ARGS_KEY!r}] is not a stored policy: {stored!r}")
    return FineTunePolicy.from_dict(stored["policy"], origin=origin)


def read_checkpoint_policy(path: str) -> FineTunePolicy | None:
    """Read only what is needed of an nnU-Net checkpoint file (memory-mapped) and return its policy.

    The file is read safely (tensors, plain values and numpy scalars only,
    :func:`~nnunet_ssl.checkpoints.load_nnunet_checkpoint`). nnU-Net loads this same file right after
    with ``weights_only=False``, so a file holding anything else is refused here, before nnU-Net would
    run it.

    Raises:
        UnsafeCheckpointError: the file holds other objects (a ValueError naming the file and their types).
    """
    checkpoint = load_nnunet_checkpoint(path, mmap=True)
    return policy_from_checkpoint(checkpoint, origin=str(path))


class FineTunePolicyMixin(nnUNetTrainer):
    """Applies a :class:`FineTunePolicy` to an nnU-Net trainer whose network is of a known family (Swin, ResEnc).

    The trainer's ``configure_optimizers`` uses :meth:`finetune_parameter_groups` and passes
    :attr:`finetune_policy` to its scheduler (``group_lr``).
    """

    #: Policy string of a trainer class when neither a checkpoint, the environment nor the weights file sets one.
    finetune_policy_default: ClassVar[str] = ""
    #: The invocation's inputs and the ``-pretrained_weights`` file's metadata; the trainer sets both
    #: when it is built (defaults: no inputs, no file).
    trainer_inputs: TrainerInputs = TrainerInputs()
    weights_metadata: dict[str, Any] | None = None

    _finetune_policy: FineTunePolicy | None = None
    _finetune_policy_origin: str = "default"
    _requested_policy: tuple[FineTunePolicy, str] | None = None

    @property
    def finetune_policy(self) -> FineTunePolicy:
        return self._finetune_policy if self._finetune_policy is not None else FineTunePolicy()

    @classmethod
    def requested_finetune_policy(
        cls, inputs: TrainerInputs, weights_metadata: dict[str, Any] | None
    ) -> tuple[FineTunePolicy, str]:
        """The policy an invocation asks for (environment, weights file, class default) and its origin.

        Raises:
            TrainerInputError: the weights file's policy string does not parse.
            PolicyError: the class default does not parse.
        """
        if inputs.finetune_policy is not None:
            return inputs.finetune_policy, f"environment variable {FINETUNE_ENV}"
        text = (weights_metadata or {}).get("finetune_policy") or ""
        if text:
            path = inputs.pretrained_weights
            try:
                policy = parse_policy(text, origin=f"{path} (metadata finetune_policy={text!r})")
            except PolicyError as error:
                raise TrainerInputError(PRETRAINED_WEIGHTS_OPTION, str(error)) from error
            return policy, f"weights file {path}"
        if cls.finetune_policy_default:
            return parse_policy(cls.finetune_policy_default, f"{cls.__name__}.finetune_policy_default"), \
                f"default of {cls.__name__}"
        return FineTunePolicy(), NO_POLICY_ORIGIN

    def set_finetune_policy(self, policy: FineTunePolicy, origin: str) -> None:
        """Make ``policy`` the run's policy and record it in ``init_args`` (saved in every checkpoint)."""
        self._finetune_policy = policy
        self._finetune_policy_origin = origin
        self.my_init_kwargs[INIT_ARGS_KEY] = {"policy": policy.to_dict(), "text": policy.to_string(), "origin": origin}

    # ------------------------------------------------------------------ nnU-Net hooks
    def initialize(self) -> None:
        if not self.was_initialized and self._finetune_policy is None:
            requested = self._requested_policy or self.requested_finetune_policy(self.trainer_inputs,
                                                                                 self.weights_metadata)
            self.set_finetune_policy(*requested)
        super().initialize()
        self.print_to_log_file(
            f"Fine-tuning policy (from {self._finetune_policy_origin}): "
            f"{self.finetune_policy.describe(num_encoder_levels(unwrap(self.network)))}"
        )

    def finetune_parameter_groups(
        self, weight_decay: float, exempt_norms_and_biases: bool = True
    ) -> list[dict[str, Any]] | None:
        """The policy's param groups, or None for the empty policy (the trainer's plain groups apply).

        ``exempt_norms_and_biases``: see :func:`~nnunet_ssl.trainers.policy.policy_parameter_groups`.
        """
        policy = self.finetune_policy
        if policy.is_default:
            return None
        network = unwrap(self.network)
        policy.check_levels(num_encoder_levels(network))
        return policy_parameter_groups(network, weight_decay, policy, exempt_norms_and_biases)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Resume with the checkpoint's policy (it wins over a changed environment, with a warning)."""
        if isinstance(filename_or_checkpoint, dict):
            stored = policy_from_checkpoint(filename_or_checkpoint, "checkpoint")
        else:
            stored = read_checkpoint_policy(filename_or_checkpoint)
        origin = f"checkpoint {filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else ''}".strip()
        if stored is None:
            stored, origin = FineTunePolicy(), f"{origin} (written without a policy: none)"
        requested = self.trainer_inputs.finetune_policy
        if requested is not None and requested != stored:
            self.print_to_log_file(
                f"WARNING: {FINETUNE_ENV} asks for '{requested.to_string()}' but this run was started with "
                f"'{stored.to_string()}'; resuming keeps the checkpoint's policy. Start a new run (another "
                "fold or trainer folder) to change it."
            )
        if self.was_initialized and stored != self.finetune_policy:
            self.set_finetune_policy(stored, origin)
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
        elif self._finetune_policy is None or stored != self._finetune_policy:
            self.set_finetune_policy(stored, origin)
        super().load_checkpoint(filename_or_checkpoint)
        self.set_finetune_policy(stored, origin)  # init_args were replaced by the checkpoint's

    def on_train_epoch_start(self) -> None:
        policy = self.finetune_policy
        epoch = self.current_epoch
        apply_freezing(unwrap(self.network), policy, epoch, toggle_requires_grad=not self.is_ddp)
        if policy.freeze_encoder_epochs:
            if epoch == policy.freeze_encoder_epochs:
                ramps = [f"a linear {what} lr warm-up over {epochs} epoch(s)" for what, epochs in
                         (("encoder", policy.encoder_lr_warmup_epochs), ("whole-network", policy.network_lr_warmup_epochs))
                         if epochs]
                ramp = f" with {' and '.join(ramps)}" if ramps else ""
                self.print_to_log_file(f"Epoch {epoch}: encoder unfrozen (decoder warm-up done){ramp}")
            elif epoch < policy.freeze_encoder_epochs and not getattr(self, "_freeze_announced", False):
                self.print_to_log_file(f"Epoch {epoch}: encoder frozen until epoch {policy.freeze_encoder_epochs}")
        self._freeze_announced = True
        super().on_train_epoch_start()
        if not policy.is_default:
            lrs = level_lr_summary(self.optimizer.param_groups)
            self.print_to_log_file("Learning rates: " + ", ".join(f"{name} {lr:.3g}" for name, lr in lrs.items()))


def level_lr_summary(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """``{"decoder": lr, "stem": lr, "stage1": lr, ...}`` from policy param groups (first group of each level)."""
    summary: dict[str, float] = {}
    for group in param_groups:
        level = group.get("level")
        name = "decoder" if level is None else level_name(level)
        summary.setdefault(name, group["lr"])
    return summary
