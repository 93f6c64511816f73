"""Collectives and per-step generators: the cross-rank contract the pretraining methods rely on."""
from __future__ import annotations

import torch
from gloo_processes import run_in_processes

from nnunet_ssl.pretraining.distributed import Collectives, step_generator
from nnunet_ssl.pretraining.methods.base import StepContext


def _sum_of_squares_loss(rank: int, world_size: int, data: torch.Tensor) -> dict[str, torch.Tensor]:
    collectives = Collectives(rank, world_size)
    rows = data.shape[0] // world_size
    local = data[collectives.local_slice(rows)].clone().requires_grad_(True)
    gathered = collectives.gather(local)
    anchors = gathered[collectives.local_slice(rows)]
    # each local anchor interacts with every gathered row, as NT-Xent negatives do; mean over local anchors
    loss = (anchors @ gathered.T).pow(2).mean()
    loss.backward()
    return {"gathered": gathered.detach(), "grad": local.grad, "mean": collectives.mean(data[rank : rank + 1] * 1.0)}


def test_gather_concatenates_in_rank_order_and_routes_gradients_to_local_rows() -> None:
    data = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = run_in_processes(_sum_of_squares_loss, 2, data)
    for result in results:
        torch.testing.assert_close(result["gathered"], data)
    # one process on the whole batch; DDP averages the ranks' gradients (divides by the world size)
    whole = data.clone().requires_grad_(True)
    ((whole @ whole.T).pow(2).mean()).backward()
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]) / 2, whole.grad)
    torch.testing.assert_close(results[0]["mean"], data[:2].mean(dim=0, keepdim=True))


def test_single_process_collectives_are_identities() -> None:
    x = torch.randn(3, 2)
    assert Collectives().gather(x) is x
    torch.testing.assert_close(Collectives().mean(x), x)


def test_step_generators_differ_by_rank_and_step_and_repeat_for_equal_keys() -> None:
    def draw(seed: int, rank: int, step: int) -> torch.Tensor:
        return torch.rand(8, generator=step_generator(seed, rank, step))

    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 1, 5))
    assert not torch.equal(draw(0, 0, 5), draw(0, 0, 6))
    assert not torch.equal(draw(0, 0, 5), draw(1, 0, 5))
    context = StepContext(step=5, steps_per_epoch=10, total_steps=20, collectives=Collectives(1, 2))
    assert torch.equal(torch.rand(8, generator=context.generator), draw(0, 1, 5))
