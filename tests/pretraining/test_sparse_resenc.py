"""The sparse forward of DNA's ResidualEncoderUNet (Spark3D, SSL_METHODS.md card 10).

Checks: an all-visible mask gives the dense network; masked positions are exactly 0 after every
sparse layer; masked input voxels change nothing (input masking) or only the first convolution's
visible border (the released code's behaviour); sparse instance norm equals InstanceNorm3d over the
visible voxels of each sample; the mask token sits only at masked positions and there is no densify
convolution at the highest resolution.

Most tests use MICRO, a 4-stage cut of resenc_tiny (total stride 8) at 32^3, whose 8^3 blocks align
with its 4^3 bottleneck as Spark3D's 32^3 blocks align with ResEnc-L's 5^3 at 160^3; the all-visible
check also runs resenc_tiny's 6 stages (at half its width) at 64^3.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import Tensor, nn

from nnunet_ssl.networks.resenc import RESENC_PRESETS, ResEncPreset, build_resenc_unet
from nnunet_ssl.pretraining.masking import bottleneck_block_masks
from nnunet_ssl.pretraining.sparse_resenc import (
    MaskTokenDensify,
    downsample_visible,
    sparse_encoder_forward,
    sparse_instance_norm,
    sparse_reconstruction,
)

#: resenc_tiny's 6 stages (total stride 32) at half its width, for the 64^3 case.
SIX_STAGES = dataclasses.replace(RESENC_PRESETS["resenc_tiny"], name="tiny_half", features_per_stage=(2, 4, 8, 16, 20, 20))
MICRO = dataclasses.replace(
    RESENC_PRESETS["resenc_tiny"], name="micro", features_per_stage=(4, 8, 8, 8), blocks_per_stage=(1, 2, 1, 1),
    strides=(1, 2, 2, 2), input_size=32,
)


def network(preset: ResEncPreset = MICRO, channels: int = 1, seed: int = 0) -> ResidualEncoderUNet:
    """A network whose norms have random affine parameters.

    nnU-Net's init zeroes the last norm weight of every residual block, which would hide the
    residual branches from the checks; random weights and biases exercise every path.
    """
    torch.manual_seed(seed)
    net = build_resenc_unet(preset, channels, channels, deep_supervision=False)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if ".norm." in name:
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return net


def visible_blocks(batch: int, crop: int, block: int, ratio: float, seed: int = 0) -> Tensor:
    """``(B, 1, D, H, W)`` visible mask (True = seen) from the Spark3D block-mask generator."""
    masks = bottleneck_block_masks(batch, (crop,) * 3, block, ratio, generator=torch.Generator().manual_seed(seed))
    return ~masks.voxel


def relative(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference over the largest magnitude of ``b``."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("preset", "crop", "batch"), [(MICRO, 32, 2), (SIX_STAGES, 64, 1)])
def test_all_visible_mask_is_the_dense_network(preset: ResEncPreset, crop: int, batch: int) -> None:
    # float64: the comparison is of the arithmetic, not of float32 round-off (the dense float32
    # network is itself ~1e-6 from its float64 value at these depths)
    net = network(preset).double()
    x = torch.randn(batch, 1, crop, crop, crop, dtype=torch.float64)
    visible = torch.ones(batch, 1, crop, crop, crop, dtype=torch.bool)
    with torch.no_grad():
        dense_skips = net.encoder(x)
        sparse_skips = sparse_encoder_forward(net.encoder, x, visible)
        assert len(sparse_skips) == len(dense_skips)
        for dense, sparse in zip(dense_skips, sparse_skips, strict=True):
            assert sparse.shape == dense.shape and relative(sparse, dense) <= 1e-6
        assert relative(net.decoder(sparse_skips), net(x)) <= 1e-6


def test_all_visible_mask_in_float32_is_within_the_dense_networks_round_off() -> None:
    net = network()
    reference = copy.deepcopy(net).double()
    x = torch.randn(2, 1, 32, 32, 32)
    visible = torch.ones(2, 1, 32, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        exact = reference(x.double())
        dense_error = relative(net(x).double(), exact)
        sparse_error = relative(net.decoder(sparse_encoder_forward(net.encoder, x, visible)).double(), exact)
        assert relative(net.decoder(sparse_encoder_forward(net.encoder, x, visible)), net(x)) <= 1e-5
    assert sparse_error <= 2 * dense_error + 1e-7


@pytest.mark.parametrize("mask_input", [True, False])
def test_masked_positions_are_exactly_zero_after_every_sparse_layer(mask_input: bool) -> None:
    net = network()
    x = torch.randn(3, 1, 32, 32, 32) + 2.0  # non-zero everywhere, so a leak cannot hide as a 0
    visible = visible_blocks(3, 32, 8, 0.6)
    seen: list[str] = []

    def observe(name: str, t: Tensor) -> None:
        masked = ~downsample_visible(visible, t.shape[2:])
        assert t.masked_select(masked.expand_as(t)).abs().max() == 0, name
        assert t.masked_select(~masked.expand_as(t)).abs().max() > 0, name
        seen.append(name)

    sparse_encoder_forward(net.encoder, x, visible, mask_input=mask_input, observe=observe)
    convs = [n for n, m in net.encoder.named_modules() if isinstance(m, nn.Conv3d) and ".all_modules." not in n]
    norms = [n for n, m in net.encoder.named_modules() if isinstance(m, nn.InstanceNorm3d) and ".all_modules." not in n]
    pools = [n for n, m in net.encoder.named_modules() if isinstance(m, nn.AvgPool3d)]
    blocks = [n for n, m in net.encoder.named_modules() if type(m).__name__ == "BasicBlockD"]
    # every conv, norm, pool and residual sum of the encoder was observed (names as DNA's modules)
    observed = set(seen)
    assert {n.removesuffix(".conv") + ".all_modules.0" for n in convs} <= observed
    assert {n.removesuffix(".norm") + ".all_modules.1" for n in norms} <= observed
    assert set(pools) <= observed and set(blocks) <= observed
    assert ("input" in observed) == mask_input


def test_masked_input_voxels_change_nothing_with_input_masking() -> None:
    net = network()
    adapter = MaskTokenDensify(net.encoder.output_channels)
    x = torch.randn(2, 1, 32, 32, 32)
    visible = visible_blocks(2, 32, 8, 0.75)
    changed = torch.where(visible, x, torch.randn_like(x) * 5.0)
    with torch.no_grad():
        skips = sparse_encoder_forward(net.encoder, x, visible)
        skips_changed = sparse_encoder_forward(net.encoder, changed, visible)
        assert all(torch.equal(a, b) for a, b in zip(skips, skips_changed, strict=True))
        out = sparse_reconstruction(net, adapter, x, visible)
        assert torch.equal(out, sparse_reconstruction(net, adapter, changed, visible))


def test_without_input_masking_masked_voxels_leak_only_into_the_first_convs_visible_border() -> None:
    """[S3D-code]: the first conv reads the unmasked input, so masked voxels reach visible voxels
    within one voxel (3^3 kernel) of a masked block, and nowhere else."""
    net = network()
    x = torch.randn(2, 1, 32, 32, 32)
    visible = visible_blocks(2, 32, 8, 0.5)
    changed = torch.where(visible, x, torch.randn_like(x) * 5.0)
    first: dict[bool, Tensor] = {}
    with torch.no_grad():
        for key, image in ((False, x), (True, changed)):
            def keep(name: str, t: Tensor, key: bool = key) -> None:
                if name == "stem.convs.0.all_modules.0":
                    first[key] = t.clone()

            sparse_encoder_forward(net.encoder, image, visible, mask_input=False, observe=keep)
    differs = (first[True] != first[False]).any(1, keepdim=True)
    masked = (~visible).float()
    border = (nn.functional.max_pool3d(masked, 3, 1, 1) > 0) & visible  # visible, next to a masked voxel
    assert differs.any() and not (differs & ~border).any()


def test_sparse_instance_norm_is_instance_norm_over_each_samples_visible_voxels() -> None:
    torch.manual_seed(1)
    norm = nn.InstanceNorm3d(5, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
        norm.bias.copy_(torch.randn(5))
    x = torch.randn(3, 5, 8, 8, 8) * 3.0 + 1.5
    visible = torch.zeros(3, 1, 8, 8, 8, dtype=torch.bool)
    visible[0, :, :4] = True  # 256 voxels
    visible[1, :, 2:3, 1:6, :7] = True  # 35 voxels
    visible[2] = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.3
    counts = visible.flatten(1).sum(1).tolist()
    assert len(set(counts)) == 3  # different visible counts per sample
    out = sparse_instance_norm(x, visible, norm)
    for b in range(3):
        seen = x[b][:, visible[b, 0]]  # (C, n_b)
        reference = norm(seen.reshape(1, 5, -1, 1, 1)).reshape(5, -1)
        assert torch.allclose(out[b][:, visible[b, 0]], reference, atol=1e-5, rtol=1e-5)
        # and by hand: biased variance, the module's eps and affine parameters
        var, mean = torch.var_mean(seen, dim=1, correction=0, keepdim=True)
        by_hand = (seen - mean) / torch.sqrt(var + 1e-5) * norm.weight[:, None] + norm.bias[:, None]
        assert torch.allclose(out[b][:, visible[b, 0]], by_hand, atol=1e-5, rtol=1e-5)
    assert out.masked_select(~visible.expand_as(out)).abs().max() == 0
    # values at masked positions are ignored
    assert torch.equal(out, sparse_instance_norm(torch.where(visible, x, x + 100.0), visible, norm))


def test_sparse_instance_norm_gradients_match_finite_differences() -> None:
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(3, affine=True).double()
    visible = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) > 0.4
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(3, dtype=torch.float64) + 1.0).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64).requires_grad_()

    def run(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        del norm.weight, norm.bias  # the module's parameters, as tensors gradcheck can perturb
        norm.weight, norm.bias = weight, bias  # type: ignore[assignment]
        return sparse_instance_norm(x, visible, norm)

    assert torch.autograd.gradcheck(run, (x, weight, bias))


def test_mask_token_fills_only_masked_positions_and_no_densify_at_full_resolution() -> None:
    widths = (4, 8, 8, 8)
    adapter = MaskTokenDensify(widths)
    assert isinstance(adapter.densify[0], nn.Identity)
    assert all(isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3) for conv in adapter.densify[1:])
    assert [tuple(t.shape) for t in adapter.mask_tokens] == [(1, w, 1, 1, 1) for w in widths]
    visible = visible_blocks(2, 32, 8, 0.5)
    skips = [torch.randn(2, w, 32 >> s, 32 >> s, 32 >> s) for s, w in enumerate(widths)]
    filled = adapter.fill(skips, visible)
    out = adapter(skips, visible)
    for s, (skip, fill, token) in enumerate(zip(skips, filled, adapter.mask_tokens, strict=True)):
        vis = downsample_visible(visible, skip.shape[2:]).expand_as(skip)
        assert torch.equal(fill[vis], skip[vis])
        assert torch.equal(fill[~vis], token.expand_as(skip)[~vis])
        assert (~vis).any() and vis.any()
        if s > 0:
            assert torch.equal(out[s], adapter.densify[s](fill))
    assert torch.equal(out[0], filled[0])  # the identity at full resolution
    # the tokens get gradients from masked positions only: none when everything is visible
    everything = torch.ones_like(visible)
    sum(o.sum() for o in adapter(skips, everything)).backward()
    assert all(t.grad is None or t.grad.abs().max() == 0 for t in adapter.mask_tokens)


def test_downsample_is_nearest_and_refuses_non_integer_factors() -> None:
    visible = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    nearest = nn.functional.interpolate(visible.float(), size=(4, 4, 4), mode="nearest").bool()
    assert torch.equal(downsample_visible(visible, (4, 4, 4)), nearest)
    with pytest.raises(ValueError, match="integer factor"):
        downsample_visible(visible, (5, 5, 5))


def test_unsupported_modules_and_deep_supervision_are_refused() -> None:
    net = network()
    x = torch.randn(1, 1, 32, 32, 32)
    visible = torch.ones(1, 1, 32, 32, 32, dtype=torch.bool)
    broken = copy.deepcopy(net)
    broken.encoder.stem.convs[0].all_modules[2] = nn.Sigmoid()  # sigmoid(0) != 0
    with pytest.raises(ValueError, match="Sigmoid"):
        sparse_encoder_forward(broken.encoder, x, visible)
    deep = build_resenc_unet(MICRO, 1, 1, deep_supervision=True)
    with pytest.raises(ValueError, match="deep_supervision"):
        sparse_reconstruction(deep, MaskTokenDensify(deep.encoder.output_channels), x, visible)
    with pytest.raises(ValueError, match="visible"):
        sparse_encoder_forward(net.encoder, x, visible[:, :, :16])


def test_bf16_autocast_keeps_masked_positions_zero_and_normalises_in_float32() -> None:
    """The engine's default on GPUs: convs run in bf16, the sparse norm in float32 (as autocast runs instance norm)."""
    net = network()
    visible = visible_blocks(2, 32, 8, 0.75)
    dtypes: dict[str, torch.dtype] = {}

    def observe(name: str, t: Tensor) -> None:
        masked = ~downsample_visible(visible, t.shape[2:])
        assert t.masked_select(masked.expand_as(t)).abs().max() == 0, name
        dtypes[name] = t.dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):
        skips = sparse_encoder_forward(net.encoder, torch.randn(2, 1, 32, 32, 32), visible, observe=observe)
    assert dtypes["stem.convs.0.all_modules.0"] == torch.bfloat16 and dtypes["stem.convs.0.all_modules.1"] == torch.float32
    assert all(torch.isfinite(s).all() for s in skips)
