"""Unit tests for the Swin encoder, the SwinUNETR decoder and the presets."""
from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.networks import PRESETS, SwinEncoder, SwinUNETRSeg
from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.networks.segmentation import decode_provenance, encode_provenance
from nnunet_ssl.networks.swin import (
    MASKED_LOGIT,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

TINY = PRESETS["tiny"]

# Parameter counts of the paper (1 input channel, 96^3); the count does not depend on the input size.
EXPECTED_MILLIONS = {"smit": 64.70, "smit128": 64.70, "smit_s": 276.3, "smit_p": 586.1}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_MILLIONS))
def test_preset_parameter_counts_match_paper(name: str) -> None:
    with torch.device("meta"):
        net = SwinUNETRSeg(PRESETS[name], in_channels=1, num_classes=2)
    millions = count_parameters(net) / 1e6
    assert millions == pytest.approx(EXPECTED_MILLIONS[name], rel=0.01)


def test_monai_preset_matches_monai_swinunetr_encoder_size() -> None:
    monai = pytest.importorskip("monai.networks.nets")
    reference = monai.SwinUNETR(in_channels=1, out_channels=2, feature_size=48)
    ours = SwinEncoder(PRESETS["monai"], in_channels=1)
    assert count_parameters(ours) == count_parameters(reference.swinViT)


def test_preset_rejects_heads_that_do_not_divide_width() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        SwinPreset("bad", embed_dim=12, depths=(2, 2, 2, 2), num_heads=(5, 2, 2, 4))


@pytest.mark.parametrize("size", [(64, 64, 64), (64, 96, 128)])
def test_encoder_feature_shapes_at_every_scale(size: tuple[int, int, int]) -> None:
    encoder = SwinEncoder(TINY, in_channels=2)
    features = encoder(torch.randn(1, 2, *size))
    assert len(features) == 5
    for i, feature in enumerate(features):
        stride = 2 ** (i + 1)
        assert feature.shape == (1, TINY.embed_dim * 2**i, *(n // stride for n in size))


def test_decoder_deep_supervision_outputs_and_toggle() -> None:
    net = SwinUNETRSeg(TINY, in_channels=1, num_classes=3)
    x = torch.randn(2, 1, 64, 64, 96)
    outputs = net(x)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 3, 64 // s, 64 // s, 96 // s) for s in (1, 2, 4, 8, 16)
    ]
    net.decoder.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor)
    torch.testing.assert_close(single, outputs[0])


def test_heads_live_under_seg_layers_and_stay_built_without_deep_supervision() -> None:
    net = SwinUNETRSeg(TINY, in_channels=1, num_classes=3, deep_supervision=False)
    head_keys = [k for k in net.state_dict() if ".seg_layers." in k]
    assert len(head_keys) == 2 * net.decoder.num_scales
    assert all(k.startswith("decoder.seg_layers.") for k in head_keys)


def test_bad_input_sizes_raise_with_the_fix() -> None:
    net = SwinUNETRSeg(TINY, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=r"multiple of 32.*\(64, 64, 96\)"):
        net(torch.randn(1, 1, 64, 48, 80))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 2, 64, 64, 64))


def test_window_partition_round_trip() -> None:
    x = torch.randn(2, 8, 12, 4, 5)
    windows = window_partition(x, (4, 4, 2))
    assert windows.shape == (2, 2 * 3 * 2, 32, 5)
    torch.testing.assert_close(window_reverse(windows, (4, 4, 2), (8, 12, 4)), x)
    # the first window holds exactly the first 4x4x2 block
    torch.testing.assert_close(windows[0, 0], x[0, :4, :4, :2].reshape(32, 5))


def test_relative_position_index_hand_computed() -> None:
    index = relative_position_index((2, 2, 2), (2, 2, 2))
    # table spans 3 per axis; token 0 = (0,0,0), token 7 = (1,1,1)
    # offset(0 rel 7) = (-1,-1,-1) -> (0,0,0) -> 0 ; offset(7 rel 0) = (1,1,1) -> (2,2,2) -> 26
    assert index[0, 7] == 0 and index[7, 0] == 26
    assert torch.all(index.diagonal() == 13)  # zero offset is the table centre
    # token 1 = (0,0,1), token 2 = (0,1,0): offset (0,-1,1) -> (1,0,2) -> 9 + 0 + 2 = 11
    assert index[1, 2] == 11


def test_relative_position_index_matches_monai() -> None:
    window = (4, 4, 4)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 2] += window[2] - 1
    rel[:, :, 0] *= (2 * window[1] - 1) * (2 * window[2] - 1)
    rel[:, :, 1] *= 2 * window[2] - 1
    assert torch.equal(relative_position_index(window, window), rel.sum(-1))


def test_shrunken_window_addresses_the_right_offsets() -> None:
    small = relative_position_index((2, 3, 3), (4, 4, 4))
    full = relative_position_index((4, 4, 4), (4, 4, 4))
    # token (a,b,c) of the small window sits at the same position in the full one
    def flat(pos: tuple[int, int, int], window: tuple[int, int, int]) -> int:
        return (pos[0] * window[1] + pos[1]) * window[2] + pos[2]

    positions = list(itertools.product(range(2), range(3), range(3)))
    for p, q in itertools.product(positions, repeat=2):
        assert small[flat(p, (2, 3, 3)), flat(q, (2, 3, 3))] == full[flat(p, (4, 4, 4)), flat(q, (4, 4, 4))]


@pytest.mark.parametrize("size,window,shift", [((8, 8, 8), (4, 4, 4), (2, 2, 2)), ((8, 12, 4), (4, 4, 4), (2, 2, 0))])
def test_shifted_window_mask_blocks_tokens_from_different_regions(size, window, shift) -> None:
    mask = shifted_window_mask(size, window, shift, torch.device("cpu"))
    # original coordinate of every token of the rolled grid, and whether it wrapped around
    grids = torch.meshgrid(*(torch.arange(n) for n in size), indexing="ij")
    wrapped = torch.stack([(g + s) >= n for g, s, n in zip(grids, shift, size, strict=True)], dim=-1).long()
    # code the wrap pattern of each token; two tokens were neighbours iff their patterns agree
    code = (wrapped * torch.tensor([4, 2, 1])).sum(-1)
    windows = window_partition(code[None, ..., None], window)[0, ..., 0]
    allowed = windows[:, :, None] == windows[:, None, :]
    assert torch.equal(mask == 0, allowed)
    assert torch.all(mask[~allowed] == MASKED_LOGIT)
    assert not allowed.all(), "a shift must create at least one masked pair"


def test_window_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, num_heads=2, window=2)
    x = torch.randn(3, 4, 8, 8)  # (B, nW, N, C)
    mask = torch.zeros(4, 8, 8)
    mask[1, :4, 4:] = MASKED_LOGIT
    out = attn(x, (2, 2, 2), mask)
    qkv = attn.qkv(x).view(3, 4, 8, 3, 2, 4).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-1, -2) / 2.0 + attn.position_bias((2, 2, 2))[None, None] + mask[None, :, None]
    expected = (logits.softmax(-1) @ v).transpose(2, 3).reshape(3, 4, 8, 8)
    torch.testing.assert_close(out, attn.proj(expected), rtol=1e-5, atol=1e-5)


def _monai_key_to_ours(key: str) -> str:
    key = key.replace("patch_embed.proj.", "patch_embed.")
    key = re.sub(r"^layers(\d)\.0\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)
    return key.replace("mlp.linear1.", "mlp.0.").replace("mlp.linear2.", "mlp.2.")


def test_encoder_matches_monai_swin_transformer_with_same_weights() -> None:
    """Reference check: MONAI's SwinTransformer (v2 patch merging) with our weights gives our outputs."""
    swin = pytest.importorskip("monai.networks.nets.swin_unetr")
    torch.manual_seed(0)
    reference = swin.SwinTransformer(
        in_chans=1, embed_dim=12, window_size=(4, 4, 4), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4), downsample="mergingv2",
    ).eval()
    ours = SwinEncoder(TINY, in_channels=1).eval()
    mapped = {
        _monai_key_to_ours(k): v for k, v in reference.state_dict().items() if "relative_position_index" not in k
    }
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 1, 64, 96, 64)
    with torch.no_grad():
        for mine, theirs in zip(ours(x), reference(x, normalize=True), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_mask_token_replaces_exactly_the_masked_patches() -> None:
    encoder = SwinEncoder(TINY, in_channels=1, use_mask_token=True)
    x = torch.randn(2, 1, 64, 64, 64)
    mask = torch.rand(2, 32, 32, 32) < 0.5
    plain = encoder.embed(x)
    masked = encoder.embed(x, mask)
    token = encoder.mask_token.view(-1)
    assert torch.equal(masked[mask], token.expand(int(mask.sum()), -1))
    assert torch.equal(masked[~mask], plain[~mask])


def test_masked_content_does_not_leak_into_the_encoder() -> None:
    encoder = SwinEncoder(TINY, in_channels=1, use_mask_token=True).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    mask = torch.zeros(1, 32, 32, 32, dtype=torch.bool)
    mask[:, :8, :8, :8] = True
    changed = x.clone()
    changed[:, :, :16, :16, :16] = torch.randn(1, 1, 16, 16, 16) * 100
    with torch.no_grad():
        for a, b in zip(encoder(x, mask), encoder(changed, mask), strict=True):
            assert torch.equal(a, b)


def test_encoder_without_mask_token_rejects_a_mask() -> None:
    encoder = SwinEncoder(TINY, in_channels=1)
    with pytest.raises(ValueError, match="mask token"):
        encoder.embed(torch.randn(1, 1, 64, 64, 64), torch.zeros(1, 32, 32, 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_forward_is_finite(dtype: torch.dtype) -> None:
    # Half the tiny preset's width: every layer still runs in half precision, but CPU float16 convolutions
    # go through PyTorch's reference kernel (slow_conv3d), which took 25 s at width 12 and takes 6 s at 6.
    narrow = dataclasses.replace(TINY, name="tiny_narrow", embed_dim=6)
    net = SwinUNETRSeg(narrow, in_channels=1, num_classes=3, deep_supervision=False).eval()
    x = torch.randn(1, 1, 64, 64, 64) * 3
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = net(x)
    assert torch.isfinite(out.float()).all()
    with torch.no_grad():
        reference = net(x)
    assert (out.float() - reference).abs().max() < 0.25 * reference.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = SwinUNETRSeg(TINY, 1, 2)
    ckpt_preset = SwinPreset(**{**TINY.__dict__, "gradient_checkpointing": True})
    checkpointed = SwinUNETRSeg(ckpt_preset, 1, 2)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 64, 64, 64)
    for net in (plain, checkpointed):
        sum(o.float().mean() for o in net(x)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_one_training_step_updates_encoder_and_decoder() -> None:
    net = SwinUNETRSeg(TINY, 1, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    target = torch.randint(0, 2, (1, 64, 64, 64))
    loss = F.cross_entropy(net(torch.randn(1, 1, 64, 64, 64))[0], target)
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    for key in ("encoder.patch_embed.weight", "encoder.stages.3.blocks.1.attn.qkv.weight", "decoder.bottleneck.conv1.conv.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_provenance_round_trip_and_default_is_empty() -> None:
    net = SwinUNETRSeg(TINY, 1, 2)
    assert net.provenance() is None
    tag = {"method": "smit", "preset": "tiny", "digest": "0123abcd"}
    net.weights_provenance.copy_(encode_provenance(tag))
    assert decode_provenance(net.state_dict()["weights_provenance"]) == tag
    with pytest.raises(ValueError, match="limit"):
        encode_provenance({"x": "y" * 600})
