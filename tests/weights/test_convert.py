"""`nnunet-ssl convert`: MONAI and SMIT weights reproduce their networks' outputs in ours.

MONAI is a test dependency: its SwinUNETR with random weights is the reference for the MONAI layouts.
SMIT is not installable; its encoder is re-written here from The-Veeraraghavan-Lab/SMIT models/Trans.py
(PatchEmbed with norm, BasicLayer/SwinTransformerBlock/WindowAttention, PatchMerging, key names) so
that a checkpoint in its key layout can be made and its outputs computed.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_ssl.networks import PRESETS, SwinEncoder, SwinUNETRSeg
from nnunet_ssl.networks.presets import MERGE_ORDERS
from nnunet_ssl.networks.swin import PatchMerging
from nnunet_ssl.weights.convert import ConversionError, convert_state_dict, detect_layout
from nnunet_ssl.weights.convert_file import convert_file
from nnunet_ssl.weights.targets import DatasetTarget

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")


def relative_error(ours: Tensor, theirs: Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def randomize(module: nn.Module, seed: int) -> None:
    """Random values everywhere (norm affines and biases too; position tables large enough to matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.05
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _capture(module: nn.Module, store: list) -> None:
    module.register_forward_hook(lambda _m, _inp, out: store.append(out))


# ---------------------------------------------------------------- MONAI SwinUNETR, whole network


# Which windows the stages see (feature maps at 64^3: 32-16-8-4-2, at 96^3: 48-24-12-6-3):
# window 4 at 64 fits stages 0-3 exactly (no padding; shifted windows wherever the map is larger than
# the window) and clips stage 4; window 7 pads and shifts stages 0-2 and clips (MONAI's sliced position
# index) stages 3-4 at both sizes. So each merge order runs both: window 4 at 64^3, and window 7 once,
# MONAI's released setting (window 7, 96^3) with "merging" and 64^3 with "mergingv2". (Window 4 at
# 96^3, which pads only stage 3, adds no path: it was dropped to keep the unit tests under two minutes.)
@pytest.mark.parametrize(
    "downsample,merge_order,window,size",
    [("merging", "monai_merging", 4, 64), ("mergingv2", "v2", 4, 64),
     ("merging", "monai_merging", 7, 96), ("mergingv2", "v2", 7, 64)],
)
def test_monai_swinunetr_converts_to_the_same_network(downsample: str, merge_order: str, window: int, size: int) -> None:
    torch.manual_seed(0)
    reference = swin_unetr.SwinUNETR(
        in_channels=1, out_channels=3, feature_size=12, window_size=window, downsample=downsample
    ).eval()
    randomize(reference, seed=window * size)
    preset = dataclasses.replace(PRESETS["monai_v2"], name="test", embed_dim=12, window_size=window,
                                 merge_order=merge_order)
    state, report = convert_state_dict(reference.state_dict(), preset)
    assert report.layout == "monai_swinunetr" and not report.problems and report.fresh == []
    assert report.derived  # MONAI's instance norms have no affine: identity in ours
    ours = SwinUNETRSeg(preset, 1, 3, deep_supervision=False).eval()
    result = ours.load_state_dict(state, strict=False)
    # only the provenance tag, the deep-supervision heads MONAI does not have, and the second names of
    # the conv/norm modules (filled through the first)
    assert all(k == "weights_provenance" or ".all_modules." in k or re.match(r"decoder\.seg_layers\.[1-4]\.", k)
               for k in result.missing_keys)
    theirs_hidden: list = []
    ours_hidden: list = []
    _capture(reference.swinViT, theirs_hidden)
    _capture(ours.encoder, ours_hidden)
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs_logits, ours_logits = reference(x), ours(x)
    for i, (mine, theirs) in enumerate(zip(ours_hidden[0], theirs_hidden[0], strict=True)):
        assert relative_error(mine, theirs) < 1e-5, f"hidden state {i}"
    assert relative_error(ours_logits, theirs_logits) < 1e-5


def test_window_7_needs_monais_sliced_position_index_and_merge_order() -> None:
    """The options matter: our exact offsets or another merge order do not reproduce MONAI."""
    torch.manual_seed(0)
    reference = swin_unetr.SwinTransformer(
        in_chans=1, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24), downsample=swin_unetr.PatchMerging,
    ).eval()
    randomize(reference, seed=3)
    state = {f"swinViT.{k}": v for k, v in reference.state_dict().items()}
    preset = dataclasses.replace(PRESETS["monai_merging"], name="test", embed_dim=12)
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = reference(x)
    errors = {}
    for name, variant in (("monai", preset), ("exact", dataclasses.replace(preset, relative_position="exact")),
                          ("v2", dataclasses.replace(preset, merge_order="v2"))):
        converted, _ = convert_state_dict(state, variant, layout="monai_ssl")
        encoder = SwinEncoder(variant).eval()
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in converted.items()})
        with torch.no_grad():
            errors[name] = [relative_error(a, b) for a, b in zip(encoder(x), theirs, strict=True)]
    assert max(errors["monai"]) < 1e-5
    # stages 3 and 4 see 4^3 and 2^3 grids in a 7^3 window
    assert max(errors["exact"][:3]) < 1e-5 and min(errors["exact"][3:]) > 1e-3
    assert errors["v2"][1] > 0.1


# ---------------------------------------------------------------- MONAI's self-supervised checkpoint


class PatchMergingV09(swin_unetr.PatchMergingV2):
    """MONAI's ``PatchMerging`` before 1.5 (MONAI commit e093d0b15 to 1c00ea22e): sub-voxels 5 and 6 repeat 2 and 3."""

    def forward(self, x: Tensor) -> Tensor:
        x0 = x[:, 0::2, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, 0::2, :]
        x3 = x[:, 0::2, 0::2, 1::2, :]
        x4 = x[:, 1::2, 0::2, 1::2, :]
        x5 = x[:, 0::2, 1::2, 0::2, :]
        x6 = x[:, 0::2, 0::2, 1::2, :]
        x7 = x[:, 1::2, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)))


def write_model_swinvit(path: Path, encoder: nn.Module) -> None:
    """Save ``encoder`` as the public ``model_swinvit.pt``: ``state_dict``, ``module.``, ``mlp.fc1/fc2``, final norm."""
    state = {}
    for key, value in encoder.state_dict().items():
        key = key.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2.")
        state[f"module.{key}"] = value
    state["module.norm.weight"] = torch.ones(16 * encoder.embed_dim)
    state["module.norm.bias"] = torch.zeros(16 * encoder.embed_dim)
    torch.save({"epoch": 100, "state_dict": state}, path)


def test_model_swinvit_layout_converts_with_no_flag_and_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = swin_unetr.SwinTransformer(
        in_chans=1, embed_dim=48, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24), downsample=PatchMergingV09,
    ).eval()
    randomize(reference, seed=5)
    source = tmp_path / "model_swinvit.pt"
    write_model_swinvit(source, reference)
    target = DatasetTarget("Dataset990_Test", tmp_path / "plans.json", "3d_fullres", in_channels=1, num_classes=3)
    payload, report = convert_file(source, target)
    assert report.layout == "monai_ssl" and not report.problems
    assert payload["metadata"]["preset"] == "monai_ssl" and payload["metadata"]["method"] == "swinunetr"
    conversion = payload["metadata"]["conversion"]
    assert conversion["options"]["merge_order"] == "monai_merging_v09" and conversion["container"] == "state_dict"
    assert "module.norm.weight" in conversion["dropped"] and len(report.fresh) == 10
    net = SwinUNETRSeg(PRESETS["monai_ssl"], 1, 3).eval()
    net.load_state_dict(payload["network_weights"])
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for i, (mine, theirs) in enumerate(zip(net.encoder(x), reference(x), strict=True)):
            assert relative_error(mine, theirs) < 1e-5, f"hidden state {i}"


def test_convert_adapts_the_stem_to_the_datasets_channels(tmp_path: Path) -> None:
    """``--channels``: a 1-channel MONAI checkpoint into a 2-channel dataset, replicated or first-only."""
    reference = swin_unetr.SwinTransformer(
        in_chans=1, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24), downsample=PatchMergingV09,
    )
    randomize(reference, seed=6)
    source = tmp_path / "model_swinvit.pt"
    write_model_swinvit(source, reference)
    stem = reference.patch_embed.proj.weight.detach()
    target = DatasetTarget("Dataset990_Test", tmp_path / "plans.json", "3d_fullres", in_channels=2, num_classes=3)
    preset = dataclasses.replace(PRESETS["monai_ssl"], embed_dim=12)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "monai_ssl12", preset)
        replicated, _ = convert_file(source, target, preset_name="monai_ssl12")
        first, _ = convert_file(source, target, preset_name="monai_ssl12", channels="first")
    kernel = replicated["network_weights"]["encoder.patch_embed.weight"]
    torch.testing.assert_close(kernel, stem.repeat(1, 2, 1, 1, 1) / 2)
    kernel = first["network_weights"]["encoder.patch_embed.weight"]
    torch.testing.assert_close(kernel[:, :1], stem)
    assert not kernel[:, 1:].any()
    assert replicated["metadata"]["channel_mode"] == "replicate" and first["metadata"]["channel_mode"] == "first"


def test_an_sslhead_checkpoint_drops_its_heads(tmp_path: Path) -> None:
    encoder = SwinEncoder(dataclasses.replace(PRESETS["monai_ssl"], name="x", embed_dim=12))
    monai_keys = {
        k.replace("patch_embed.", "patch_embed.proj.").replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2."): v
        for k, v in encoder.state_dict().items()
    }
    monai_keys = {
        (f"layers{int(k.split('.')[1]) + 1}.0." + k.split(".", 2)[2] if k.startswith("stages.") else k): v
        for k, v in monai_keys.items()
    }
    state = {f"module.swinViT.{k}": v for k, v in monai_keys.items()}
    state.update({"module.rotation_head.weight": torch.zeros(4, 192), "module.contrastive_head.weight": torch.zeros(512, 192)})
    assert detect_layout(state) == ("monai_ssl", "module.swinViT.")
    preset = dataclasses.replace(PRESETS["monai_ssl"], name="x", embed_dim=12)
    converted, report = convert_state_dict(state, preset)
    assert not report.problems and "module.rotation_head.weight" in report.dropped
    for key, value in encoder.state_dict().items():
        assert torch.equal(converted[f"encoder.{key}"], value), key


# ---------------------------------------------------------------- SMIT


def smit_merge(x: Tensor) -> Tensor:
    """SMIT's PatchMerging concatenation (models/Trans.py), before its norm and reduction."""
    x0 = x[:, 0::2, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, 0::2, :]
    x3 = x[:, 0::2, 0::2, 1::2, :]
    x4 = x[:, 1::2, 1::2, 0::2, :]
    x5 = x[:, 0::2, 1::2, 1::2, :]
    x6 = x[:, 1::2, 0::2, 1::2, :]
    x7 = x[:, 1::2, 1::2, 1::2, :]
    return torch.cat([x0, x1, x2, x3, x4, x5, x6, x7], -1)


def test_smit_merge_order_on_a_known_tensor() -> None:
    # token value = its linear position, so each output channel names the sub-voxel it came from
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).view(1, 4, 4, 4, 1)
    merge = PatchMerging(1, "smit")
    captured: list = []
    merge.norm.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    merge(x)
    assert torch.equal(captured[0], smit_merge(x))
    # hand-computed first neighbourhood: (d,h,w) offsets (0,0,0),(1,0,0),(0,1,0),(0,0,1),(1,1,0),(0,1,1),(1,0,1),(1,1,1)
    assert captured[0][0, 0, 0, 0].tolist() == [0, 16, 4, 1, 20, 5, 17, 21]
    assert MERGE_ORDERS["smit"] != MERGE_ORDERS["monai_merging"]


def _smit_windows(x: Tensor, w: int) -> Tensor:
    b, d, h, t, c = x.shape
    x = x.view(b, d // w, w, h // w, w, t // w, w, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, w**3, c)


def _smit_unwindows(windows: Tensor, w: int, b: int, d: int, h: int, t: int) -> Tensor:
    x = windows.view(b, d // w, h // w, t // w, w, w, w, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, t, -1)


def smit_reference_forward(state: dict[str, Tensor], x: Tensor, heads: tuple[int, ...], w: int) -> list[Tensor]:
    """SMIT's SwinTransformer_Unetr forward (models/Trans.py) in functional form: the merged tokens of each stage."""
    s = w // 2
    tokens = F.conv3d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=2)
    tokens = tokens.permute(0, 2, 3, 4, 1)
    tokens = F.layer_norm(tokens, tokens.shape[-1:], state["patch_embed.norm.weight"], state["patch_embed.norm.bias"])
    coords = torch.stack(torch.meshgrid(*[torch.arange(w)] * 3, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    index = rel[..., 0] * (2 * w - 1) ** 2 + rel[..., 1] * (2 * w - 1) + rel[..., 2]
    outputs = [tokens]
    for i, nh in enumerate(heads):
        b, d, h, t, c = tokens.shape
        dp, hp, tp = (-(-n // w) * w for n in (d, h, t))
        img = torch.zeros(1, dp, hp, tp, 1)
        cnt = 0
        for sd, sh, st in itertools.product(*[(slice(0, -w), slice(-w, -s), slice(-s, None))] * 3):
            img[:, sd, sh, st] = cnt
            cnt += 1
        mw = _smit_windows(img, w).squeeze(-1)
        mask = (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0
        j = 0
        while f"layers.{i}.blocks.{j}.norm1.weight" in state:
            p = f"layers.{i}.blocks.{j}."
            shift = s if j % 2 else 0
            y = F.layer_norm(tokens, (c,), state[p + "norm1.weight"], state[p + "norm1.bias"])
            y = F.pad(y, (0, 0, 0, tp - t, 0, hp - h, 0, dp - d))
            if shift:
                y = torch.roll(y, (-shift,) * 3, (1, 2, 3))
            win = _smit_windows(y, w)
            qkv = F.linear(win, state[p + "attn.qkv.weight"], state.get(p + "attn.qkv.bias"))
            qkv = qkv.reshape(win.shape[0], w**3, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (c // nh) ** -0.5, qkv[1], qkv[2]
            attn = q @ k.transpose(-2, -1)
            bias = state[p + "attn.relative_position_bias_table"][index.reshape(-1)].view(w**3, w**3, -1)
            attn = attn + bias.permute(2, 0, 1)[None]
            if shift:
                nw = mask.shape[0]
                attn = attn.view(-1, nw, nh, w**3, w**3) + mask[None, :, None]
                attn = attn.view(-1, nh, w**3, w**3)
            out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(win.shape[0], w**3, c)
            out = F.linear(out, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
            y = _smit_unwindows(out, w, b, dp, hp, tp)
            if shift:
                y = torch.roll(y, (shift,) * 3, (1, 2, 3))
            tokens = tokens + y[:, :d, :h, :t]
            z = F.layer_norm(tokens, (c,), state[p + "norm2.weight"], state[p + "norm2.bias"])
            z = F.linear(F.gelu(F.linear(z, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                         state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
            tokens = tokens + z
            j += 1
        p = f"layers.{i}.downsample."
        merged = F.layer_norm(smit_merge(tokens), (8 * c,), state[p + "norm.weight"], state[p + "norm.bias"])
        tokens = F.linear(merged, state[p + "reduction.weight"])
        outputs.append(tokens)
    return [F.layer_norm(o, o.shape[-1:]).permute(0, 4, 1, 2, 3) for o in outputs]


def smit_checkpoint(preset_name: str, seed: int) -> dict[str, Tensor]:
    """Random weights in the SMIT key layout (``module.`` prefix, patch_embed.norm, norm0..3, no qkv bias)."""
    preset = PRESETS[preset_name]
    generator = torch.Generator().manual_seed(seed)
    e, w = preset.embed_dim, preset.window_size

    def rand(*shape: int, scale: float = 0.05) -> Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {"patch_embed.proj.weight": rand(e, 1, 2, 2, 2, scale=0.3), "patch_embed.proj.bias": rand(e),
             "patch_embed.norm.weight": 1 + rand(e), "patch_embed.norm.bias": rand(e)}
    for i, (depth, nh) in enumerate(zip(preset.depths, preset.num_heads, strict=True)):
        c = e * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            state.update({
                p + "norm1.weight": 1 + rand(c), p + "norm1.bias": rand(c),
                p + "attn.relative_position_bias_table": rand((2 * w - 1) ** 3, nh, scale=0.5),
                p + "attn.qkv.weight": rand(3 * c, c), p + "attn.proj.weight": rand(c, c), p + "attn.proj.bias": rand(c),
                p + "norm2.weight": 1 + rand(c), p + "norm2.bias": rand(c),
                p + "mlp.fc1.weight": rand(4 * c, c), p + "mlp.fc1.bias": rand(4 * c),
                p + "mlp.fc2.weight": rand(c, 4 * c), p + "mlp.fc2.bias": rand(c),
            })
        p = f"layers.{i}.downsample."
        state.update({p + "norm.weight": 1 + rand(8 * c), p + "norm.bias": rand(8 * c),
                      p + "reduction.weight": rand(2 * c, 8 * c)})
        state[f"norm{i}.weight"], state[f"norm{i}.bias"] = 1 + rand(c), rand(c)
    return state


def test_smit_checkpoint_converts_and_reproduces_smits_encoder(tmp_path: Path) -> None:
    state = smit_checkpoint("smit_public", seed=11)
    source = tmp_path / "pre_train_weight.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, source)
    target = DatasetTarget("Dataset990_Test", tmp_path / "plans.json", "3d_fullres", in_channels=1, num_classes=2)
    payload, report = convert_file(source, target)
    assert report.layout == "smit" and report.prefix == "module." and not report.problems
    assert payload["metadata"]["preset"] == "smit_public" and payload["metadata"]["method"] == "smit"
    assert sorted(k for k, why in report.dropped.items() if "output norms" in why) == [
        f"module.norm{i}.{p}" for i in range(4) for p in ("bias", "weight")
    ]
    net = SwinUNETRSeg(PRESETS["smit_public"], 1, 2).eval()
    net.load_state_dict(payload["network_weights"])
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        theirs = smit_reference_forward(state, x, PRESETS["smit_public"].num_heads, 4)
        for i, (mine, ref) in enumerate(zip(net.encoder(x), theirs, strict=True)):
            # stages 3 and 4 see 4^3 and 2^3 grids: SMIT keeps its 4^3 window shifted there (padding the
            # 2^3 grid), where MONAI/Swin would shrink it and drop the shift
            assert relative_error(mine, ref) < 1e-5, f"hidden state {i}"


# ---------------------------------------------------------------- refusals


def test_partial_and_foreign_sources_are_refused_with_the_file_named(tmp_path: Path) -> None:
    target = DatasetTarget("Dataset990_Test", tmp_path / "plans.json", "3d_fullres", in_channels=1, num_classes=2)
    state = smit_checkpoint("smit_public", seed=1)
    del state["layers.2.blocks.3.attn.proj.weight"]
    state["layers.0.blocks.0.attn.extra"] = torch.zeros(3)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(ConversionError, match=r"(?s)partial\.pt.*partial load.*missing 1.*stages\.2\.blocks\.3"):
        convert_file(partial, target)
    payload, report = convert_file(partial, target, allow_partial=True)
    assert report.missing == ["encoder.stages.2.blocks.3.attn.proj.weight"]
    assert payload["metadata"]["conversion"]["allow_partial"] is True

    with pytest.raises(ConversionError, match=r"(?s)smit\.pt.*window 4 \(preset 7\).*presets with this shape: smit_public"):
        torch.save(smit_checkpoint("smit_public", seed=2), tmp_path / "smit.pt")
        convert_file(tmp_path / "smit.pt", target, preset_name="monai_ssl")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(ConversionError, match=r"(?s)foreign\.pt: no Swin encoder found.*conv\.weight"):
        convert_file(foreign, target)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a readable checkpoint"):
        convert_file(tmp_path / "garbage.pt", target)
    monai = swin_unetr.SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    torch.save(monai.state_dict(), tmp_path / "btcv.pt")
    with pytest.raises(ConversionError, match=r"(?s)btcv\.pt.*does not record which patch merging.*--preset monai_v2"):
        convert_file(tmp_path / "btcv.pt", target)


def test_full_swinunetr_with_other_channels_keeps_the_input_block_fresh_only_when_allowed(tmp_path: Path) -> None:
    monai = swin_unetr.SwinUNETR(in_channels=1, out_channels=5, feature_size=48)
    torch.save(monai.state_dict(), tmp_path / "btcv.pt")
    target = DatasetTarget("Dataset990_Test", tmp_path / "plans.json", "3d_fullres", in_channels=2, num_classes=3)
    with pytest.raises(ConversionError, match=r"(?s)skip_blocks\.0\.conv1\.conv\.weight: \(48, 1, 3, 3, 3\) vs \(48, 2"):
        convert_file(tmp_path / "btcv.pt", target, preset_name="monai_merging")
    payload, report = convert_file(tmp_path / "btcv.pt", target, preset_name="monai_merging", allow_partial=True)
    weights = payload["network_weights"]
    assert torch.equal(weights["decoder.bottleneck.conv1.conv.weight"], monai.state_dict()["encoder10.layer.conv1.conv.weight"])
    assert any("seg_layers.0.weight stays fresh" in note for note in report.notes)
    assert weights["encoder.patch_embed.weight"].shape[1] == 2  # the stem is adapted as by `export`
    # the decoder aliases (conv / all_modules.0) hold the same converted values, and nnU-Net's loader takes the file
    assert torch.equal(weights["decoder.up_blocks.2.block.conv1.all_modules.0.weight"],
                       monai.state_dict()["decoder3.conv_block.conv1.conv.weight"])
    assert torch.equal(weights["decoder.up_blocks.2.block.conv1.norm.weight"], torch.ones(96))
    net = SwinUNETRSeg(PRESETS["monai_merging"], 2, 3)
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    path = tmp_path / "w.pt"
    torch.save(payload, path)
    load_pretrained_weights(net, str(path))
    assert torch.equal(net.decoder.up_blocks[2].block.conv1.conv.weight,
                       monai.state_dict()["decoder3.conv_block.conv1.conv.weight"])


# ---------------------------------------------------------------- the command, and nnU-Net's loader


def _plans() -> dict:
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset991_Convert", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [64, 64, 64], "median_image_size_in_voxels": [64, 64, 64], "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
            "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
            "architecture": {"network_class_name": "SwinUNETRSeg", "arch_kwargs": {}, "_kw_requires_import": []},
            "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": 40.0, "std": 60.0, "percentile_00_5": -150.0, "percentile_99_5": 250.0, "min": -1000.0,
            "max": 1000.0, "median": 40.0}},
    }


def test_convert_command_writes_a_file_nnunet_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnunet_ssl.cli import main
    from nnunet_ssl.trainers.named import TRAINERS
    from nnunet_ssl.weights.format import load_weights_file
    from nnunet_ssl.weights.targets import network_for_target, resolve_target

    preprocessed = tmp_path / "preprocessed" / "Dataset991_Convert"
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(_plans()), encoding="utf-8")
    (preprocessed / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
        "file_ending": ".nii.gz"}), encoding="utf-8")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable.split("_")[1]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    source = tmp_path / "smit.pt"
    torch.save({"state_dict": smit_checkpoint("smit_public", seed=3)}, source)
    out = tmp_path / "smit_public_501.pt"
    assert main(["convert", str(source), "-d", "991", "-c", "3d_fullres", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layout smit" in printed and "decoder parts left fresh: decoder.skip_blocks.0" in printed
    assert "dropped 8 (SMIT's per-stage output norms" in printed
    trainer = "SwinSMITPublicTrainer"
    assert main(["inspect-weights", str(out), "--trainer", trainer, "-d", "991"]) == 0
    assert "OK: fits SwinSMITPublicTrainer" in capsys.readouterr().out
    _, metadata = load_weights_file(out)
    assert metadata["conversion"]["layout"] == "smit" and metadata["conversion"]["source"] == str(source)
    network = TRAINERS[trainer].build_network_architecture(None, None, 1, 3, True)
    load_pretrained_weights(network, str(out))
    expected = smit_checkpoint("smit_public", seed=3)
    assert torch.equal(network.encoder.patch_norm.weight, expected["patch_embed.norm.weight"])
    assert torch.equal(network.encoder.stages[2].blocks[3].mlp[0].weight, expected["layers.2.blocks.3.mlp.fc1.weight"])
    assert network.provenance()["method"] == "smit"
    # a refused conversion writes nothing and says why
    bad = tmp_path / "bad.pt"
    torch.save({"weights": np.zeros(3).tolist()}, bad)
    assert main(["convert", str(bad), "-d", "991", "--out", str(tmp_path / "x.pt")]) == 1
    assert not (tmp_path / "x.pt").exists()
    assert resolve_target("991").num_classes == 3 and network_for_target(TRAINERS[trainer], resolve_target("991"))


def test_preset_options_are_validated() -> None:
    from nnunet_ssl.networks.presets import SwinPreset

    for field_name, value in (("merge_order", "zigzag"), ("window_fit", "crop"), ("relative_position", "sliced")):
        with pytest.raises(ValueError, match=field_name):
            SwinPreset("bad", embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), **{field_name: value})
    # every merge order is a permutation of the 8 sub-voxels, except MONAI's pre-1.5 one (2 repeated, 2 dropped)
    for name, order in MERGE_ORDERS.items():
        assert len(order) == 8 and (len(set(order)) == 6 if name == "monai_merging_v09" else len(set(order)) == 8)
