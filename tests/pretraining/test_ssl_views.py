"""Axial rotations, noise cutout and cross-sample paste ([TANG] utils/ops.py; SSL_METHODS.md cards 2 and 5)."""
from __future__ import annotations

import pytest
import torch

from nnunet_ssl.pretraining.views import (
    CutoutSettings,
    aug_rand,
    block_owner,
    draw_blocks,
    noise_fill,
    random_axial_rotation,
    rotate_axial,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ rotation
def test_rotation_moves_a_voxel_within_its_axial_slice_as_computed_by_hand() -> None:
    x = torch.zeros(4, 1, 6, 8, 8)
    d, h, w = 2, 1, 5
    x[:, 0, d, h, w] = 1.0
    out = rotate_axial(x, torch.tensor([0, 1, 2, 3]))
    # rot90 in (H, W) by k = 1 maps (h, w) -> (W-1-w, h); k = 2 -> (H-1-h, W-1-w); k = 3 -> (w, H-1-h)
    expected = [(h, w), (7 - w, h), (7 - h, 7 - w), (w, 7 - h)]
    for k, (eh, ew) in enumerate(expected):
        hot = out[k, 0].nonzero().tolist()
        assert hot == [[d, eh, ew]], (k, hot)  # the slice index d (2 mm axis) never changes


def test_random_rotation_labels_match_the_applied_rotation_and_input_is_untouched() -> None:
    x = torch.rand(16, 2, 4, 8, 8, generator=generator(1))
    before = x.clone()
    rotated, labels = random_axial_rotation(x, generator(2))
    assert torch.equal(x, before)
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert len(set(labels.tolist())) > 1
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(rotated[i], torch.rot90(x[i], k, dims=(2, 3)))
    again, labels_again = random_axial_rotation(x, generator(2))
    assert torch.equal(again, rotated) and torch.equal(labels_again, labels)


def test_rotating_by_k_then_4_minus_k_is_the_identity() -> None:
    x = torch.rand(8, 1, 4, 6, 6, generator=generator(3))
    k = torch.arange(8) % 4
    assert torch.equal(rotate_axial(rotate_axial(x, k), 4 - k), x)
    assert torch.equal(rotate_axial(rotate_axial(x, k), -k), x)
    assert not torch.equal(rotate_axial(x, k), x)


def test_rotation_labels_are_roughly_uniform() -> None:
    _, labels = random_axial_rotation(torch.zeros(4000, 1, 1, 2, 2), generator(4))
    counts = torch.bincount(labels, minlength=4).float()
    sd = (4000 * 0.25 * 0.75) ** 0.5
    assert ((counts - 1000).abs() < 5 * sd).all(), counts


def test_rotation_needs_square_axial_crops() -> None:
    with pytest.raises(ValueError, match="H == W"):
        rotate_axial(torch.zeros(1, 1, 4, 4, 6), 1)
    with pytest.raises(ValueError, match="N, C, D, H, W"):
        rotate_axial(torch.zeros(1, 4, 4, 4), 1)


# -------------------------------------------------------------------------------------- cutout
def test_draw_blocks_follow_patch_rand_drop_limits_and_stop_after_the_budget() -> None:
    settings = CutoutSettings()
    spatial = (64, 96, 32)
    lows = [int(0.05 * s) for s in spatial]
    highs = [int(0.25 * s) for s in spatial]
    g = generator(5)
    for _ in range(40):
        blocks = draw_blocks(spatial, settings, g)
        sides = []
        for axis, size in enumerate(spatial):
            start, end = blocks[:, 2 * axis], blocks[:, 2 * axis + 1]
            assert (start >= 0).all() and (start < size - lows[axis]).all()
            side = end - start
            # side drawn in [low, high), clipped only by the far edge
            assert (side >= lows[axis]).all() and (side < highs[axis]).all()
            sides.append(side)
        volumes = sides[0] * sides[1] * sides[2]
        if len(blocks) > 1:  # every cuboid but the last was added while under the 0.3 * N budget
            assert volumes[:-1].sum() < 0.3 * 64 * 96 * 32


def test_covered_fraction_per_pass_is_at_most_0_3_plus_one_block() -> None:
    spatial = (96, 96, 96)
    total = 96**3
    biggest = int(0.25 * 96) ** 3
    fractions = []
    g = generator(6)
    for _ in range(60):
        blocks = draw_blocks(spatial, CutoutSettings(), g)
        covered = (block_owner(spatial, blocks, "cpu") >= 0).sum().item()
        last = blocks[-1]
        last_volume = int((last[1] - last[0]) * (last[3] - last[2]) * (last[5] - last[4]))
        assert covered <= 0.3 * total + last_volume <= 0.3 * total + biggest
        fractions.append(covered / total)
    assert max(fractions) > 0.15 and min(fractions) < 0.1  # U(0, 0.3) budgets, not a constant


def test_block_owner_is_the_last_covering_block() -> None:
    blocks = torch.tensor([[0, 2, 0, 2, 0, 2], [1, 3, 1, 3, 1, 3]])
    owner = block_owner((4, 4, 4), blocks, "cpu")
    assert owner[0, 0, 0] == 0 and owner[1, 1, 1] == 1 and owner[2, 2, 2] == 1 and owner[3, 3, 3] == -1
    assert (owner == 0).sum() == 8 - 1 and (owner == 1).sum() == 8


def test_noise_fill_is_min_max_scaled_per_block() -> None:
    blocks = torch.tensor([[0, 4, 0, 4, 0, 4], [5, 8, 5, 8, 5, 8]])
    owner = block_owner((8, 8, 8), blocks, "cpu")
    fill = noise_fill(owner, 2, 2, generator(7), torch.float32)
    assert fill.shape == (2, 8, 8, 8)
    for j in range(2):
        values = fill[:, owner == j]
        assert values.min() == 0.0 and values.max() == 1.0
        assert 0.3 < values.mean() < 0.7  # scaled Gaussian, centred
    assert (fill[:, owner < 0] == 0).all()


def test_aug_rand_noise_and_paste_from_another_crop() -> None:
    # crop 0 is all 2.0, crop 1 all 3.0: noise lies in [0, 1], pasted voxels carry the other crop's value
    x = torch.stack([torch.full((1, 32, 32, 32), 2.0), torch.full((1, 32, 32, 32), 3.0)])
    before = x.clone()
    seed = next(s for s in range(100) if aug_rand(x, generator(s)).paste_source[0] == 1)
    out = aug_rand(x, generator(seed))
    assert torch.equal(x, before)  # the input is never modified
    first = out.images[0]
    noise = (first >= 0) & (first <= 1)
    pasted = first == 3.0
    assert noise.any() and pasted.any()
    assert ((first == 2.0) | noise | pasted).all()
    assert torch.equal(out.mask[0], noise | pasted)
    unchanged = out.images == x
    assert (unchanged | out.mask).all()  # every changed voxel is in the mask
    assert 0 < out.noise_fraction[0] <= 0.3 + 8**3 / 32**3

    plain = aug_rand(x, generator(seed), paste=False)
    assert (plain.paste_source == -1).all()
    assert not (plain.images[0] == 3.0).any() and not (plain.images[1] == 2.0).any()


def test_aug_rand_is_reproducible_per_generator() -> None:
    x = torch.rand(3, 1, 32, 32, 32, generator=generator(8))
    a, b, c = aug_rand(x, generator(9)), aug_rand(x, generator(9)), aug_rand(x, generator(10))
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.images, c.images)


def test_cutout_settings_refuse_impossible_blocks() -> None:
    with pytest.raises(ValueError):
        CutoutSettings(max_fraction=1.5)
    with pytest.raises(ValueError):
        CutoutSettings(min_block=0.3, max_block=0.25)
    with pytest.raises(ValueError, match="too small"):
        draw_blocks((8, 8, 8), CutoutSettings(), generator())
