"""What every pretraining method provides to the engine.

A method is an ``nn.Module`` that owns its student encoder, heads, optional EMA teacher and loss.
The engine owns the optimiser, schedules of the learning rate, autocast, DDP, checkpoints and logs.
Methods never subclass one another; they compose ``masking``, ``ema``, ``heads`` and ``losses``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import Tensor, nn


@dataclass(frozen=True)
class StepContext:
    """Where training stands, for per-step schedules (teacher temperature, EMA momentum).

    Attributes:
        step: Global optimisation step, 0-based.
        steps_per_epoch: Optimisation steps in one pass over the pretraining volumes.
        total_steps: Steps of the whole run.
    """

    step: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epoch(self) -> float:
        """Fractional epoch (``step / steps_per_epoch``): per-epoch schedules use it."""
        return self.step / self.steps_per_epoch


class PretrainingMethod(Protocol):
    """The engine's view of a method (see ``methods/smit.py`` for a full example).

    Batches come from the loader as ``{"views": Tensor (B, V, C, D, H, W)}`` with intensities in
    [0, 1]; ``V == num_views`` crops per volume (overlapping crops of one region when V > 1).
    """

    name: ClassVar[str]
    num_views: ClassVar[int]

    def training_step(self, batch: dict[str, Tensor], context: StepContext) -> dict[str, Tensor]:
        """Forward pass and loss. Returns scalars to log; ``"loss"`` is what the engine back-propagates."""
        ...

    def before_optimizer_step(self, context: StepContext) -> None:
        """Called after backward, before the optimiser step (e.g. DINO's frozen last layer in epoch 0)."""
        ...

    def after_step(self, context: StepContext) -> None:
        """Called after each optimiser step (e.g. the EMA teacher update)."""
        ...

    def student_modules(self) -> nn.Module:
        """Everything the optimiser updates (student encoder and heads; never the teacher)."""
        ...

    def encoder_state(self, source: str = "default") -> dict[str, Tensor]:
        """Encoder weights to export: ``"student"``, ``"teacher"`` or the method's default."""
        ...
