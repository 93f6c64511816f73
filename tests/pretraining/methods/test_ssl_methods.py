"""The method registry, SimMIM and SMIT on the tiny preset at 64^3."""
from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
from torch import Tensor, nn

from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.pretraining.methods import METHODS, StepContext, build_config, build_method, method_family
from nnunet_ssl.pretraining.methods.base import MethodInfo, after_step, before_optimizer_step
from nnunet_ssl.pretraining.methods.simmim import SimMIM
from nnunet_ssl.pretraining.methods.smit import SMIT

TINY = PRESETS["tiny"]
CROP = 64
#: Small heads keep SMIT fast; drop-path 0 makes steps deterministic given the seed.
SMIT_SMALL = {
    "crop_size": CROP, "out_dim": 64, "head_hidden_dim": 128, "head_bottleneck_dim": 32, "drop_path_rate": 0.0,
}
SIMMIM_SMALL = {"crop_size": CROP, "drop_path_rate": 0.0}
CONTEXT = StepContext(step=0, steps_per_epoch=10, total_steps=100)
#: The methods that pretrain the Swin encoder (the others have their own tests, e.g. test_spark3d.py).
SWIN_METHODS = sorted(name for name in METHODS if method_family(name).name == "swin")


def phantom_views(batch: int, views: int, seed: int = 0) -> Tensor:
    """Smooth blobs in [0, 1]: ``(B, V, 1, 64, 64, 64)``."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, CROP)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    out = torch.zeros(batch, views, 1, CROP, CROP, CROP)
    for b in range(batch):
        for v in range(views):
            for _ in range(4):
                c = torch.rand(3, generator=g) * 1.4 - 0.7
                r = 0.15 + 0.3 * torch.rand(1, generator=g)
                dist2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
                out[b, v, 0] += 0.5 * torch.exp(-dist2 / (2 * r**2))
    return out.clamp(0, 1)


def small_overrides(name: str) -> dict:
    """Cheap settings for any registered method: 64^3 crops and a small K where there is one."""
    fields = {f.name for f in dataclasses.fields(METHODS[name][1])}
    wanted = {"crop_size": CROP, "out_dim": 64}
    return {k: v for k, v in wanted.items() if k in fields}


# ---------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", SWIN_METHODS)
def test_smoke_one_step(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, "tiny", overrides=small_overrides(name))
    method.train()
    assert method.name == name and method.num_views >= 1
    # two volumes: contrastive losses need another volume's views as negatives
    out = method.training_step({"views": phantom_views(2, method.num_views)}, CONTEXT)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    before_optimizer_step(method, CONTEXT)  # optional hooks: methods without them are skipped
    encoder = next(m for m in method.student_modules().modules() if isinstance(m, SwinEncoder))
    grads = {k: p.grad for k, p in encoder.named_parameters()}
    # stage 4 (stride 32) trains only where a loss reads x4; distillation heads read stride-16 tokens
    assert all(g is not None for k, g in grads.items() if not k.startswith("stages.3."))
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads["patch_embed.weight"].abs().sum() > 0
    if "mask_token" in grads:  # a method that masks must train its mask token
        assert grads["mask_token"].abs().sum() > 0
    after_step(method, CONTEXT)
    assert isinstance(type(method).info, MethodInfo) and all(dataclasses.astuple(method.info))
    # --list-methods names exactly the loss terms the step logs (each with a weight)
    assert set(re.findall(r"[\d.]+ (loss_\w+)", method.info.losses)) == {k for k in out if k.startswith("loss_")}
    state = method.encoder_state()
    reference = SwinEncoder(TINY, use_mask_token=False)
    reference.load_state_dict(state, strict=True)  # every key matches, no mask token


def test_registry_errors_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="simmim"):
        build_method("mae", "tiny")
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method("smit", "tiny", overrides={"mask_rato": 0.5})
    with pytest.raises(ValueError, match="unknown preset"):
        build_method("smit", "huge")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("simmim", {"pixel_loss": "l3"}),
        ("simmim", {"mask_ratio": 1.5}),
        ("simmim", {"crop_size": 80}),
        ("smit", {"unit": 8}),
        ("smit", {"student_temp": 0.0}),
        ("smit", {"ema_base": 1.0, "ema_final": 0.99}),
        ("smit", {"lambda_mpd": -1.0}),
    ],
)
def test_invalid_config_values_raise(name: str, overrides: dict) -> None:
    with pytest.raises(ValueError):
        build_config(name, overrides)


def test_configs_are_frozen_and_have_paper_defaults() -> None:
    smit, simmim = build_config("smit"), build_config("simmim")
    with pytest.raises(dataclasses.FrozenInstanceError):
        smit.mask_ratio = 0.5  # type: ignore[misc]
    assert (smit.mask_ratio, smit.unit, smit.pixel_loss, smit.crop_size) == (0.75, 16, "l1", 96)
    assert (smit.lambda_mpd, smit.lambda_itd, smit.out_dim, smit.student_temp) == (0.1, 0.1, 8192, 0.1)
    assert (smit.teacher_temp_start, smit.teacher_temp_end, smit.teacher_temp_warmup_epochs) == (0.04, 0.07, 30)
    assert (smit.center_momentum, smit.ema_base, smit.ema_final, smit.freeze_last_layer_epochs) == (0.9, 0.996, 1.0, 1)
    assert (simmim.mask_ratio, simmim.unit, simmim.pixel_loss, simmim.crop_size) == (0.75, 16, "l2", 96)


def test_wrong_view_shape_raises() -> None:
    method = build_method("simmim", "tiny", overrides=SIMMIM_SMALL)
    with pytest.raises(ValueError, match="views"):
        method.training_step({"views": torch.rand(1, 2, 1, CROP, CROP, CROP)}, CONTEXT)
    with pytest.raises(ValueError, match="views"):
        method.training_step({"views": torch.rand(1, 1, 1, 32, 32, 32)}, CONTEXT)


# -------------------------------------------------------------------------- pixel loss wiring
@pytest.mark.parametrize("name", ["simmim", "smit"])
def test_pixel_gradient_only_at_masked_voxels(name: str) -> None:
    method = build_method(name, "tiny", overrides=SIMMIM_SMALL if name == "simmim" else SMIT_SMALL)
    captured: dict[str, Tensor] = {}
    encoder = next(m for m in method.student_modules().modules() if isinstance(m, SwinEncoder))
    encoder.register_forward_pre_hook(lambda _m, args: captured.__setitem__("token_mask", args[1]))

    def keep(_m: nn.Module, _args: tuple, output: Tensor) -> None:
        output.retain_grad()
        captured["reconstruction"] = output

    method.pixel_head.register_forward_hook(keep)
    torch.manual_seed(3)
    method.training_step({"views": phantom_views(1, method.num_views)}, CONTEXT)["loss"].backward()
    token_mask = captured["token_mask"]
    voxel_mask = token_mask.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, None]
    grad = captured["reconstruction"].grad
    assert voxel_mask.float().mean().item() == 0.75
    assert torch.equal(grad[~voxel_mask], torch.zeros_like(grad[~voxel_mask]))
    assert (grad[voxel_mask] != 0).float().mean() > 0.99


# ---------------------------------------------------------------------------------------- SMIT
@pytest.fixture(scope="module")
def smit_step() -> dict:
    """A tiny SMIT before and after one AdamW step (shared by several checks)."""
    torch.manual_seed(0)
    method = build_method("smit", "tiny", overrides=SMIT_SMALL)
    method.train()
    initial = copy.deepcopy(method)
    optimizer = torch.optim.AdamW(method.student_modules().parameters(), lr=1e-3)
    context = StepContext(step=3, steps_per_epoch=10, total_steps=20)
    views = phantom_views(1, 2)
    out = method.training_step({"views": views}, context)
    out["loss"].backward()
    teacher_grads = [p.grad for p in method.teacher.parameters()]
    method.before_optimizer_step(context)
    last_layer_grads = [method.student[k].last_layer.weight.grad for k in ("head_cls", "head_patch")]
    optimizer.step()
    teacher_before = {k: v.clone() for k, v in method.teacher.named_parameters()}
    method.after_step(context)
    return {
        "method": method, "initial": initial, "out": out, "context": context, "views": views,
        "teacher_grads": teacher_grads, "teacher_before": teacher_before, "last_layer_grads": last_layer_grads,
    }


def test_smit_teacher_equals_student_at_step_zero(smit_step: dict) -> None:
    method: SMIT = smit_step["initial"]
    student = dict(method.student.named_parameters())
    teacher = dict(method.teacher.named_parameters())
    assert set(student) - set(teacher) == {"encoder.mask_token"}
    assert all(torch.equal(p, student[k]) for k, p in teacher.items())
    assert all(not p.requires_grad for p in teacher.values())
    assert not method.teacher.training and method.student.training
    assert method.teacher["encoder"].mask_token is None


def test_smit_teacher_gets_no_gradient_and_follows_the_ema_exactly(smit_step: dict) -> None:
    method: SMIT = smit_step["method"]
    assert all(g is None for g in smit_step["teacher_grads"])
    m = method.teacher.momentum(smit_step["context"])
    assert m == pytest.approx(1.0 - 0.004 * 0.5 * (1 + math.cos(math.pi * 3 / 20)))
    assert smit_step["out"]["ema_momentum"].item() == pytest.approx(m)
    student = dict(method.student.named_parameters())
    moved = 0
    for name, p in method.teacher.named_parameters():
        old = smit_step["teacher_before"][name]
        expected = old.double() * m + student[name].detach().double() * (1 - m)
        torch.testing.assert_close(p.double(), expected, rtol=2.4e-7, atol=1e-9)  # float32 rounding only
        moved += int(not torch.equal(p, old))
    assert moved > 0


def test_smit_step_outputs_and_centres(smit_step: dict) -> None:
    method: SMIT = smit_step["method"]
    out = smit_step["out"]
    assert set(out) >= {"loss", "loss_mip", "loss_mpd", "loss_itd", "teacher_temp", "ema_momentum"}
    expected = out["loss_mip"] + 0.1 * out["loss_mpd"] + 0.1 * out["loss_itd"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert out["teacher_temp"].item() == pytest.approx(0.04 + 0.03 * 0.3 / 30)  # epoch 0.3
    assert 0 < out["teacher_entropy_cls"].item() < math.log(64)
    # The centres moved to 0.1 x the mean teacher output of the step (the initial teacher).
    initial: SMIT = smit_step["initial"]
    with torch.no_grad():
        features = initial.teacher["encoder"](smit_step["views"].flatten(0, 1))
        dense = initial.teacher["norm"](features[3].flatten(2).transpose(1, 2))
        cls_t = initial.teacher["head_cls"](dense.mean(1))
        patch_t = initial.teacher["head_patch"](dense)
    torch.testing.assert_close(method.center_cls, 0.1 * cls_t.mean(0, keepdim=True), rtol=1e-4, atol=1e-6)
    expected_patch = 0.1 * patch_t.mean((0, 1)).view(1, 1, -1)
    torch.testing.assert_close(method.center_patch, expected_patch, rtol=1e-4, atol=1e-6)
    state = method.state_dict()
    assert "center_cls" in state and "center_patch" in state
    assert "teacher.encoder.mask_token" not in state and "student.encoder.mask_token" in state


def test_smit_last_layers_frozen_in_epoch_zero(smit_step: dict) -> None:
    assert all(g is None for g in smit_step["last_layer_grads"])
    method: SMIT = copy.deepcopy(smit_step["method"])  # leave the shared fixture untouched
    later = StepContext(step=10, steps_per_epoch=10, total_steps=20)  # epoch 1.0
    method.zero_grad()
    torch.manual_seed(0)
    method.training_step({"views": smit_step["views"][:1]}, later)["loss"].backward()
    method.before_optimizer_step(later)
    for key in ("head_cls", "head_patch"):
        assert method.student[key].last_layer.weight.grad is not None
        assert method.student[key].mlp[0].weight.grad is not None


def test_smit_encoder_state_sources(smit_step: dict) -> None:
    method: SMIT = smit_step["method"]
    default, teacher, student = (method.encoder_state(s) for s in ("default", "teacher", "student"))
    assert "mask_token" not in default and "mask_token" not in student
    assert all(torch.equal(default[k], teacher[k]) for k in default)
    assert set(default) == set(student) == set(SwinEncoder(TINY).state_dict())
    assert not all(torch.equal(default[k], student[k]) for k in default)
    with pytest.raises(ValueError):
        method.encoder_state("ema")
    method.train()
    assert not method.teacher.training


def test_smit_without_distillation_equals_simmim_l1() -> None:
    torch.manual_seed(0)
    smit = build_method("smit", "tiny", overrides={**SMIT_SMALL, "lambda_mpd": 0.0, "lambda_itd": 0.0})
    simmim = build_method("simmim", "tiny", overrides={**SIMMIM_SMALL, "pixel_loss": "l1"})
    smit.student["encoder"].load_state_dict(simmim.encoder.state_dict())
    smit.pixel_head.load_state_dict(simmim.pixel_head.state_dict())
    views = phantom_views(1, 2, seed=5)
    # equal (seed, rank, step) -> equal per-step generators -> equal masks
    out_smit = smit.training_step({"views": views}, StepContext(step=0, steps_per_epoch=10, total_steps=100))
    out_simmim = simmim.training_step(
        {"views": views.flatten(0, 1)[:, None]}, StepContext(step=0, steps_per_epoch=10, total_steps=100)
    )
    assert out_smit["loss_mpd"] > 0 and out_smit["loss_itd"] > 0
    assert torch.equal(out_smit["loss"], out_simmim["loss"])
    out_smit["loss"].backward()
    out_simmim["loss"].backward()
    simmim_grads = dict(simmim.encoder.named_parameters())
    for name, p in smit.student["encoder"].named_parameters():
        torch.testing.assert_close(p.grad, simmim_grads[name].grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["simmim", "smit"])
def test_a_few_steps_reduce_the_loss(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(name, "tiny", overrides=SIMMIM_SMALL if name == "simmim" else SMIT_SMALL)
    method.train()
    optimizer = torch.optim.AdamW(method.student_modules().parameters(), lr=1e-3)
    views = phantom_views(1, method.num_views, seed=1)
    losses = []
    for step in range(6):
        context = StepContext(step=step, steps_per_epoch=1, total_steps=6)  # last layers trainable from step 1
        torch.manual_seed(123)  # fixes drop-path; the masks come from the step's generator and differ per step
        out = method.training_step({"views": views}, context)
        optimizer.zero_grad()
        out["loss"].backward()
        before_optimizer_step(method, context)
        optimizer.step()
        after_step(method, context)
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_simmim_has_no_teacher() -> None:
    method = build_method("simmim", "tiny", overrides=SIMMIM_SMALL)
    assert isinstance(method, SimMIM)
    with pytest.raises(ValueError, match="teacher"):
        method.encoder_state("teacher")
    state = method.encoder_state()
    assert "mask_token" not in state
    assert all(torch.equal(state[k], method.encoder_state("student")[k]) for k in state)


@torch.no_grad()
def test_smit_distillation_losses_start_near_ln_k() -> None:
    torch.manual_seed(0)
    method = build_method("smit", "tiny", overrides={"crop_size": CROP})  # K = 8192, full-size heads
    out = method.training_step({"views": phantom_views(1, 2)}, CONTEXT)
    ln_k = math.log(8192)
    assert abs(out["loss_itd"].item() - ln_k) < 1.0 and abs(out["loss_mpd"].item() - ln_k) < 1.0
    assert 1.0 < out["teacher_entropy_cls"].item() < ln_k and 1.0 < out["teacher_entropy_patch"].item() < ln_k


def test_ranks_draw_different_masks_and_equal_keys_repeat_them() -> None:
    """Masks come from the step's generator keyed by (seed, rank, step), not from the global RNG."""
    from nnunet_ssl.pretraining.distributed import Collectives

    method = build_method("simmim", "tiny", overrides=SIMMIM_SMALL)
    encoder = method.student_modules()["encoder"]
    masks: list[Tensor] = []
    encoder.register_forward_pre_hook(lambda _m, args: masks.append(args[1].clone()))
    views = {"views": phantom_views(1, 1)}
    for rank in (0, 1, 0):
        torch.manual_seed(0)  # the same global RNG state on every "rank", as DDP seeds it
        context = StepContext(step=4, steps_per_epoch=10, total_steps=20, seed=7, collectives=Collectives(rank, 2))
        method.training_step(views, context)
    assert not torch.equal(masks[0], masks[1])  # rank 0 vs rank 1
    assert torch.equal(masks[0], masks[2])  # the same key draws the same masks (a resumed run)


def test_list_methods_prints_one_line_per_method_without_out_or_data(capsys: pytest.CaptureFixture) -> None:
    from nnunet_ssl.cli import main

    assert main(["pretrain", "--list-methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(METHODS)
    for line, (cls, _) in zip(lines, METHODS.values(), strict=True):
        assert cls.info.family in line and cls.info.losses in line and cls.info.heads in line
    assert main(["pretrain", "--method", "smit", "--data", "x"]) == 1  # training still needs --out
