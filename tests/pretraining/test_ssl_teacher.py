"""The EMA teacher helper and the cross-rank centre update."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from gloo_processes import run_in_processes
from torch import nn

from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.networks.swin import DropPath
from nnunet_ssl.pretraining.distributed import Collectives
from nnunet_ssl.pretraining.losses import updated_center
from nnunet_ssl.pretraining.methods.base import StepContext
from nnunet_ssl.pretraining.teacher import EMATeacher, export_encoder_state

TINY = PRESETS["tiny"]


def _student() -> nn.ModuleDict:
    torch.manual_seed(0)
    preset = dataclasses.replace(TINY, drop_path_rate=0.3)
    return nn.ModuleDict({"encoder": SwinEncoder(preset, use_mask_token=True), "head": nn.Linear(4, 3)})


def test_teacher_is_a_frozen_unmasked_eval_copy_that_train_cannot_wake() -> None:
    student = _student()
    teacher = EMATeacher(student)
    assert teacher["encoder"].mask_token is None and student["encoder"].mask_token is not None
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    assert set(s_params) - set(t_params) == {"encoder.mask_token"}
    assert all(torch.equal(p, s_params[k]) and p.data_ptr() != s_params[k].data_ptr() for k, p in t_params.items())
    assert all(not p.requires_grad for p in t_params.values())
    assert all(m.p == 0.0 for m in teacher.modules() if isinstance(m, DropPath))
    assert any(m.p > 0.0 for m in student.modules() if isinstance(m, DropPath))
    holder = nn.ModuleDict({"student": student, "teacher": teacher})
    holder.train()
    assert student.training and not any(m.training for m in teacher.modules())


def test_teacher_update_is_the_global_step_cosine_ema() -> None:
    student = _student()
    teacher = EMATeacher(student, ema_base=0.99, ema_final=1.0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    old = {k: v.clone() for k, v in teacher.named_parameters()}
    context = StepContext(step=5, steps_per_epoch=2, total_steps=10)  # epoch 2.5: the global step counts
    m = teacher.update_(student, context)
    assert m == pytest.approx(1.0 - 0.01 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    s_params = dict(student.named_parameters())
    for k, p in teacher.named_parameters():
        expected = m * old[k].double() + (1 - m) * s_params[k].detach().double()
        torch.testing.assert_close(p.double(), expected, rtol=2.4e-7, atol=1e-7)
    with pytest.raises(ValueError):
        EMATeacher(student, ema_base=1.0, ema_final=0.9)


def test_export_sources() -> None:
    student = _student()
    teacher = EMATeacher(student)
    with torch.no_grad():
        student["encoder"].patch_embed.weight.add_(1.0)
    reference = SwinEncoder(TINY)
    for source in ("default", "teacher", "student"):
        state = export_encoder_state(student["encoder"], teacher, source)
        reference.load_state_dict(state, strict=True)  # all encoder keys, no mask token
    default = export_encoder_state(student["encoder"], teacher)
    own = export_encoder_state(student["encoder"], teacher, "student")
    assert torch.equal(default["patch_embed.weight"], teacher["encoder"].patch_embed.weight)
    assert torch.equal(own["patch_embed.weight"], student["encoder"].patch_embed.weight)
    with pytest.raises(ValueError, match="ema"):
        export_encoder_state(student["encoder"], teacher, "ema")


def _centre_on_rank(rank: int, world_size: int, logits: torch.Tensor) -> torch.Tensor:
    rows = logits.shape[1] // world_size  # (V, B, T, K): ranks split the batch axis
    local = logits[:, rank * rows : (rank + 1) * rows]
    return updated_center(torch.ones(1, 1, logits.shape[-1]), local, 0.9, Collectives(rank, world_size))


def test_two_process_centre_equals_one_process_centre_of_the_whole_batch() -> None:
    logits = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    whole = updated_center(torch.ones(1, 1, 6), logits, 0.9, Collectives())
    results = run_in_processes(_centre_on_rank, 2, logits)
    for centre in results:
        torch.testing.assert_close(centre, whole)
    alone = updated_center(torch.ones(1, 1, 6), logits[:, :2], 0.9)  # without the reduction the ranks differ
    assert not torch.allclose(alone, whole)
