"""Masked pixel loss, DINO cross-view loss, iBOT patch loss and centring."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.pretraining.losses import (
    cross_view_distillation_loss,
    entropy,
    masked_patch_distillation_loss,
    masked_pixel_loss,
    teacher_probabilities,
    updated_center,
)


# ------------------------------------------------------------------------------------ pixel loss
def _pixel_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prediction = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 2, 2)
    target = torch.zeros(1, 1, 1, 2, 2)
    mask = torch.tensor([True, False, True, False]).view(1, 1, 1, 2, 2)
    return prediction, target, mask


def test_masked_pixel_loss_hand_values() -> None:
    prediction, target, mask = _pixel_case()
    assert masked_pixel_loss(prediction, target, mask, "l1").item() == pytest.approx((1 + 3) / 2)
    assert masked_pixel_loss(prediction, target, mask, "l2").item() == pytest.approx((1 + 9) / 2)
    # Two channels share the voxel mask; the loss is the mean over channels too.
    two = torch.cat([prediction, 2 * prediction], dim=1)
    assert masked_pixel_loss(two, torch.zeros_like(two), mask, "l1").item() == pytest.approx((1 + 3 + 2 + 6) / 4)


def test_masked_pixel_loss_gradient_only_at_masked_voxels() -> None:
    prediction, target, mask = _pixel_case()
    prediction = prediction.clone().requires_grad_(True)
    before = (prediction.detach().clone(), target.clone(), mask.clone())
    masked_pixel_loss(prediction, target, mask, "l2").backward()
    grad = prediction.grad
    assert torch.equal(grad[~mask], torch.zeros(2))
    assert torch.all(grad[mask] != 0)
    assert torch.equal(prediction.detach(), before[0]) and torch.equal(target, before[1])
    assert torch.equal(mask, before[2])


def test_masked_pixel_loss_ignores_non_finite_visible_voxels_and_empty_masks() -> None:
    prediction, target, mask = _pixel_case()
    prediction = prediction.clone()
    prediction[~mask] = float("inf")
    assert masked_pixel_loss(prediction, target, mask, "l1").item() == pytest.approx(2.0)
    assert masked_pixel_loss(prediction, target, torch.zeros_like(mask), "l1").item() == 0.0
    with pytest.raises(ValueError):
        masked_pixel_loss(prediction, target, mask, "l3")


# ------------------------------------------------------------------------------- DINO cross-view
def _ce(p: list[float], log_q: list[float]) -> float:
    return -sum(a * b for a, b in zip(p, log_q, strict=True))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def test_cross_view_loss_hand_value() -> None:
    s = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]]  # two views, one sample, K = 3
    t = [[0.3, 0.1, 0.0], [0.0, 0.4, 0.2]]
    c = [0.1, 0.0, -0.1]
    tau_s, tau_t = 0.1, 0.04
    p_t = [_softmax([(a - b) / tau_t for a, b in zip(row, c, strict=True)]) for row in t]
    log_p_s = [[math.log(v) for v in _softmax([a / tau_s for a in row])] for row in s]
    expected = 0.5 * (_ce(p_t[0], log_p_s[1]) + _ce(p_t[1], log_p_s[0]))
    loss = cross_view_distillation_loss(
        torch.tensor(s).unsqueeze(1), torch.tensor(t).unsqueeze(1), torch.tensor([c]), tau_s, tau_t
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cross_view_loss_is_ln_k_for_near_uniform_logits() -> None:
    g = torch.Generator().manual_seed(0)
    k = 8192
    s = torch.randn(2, 4, k, generator=g) * 1e-3
    t = torch.randn(2, 4, k, generator=g) * 1e-3
    loss = cross_view_distillation_loss(s, t, torch.zeros(1, k), 0.1, 0.04)
    assert loss.item() == pytest.approx(math.log(k), abs=0.01)


def test_cross_view_loss_skips_same_view_pairs_and_gradients_only_reach_the_student() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 16, generator=g).requires_grad_(True)
    t = torch.randn(2, 3, 16, generator=g).requires_grad_(True)
    center = torch.zeros(1, 16)
    loss = cross_view_distillation_loss(s, t, center, 0.1, 0.05)
    # Swapping the teacher views changes the pairing: same-view pairs would then be used.
    swapped = cross_view_distillation_loss(s, t.flip(0), center, 0.1, 0.05)
    assert not torch.isclose(loss, swapped)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError):
        cross_view_distillation_loss(s[:1], t[:1], center, 0.1, 0.05)


def test_sdloss_minimum_is_teacher_entropy_and_kl_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(2)
    t_view = torch.randn(1, 3, 32, generator=g)
    t = t_view.expand(2, 3, 32)  # both views agree, so the cross-view target is the same
    center = torch.randn(1, 32, generator=g) * 0.1
    tau_s, tau_t = 0.1, 0.04
    matched = tau_s * (t - center) / tau_t  # student log-probs equal the teacher's
    h_t = entropy(teacher_probabilities(t, center, tau_t)).mean()
    loss = cross_view_distillation_loss(matched, t, center, tau_s, tau_t)
    torch.testing.assert_close(loss, h_t, rtol=1e-5, atol=1e-5)
    other = cross_view_distillation_loss(matched + torch.randn(2, 3, 32, generator=g), t, center, tau_s, tau_t)
    assert other > h_t  # KL(P_t || P_s) > 0


def test_centering_prevents_one_hot_collapse_and_sharpening_prevents_uniform() -> None:
    g = torch.Generator().manual_seed(3)
    k = 64
    logits = torch.randn(64, k, generator=g) * 0.1
    logits[:, 0] += 5.0  # one dimension dominates every sample
    h_raw = entropy(teacher_probabilities(logits, torch.zeros(1, k), 0.04)).mean()
    center = torch.zeros(1, k)
    for _ in range(100):
        center = updated_center(center, logits, 0.9)
    h_centred = entropy(teacher_probabilities(logits, center, 0.04)).mean()
    assert h_raw < 1e-3  # no centring: one-hot
    assert 0.5 < h_centred < math.log(k) - 0.5  # centred and sharpened: strictly in between
    h_unsharpened = entropy(teacher_probabilities(logits, center, 1.0)).mean()
    assert h_unsharpened > math.log(k) - 0.01  # tau_t large: towards uniform


# -------------------------------------------------------------------------------- iBOT patch loss
def _patch_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 3, 8, 16, generator=g)
    teacher = torch.randn(2, 3, 8, 16, generator=g)
    masks = torch.rand(2, 3, 8, generator=g) < 0.6
    masks[0, 0] = False  # one sample without any masked token
    center = torch.randn(1, 1, 16, generator=g) * 0.1
    return student, teacher, masks, center


def test_patch_loss_matches_reference_loop() -> None:
    student, teacher, masks, center = _patch_case()
    tau_s, tau_t = 0.1, 0.04
    total = 0.0
    for v in range(2):  # [iBOT] iBOTLoss, q == v terms
        p_t = F.softmax((teacher[v] - center[0]) / tau_t, dim=-1)
        ce = torch.sum(-p_t * F.log_softmax(student[v] / tau_s, dim=-1), dim=-1)
        m = masks[v].float()
        total += (torch.sum(ce * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()
    loss = masked_patch_distillation_loss(student, teacher, masks, center, tau_s, tau_t)
    torch.testing.assert_close(loss, total / 2, rtol=1e-5, atol=1e-6)


def test_patch_loss_is_zero_without_masked_tokens() -> None:
    student, teacher, masks, center = _patch_case()
    loss = masked_patch_distillation_loss(student, teacher, torch.zeros_like(masks), center, 0.1, 0.04)
    assert loss.item() == 0.0


def test_patch_loss_ignores_teacher_targets_at_unmasked_tokens() -> None:
    student, teacher, masks, center = _patch_case()
    loss = masked_patch_distillation_loss(student, teacher, masks, center, 0.1, 0.04)
    changed = torch.where(masks[..., None], teacher, torch.randn_like(teacher) * 10)
    assert torch.equal(masked_patch_distillation_loss(student, changed, masks, center, 0.1, 0.04), loss)
    at_masked = torch.where(masks[..., None], torch.randn_like(teacher) * 10, teacher)
    assert not torch.equal(masked_patch_distillation_loss(student, at_masked, masks, center, 0.1, 0.04), loss)


# ---------------------------------------------------------------------------------------- centre
def test_updated_center_hand_value_and_purity() -> None:
    center = torch.zeros(1, 2)
    logits = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (V=1, B=2, K=2): mean [2, 3]
    new = updated_center(center, logits, momentum=0.9)
    torch.testing.assert_close(new, torch.tensor([[0.2, 0.3]]))
    assert torch.equal(center, torch.zeros(1, 2))  # input untouched
    again = updated_center(new, logits, momentum=0.9)
    torch.testing.assert_close(again, torch.tensor([[0.9 * 0.2 + 0.2, 0.9 * 0.3 + 0.3]]))


def test_updated_patch_center_means_over_views_batch_and_tokens() -> None:
    center = torch.ones(1, 1, 2)
    logits = torch.arange(16.0).view(2, 2, 2, 2)  # (V, B, T, K)
    new = updated_center(center, logits, momentum=0.5)
    expected = 0.5 * torch.ones(1, 1, 2) + 0.5 * logits.reshape(-1, 2).mean(0).view(1, 1, 2)
    assert new.shape == (1, 1, 2)
    torch.testing.assert_close(new, expected)
