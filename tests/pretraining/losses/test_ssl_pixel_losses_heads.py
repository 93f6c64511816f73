"""NT-Xent (1 and 2 gloo processes), rotation and reconstruction losses, ConvUpHead and x4 readouts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gloo_processes import run_in_processes

from nnunet_ssl.pretraining.distributed import Collectives
from nnunet_ssl.pretraining.heads import ConvUpHead, linear_head, x4_vector
from nnunet_ssl.pretraining.losses import nt_xent_loss, reconstruction_loss, rotation_loss


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """[TANG] ``Contrast`` written out as a loop over the 2B anchors (views ordered z1 then z2)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    b = z1.shape[0]
    total = 0.0
    for i in range(2 * b):
        j = (i + b) % (2 * b)
        numerator = math.exp(float(z[i] @ z[j]) / t)
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * b) if k != i)
        total += -math.log(numerator / denominator)
    return torch.tensor(total / (2 * b), dtype=torch.float64)


def test_nt_xent_matches_the_reference_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.5, 0.1):
        torch.testing.assert_close(nt_xent_loss(z1.double(), z2.double(), t), reference_nt_xent(z1, z2, t))


def test_nt_xent_random_embeddings_near_ln_2b_minus_1_and_symmetric() -> None:
    g = torch.Generator().manual_seed(1)
    b = 8
    z1, z2 = torch.randn(b, 4096, generator=g), torch.randn(b, 4096, generator=g)
    loss = nt_xent_loss(z1, z2)
    assert abs(loss.item() - math.log(2 * b - 1)) < 0.02
    torch.testing.assert_close(nt_xent_loss(z2, z1), loss)


def test_nt_xent_shuffled_positive_pairing_raises_the_loss() -> None:
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(8, 64, generator=g)
    z2 = z1 + 0.3 * torch.randn(8, 64, generator=g)  # correlated positives
    paired = nt_xent_loss(z1, z2)
    shuffled = nt_xent_loss(z1, z2[torch.roll(torch.arange(8), 1)])
    assert paired < math.log(15) - 1.0 and shuffled > paired + 1.0


def test_nt_xent_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="views"):
        nt_xent_loss(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


def _nt_xent_on_rank(rank: int, world_size: int, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    collectives = Collectives(rank, world_size)
    rows = z1.shape[0] // world_size
    local1 = z1[collectives.local_slice(rows)].clone().requires_grad_(True)
    local2 = z2[collectives.local_slice(rows)].clone().requires_grad_(True)
    loss = nt_xent_loss(local1, local2, 0.5, collectives)
    loss.backward()
    return {"loss": loss.detach(), "grad1": local1.grad, "grad2": local2.grad}


def test_two_process_nt_xent_equals_one_process_loss_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g, dtype=torch.float64)
    results = run_in_processes(_nt_xent_on_rank, 2, z1, z2)
    whole1, whole2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = nt_xent_loss(whole1, whole2, 0.5)
    loss.backward()
    # every rank holds the mean over its anchors; DDP averages ranks (and their gradients)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(sum(r["loss"] for r in results) / 2, loss.detach())
    torch.testing.assert_close(torch.cat([r["grad1"] for r in results]) / 2, whole1.grad)
    torch.testing.assert_close(torch.cat([r["grad2"] for r in results]) / 2, whole2.grad)
    assert abs(results[0]["loss"] - results[1]["loss"]) > 1e-4  # the ranks really differ


def test_rotation_loss_hand_values() -> None:
    assert rotation_loss(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item() == pytest.approx(math.log(4))
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    expected = -(2.0 - math.log(math.exp(2.0) + 3.0))
    assert rotation_loss(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_hand_values_over_all_voxels() -> None:
    prediction = torch.zeros(1, 1, 2, 2, 2)
    target = torch.zeros(1, 1, 2, 2, 2)
    target[0, 0, 0, 0, 0] = 2.0
    assert reconstruction_loss(prediction, target, "l2").item() == pytest.approx(4.0 / 8)
    assert reconstruction_loss(prediction, target, "l1").item() == pytest.approx(2.0 / 8)
    with pytest.raises(ValueError):
        reconstruction_loss(prediction, target, "l3")
    with pytest.raises(ValueError):
        reconstruction_loss(prediction, target[..., :1], "l2")


def test_conv_up_head_widths_and_shapes() -> None:
    head = ConvUpHead(768)
    assert head.widths == (384, 192, 96, 48, 48)  # [TANG] at embed 48
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 5 + [(1, 1, 1)]
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in head.modules()) == 5
    assert sum(isinstance(m, torch.nn.Upsample) for m in head.modules()) == 5
    small = ConvUpHead(192, out_channels=2)  # tiny preset
    assert small.widths == (96, 48, 24, 12, 12)
    assert small(torch.randn(1, 192, 2, 2, 2)).shape == (1, 2, 64, 64, 64)
    with pytest.raises(ValueError):
        ConvUpHead(100)


def test_conv_up_head_equals_tangs_order_of_upsampling_then_1x1_conv() -> None:
    """The head convolves to the image channels before its last upsampling; [TANG] after. Same output."""
    torch.manual_seed(0)
    head = ConvUpHead(192, out_channels=2).double()
    torch.nn.init.normal_(head.layers[-1].bias)  # a bias must commute too
    x4 = torch.randn(2, 192, 2, 3, 2, dtype=torch.float64)
    tangs_order = head.layers(x4)  # the Sequential as [TANG] runs it: ..., Upsample, Conv3d(1x1x1)
    torch.testing.assert_close(head(x4), tangs_order, rtol=1e-12, atol=1e-12)
    assert tangs_order.shape == (2, 2, 64, 96, 64)


def test_x4_readouts() -> None:
    x4 = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    torch.testing.assert_close(x4_vector(x4, "pool"), x4.flatten(2).mean(2))
    assert torch.equal(x4_vector(x4, "token0"), x4[:, :, 0, 0, 0])
    assert torch.equal(x4_vector(x4, "token1"), x4[:, :, 0, 0, 1])
    with pytest.raises(ValueError, match="token"):
        x4_vector(x4[:, :, :1, :1, :1], "token1")
    with pytest.raises(ValueError, match="readout"):
        x4_vector(x4, "cls")


def test_linear_head_init() -> None:
    layer = linear_head(768, 4)
    assert torch.equal(layer.bias, torch.zeros(4))
    assert 0.015 < layer.weight.std().item() < 0.025
