"""Weights made elsewhere -> our network's state dict: pure ``state_dict -> (state_dict, report)`` functions.

Layouts (detected from the keys, see :func:`detect_layout`):

* ``monai_ssl``: MONAI's self-supervised Swin UNETR encoder, as the public ``model_swinvit.pt``
  (research-contributions SwinUNETR/Pretrain) stores it: ``{"state_dict": ...}`` with a ``module.``
  prefix, MLP layers named ``mlp.fc1``/``mlp.fc2`` and a final ``norm`` after stage 4 that SwinUNETR
  does not use (MONAI's ``SwinUNETR.load_from`` reads exactly these keys). A whole pretraining
  ``SSLHead`` (``swinViT.``/``swin_vit.`` prefix plus rotation, contrastive and reconstruction heads)
  is read the same way; the heads are dropped. Default preset ``monai_ssl``: the merge and the
  position-bias slicing of the MONAI code it was released for (see :mod:`nnunet_ssl.networks.presets`).
* ``monai_swinunetr``: a full MONAI ``SwinUNETR`` state dict (``swinViT.*`` plus ``encoder1..4``,
  ``encoder10``, ``decoder5..1``, ``out``). Our decoder is SwinUNETR's, so every block converts:
  ``encoder1..4`` -> ``decoder.skip_blocks.0..3``, ``encoder10`` -> ``decoder.bottleneck``,
  ``decoder5..1`` -> ``decoder.up_blocks.0..4``, ``out`` -> ``decoder.seg_layers.0``. MONAI's
  ``UnetResBlock`` (conv, norm, LeakyReLU, conv, norm, 1x1 conv + norm on the residual when the width
  changes, add, LeakyReLU) is dynamic-network-architectures' ``BasicBlockD`` with other names; its
  instance norms have no affine parameters (``affine=False``), so ours get weight 1 and bias 0. The
  state dict does not say which ``downsample`` it was built with, so there is no default preset.
* ``smit``: the SMIT authors' encoder (The-Veeraraghavan-Lab/SMIT, models/Trans.py,
  ``SwinTransformer_Unetr``): timm-style ``layers.{i}.blocks.{j}``, ``patch_embed.norm``
  (``patch_norm=True``), ``mlp.fc1``/``mlp.fc2``, no qkv bias in the public configuration, and
  per-stage output norms ``norm0..3`` that the SwinUNETR layout has no place for (its decoder reads
  the merged tokens through affine-free layer norms); they are dropped and listed. Default preset
  ``smit_public``.

Nothing here reads files or downloads anything; :mod:`nnunet_ssl.weights.convert_file` does the I/O.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nnunet_ssl.networks.presets import PRESETS, SwinPreset
from nnunet_ssl.networks.segmentation import SwinUNETRSeg
from nnunet_ssl.networks.swin import relative_position_index

LAYOUTS = ("monai_ssl", "monai_swinunetr", "smit")
#: Preset a layout converts to when none is given (None: the user must choose).
DEFAULT_PRESETS: dict[str, str | None] = {"monai_ssl": "monai_ssl", "monai_swinunetr": None, "smit": "smit_public"}
#: Method recorded in the metadata and the provenance tag, per layout.
DEFAULT_METHODS = {"monai_ssl": "swinunetr", "monai_swinunetr": "monai_swinunetr", "smit": "smit"}
#: Our decoder's parts, for the report of what stays fresh.
DECODER_PARTS = tuple(
    [f"decoder.skip_blocks.{i}" for i in range(4)] + ["decoder.bottleneck"]
    + [f"decoder.up_blocks.{i}" for i in range(5)]
)
_STEM_KEY = "patch_embed.proj.weight"


class ConversionError(ValueError):
    """A state dict that cannot be converted as asked; the message says why and what to do."""


@dataclass
class ConversionReport:
    """What a conversion did, key by key.

    Attributes:
        layout: The source layout (:data:`LAYOUTS`).
        prefix: The prefix in front of the source encoder's keys (``module.``, ``module.swinViT.`` ...).
        matched: Our key -> the source key it was copied from.
        derived: Our key -> how its value was made (e.g. identity affine of a norm MONAI builds without one).
        dropped: Source key -> why it is not used (known parts with no counterpart, pretraining heads).
        unexpected: Source keys this layout does not explain.
        mismatched: ``"key: source shape vs ours"`` for tensors of the wrong shape.
        missing: Our encoder keys (and, for a full-network source, decoder keys) that got no value.
        fresh: Decoder parts that keep their fresh (seeded) initialisation.
        notes: Other facts worth printing.
    """

    layout: str
    prefix: str = ""
    matched: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Everything that makes the load partial or ambiguous (refused without ``allow_partial``)."""
        return (
            [f"missing {k}" for k in self.missing]
            + [f"unexpected {k}" for k in self.unexpected]
            + [f"shape mismatch {k}" for k in self.mismatched]
        )

    def lines(self, limit: int = 8) -> list[str]:
        """A human-readable summary, at most ``limit`` keys per list."""

        def show(keys: list[str]) -> str:
            shown = ", ".join(keys[:limit])
            return shown + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")

        encoder = sum(1 for k in self.matched if k.startswith("encoder."))
        decoder = len(self.matched) - encoder
        out = [f"layout {self.layout} (source prefix {self.prefix!r})",
               f"matched {len(self.matched)} tensors ({encoder} encoder, {decoder} decoder)"]
        if self.derived:
            out.append(f"derived {len(self.derived)}: {show(sorted(set(self.derived.values())))}")
        reasons: dict[str, list[str]] = {}
        for key, reason in self.dropped.items():
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            out.append(f"dropped {len(keys)} ({reason}): {show(keys)}")
        for name, keys in (("unexpected", self.unexpected), ("shape mismatch", self.mismatched),
                           ("missing", self.missing)):
            if keys:
                out.append(f"{name} {len(keys)}: {show(keys)}")
        out.append("decoder parts left fresh: " + (show(self.fresh) if self.fresh else "none"))
        out.extend(self.notes)
        return out

    def to_metadata(self) -> dict[str, Any]:
        """Counts and the kept-fresh parts, small enough for the weights file's metadata."""
        return {
            "layout": self.layout,
            "prefix": self.prefix,
            "matched": len(self.matched),
            "derived": len(self.derived),
            "dropped": sorted(self.dropped),
            "unexpected": list(self.unexpected),
            "mismatched": list(self.mismatched),
            "missing": list(self.missing),
            "fresh": list(self.fresh),
        }


# ---------------------------------------------------------------- detection


def find_encoder_prefix(state: Mapping[str, Any], prefix: str | None = None) -> str:
    """The prefix in front of the source encoder's ``patch_embed.proj.weight``.

    Raises:
        ConversionError: no encoder, or several (then ``prefix`` must say which).
    """
    roots = sorted(k[: -len(_STEM_KEY)] for k in state if k.endswith(_STEM_KEY))
    if prefix is not None:
        if prefix not in roots:
            raise ConversionError(f"no encoder under prefix {prefix!r}; encoders found under {roots}")
        return prefix
    if not roots:
        sample = ", ".join(list(state)[:5])
        raise ConversionError(
            f"no Swin encoder found (no key ending in {_STEM_KEY!r}); the first keys are: {sample}. "
            f"Known layouts: {', '.join(LAYOUTS)}"
        )
    if len(roots) > 1:
        raise ConversionError(f"several encoders found, under prefixes {roots}; choose one with --prefix")
    return roots[0]


def detect_layout(state: Mapping[str, Any], prefix: str | None = None) -> tuple[str, str]:
    """``(layout, encoder_prefix)`` of a state dict (see the module docstring).

    Raises:
        ConversionError: for a layout this module does not know.
    """
    root = find_encoder_prefix(state, prefix)
    keys = [k[len(root):] for k in state if k.startswith(root)]
    if any(re.match(r"layers[1-4]\.0\.", k) for k in keys):
        outer = root[: -len("swinViT.")] if root.endswith("swinViT.") else None
        if outer is not None and f"{outer}encoder1.layer.conv1.conv.weight" in state:
            return "monai_swinunetr", root
        return "monai_ssl", root
    if any(re.match(r"layers\.\d+\.blocks\.", k) for k in keys):
        return "smit", root
    raise ConversionError(
        f"the encoder under {root!r} has neither MONAI's layers1..4 nor timm/SMIT's layers.N stages; "
        f"known layouts: {', '.join(LAYOUTS)}"
    )


@dataclass(frozen=True)
class SourceShape:
    """Architecture read off a source encoder's tensors."""

    in_channels: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    qkv_bias: bool
    patch_norm: bool


def _stage_key(layout: str, stage: int) -> str:
    return f"layers{stage + 1}.0." if layout.startswith("monai") else f"layers.{stage}."


def source_shape(state: Mapping[str, Tensor], layout: str, root: str) -> SourceShape:
    """Read the encoder's shape; the window edge comes from the bias table's ``(2w-1)^3`` rows."""
    stem = state[root + _STEM_KEY]
    depths, heads, windows, bias = [], [], [], []
    for stage in range(4):
        base = root + _stage_key(layout, stage)
        blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(base) + r"blocks\.(\d+)\.", k))}
        depths.append(len(blocks))
        table = state.get(f"{base}blocks.0.attn.relative_position_bias_table")
        if table is None:
            raise ConversionError(f"stage {stage + 1} has no blocks.0.attn.relative_position_bias_table under {base!r}")
        heads.append(int(table.shape[1]))
        windows.append(round((round(table.shape[0] ** (1 / 3)) + 1) / 2))
        bias.append(f"{base}blocks.0.attn.qkv.bias" in state)
    if len(set(windows)) != 1:
        raise ConversionError(f"stages have different windows {windows}; our encoder uses one window size")
    return SourceShape(
        in_channels=int(stem.shape[1]),
        embed_dim=int(stem.shape[0]),
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=windows[0],
        qkv_bias=all(bias),
        patch_norm=f"{root}patch_embed.norm.weight" in state,
    )


def check_preset_fits(shape: SourceShape, preset: SwinPreset) -> None:
    """Raise naming every architecture difference between the source and ``preset``, and presets that fit."""
    differences = [
        f"{name} {have} (preset {want})"
        for name, have, want in (
            ("embed_dim", shape.embed_dim, preset.embed_dim),
            ("depths", shape.depths, tuple(preset.depths)),
            ("num_heads", shape.num_heads, tuple(preset.num_heads)),
            ("window", shape.window_size, preset.window_size),
            ("qkv_bias", shape.qkv_bias, preset.qkv_bias),
            ("patch_norm", shape.patch_norm, preset.patch_norm),
        )
        if have != want
    ]
    if differences:
        fitting = [name for name, p in PRESETS.items() if _fits(shape, p)]
        hint = f"presets with this shape: {', '.join(fitting)}" if fitting else "no preset has this shape"
        raise ConversionError(f"the checkpoint does not fit preset {preset.name!r}: {'; '.join(differences)}; {hint}")


def _fits(shape: SourceShape, preset: SwinPreset) -> bool:
    return (shape.embed_dim, shape.depths, shape.num_heads, shape.window_size, shape.qkv_bias, shape.patch_norm) == (
        preset.embed_dim, tuple(preset.depths), tuple(preset.num_heads), preset.window_size, preset.qkv_bias,
        preset.patch_norm,
    )


# ---------------------------------------------------------------- key maps


def _encoder_key(layout: str, key: str) -> str | None:
    """Our encoder key (without ``encoder.``) for a source key relative to the encoder prefix."""
    if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return key.replace("patch_embed.proj.", "patch_embed.")
    if key in ("patch_embed.norm.weight", "patch_embed.norm.bias"):
        return key.replace("patch_embed.norm.", "patch_norm.")
    pattern = r"layers([1-4])\.0\.(.+)" if layout.startswith("monai") else r"layers\.(\d+)\.(.+)"
    match = re.fullmatch(pattern, key)
    if match is None:
        return None
    stage = int(match.group(1)) - (1 if layout.startswith("monai") else 0)
    rest = match.group(2)
    for theirs, ours in (("mlp.fc1.", "mlp.0."), ("mlp.linear1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
                         ("mlp.linear2.", "mlp.2.")):
        rest = rest.replace(theirs, ours)
    return f"stages.{stage}.{rest}"


def _encoder_dropped_reason(layout: str, key: str) -> str | None:
    """Why a known source encoder key is not used, or None for an unknown key."""
    if key.endswith("attn.relative_position_index"):
        return "relative position index (a buffer; recomputed, checked equal)"
    if layout == "monai_ssl" and key in ("norm.weight", "norm.bias"):
        return "final norm of the pretraining network (SwinUNETR does not use it)"
    if layout == "smit" and re.fullmatch(r"norm[0-3]\.(weight|bias)", key):
        return "SMIT's per-stage output norms (no counterpart in the SwinUNETR layout)"
    if key == "mask_token" or key.endswith(".mask_token"):
        return "mask token (pretraining only)"
    return None


#: MONAI SwinUNETR CNN block -> our decoder block.
_MONAI_DECODER_BLOCKS = {
    "encoder1.layer.": "decoder.skip_blocks.0.", "encoder2.layer.": "decoder.skip_blocks.1.",
    "encoder3.layer.": "decoder.skip_blocks.2.", "encoder4.layer.": "decoder.skip_blocks.3.",
    "encoder10.layer.": "decoder.bottleneck.",
    **{f"decoder{5 - i}.conv_block.": f"decoder.up_blocks.{i}.block." for i in range(5)},
}
#: MONAI UnetResBlock member -> BasicBlockD member.
_RES_BLOCK_PARTS = {
    "conv1.conv.": "conv1.conv.", "norm1.": "conv1.norm.",
    "conv2.conv.": "conv2.conv.", "norm2.": "conv2.norm.",
    "conv3.conv.": "skip.0.conv.", "norm3.": "skip.0.norm.",
}


def _monai_decoder_key(key: str) -> str | None:
    """Our decoder key for a MONAI SwinUNETR key outside ``swinViT.``, or None."""
    for i in range(5):
        if key == f"decoder{5 - i}.transp_conv.conv.weight":
            return f"decoder.up_blocks.{i}.transp_conv.weight"
    if key in ("out.conv.conv.weight", "out.conv.conv.bias"):
        return key.replace("out.conv.conv.", "decoder.seg_layers.0.")
    for theirs, ours in _MONAI_DECODER_BLOCKS.items():
        if key.startswith(theirs):
            rest = key[len(theirs):]
            for part, our_part in _RES_BLOCK_PARTS.items():
                if rest.startswith(part):
                    return ours + our_part + rest[len(part):]
    return None


# ---------------------------------------------------------------- conversion


def reference_network(preset: SwinPreset, in_channels: int, num_classes: int) -> SwinUNETRSeg:
    """Our network on the meta device: the keys and shapes a conversion must produce."""
    with torch.device("meta"):
        return SwinUNETRSeg(preset, in_channels, num_classes, deep_supervision=True)


def canonical_keys(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Each parameter and persistent buffer once (the first of its aliases), with its shape.

    dynamic-network-architectures registers a block's conv and norm twice (``conv`` and
    ``all_modules.0``); loading the first name fills both.
    """
    persistent = network.state_dict()
    keys = {name: tuple(p.shape) for name, p in network.named_parameters()}
    keys.update({name: tuple(b.shape) for name, b in network.named_buffers() if name in persistent})
    return keys


def convert_state_dict(
    state: Mapping[str, Any],
    preset: SwinPreset,
    layout: str | None = None,
    prefix: str | None = None,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert a MONAI or SMIT state dict into :class:`SwinUNETRSeg` keys for ``preset``.

    Args:
        state: The source state dict (already taken out of its checkpoint container).
        preset: The preset the weights are for; its shape must match the source's, and its merge order
            and window options must be the ones the source was trained with (not checkable from keys).
        layout: One of :data:`LAYOUTS`; detected when None.
        prefix: The source encoder's key prefix, when the state holds several encoders.

    Returns:
        ``(state, report)``: ``state`` has our keys (``encoder.*``, and ``decoder.*`` for a full
        MONAI SwinUNETR), canonical names only; load it with ``strict=False`` and consult the report.

    Raises:
        ConversionError: unknown layout or a preset of another shape.
    """
    detected, root = detect_layout(state, prefix)
    layout = layout or detected
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    shape = source_shape(state, layout, root)
    check_preset_fits(shape, preset)
    report = ConversionReport(layout=layout, prefix=root)
    num_classes = 1
    outer = root[: -len("swinViT.")] if layout == "monai_swinunetr" else None
    if outer is not None and f"{outer}out.conv.conv.weight" in state:
        num_classes = int(state[f"{outer}out.conv.conv.weight"].shape[0])
    network = reference_network(preset, shape.in_channels, num_classes)
    targets = canonical_keys(network)
    out: dict[str, Tensor] = {}

    def put(ours: str, source_key: str, tensor: Tensor) -> None:
        if ours not in targets:
            report.unexpected.append(source_key)
        elif tuple(tensor.shape) != targets[ours]:
            report.mismatched.append(f"{source_key}: {tuple(tensor.shape)} vs {ours} {targets[ours]}")
        else:
            out[ours] = tensor.detach().clone()
            report.matched[ours] = source_key

    for key, tensor in state.items():
        if not isinstance(tensor, Tensor):
            report.dropped[key] = "not a tensor"
            continue
        if key.startswith(root):
            relative = key[len(root):]
            reason = _encoder_dropped_reason(layout, relative)
            if reason is not None:
                report.dropped[key] = reason
                if relative.endswith("attn.relative_position_index"):
                    _check_index(tensor, shape.window_size, key, report)
                continue
            ours = _encoder_key(layout, relative)
            if ours is None:
                report.unexpected.append(key)
            else:
                put(f"encoder.{ours}", key, tensor)
        elif outer is not None and key.startswith(outer):
            ours = _monai_decoder_key(key[len(outer):])
            if ours is None:
                report.unexpected.append(key)
            else:
                put(ours, key, tensor)
        else:
            report.dropped[key] = "outside the encoder (pretraining heads, wrappers)"

    # MONAI builds its instance norms without affine parameters: identity affine in ours
    for ours in targets:
        if ours.startswith("decoder.") and ours not in out and ".norm." in ours and outer is not None:
            block = ours.rsplit(".norm.", 1)[0]
            if f"{block}.conv.weight" in out:
                out[ours] = torch.ones(targets[ours]) if ours.endswith("weight") else torch.zeros(targets[ours])
                report.derived[ours] = "identity affine of an instance norm built with affine=False"

    encoder_targets = [k for k in targets if k.startswith("encoder.")]
    report.missing = [k for k in encoder_targets if k not in out]
    if outer is not None:
        report.missing += [
            k for k in targets if k.startswith("decoder.") and ".seg_layers." not in k and k not in out
        ]
    report.fresh = [
        part for part in DECODER_PARTS if not any(k.startswith(part + ".") and k in out for k in targets)
    ]
    if outer is not None and not any(".seg_layers." in k for k in out):
        report.notes.append("segmentation heads stay fresh (nnU-Net never loads heads)")
    report.notes.append(
        f"preset {preset.name}: merge order {preset.merge_order}, window fit {preset.window_fit}, "
        f"relative position {preset.relative_position}"
    )
    return out, report


def _check_index(index: Tensor, window: int, key: str, report: ConversionReport) -> None:
    """A stored relative-position index must be the standard one we recompute."""
    w = (window, window, window)
    if tuple(index.shape) != (window**3, window**3) or not torch.equal(index.long(), relative_position_index(w, w)):
        report.mismatched.append(f"{key}: not the standard relative position index of window {window}")


def split_encoder_decoder(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(encoder state without the prefix, decoder state with ``decoder.`` kept)``."""
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
    return encoder, decoder
