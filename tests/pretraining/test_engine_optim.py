"""The optimisers and learning-rate schedules the pretraining engine uses (nnunet_ssl/optim.py), against hand values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunet_ssl.optim import build_optimizer, scheduled_lr, warmup_cosine, warmup_poly


def test_poly_without_warmup_is_nnunets_polylr() -> None:
    # nnU-Net's PolyLRScheduler: initial_lr * (1 - current_step / max_steps) ** 0.9
    assert warmup_poly(0, 1e-2, 0, 10) == pytest.approx(1e-2)
    assert warmup_poly(5, 1e-2, 0, 10) == pytest.approx(1e-2 * 0.5**0.9)  # 0.0053589...
    assert warmup_poly(5, 1e-2, 0, 10) == pytest.approx(0.005358867312681466)
    assert warmup_poly(9, 1.0, 0, 10) == pytest.approx(0.1**0.9)  # the last step still trains
    assert warmup_poly(10, 1.0, 0, 10) == 0.0
    assert warmup_poly(25, 1.0, 0, 10) == 0.0  # past the end: stays at 0


def test_poly_after_a_linear_warmup() -> None:
    # 4 warm-up steps: 0.25, 0.5, 0.75, 1; then (1 - t / 8) ** 0.9 over the 8 steps left
    assert [warmup_poly(s, 1.0, 4, 12) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_poly(4, 1.0, 4, 12) == pytest.approx(1.0)
    assert warmup_poly(8, 2.0, 4, 12) == pytest.approx(2.0 * 0.5**0.9)
    assert warmup_poly(10, 1.0, 4, 12) == pytest.approx(0.25**0.9)
    with pytest.raises(ValueError, match="total_steps must be positive"):
        warmup_poly(0, 1.0, 0, 0)


def test_scheduled_lr_picks_the_schedule() -> None:
    assert scheduled_lr("cosine", 8, 1.0, 4, 12, 0.1) == warmup_cosine(8, 1.0, 4, 12, 0.1)
    assert scheduled_lr("cosine", 6, 2.0, 0, 8) == pytest.approx(1.0 + math.cos(math.pi * 6 / 8))
    assert scheduled_lr("poly", 8, 1.0, 4, 12, 0.1) == pytest.approx(0.5**0.9)  # poly ignores the final value
    with pytest.raises(ValueError, match=r"unknown learning-rate schedule 'step'; choose one of \('cosine', 'poly'\)"):
        scheduled_lr("step", 0, 1.0, 0, 10)


def _net() -> nn.Module:
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, affine=True), nn.Conv3d(2, 1, 1))
    net.register_parameter("mask_token", nn.Parameter(torch.zeros(1, 2)))
    return net


def test_sgd_and_adamw_share_the_decay_groups() -> None:
    net = _net()
    sgd = build_optimizer("sgd", net, 0.01, 3e-5, momentum=0.99, nesterov=True)
    adamw = build_optimizer("adamw", net, 2e-4, 0.05)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    decayed = {id(net[0].weight), id(net[2].weight)}  # the conv kernels; norms, biases and the token get none
    for optimizer, decay in ((sgd, 3e-5), (adamw, 0.05)):
        first, second = optimizer.param_groups
        assert {id(p) for p in first["params"]} == decayed and first["weight_decay"] == decay
        assert len(second["params"]) == 5 and second["weight_decay"] == 0.0  # 2 biases, 2 norm, the token
    assert sgd.param_groups[0]["momentum"] == 0.99 and sgd.param_groups[0]["nesterov"] is True
    assert sgd.param_groups[0]["lr"] == 0.01


def test_nesterov_sgd_step_by_hand() -> None:
    """One weight, gradient 1, lr 0.1, momentum 0.9, nesterov: buffer b = g, update g + 0.9 b = 1.9."""
    weight = nn.Parameter(torch.ones(2, 2))
    module = nn.Module()
    module.register_parameter("weight", weight)
    optimizer = build_optimizer("sgd", module, 0.1, 0.0, momentum=0.9, nesterov=True)
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((2, 2), 1.0 - 0.1 * 1.9))
    with pytest.raises(ValueError, match="Nesterov SGD needs a momentum > 0"):
        build_optimizer("sgd", module, 0.1, 0.0, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match=r"unknown optimizer 'lamb'; choose one of \('adamw', 'sgd'\)"):
        build_optimizer("lamb", module, 0.1, 0.0)


def test_a_run_that_ends_inside_its_warmup_says_so() -> None:
    from nnunet_ssl.pretraining.engine import warmup_warning

    # issue 21: --max-steps 240 on 24 volumes (12 steps per epoch) with the default 30-epoch warm-up (360 steps)
    assert "never reaches its peak" in warmup_warning(360, 240, 30.0)
    assert "150% of this run's 240 steps" in warmup_warning(360, 240, 30.0)
    assert "only in its last half" in warmup_warning(150, 240, 12.5)
    assert warmup_warning(24, 240, 2.0) is None and warmup_warning(0, 5, 0.0) is None


def test_a_run_without_a_bar_logs_progress_every_tenth_and_every_30_seconds() -> None:
    from nnunet_ssl.pretraining.engine import ProgressLines

    now = [0.0]
    lines = ProgressLines(0, 30, clock=lambda: now[0])
    logged = []
    for step in range(1, 31):
        now[0] = step * 2.0  # 2 s a step
        if lines.line(step, 0.5, 1e-3, 1.0) is not None:
            logged.append(step)
    assert logged == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert lines.line(30, 0.5, 1e-3, 1.0) == ("pretraining step 30/30 (100%): loss 0.5000, lr 1.00e-03, "
                                              "1.00 volumes/s, 0.0 min left")
    slow = ProgressLines(0, 1000, clock=lambda: now[0])  # a step every 40 s: a line every step, not every 100
    now[0] += 40.0
    assert slow.line(1, 0.5, 1e-3, 0.05) == ("pretraining step 1/1000 (0%): loss 0.5000, lr 1.00e-03, 0.05 volumes/s, "
                                             "666.0 min left")
    assert slow.line(2, 0.5, 1e-3, 0.05) is None  # no time has passed
