"""Unit masks: exact ratio, alignment of the three resolutions, uniformity, and no leak."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.networks import PRESETS, SwinEncoder
from nnunet_ssl.pretraining.masking import MaskSet, expand_mask, masked_unit_count, random_unit_masks


def test_exact_ratio_per_sample_at_96() -> None:
    masks = random_unit_masks(8, (96, 96, 96), generator=torch.Generator().manual_seed(0))
    assert masks.unit.shape == (8, 6, 6, 6) and masks.unit.dtype == torch.bool
    assert masks.token.shape == (8, 48, 48, 48) and masks.token.dtype == torch.bool
    assert masks.voxel.shape == (8, 1, 96, 96, 96) and masks.voxel.dtype == torch.bool
    assert masks.unit.flatten(1).sum(1).tolist() == [162] * 8
    assert masks.token.flatten(1).float().mean(1).tolist() == [0.75] * 8
    assert masks.voxel.flatten(1).float().mean(1).tolist() == [0.75] * 8
    assert not torch.equal(masks.unit[0], masks.unit[1])  # independent per sample


@pytest.mark.parametrize(
    ("crop", "unit", "ratio"),
    [((64, 64, 64), 16, 0.75), ((64, 96, 32), 16, 0.7), ((32, 32, 32), 8, 0.6), ((64, 64, 64), 32, 1.0)],
)
def test_count_is_ceil_of_ratio(crop: tuple[int, int, int], unit: int, ratio: float) -> None:
    n_units = math.prod(n // unit for n in crop)
    masks = random_unit_masks(5, crop, unit=unit, ratio=ratio, generator=torch.Generator().manual_seed(1))
    expected = math.ceil(round(ratio * n_units, 9))
    assert masks.unit.flatten(1).sum(1).tolist() == [expected] * 5
    assert masks.voxel.shape == (5, 1, *crop)


def test_count_is_robust_to_float_noise() -> None:
    assert masked_unit_count(216, 0.75) == 162
    assert masked_unit_count(5, 0.6) == 3  # 0.6 * 5 = 3.0000000000000004 in floats
    assert masked_unit_count(216, 0.7) == 152
    assert masked_unit_count(27, 0.0) == 0


def test_token_and_voxel_masks_are_the_unit_mask_upsampled() -> None:
    masks = random_unit_masks(3, (64, 64, 64), generator=torch.Generator().manual_seed(2))
    unit = masks.unit.float()[:, None]
    assert torch.equal(F.interpolate(unit, scale_factor=8, mode="nearest")[:, 0].bool(), masks.token)
    assert torch.equal(F.interpolate(unit, scale_factor=16, mode="nearest").bool(), masks.voxel)
    # iBOT check: the unit mask is the token mask max-pooled by 8, and each 8^3 block is constant.
    token = masks.token.float()[:, None]
    assert torch.equal(F.max_pool3d(token, 8)[:, 0].bool(), masks.unit)
    assert torch.equal((-F.max_pool3d(-token, 8))[:, 0].bool(), masks.unit)


def test_expand_mask_hand_case() -> None:
    mask = torch.tensor([[[[True, False]]]])  # (1, 1, 1, 2)
    out = expand_mask(mask, 2)
    expected = torch.tensor([True, True, False, False]).expand(1, 2, 2, 4)
    assert torch.equal(out, expected)


def test_units_are_uniform() -> None:
    masks = random_unit_masks(4000, (48, 48, 48), ratio=0.5, generator=torch.Generator().manual_seed(3))
    freq = masks.unit.flatten(1).float().mean(0)  # 27 units, 14 masked each time
    assert torch.allclose(freq, torch.full_like(freq, 14 / 27), atol=0.04)


def test_generator_reproducible_and_global_rng_used_without_one() -> None:
    a = random_unit_masks(2, (64, 64, 64), generator=torch.Generator().manual_seed(7))
    b = random_unit_masks(2, (64, 64, 64), generator=torch.Generator().manual_seed(7))
    c = random_unit_masks(2, (64, 64, 64), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.unit, b.unit) and not torch.equal(a.unit, c.unit)
    torch.manual_seed(11)
    d = random_unit_masks(2, (64, 64, 64))
    torch.manual_seed(11)
    e = random_unit_masks(2, (64, 64, 64))
    assert torch.equal(d.unit, e.unit)
    assert isinstance(d, MaskSet)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_size": (64, 64, 60)},
        {"crop_size": (64, 64)},
        {"unit": 15},
        {"unit": 16, "patch": 3},
        {"ratio": 1.5},
        {"ratio": -0.1},
        {"batch": 0},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    args = {"batch": 2, "crop_size": (64, 64, 64), **kwargs}
    with pytest.raises(ValueError):
        random_unit_masks(**args)


@torch.no_grad()
def test_masked_content_does_not_leak_into_the_encoder() -> None:
    torch.manual_seed(0)
    encoder = SwinEncoder(PRESETS["tiny"], use_mask_token=True).eval()
    x = torch.rand(1, 1, 64, 64, 64)
    masks = random_unit_masks(1, (64, 64, 64), generator=torch.Generator().manual_seed(4))
    changed = torch.where(masks.voxel, torch.rand_like(x) * 5 - 2, x)
    assert not torch.equal(changed, x)
    before = encoder(x, masks.token)
    after = encoder(changed, masks.token)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # The check can fail: a change at one visible voxel does reach the output.
    visible = (~masks.voxel).nonzero()[0].tolist()
    poked = x.clone()
    poked[visible[0], visible[1], visible[2], visible[3], visible[4]] += 1.0
    assert not torch.equal(encoder(poked, masks.token)[-1], before[-1])
