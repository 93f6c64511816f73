"""Everything a Swin trainer reads from nnU-Net's command line and the environment, in one place.

nnU-Net builds a trainer from ``nnUNetv2_train``'s arguments but hands it only the plans, the
configuration, the fold, dataset.json and the device. What else a Swin trainer needs it reads here,
once, when it is constructed (:meth:`TrainerInputs.read`); no other module of the trainers looks at
``sys.argv`` or ``os.environ``.

Command line (only when the process is nnU-Net's ``nnUNetv2_train``; see :func:`is_nnunet_train`):

* ``-pretrained_weights FILE``: checked against the network before nnU-Net creates the results
  folder; its metadata may carry a fine-tuning policy (``nnunet-ssl export --policy``).
* ``--val``: validation only; nnU-Net ignores ``-pretrained_weights`` then, and so do the trainers.

Environment:

* ``NNUNET_SSL_SEED``: seed of the run, an integer in [0, 2**32 - 1]; unset or empty: unseeded, as nnU-Net.
* ``NNUNET_SSL_EPOCHS``: epochs of the fold being trained (overrides the recipe; ``nnunet-ssl
  experiment`` sets it from the experiment file's ``epochs``).
* ``NNUNET_SSL_FINETUNE``: a fine-tuning policy string (:mod:`nnunet_ssl.trainers.policy`).
* ``nnUNet_extTrainer``: nnU-Net's own trainer search path; read by :func:`ext_trainer_folders`
  for looking trainers up by name outside a training (``nnunet_ssl.trainers.named.find_trainer``).

A value that cannot be used raises :class:`TrainerInputError` (a ValueError naming the input).
``nnUNetv2_train`` has no error handling around the trainer's constructor, so there that error would
end in a traceback; :func:`refuse_under_nnunet_train` turns it into nnU-Net's usual one-line exit
(status 1) only when the process is that command, and library callers get the error itself.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_ssl.trainers.policy import FineTunePolicy, PolicyError, parse_policy

#: The environment variable the Swin trainers read their seed from.
SEED_ENV = "NNUNET_SSL_SEED"
#: Environment variable overriding the epochs of the fold being trained.
EPOCHS_ENV = "NNUNET_SSL_EPOCHS"
#: Environment variable holding a fine-tuning policy string.
FINETUNE_ENV = "NNUNET_SSL_FINETUNE"
#: nnU-Net's trainer search path (os.pathsep-separated folders).
EXT_TRAINER_ENV = "nnUNet_extTrainer"
#: Largest seed NumPy's legacy ``np.random.seed`` (used in nnU-Net's workers) accepts.
MAX_SEED = 2**32 - 1
#: ``sys.argv[0]`` stems of nnU-Net's training command (the console script and its module).
NNUNET_TRAIN_COMMANDS = ("nnUNetv2_train", "run_training")
#: The ``nnUNetv2_train`` options the trainers read.
PRETRAINED_WEIGHTS_OPTION = "-pretrained_weights"
VALIDATION_ONLY_OPTION = "--val"


class TrainerInputError(ValueError):
    """A command-line option or environment variable a Swin trainer cannot use.

    Attributes:
        input_name: The option or variable, e.g. ``-pretrained_weights`` or ``NNUNET_SSL_SEED``.
    """

    def __init__(self, input_name: str, message: str) -> None:
        super().__init__(message)
        self.input_name = input_name


@dataclass(frozen=True)
class TrainerInputs:
    """What one ``nnUNetv2_train`` invocation asks of a Swin trainer (see the module docstring).

    Attributes:
        nnunet_train: The process is nnU-Net's ``nnUNetv2_train`` (its command line was read).
        pretrained_weights: The ``-pretrained_weights`` file, None without the option or with ``--val``.
        validation_only: ``--val`` was given.
        seed: ``NNUNET_SSL_SEED``.
        epochs: ``NNUNET_SSL_EPOCHS``.
        finetune_policy: ``NNUNET_SSL_FINETUNE`` (None when unset or empty).
    """

    nnunet_train: bool = False
    pretrained_weights: str | None = None
    validation_only: bool = False
    seed: int | None = None
    epochs: int | None = None
    finetune_policy: FineTunePolicy | None = None

    @classmethod
    def read(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainerInputs:
        """Read the inputs (default: ``sys.argv`` and ``os.environ``).

        Raises:
            TrainerInputError: for a value that cannot be used, naming the input.
        """
        argv = sys.argv if argv is None else argv
        environ = os.environ if environ is None else environ
        command = is_nnunet_train(argv)
        validation_only = command and VALIDATION_ONLY_OPTION in argv[1:]
        weights = pretrained_weights_argument(argv) if command and not validation_only else None
        return cls(
            nnunet_train=command,
            pretrained_weights=weights,
            validation_only=validation_only,
            seed=seed_from_environment(environ),
            epochs=epochs_from_environment(environ),
            finetune_policy=policy_from_environment(environ),
        )


def is_nnunet_train(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is the command line of nnU-Net's ``nnUNetv2_train`` (console script or module)."""
    return bool(argv) and Path(argv[0]).stem in NNUNET_TRAIN_COMMANDS


def pretrained_weights_argument(argv: Sequence[str]) -> str | None:
    """The value of ``nnUNetv2_train``'s ``-pretrained_weights`` option in ``argv``, if any."""
    for i, arg in enumerate(argv):
        if arg == PRETRAINED_WEIGHTS_OPTION and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{PRETRAINED_WEIGHTS_OPTION}="):
            return arg.split("=", 1)[1]
    return None


def seed_from_environment(environ: Mapping[str, str]) -> int | None:
    """The seed in ``NNUNET_SSL_SEED``; None when unset or empty.

    Raises:
        TrainerInputError: when the value is not an integer in [0, 2**32 - 1].
    """
    value = environ.get(SEED_ENV, "").strip()
    if not value:
        return None
    try:
        seed = int(value)
    except ValueError:
        raise TrainerInputError(SEED_ENV, f"{SEED_ENV}={value!r} is not an integer seed") from None
    if not 0 <= seed <= MAX_SEED:
        raise TrainerInputError(SEED_ENV, f"{SEED_ENV}={seed} is outside [0, {MAX_SEED}]")
    return seed


def epochs_from_environment(environ: Mapping[str, str]) -> int | None:
    """The epoch override in ``NNUNET_SSL_EPOCHS``; None when unset or empty.

    Raises:
        TrainerInputError: when the value is not a positive integer.
    """
    value = environ.get(EPOCHS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise TrainerInputError(EPOCHS_ENV, f"{EPOCHS_ENV}={value!r} is not a positive number of epochs")
    return int(value)


def policy_from_environment(environ: Mapping[str, str]) -> FineTunePolicy | None:
    """The policy in ``NNUNET_SSL_FINETUNE``; None when unset or empty.

    Raises:
        TrainerInputError: when the string is not a policy (the message says which entry and the form).
    """
    text = environ.get(FINETUNE_ENV)
    if text is None or not text.strip():
        return None
    try:
        return parse_policy(text, origin=f"environment variable {FINETUNE_ENV}={text!r}")
    except PolicyError as error:
        raise TrainerInputError(FINETUNE_ENV, str(error)) from error


def ext_trainer_folders(environ: Mapping[str, str] | None = None) -> list[str]:
    """The folders in ``nnUNet_extTrainer``, in nnU-Net's search order (empty entries dropped)."""
    environ = os.environ if environ is None else environ
    return [p for p in environ.get(EXT_TRAINER_ENV, "").split(os.pathsep) if p.strip()]


def refuse_under_nnunet_train(error: TrainerInputError, argv: Sequence[str] | None = None) -> None:
    """End ``nnUNetv2_train`` with one line for ``error``, as nnU-Net's own refusals do; return elsewhere.

    The caller re-raises ``error`` when this returns (a library caller, a test, nnU-Net's Python API):
    only the command whose entry point has no error handling is ended here.

    Raises:
        SystemExit: status 1 with the message, when ``argv`` is ``nnUNetv2_train``'s command line.
    """
    if is_nnunet_train(sys.argv if argv is None else argv):
        raise SystemExit(f"nnunet-ssl: refusing {error.input_name}, nothing was written.\n{error}") from None
