"""``nnunet-ssl convert``: a checkpoint made elsewhere (or one of our runs) -> a ``-pretrained_weights`` file.

Reads the source with ``weights_only=True`` and never downloads anything. The converted encoder goes
through the same :func:`~nnunet_ssl.weights.targets.build_weights_for_target` as ``nnunet-ssl export``
(stem adaptation, seeded fresh decoder, provenance tag); a full MONAI SwinUNETR's decoder is then
loaded over the fresh one. A load that would leave encoder keys (or, for a full network, decoder keys)
without a value, meet keys it cannot place, or shapes that differ is refused unless ``allow_partial``.

An nnssl checkpoint (a ResEnc U-Net with its ``nnssl_adaptation_plan``, :mod:`nnunet_ssl.weights.nnssl`)
keeps its architecture: the target plans must plan the same network (checked as for our ResEnc runs), and
its pretrained decoder comes along unless ``encoder_only``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nnunet_ssl.checkpoints import CHECKPOINT_FORMAT, NNUNET_CHECKPOINT_GLOBALS, read_torch_file
from nnunet_ssl.networks.family import FAMILIES
from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.networks.segmentation import SwinUNETRSeg
from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.weights import nnssl
from nnunet_ssl.weights.convert import (
    DEFAULT_METHODS,
    DEFAULT_PRESETS,
    ConversionError,
    ConversionReport,
    convert_state_dict,
    detect_layout,
    split_encoder_decoder,
)
from nnunet_ssl.weights.export import export_run
from nnunet_ssl.weights.targets import DatasetTarget, build_weights_for_target

logger = logging.getLogger(__name__)

#: Entries of a checkpoint dict that may hold the state dict, in the order they are tried.
CONTAINER_KEYS = ("state_dict", "model", "network_weights", "teacher", "student", "net")
#: Layout name of our own pretraining runs.
RUN_LAYOUT = "nnunet_ssl_run"
#: Layout name of nnssl checkpoints (``--layout nnssl`` skips their detection).
NNSSL_LAYOUT = "nnssl"


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and any(isinstance(v, Tensor) for v in value.values())


def unwrap_checkpoint(payload: Any, path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict inside a loaded checkpoint and the entry it came from (``""`` for the top level).

    Raises:
        ConversionError: naming the file when no state dict is found.
    """
    if isinstance(payload, dict):
        if isinstance(payload.get("metadata"), dict) and payload["metadata"].get("format") == "nnunet-ssl-weights":
            raise ConversionError(
                f"{path}: already an nnunet-ssl weights file; pass it to -pretrained_weights directly "
                "(re-target a pretraining run with `nnunet-ssl export`)"
            )
        for key in CONTAINER_KEYS:
            if _is_state_dict(payload.get(key)):
                return payload[key], key
        if _is_state_dict(payload):
            return {k: v for k, v in payload.items() if isinstance(v, Tensor)}, ""
    raise ConversionError(
        f"{path}: no state dict found (looked at the top level and at {', '.join(CONTAINER_KEYS)}); "
        f"got {type(payload).__name__}"
        + (f" with keys {sorted(map(str, payload))[:6]}" if isinstance(payload, dict) else "")
    )


def convert_file(
    source: str | Path,
    target: DatasetTarget,
    preset_name: str | None = None,
    layout: str | None = None,
    prefix: str | None = None,
    allow_partial: bool = False,
    method: str | None = None,
    decoder_seed: int = 0,
    channels: str = "replicate",
    encoder_only: bool = False,
    export_from: str = "default",
) -> tuple[dict[str, Any], ConversionReport]:
    """Build the ``-pretrained_weights`` payload of ``source`` for ``target``.

    Args:
        source: A MONAI or SMIT checkpoint file, an nnssl checkpoint (file, or its folder with
            ``checkpoint_final.pth``), or one of our pretraining runs (folder or checkpoint).
        target: The dataset's channels and classes under its plans.
        preset_name: Architecture preset; default: the layout's (:data:`DEFAULT_PRESETS`) or the run's.
        layout: Force a layout instead of detecting it.
        prefix: The source encoder's key prefix, when the file holds several encoders.
        allow_partial: Write the file even when keys are missing, unplaced or of another shape.
        method: Method recorded in the metadata; default: the layout's (:data:`DEFAULT_METHODS`).
        decoder_seed: Seed of the fresh decoder parts.
        channels: Stem adaptation when the source's input channels differ from the target's
            (``replicate``, ``first`` or ``mean``; :mod:`nnunet_ssl.weights.channels`).
        encoder_only: A fresh seeded decoder even when the source holds a pretrained one (nnssl, our runs).
        export_from: Which encoder of one of our runs (``default``, ``teacher``, ``student``), as ``export --from``.

    Returns:
        ``(payload, report)``; the payload's metadata has a ``conversion`` entry (source, layout,
        options and the report's counts).

    Raises:
        ConversionError: unknown layout, wrong preset, or a partial load without ``allow_partial``.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if layout == NNSSL_LAYOUT or is_nnssl_checkpoint(path):
        return _convert_nnssl(path, target, preset_name, decoder_seed, channels, encoder_only)
    payload = None if path.is_dir() else read_torch_file(path, "checkpoint")
    if path.is_dir() or (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT):
        return _convert_run(path, target, preset_name, decoder_seed, channels, encoder_only, export_from)
    state, container = unwrap_checkpoint(payload, path)
    try:
        detected, _ = detect_layout(state, prefix)
        layout = layout or detected
        preset_name = preset_name or DEFAULT_PRESETS.get(layout)
        if preset_name is None:
            raise ConversionError(
                "a MONAI SwinUNETR state dict does not record which patch merging it was built with; choose "
                "--preset monai_v2 (downsample='mergingv2'), monai_merging (downsample='merging', MONAI >= 1.5) "
                "or monai_ssl (downsample='merging', MONAI < 1.5, e.g. fine-tuned from model_swinvit.pt)"
            )
        converted, report = convert_state_dict(state, get_preset(preset_name), layout, prefix)
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from error
    if report.problems and not allow_partial:
        raise ConversionError(
            f"{path}: refusing a partial load into preset {preset_name!r}:\n  " + "\n  ".join(report.lines())
            + "\nFix the preset/layout, or pass --allow-partial to keep fresh weights where nothing fits."
        )
    method = method or DEFAULT_METHODS[report.layout]
    encoder_state, decoder_state = split_encoder_decoder(converted)
    if report.missing:
        encoder_state = _fill_fresh_encoder(encoder_state, preset_name, decoder_seed)
    result = build_weights_for_target(
        encoder_state, preset_name, target, method=method, source=str(path), decoder_seed=decoder_seed,
        channels=channels,
    )
    if decoder_state:
        result["network_weights"] = _overlay_decoder(result["network_weights"], decoder_state, preset_name,
                                                     target, report)
        if report.problems and not allow_partial:
            raise ConversionError(
                f"{path}: the decoder does not fit {target.dataset_name}:\n  " + "\n  ".join(report.lines())
                + "\nPass --allow-partial to keep fresh weights where nothing fits."
            )
    result["metadata"]["conversion"] = {
        "source": str(path),
        "container": container,
        "preset": preset_name,
        "options": _preset_options(preset_name),
        "allow_partial": allow_partial,
        **report.to_metadata(),
    }
    return result, report


def _fill_fresh_encoder(encoder_state: dict[str, Tensor], preset_name: str, seed: int) -> dict[str, Tensor]:
    """Encoder keys the source lacks (or had in another shape) from a fresh encoder seeded with ``seed``."""
    stem = encoder_state.get("patch_embed.weight")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = SwinEncoder(get_preset(preset_name), in_channels=1 if stem is None else int(stem.shape[1]))
    return {**fresh.state_dict(), **encoder_state}


def _overlay_decoder(
    weights: dict[str, Tensor],
    decoder_state: dict[str, Tensor],
    preset_name: str,
    target: DatasetTarget,
    report: ConversionReport,
) -> dict[str, Tensor]:
    """Load the converted decoder over the fresh one; tensors of another shape for this dataset stay fresh."""
    with torch.device("meta"):  # shapes only; every tensor is then assigned from the payload
        network = SwinUNETRSeg(get_preset(preset_name), target.in_channels, target.num_classes)
    network.load_state_dict(weights, assign=True)
    own = network.state_dict()
    fits = {k: v for k, v in decoder_state.items() if tuple(v.shape) == tuple(own[k].shape)}
    for key in sorted(set(decoder_state) - set(fits)):
        shape, want = tuple(decoder_state[key].shape), tuple(own[key].shape)
        if ".seg_layers." in key:
            report.notes.append(f"{key} stays fresh: {shape} vs {want} for this dataset (nnU-Net never loads heads)")
        else:
            report.mismatched.append(f"{key}: {shape} vs {want} for {target.dataset_name} (stays fresh)")
    network.load_state_dict(fits, strict=False, assign=True)
    return {k: v.detach() for k, v in network.state_dict().items()}


def _preset_options(preset_name: str) -> dict[str, Any]:
    preset = get_preset(preset_name)
    return {
        "merge_order": preset.merge_order,
        "window_fit": preset.window_fit,
        "relative_position": preset.relative_position,
        "patch_norm": preset.patch_norm,
        "qkv_bias": preset.qkv_bias,
        "window_size": preset.window_size,
    }


def _convert_run(
    path: Path, target: DatasetTarget, preset_name: str | None, decoder_seed: int, channels: str,
    encoder_only: bool, export_from: str,
) -> tuple[dict[str, Any], ConversionReport]:
    """One of our pretraining runs: exactly ``nnunet-ssl export``."""
    result = export_run(path, target, source=export_from, decoder_seed=decoder_seed, channels=channels,
                        encoder_only=encoder_only)
    run_preset = result["metadata"]["preset"]
    if preset_name is not None and preset_name != run_preset:
        raise ConversionError(
            f"{path}: the run was pretrained with preset {run_preset!r}, not {preset_name!r}; drop --preset"
        )
    encoder_keys = [k for k in result["network_weights"] if k.startswith("encoder.")]
    report = ConversionReport(layout=RUN_LAYOUT, matched={k: k for k in encoder_keys})
    if result["metadata"].get("decoder") != "pretrained":
        report.fresh = ["decoder (seeded, as `nnunet-ssl export` writes it)"]
    result["metadata"]["conversion"] = {
        "source": str(path), "preset": run_preset, "options": _preset_options(run_preset), **report.to_metadata()
    }
    return result, report


def is_nnssl_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an nnssl checkpoint: a folder holding ``checkpoint_final.pth``, or a file with an
    nnssl adaptation plan inside or beside it (our pretraining checkpoints are ``.pt`` files of another format)."""
    if path.is_dir():
        return (path / nnssl.CHECKPOINT_FILE).is_file()
    if any(candidate.is_file() for candidate in nnssl.plan_json_candidates(path)):
        return True
    try:
        payload = read_torch_file(path, "checkpoint", NNUNET_CHECKPOINT_GLOBALS, mmap=True)  # a look, not a load
    except (OSError, ValueError):
        return False  # the caller reads it again and names the problem
    return isinstance(payload, dict) and nnssl.PLAN_ENTRY in payload


def _convert_nnssl(
    path: Path, target: DatasetTarget, preset_name: str | None, decoder_seed: int, channels: str, encoder_only: bool
) -> tuple[dict[str, Any], ConversionReport]:
    """An nnssl checkpoint: its encoder (and decoder unless ``encoder_only``) for ``target``'s plans."""
    checkpoint = nnssl.read_nnssl_checkpoint(path)
    if preset_name is not None and preset_name != checkpoint.preset:
        raise ConversionError(
            f"{checkpoint.source}: the checkpoint holds {FAMILIES['resenc'].describe(checkpoint.record)}, not preset "
            f"{preset_name!r}; drop --preset"
        )
    encoder = {k[len("encoder."):]: v for k, v in checkpoint.network_weights.items() if k.startswith("encoder.")}
    decoder = {k[len("decoder."):]: v for k, v in checkpoint.network_weights.items() if k.startswith("decoder.")}
    method = f"nnssl {checkpoint.trainer_name}".strip()
    result = build_weights_for_target(
        encoder, checkpoint.preset, target, method=method, source=str(checkpoint.source), decoder_seed=decoder_seed,
        channels=channels, record=checkpoint.record, decoder_state=None if encoder_only else decoder,
    )
    report = ConversionReport(layout=NNSSL_LAYOUT, matched={f"encoder.{k}": f"encoder.{k}" for k in encoder})
    report.notes.extend(checkpoint.notes)
    if encoder_only:
        report.fresh = ["decoder (seeded; --encoder-only)"]
    else:
        report.matched.update({f"decoder.{k}": f"decoder.{k}" for k in decoder if not k.startswith(("seg_layers.", "encoder."))})
        report.notes.append("heads (decoder.seg_layers) stay fresh: nnU-Net never loads them")
    result["metadata"]["conversion"] = {
        "source": str(checkpoint.source), "plan_sources": [str(p) for p in checkpoint.plan_sources],
        "arch_class_name": checkpoint.arch_class_name, "pretrain_configuration": checkpoint.pretrain_configuration,
        "pretrain_normalization": list(checkpoint.pretrain_normalization), **report.to_metadata(),
    }
    return result, report
