"""EMA update, EMA momentum and teacher-temperature schedules."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from nnunet_ssl.pretraining.ema import cosine_momentum, ema_update_
from nnunet_ssl.pretraining.schedules import cosine_schedule, linear_warmup


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(8, 4))  # changes the BatchNorm running statistics
    return teacher, student


def test_ema_update_is_exact_and_copies_buffers() -> None:
    teacher, student = _pair()
    old = {k: v.clone() for k, v in teacher.named_parameters()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    m = 0.9
    ema_update_(teacher, student, m)
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        expected = old[name] * m + s[name].detach() * (1 - m)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)  # lerp vs mul+add: 1 ulp
        assert not torch.equal(p, old[name])
    t_buffers = dict(teacher.named_buffers())
    for name, b in student.named_buffers():
        assert torch.equal(t_buffers[name], b)
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_ema_extremes_and_no_autograd() -> None:
    teacher, student = _pair()
    old = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), old, strict=True))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters(), strict=True))
    assert all(p.grad_fn is None for p in teacher.parameters())


def test_ema_matches_by_name() -> None:
    teacher, student = _pair()
    student.register_parameter("mask_token", nn.Parameter(torch.ones(3)))  # student-only: fine
    ema_update_(teacher, student, 0.5)
    teacher.register_parameter("extra", nn.Parameter(torch.ones(3)))  # teacher-only: an error
    with pytest.raises(ValueError, match="extra"):
        ema_update_(teacher, student, 0.5)
    with pytest.raises(ValueError):
        ema_update_(teacher, student, 1.5)


def test_cosine_momentum_is_global_step_indexed() -> None:
    assert cosine_momentum(0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(1000, 1000) == pytest.approx(1.0)
    quarter = 1.0 - 0.05 * (1 + math.cos(math.pi / 4))
    assert cosine_momentum(250, 1000, base=0.9, final=1.0) == pytest.approx(quarter)
    values = [cosine_momentum(s, 100) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError):
        cosine_schedule(0, 0, 1.0, 0.0)


def test_teacher_temperature_warmup() -> None:
    assert linear_warmup(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert linear_warmup(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert linear_warmup(7.5, 0.04, 0.07, 30) == pytest.approx(0.0475)
    assert linear_warmup(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert linear_warmup(450, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert linear_warmup(3, 0.04, 0.07, 0) == pytest.approx(0.07)
    with pytest.raises(ValueError):
        linear_warmup(3, 0.04, 0.07, -1)
