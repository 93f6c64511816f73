"""Cross-rank operations that pretraining losses need, in one place the engine owns.

Losses never call ``torch.distributed`` themselves: a method receives a :class:`Collectives` in its
:class:`~nnunet_ssl.pretraining.methods.base.StepContext` and passes it on. In a single process
(the default, and every unit test) the operations are identities, so the same loss code runs with
and without data parallelism.

- :meth:`Collectives.gather` concatenates a tensor from every rank (rank order) along dim 0, and
  gradients flow back to this rank's own slice only (NT-Xent negatives from other ranks; [TANG]
  and SimCLR's ``GatherLayer``);
- :meth:`Collectives.mean` averages a tensor over ranks without gradients (DINO/iBOT centres).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


class _GatherWithLocalGradient(torch.autograd.Function):
    """``all_gather`` whose backward returns this rank's slice of the incoming gradient.

    Every rank computes a loss on the gathered tensor; DDP averages the parameter gradients over
    ranks afterwards. Each rank's slice must therefore receive the sum of the gradients that all
    ranks' losses send to it, so the backward all-reduces (sums) the gradient before slicing.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world_size = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


@dataclass(frozen=True)
class Collectives:
    """The rank layout of a run and the two collective operations losses use.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes; 1 means no process group is used.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid rank layout: rank {self.rank} of {self.world_size}")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def gather(self, x: Tensor) -> Tensor:
        """``(n, ...)`` on every rank -> ``(world_size * n, ...)`` in rank order; gradients reach the local rows.

        Every rank must pass the same shape (DDP with ``drop_last`` gives equal batches). Take this
        rank's anchors from the gathered tensor (``gathered[local_slice(n)]``), not from ``x``, so
        that every gradient passes through the gather: then a rank's loss averaged by DDP equals
        the one-process loss on the concatenated batch.
        """
        if not self.enabled:
            return x
        return _GatherWithLocalGradient.apply(x)

    def local_slice(self, rows: int) -> slice:
        """Rows of this rank inside a tensor :meth:`gather` returned, when each rank gave ``rows``."""
        return slice(self.rank * rows, (self.rank + 1) * rows)

    @torch.no_grad()
    def mean(self, x: Tensor) -> Tensor:
        """The average of ``x`` over ranks (a new tensor; no gradient)."""
        if not self.enabled:
            return x.detach().clone()
        out = x.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator that depends on ``(seed, rank, step)`` only.

    Masks and augmentations of step ``step`` on rank ``rank`` come from it, so ranks draw
    different masks and a resumed run draws exactly the masks the uninterrupted run would have.
    The three numbers are hashed by NumPy's ``SeedSequence`` (nearby keys give unrelated streams).
    """
    if min(seed, rank, step) < 0:
        raise ValueError(f"seed, rank and step must be >= 0, got {seed}, {rank}, {step}")
    key = np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(key) & 0x7FFF_FFFF_FFFF_FFFF)
