"""Where training stands at one step (:class:`StepContext`), as the engine hands it to methods and blocks.

It sits below ``methods`` and the blocks (``teacher``, ``masking`` ...) so that a block can take it
without importing the methods; ``methods.base`` re-exports it as part of the method contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nnunet_ssl.pretraining.distributed import Collectives, step_generator


@dataclass(frozen=True)
class StepContext:
    """Where training stands, for per-step schedules (teacher temperature, EMA momentum).

    Attributes:
        step: Global optimisation step, 0-based.
        steps_per_epoch: Optimisation steps in one pass over the pretraining volumes.
        total_steps: Steps of the whole run.
        seed: Run seed; with the rank and the step it keys :attr:`generator`.
        collectives: Cross-rank operations (identities in a single process).
        generator: CPU generator of this step on this rank, keyed by ``(seed, rank, step)``: every
            mask and augmentation draws from it (never from the global RNG), so ranks differ and a
            resumed run repeats the draws of the uninterrupted one. Built in ``__post_init__``.
    """

    step: int
    steps_per_epoch: int
    total_steps: int
    seed: int = 0
    collectives: Collectives = field(default_factory=Collectives)
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "generator", step_generator(self.seed, self.collectives.rank, self.step))

    @property
    def epoch(self) -> float:
        """Fractional epoch (``step / steps_per_epoch``): per-epoch schedules use it."""
        return self.step / self.steps_per_epoch
