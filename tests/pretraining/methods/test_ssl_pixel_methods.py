"""Inpainting, Reconstruction, Contrastive, Rotation and SwinUNETR: the checks of cards 2, 3, 4, 5 and 9.

Tiny preset; 64^3 crops where a ConvUpHead reads x4 (InstanceNorm needs x4 wider than one
voxel), 32^3 otherwise; drop-path 0 so a step is a deterministic function of the step's generator.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.pretraining.losses import nt_xent_loss
from nnunet_ssl.pretraining.methods import StepContext, build_config, build_method
from nnunet_ssl.pretraining.views import aug_rand, rotate_axial

CROPS = {"inpainting": 64, "reconstruction": 64, "swinunetr": 64, "contrastive": 32, "rotation": 32}
PIXEL_METHODS = ("inpainting", "reconstruction", "contrastive", "rotation", "swinunetr")


def context(step: int = 0) -> StepContext:
    return StepContext(step=step, steps_per_epoch=10, total_steps=100, seed=7)


def build(name: str, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    method = build_method(name, "tiny", overrides={"crop_size": CROPS[name], "drop_path_rate": 0.0, **overrides})
    method.train()
    return method


def blobs(batch: int, views: int, crop: int, seed: int = 0) -> Tensor:
    """Smooth random blobs in [0, 1]: ``(B, V, 1, crop, crop, crop)``."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, crop)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    out = torch.zeros(batch, views, 1, crop, crop, crop)
    for b in range(batch):
        for v in range(views):
            for _ in range(3):
                centre = (torch.rand(3, generator=g) * 1.4 - 0.7).view(3, 1, 1, 1)
                radius = 0.2 + 0.3 * torch.rand(1, generator=g)
                out[b, v, 0] += 0.6 * torch.exp(-((grid - centre) ** 2).sum(0) / (2 * radius**2))
    return out.clamp(0, 1)


class PassThrough(nn.Module):
    """Stands in for the encoder: every feature level is the input itself."""

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x] * 5


def test_configs_have_card_defaults_and_refuse_bad_values() -> None:
    assert build_config("inpainting").pixel_loss == "l2" and build_config("inpainting").max_fraction == 0.3
    assert build_config("reconstruction").pixel_loss == "l2" and build_config("reconstruction").noise_std == 0.0
    contrastive = build_config("contrastive")
    assert (contrastive.temperature, contrastive.projection_dim, contrastive.readout) == (0.5, 512, "pool")
    assert build_config("rotation").readout == "pool"
    swin = build_config("swinunetr")
    assert (swin.weight_rot, swin.weight_contrast, swin.weight_rec, swin.pixel_loss, swin.readout) == (
        1.0, 1.0, 1.0, "l1", "tokens",
    )
    for name, bad in [
        ("inpainting", {"crop_size": 32}), ("inpainting", {"pixel_loss": "l3"}), ("inpainting", {"max_fraction": 2.0}),
        ("reconstruction", {"noise_std": -1.0}), ("contrastive", {"temperature": 0.0}),
        ("contrastive", {"readout": "cls"}), ("rotation", {"crop_size": 48}), ("swinunetr", {"weight_rot": -1.0}),
        ("swinunetr", {"readout": "token0"}),
    ]:
        with pytest.raises(ValueError):
            build_config(name, bad)


@pytest.mark.parametrize("name", PIXEL_METHODS)
def test_export_is_the_student_encoder_without_teacher(name: str) -> None:
    method = build(name)
    state = method.encoder_state()
    SwinEncoder(PRESETS["tiny"], use_mask_token=False).load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], method.encoder_state("student")[k]) for k in state)
    with pytest.raises(ValueError, match="teacher"):
        method.encoder_state("teacher")
    assert method.info.losses and method.info.heads


# ------------------------------------------------------------------------------ card 2: inpainting
def test_inpainting_identity_prediction_scores_only_corrupted_voxels_against_the_clean_target() -> None:
    method = build("inpainting")
    method.encoder = PassThrough()
    method.pixel_head = nn.Identity()  # prediction = the corrupted input
    views = blobs(2, 1, 64)
    before = views.clone()
    loss = method.training_step({"views": views}, context(3))["loss"]
    assert torch.equal(views, before)  # the target is never corrupted in place
    corrupted = aug_rand(views.flatten(0, 1), context(3).generator)  # the same draws as the step
    error = (corrupted.images - before.flatten(0, 1)).square()
    assert (error[~corrupted.mask.expand_as(error)] == 0).all()
    assert corrupted.mask.any() and loss.item() > 0
    expected = error[corrupted.mask.expand_as(error)].sum() / error.numel()  # MSE over ALL voxels
    torch.testing.assert_close(loss, expected)


def test_inpainting_logs_loss_and_corruption() -> None:
    out = build("inpainting").training_step({"views": blobs(2, 1, 64)}, context())
    assert set(out) == {"loss", "loss_rec", "corrupted_fraction"}
    assert 0 < out["corrupted_fraction"].item() < 0.7


# -------------------------------------------------------------------------- card 3: reconstruction
def test_reconstruction_output_depends_on_the_input_only_through_x4() -> None:
    method = build("reconstruction")
    outputs = []

    def zero_x4(_module: nn.Module, _args: tuple, features: list[Tensor]) -> list[Tensor]:
        return [*features[:4], torch.zeros_like(features[4])]

    def keep(_module: nn.Module, _args: tuple, output: Tensor) -> None:
        outputs.append(output.detach())

    method.encoder.register_forward_hook(zero_x4)
    method.pixel_head.register_forward_hook(keep)
    losses = [method.training_step({"views": blobs(1, 1, 64, seed=s)}, context())["loss"] for s in (1, 2)]
    assert torch.equal(outputs[0], outputs[1])  # no skip path around x4
    assert losses[0] > 0 and losses[1] > 0 and losses[0] != losses[1]


def test_reconstruction_target_is_the_clean_input_even_when_denoising() -> None:
    method = build("reconstruction", noise_std=0.1)
    method.encoder = PassThrough()
    method.pixel_head = nn.Identity()
    views = blobs(1, 1, 64)
    loss = method.training_step({"views": views}, context())["loss"]
    assert 0.005 < loss.item() < 0.015  # mean squared noise = 0.1^2
    method_plain = build("reconstruction")
    method_plain.encoder, method_plain.pixel_head = PassThrough(), nn.Identity()
    assert method_plain.training_step({"views": views}, context())["loss"].item() == 0.0


# ---------------------------------------------------------------------------- card 4: contrastive
def test_contrastive_at_init_is_near_ln_2b_minus_1_and_pairs_the_two_views_of_a_volume() -> None:
    method = build("contrastive")
    views = blobs(3, 2, 32)
    out = method.training_step({"views": views}, context())
    assert set(out) == {"loss", "loss_contrast", "positive_cosine"}
    assert abs(out["loss"].item() - math.log(5)) < 0.1
    with torch.no_grad():
        z = method.project(views.flatten(0, 1)).reshape(3, 2, -1)
    torch.testing.assert_close(out["loss"].detach(), nt_xent_loss(z[:, 0], z[:, 1], 0.5))
    swapped = method.training_step({"views": views.flip(1)}, context())["loss"]
    torch.testing.assert_close(swapped, out["loss"])


# ------------------------------------------------------------------------------- card 5: rotation
def test_rotation_loss_near_ln_4_at_init_and_labels_are_the_applied_rotations() -> None:
    method = build("rotation")
    views = blobs(4, 1, 32)
    out = method.training_step({"views": views}, context(2))
    assert abs(out["loss"].item() - math.log(4)) < 0.1
    # the step rotated by the labels its generator drew: recompute the loss from them
    labels = torch.randint(0, 4, (4,), generator=context(2).generator)
    with torch.no_grad():
        logits = method.logits(rotate_axial(views.flatten(0, 1), labels))
    torch.testing.assert_close(out["loss"].detach(), nn.functional.cross_entropy(logits, labels))


def test_constant_images_cannot_leak_the_rotation() -> None:
    method = build("rotation")
    crop = torch.full((1, 1, 32, 32, 32), 0.4)
    with torch.no_grad():
        logits = method.logits(rotate_axial(crop.expand(4, -1, -1, -1, -1), torch.arange(4)))
    assert torch.equal(logits, logits[:1].expand_as(logits))  # one prediction for all four rotations
    mean_ce = nn.functional.cross_entropy(logits, torch.arange(4))
    assert mean_ce.item() >= math.log(4) - 1e-6  # so the expected loss on constant crops is >= ln 4


# ------------------------------------------------------------------------------ card 9: SwinUNETR
def test_swinunetr_views_targets_unrotate_to_the_crop() -> None:
    x = blobs(2, 1, 64).flatten(0, 1)
    inputs, targets, labels = build("swinunetr").make_views(x, context().generator)
    assert inputs.shape == targets.shape == (4, 1, 64, 64, 64) and labels.shape == (4,)
    assert torch.equal(rotate_axial(targets, -labels), torch.cat([x, x]))
    assert not torch.equal(inputs, targets)  # corrupted student inputs


def test_swinunetr_losses_at_init_sum_and_symmetry() -> None:
    method = build("swinunetr")
    views = blobs(2, 1, 64)
    out = method.training_step({"views": views}, context())
    assert set(out) >= {"loss", "loss_rot", "loss_contrast", "loss_rec"}
    assert abs(out["loss_rot"].item() - math.log(4)) < 0.15
    torch.testing.assert_close(out["loss"].detach(), out["loss_rot"] + out["loss_contrast"] + out["loss_rec"])
    weighted = build("swinunetr", weight_rot=2.0, weight_contrast=0.5, weight_rec=3.0)
    out_w = weighted.training_step({"views": views}, context())
    torch.testing.assert_close(out_w["loss_rot"], out["loss_rot"])
    torch.testing.assert_close(
        out_w["loss"].detach(), 2.0 * out["loss_rot"] + 0.5 * out["loss_contrast"] + 3.0 * out["loss_rec"]
    )
    # swapping the two corrupted views leaves the contrastive loss unchanged
    inputs, _, _ = method.make_views(views.flatten(0, 1), context().generator)
    with torch.no_grad():
        z = method.predict(inputs)[1]
        z_swapped = method.predict(torch.cat([inputs[2:], inputs[:2]]))[1]
    torch.testing.assert_close(nt_xent_loss(z[:2], z[2:]), out["loss_contrast"])
    torch.testing.assert_close(nt_xent_loss(z_swapped[:2], z_swapped[2:]), out["loss_contrast"])


def test_swinunetr_pool_readout_differs_from_corner_tokens() -> None:
    tokens, pooled = build("swinunetr"), build("swinunetr", readout="pool")
    x4 = torch.randn(1, 192, 2, 2, 2)
    tokens.encoder = pooled.encoder = nn.Identity()
    tokens.encoder.forward = pooled.encoder.forward = lambda x: [x] * 5  # type: ignore[method-assign]
    with torch.no_grad():
        rot_t, z_t, _ = tokens.predict(x4)
        rot_p, z_p, _ = pooled.predict(x4)
    torch.testing.assert_close(rot_t, tokens.rotation_head(x4[:, :, 0, 0, 0]))
    torch.testing.assert_close(z_t, tokens.contrastive_head(x4[:, :, 0, 0, 1]))
    torch.testing.assert_close(rot_p, pooled.rotation_head(x4.flatten(2).mean(2)))


# ------------------------------------------------------------------------- tiny-batch overfitting
#: (steps, batch, learning rate, required final/initial loss ratio). Few steps where a ConvUpHead
#: decodes 64^3 crops (about 1 s a step on one CPU core); on this batch the ratios reached were
#: about 0.06 (reconstruction, 8 steps), 0.09 (inpainting, 8), 0.17 (swinunetr, 6), 0.035
#: (contrastive, 12; NT-Xent's floor at B = 2 is ln(1 + 2 e^-4) = 0.036, 0.033 of ln 3), < 0.05 (rotation, 30).
OVERFIT = {
    "inpainting": (8, 1, 3e-3, 0.3),
    "reconstruction": (8, 1, 3e-3, 0.3),
    "contrastive": (12, 2, 5e-4, 0.1),
    "rotation": (30, 2, 2e-3, 0.2),
    "swinunetr": (6, 2, 1e-3, 0.3),
}


@pytest.mark.parametrize("name", PIXEL_METHODS)
def test_tiny_batch_overfits(name: str) -> None:
    steps, batch, lr, ratio = OVERFIT[name]
    method = build(name)
    optimizer = torch.optim.AdamW(method.student_modules().parameters(), lr=lr)
    views = blobs(batch, method.num_views, CROPS[name], seed=1)
    losses = []
    for _ in range(steps):
        out = method.training_step({"views": views}, context(0))  # step 0 every time: the same draws
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < ratio * losses[0], losses


def test_config_fields_documented() -> None:
    for name in PIXEL_METHODS:
        config_cls = type(build_config(name))
        for field in dataclasses.fields(config_cls):
            assert field.name in (config_cls.__doc__ or ""), (name, field.name)
