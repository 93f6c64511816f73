"""What every pretraining method provides to the engine.

A method is an ``nn.Module`` that owns its student encoder, heads, optional EMA teacher and loss.
The engine owns the optimiser, schedules of the learning rate, autocast, DDP, checkpoints and logs.
Methods never subclass one another; they compose ``masking``, ``ema``, ``heads`` and ``losses``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from nnunet_ssl.checkpoints import PRETRAINING_ONLY_KEYS
from nnunet_ssl.pretraining.context import StepContext  # re-exported: part of the method contract

#: The network family of a method class that declares none: every method written before families existed.
DEFAULT_FAMILY = "swin"
#: ``encoder_modules`` of a method with an EMA teacher (what ``"default"`` exports) and a student branch.
TEACHER_AND_STUDENT: tuple[tuple[str, str], ...] = (("teacher", "teacher.encoder"), ("student", "student.encoder"))
#: ``encoder_modules`` of a teacher-free method that holds its encoder as ``self.encoder``.
STUDENT_ONLY: tuple[tuple[str, str], ...] = (("student", "encoder"),)


@dataclass(frozen=True)
class MethodInfo:
    """One line per method for ``nnunet-ssl pretrain --list-methods`` (each method class sets ``info``).

    Attributes:
        family: e.g. ``"masked image modelling"``, ``"self-distillation"``, ``"contrastive"``.
        views: What the student and teacher see, e.g. ``"2 crops, masked 0.75 (student)"``.
        heads: Heads and the features they read, e.g. ``"x4 -> LinearPixelHead"``.
        losses: Loss terms with their default weights, e.g. ``"MIP (L1) + 0.1 MPD + 0.1 ITD"``.
    """

    family: str
    views: str
    heads: str
    losses: str


@runtime_checkable
class EncoderExporter(Protocol):
    """What :func:`encoder_states` reads of a method: its ``encoder_modules`` (see :class:`PretrainingMethod`)."""

    encoder_modules: ClassVar[tuple[tuple[str, str], ...]]


@runtime_checkable
class PretrainingMethod(Protocol):
    """The engine's view of a method (see ``methods/smit.py`` for a full example).

    Two hooks are optional, and a method without a teacher or a frozen last layer simply does
    not define them (the engine calls them through :func:`before_optimizer_step` and
    :func:`after_step`, which skip a missing hook):

    - ``before_optimizer_step(context)``: after backward (and gradient unscaling), before
      clipping and the optimiser step, e.g. dropping the DINO heads' last-layer gradients in epoch 0;
    - ``after_step(context)``: after the optimiser step, e.g. the EMA teacher update.

    Batches come from the loader as ``{"views": Tensor (B, V, C, D, H, W)}`` with intensities in
    [0, 1] (or per-image z-scores with ``intensity="zscore"``); ``V == num_views`` crops per volume
    (overlapping crops of one region when V > 1).

    Class attributes a method may declare besides the members below (read with ``getattr``, so the
    nine Swin methods declare none of them):

    - ``family: ClassVar[str]``: the network family it pretrains, a key of
      :data:`nnunet_ssl.networks.family.FAMILIES` (absent: ``"swin"``); the class is built with a preset
      of that family (``SwinPreset`` or ``ResEncPreset``), see :func:`declared_family`;
    - ``decoder_modules: ClassVar[tuple[tuple[str, str], ...]]``: ``(role, submodule path)`` of decoders
      the checkpoints carry beside the encoders (:func:`decoder_states`), e.g. a U-Net decoder that
      fine-tuning may start from;
    - ``engine_defaults`` / ``data_defaults: ClassVar[Mapping[str, Any]]``: the method's recipe, values
      of ``EngineConfig`` / ``DataConfig`` fields that replace those classes' defaults in its runs
      (a config file and flags still override them; ``methods.apply_method_defaults``).
    """

    name: ClassVar[str]
    num_views: ClassVar[int]
    info: ClassVar[MethodInfo]
    #: ``(role, submodule path)`` of every encoder the method can export, the default first
    #: (:data:`TEACHER_AND_STUDENT` or :data:`STUDENT_ONLY`); checkpoints carry them (:func:`encoder_states`).
    encoder_modules: ClassVar[tuple[tuple[str, str], ...]]

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Forward pass and loss. Returns scalars to log; ``"loss"`` is what the engine back-propagates."""
        ...

    def student_modules(self) -> nn.Module:
        """Everything the optimiser updates (student encoder and heads; never the teacher)."""
        ...

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights to export: ``"student"``, ``"teacher"`` or the method's default."""
        ...


def method_contract(method: nn.Module) -> PretrainingMethod:
    """``method`` typed as the engine's :class:`PretrainingMethod`, once it is checked to have every member.

    Raises:
        TypeError: when the module lacks a member of the contract.
    """
    if not isinstance(method, PretrainingMethod):
        raise TypeError(f"{type(method).__name__} is not a pretraining method: it lacks a member of PretrainingMethod")
    return method


def encoder_states(method: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Every encoder the method exports, by role (``"teacher"``, ``"student"``), the default one first.

    The pretraining engine stores this in each checkpoint, so that ``nnunet-ssl export`` reads the
    encoders without building the method. The tensors are the method's own (detached, not copied):
    saved beside ``method.state_dict()`` they share its storage, and the file does not grow.
    Pretraining-only keys (the mask token) are left out, as :meth:`PretrainingMethod.encoder_state` does.
    """
    if not isinstance(method, EncoderExporter):
        raise TypeError(f"{type(method).__name__} declares no encoder_modules (see PretrainingMethod)")
    return {
        role: {k: v for k, v in method.get_submodule(path).state_dict().items() if k not in PRETRAINING_ONLY_KEYS}
        for role, path in method.encoder_modules
    }


def declared_family(method: type | object) -> str:
    """The network family a method class (or instance) declares: its ``family``, else :data:`DEFAULT_FAMILY`."""
    family = getattr(method, "family", DEFAULT_FAMILY)
    if not isinstance(family, str):
        raise TypeError(f"{getattr(method, '__name__', type(method).__name__)}.family must be a family name, got {family!r}")
    return family


def decoder_states(method: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Every decoder the method declares in ``decoder_modules``, by role; empty when it declares none.

    Like :func:`encoder_states`: the method's own tensors (not copies), so a checkpoint that stores them
    beside ``method.state_dict()`` does not grow, and pretraining-only keys are left out.
    """
    modules: tuple[tuple[str, str], ...] = getattr(method, "decoder_modules", ())
    return {
        role: {k: v for k, v in method.get_submodule(path).state_dict().items() if k not in PRETRAINING_ONLY_KEYS}
        for role, path in modules
    }


def recipe_defaults(method: type | object) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``(engine_defaults, data_defaults)`` a method class declares (empty mappings when it declares none)."""
    return getattr(method, "engine_defaults", {}), getattr(method, "data_defaults", {})


def before_optimizer_step(method: object, context: StepContext) -> None:
    """Call ``method.before_optimizer_step(context)`` if the method defines that optional hook."""
    hook = getattr(method, "before_optimizer_step", None)
    if hook is not None:
        hook(context)


def after_step(method: object, context: StepContext) -> None:
    """Call ``method.after_step(context)`` if the method defines that optional hook."""
    hook = getattr(method, "after_step", None)
    if hook is not None:
        hook(context)
