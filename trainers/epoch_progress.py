"""Progress inside a training epoch: nnU-Net logs once per epoch, which on a CPU can be a minute apart."""
from __future__ import annotations

import time
from collections.abc import Callable


class InEpochProgress:
    """When to say how far a training epoch has got: every ``every_s`` seconds (None: never), not after its last step.

    nnU-Net logs once per epoch; a CPU trial's epoch takes 40 s on 2 cores, so the recipe asks for a
    line in between (``FineTuneRecipe.progress_every_s``).
    """

    def __init__(self, iterations: int, every_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.iterations, self.every_s, self.clock = iterations, every_s, clock
        self.started = self.last = clock()
        self.done = 0

    def step(self, loss: float) -> str | None:
        """Count one step; the progress text when it is time for one, e.g. ``10/30 training iterations (15 s), loss -0.412``."""
        self.done += 1
        now = self.clock()
        if self.every_s is None or self.done >= self.iterations or now - self.last < self.every_s:
            return None
        self.last = now
        return f"{self.done}/{self.iterations} training iterations ({now - self.started:.0f} s), loss {loss:.4f}"
