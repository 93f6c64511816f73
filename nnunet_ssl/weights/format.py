"""The ``-pretrained_weights`` file: a full-network state dict plus provenance metadata.

Layout (a ``torch.save`` dict, loadable with ``weights_only=True``)::

    {
        "network_weights": {...},   # every key of the network's state dict; what nnU-Net loads
        "metadata": {               # plain JSON-compatible values
            "format": "nnunet-ssl-weights", "format_version": 1,
            "family": "swin", "preset": "smit",  # or "resenc", "resenc_l", "architecture": {...}
            "method": "smit", "in_channels": 1, "num_classes": 4,
            "encoder_digest": "<16 hex>", "source": "<checkpoint path or description>",
            "channel_adaptation": "none" | "replicate 1->3: stem copied x3 and scaled by 1/3",
            "channel_mode": "none" | "replicate" | "first" | "mean", "source_in_channels": 1,
            "finetune_policy": "" | "freeze_encoder_epochs=50,encoder_lr_warmup_epochs=10",
            "intensity": {"modality": "CT", "window": [-500, 500], "range": [0, 1]},
            "decoder_seed": 0, "decoder": "pretrained",  # only when the decoder is pretrained
            "created_by": "nnunet-ssl 0.1.0"
        }
    }

nnU-Net's loader needs ``network_weights`` to cover every key of the target network except the
heads under ``.seg_layers.``: the file therefore carries the pretrained encoder, a decoder (seeded
fresh, or pretrained where the method trained one, e.g. Spark3D's U-Net decoder: ``"decoder":
"pretrained"``), heads that are always fresh (they depend on the dataset's classes), and, where the
network has a buffer for it (Swin's ``weights_provenance``), the provenance tag the trainer logs at start.

``family``, ``preset`` and (for ``resenc``) ``architecture`` are the file's network record
(:mod:`nnunet_ssl.networks.family`): everything here asks that family what to build, where the
encoder and its stem are, instead of branching on the name. A file without ``family`` was written
before families existed and holds a Swin network; :func:`load_weights_file` reads it as ``"swin"``.
The format version stays 1: the new entries only add to what version-1 readers read.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nnunet_ssl import __version__
from nnunet_ssl.checkpoints import (  # noqa: F401 (encoder_digest: re-exported)
    PRETRAINING_ONLY_KEYS,
    encoder_digest,
    read_torch_file,
)
from nnunet_ssl.io import atomic_torch_save
from nnunet_ssl.networks.family import LEGACY_FAMILY, NetworkFamily, family_of, family_of_network, family_of_preset
from nnunet_ssl.networks.segmentation import encode_provenance
from nnunet_ssl.weights.channels import ChannelAdaptationError, adapt_stem_weight

FORMAT_NAME = "nnunet-ssl-weights"
FORMAT_VERSION = 1
#: The Swin encoder's stem kernel (the ``swin`` family's ``stem_keys[0]``), for the Swin-only CKA.
STEM_KEY = "patch_embed.weight"


class WeightsError(ValueError):
    """A weights file that cannot be used as asked; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class WeightsMetadata:
    """Provenance of an exported weights file.

    ``family``, ``preset`` and ``architecture`` are the network record of
    :mod:`nnunet_ssl.networks.family`; ``architecture`` is written only by families that have one.
    """

    method: str
    preset: str
    in_channels: int
    num_classes: int
    encoder_digest: str
    source: str = ""
    channel_adaptation: str = "none"
    channel_mode: str = "none"
    source_in_channels: int = 0
    finetune_policy: str = ""
    intensity: dict[str, Any] = field(default_factory=dict)
    decoder_seed: int = 0
    decoder: str = "fresh"
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = f"nnunet-ssl {__version__}"
    family: str = LEGACY_FAMILY
    architecture: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metadata as written to the file: no ``architecture`` entry for a family without one, and a
        ``decoder`` entry only for a pretrained decoder (absent means fresh, as in every file before it)."""
        values = asdict(self)
        if values["architecture"] is None:
            del values["architecture"]
        if values["decoder"] == "fresh":
            del values["decoder"]
        return values


def adapt_stem(weight: Tensor, in_channels: int, mode: str = "replicate") -> tuple[Tensor, str]:
    """Adapt the stem kernel ``(E, C0, k, k, k)`` to ``in_channels``; returns ``(kernel, description)``.

    Kernel-level shortcut of :func:`nnunet_ssl.weights.channels.adapt_stem` (which takes a state dict).
    """
    try:
        adapted, adaptation = adapt_stem_weight(weight, in_channels, mode)
    except ChannelAdaptationError as error:
        raise WeightsError(str(error)) from error
    return adapted, adaptation.description if adaptation.mode != "none" else "none"


def build_weights_file(
    encoder_state: Mapping[str, Tensor],
    preset_name: str,
    in_channels: int,
    num_classes: int,
    method: str,
    source: str = "",
    intensity: dict[str, Any] | None = None,
    decoder_seed: int = 0,
    channels: str = "replicate",
    finetune_policy: str = "",
    decoder_state: Mapping[str, Tensor] | None = None,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the full-network ``-pretrained_weights`` payload from an encoder state dict.

    The network is the one ``preset_name``'s family builds (:func:`~nnunet_ssl.networks.family.family_of_preset`),
    or the one ``record`` describes, with its decoder and heads freshly initialised from ``decoder_seed``;
    then ``decoder_state``, when given, replaces the decoder (heads excepted).

    Args:
        encoder_state: The encoder's state dict (``network.encoder.state_dict()``, no ``encoder.`` prefix;
            a mask token is dropped).
        preset_name: Preset the encoder was built with; the target trainer must use the same one.
        in_channels: Input channels of the target dataset.
        num_classes: Segmentation heads of the target dataset (heads are not loaded by nnU-Net,
            but are included so the file is a complete state dict).
        method: SSL method name recorded in the metadata.
        source: Where the encoder came from (a run folder, a checkpoint path).
        intensity: Intensity mapping used in pretraining, for the trainer's consistency warning.
        decoder_seed: Seed for the fresh decoder, so exports are reproducible.
        channels: Stem adaptation when the encoder's channels differ from ``in_channels``:
            ``replicate``, ``first`` or ``mean`` (:mod:`nnunet_ssl.weights.channels`).
        finetune_policy: A fine-tuning policy string stored for the trainer, already validated by
            the caller (:func:`nnunet_ssl.trainers.policy.parse_policy`); "" for none.
        decoder_state: A pretrained decoder (``network.decoder.state_dict()``, no ``decoder.`` prefix).
            Its heads (``seg_layers.``, a pretraining method's reconstruction head) and the encoder the
            decoder refers to (``encoder.``, loaded from ``encoder_state``) are not used. None: a fresh decoder.
        record: The network record (:mod:`nnunet_ssl.networks.family`) when the architecture is not one of
            our presets (e.g. converted from nnssl); None builds ``preset_name``'s record.

    Returns:
        ``{"network_weights": state_dict, "metadata": dict}``.

    Raises:
        WeightsError: The encoder or decoder does not fit the network, naming the first keys and the fix.
    """
    if record is None:
        family = family_of_preset(preset_name)
        record = family.record(preset_name)
    else:
        family = family_of(record)
        record = dict(record)
        preset_name = str(record.get("preset") or "")
    state = {k: v for k, v in encoder_state.items() if k not in PRETRAINING_ONLY_KEYS}
    stem_key = family.stem_keys[0]
    if stem_key not in state:
        raise WeightsError(
            f"the encoder state has no {stem_key!r}; is this the encoder state dict of a {family.name} network "
            f"(preset {preset_name!r})?"
        )
    source_channels = family.in_channels(state)
    try:
        stem, adaptation = adapt_stem_weight(state[stem_key], in_channels, channels)
    except ChannelAdaptationError as error:
        raise WeightsError(str(error)) from error
    state.update({key: stem for key in family.stem_keys if key in state})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(decoder_seed)
        network = family.build(record, in_channels, num_classes, deep_supervision=True)
    encoder = family.encoder(network)
    _check_shapes(state, encoder.state_dict(), preset_name)
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"encoder weights do not fit preset {preset_name!r}: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; export with the preset used for pretraining"
        )
    if decoder_state is not None:
        _load_decoder(network, decoder_state, preset_name or family.describe(record))
    digest = encoder_digest(encoder.state_dict())
    metadata = WeightsMetadata(
        method=method,
        preset=preset_name,
        in_channels=in_channels,
        num_classes=num_classes,
        encoder_digest=digest,
        source=source,
        channel_adaptation=adaptation.description if adaptation.mode != "none" else "none",
        channel_mode=adaptation.mode,
        source_in_channels=source_channels,
        finetune_policy=finetune_policy,
        intensity=dict(intensity or {}),
        decoder_seed=decoder_seed,
        decoder="fresh" if decoder_state is None else "pretrained",
        family=family.name,
        architecture=record.get("architecture"),
    )
    if family.provenance_buffer is not None:
        tag = {"method": method, "preset": preset_name, "digest": digest}
        if adaptation.mode != "none":
            tag["channels"] = adaptation.short  # logged by the trainer when it starts from these weights
        network.get_buffer(family.provenance_buffer).copy_(encode_provenance(tag))
    return {"network_weights": network.state_dict(), "metadata": metadata.to_dict()}


#: Key prefixes of a decoder state that a weights file never takes from pretraining: the heads (the
#: dataset's classes; in pretraining a reconstruction head) and DNA's reference to the encoder.
DECODER_KEYS_NOT_TRANSFERRED = ("seg_layers.", "encoder.")


def _load_decoder(network: nn.Module, decoder_state: Mapping[str, Tensor], what: str) -> None:
    """Copy a pretrained decoder into ``network.decoder``, heads and encoder reference excepted."""
    decoder = getattr(network, "decoder", None)
    if not isinstance(decoder, nn.Module):
        raise WeightsError(f"the {what} network has no decoder to take a pretrained one")
    state = {k: v for k, v in decoder_state.items() if not k.startswith(DECODER_KEYS_NOT_TRANSFERRED)}
    wanted = {k: v for k, v in decoder.state_dict().items() if not k.startswith(DECODER_KEYS_NOT_TRANSFERRED)}
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(wanted[k].shape)}" for k, v in state.items()
             if k in wanted and tuple(v.shape) != tuple(wanted[k].shape)]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"the pretrained decoder does not fit the {what} network (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shapes {wrong[:3]}); export with the architecture used for pretraining, or "
            "pass --encoder-only for a fresh decoder"
        )
    decoder.load_state_dict(state, strict=False)


def _check_shapes(state: Mapping[str, Tensor], target: Mapping[str, Tensor], preset_name: str) -> None:
    for key, tensor in state.items():
        if key in target and tuple(tensor.shape) != tuple(target[key].shape):
            raise WeightsError(
                f"encoder key {key!r} has shape {tuple(tensor.shape)} but preset {preset_name!r} needs "
                f"{tuple(target[key].shape)}; export with the preset used for pretraining"
            )


def save_weights_file(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically (temporary file in the same folder, then rename); a failed write leaves ``path`` as it was.

    Whether ``path`` may be replaced is the caller's decision (the CLI checks ``--out``/``--force`` first,
    :func:`nnunet_ssl.outputs.check_output_file`).

    Raises:
        nnunet_ssl.outputs.WriteError: an ``OSError`` (disk full, permission, a folder at ``path``), naming ``path``.
    """
    return atomic_torch_save(dict(payload), path)


def load_weights_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a weights file safely (``weights_only=True``) and return ``(network_weights, metadata)``.

    Raises:
        WeightsError: no such file, a folder, not a torch file, or one holding objects other than
            tensors and plain values (refused in one line naming their types; nothing in it is run).
    """
    path = Path(path)
    try:
        payload = read_torch_file(path, "weights file")
    except (OSError, ValueError) as error:
        raise WeightsError(str(error)) from error
    if not isinstance(payload, dict) or "network_weights" not in payload:
        raise WeightsError(
            f"{path}: not an nnunet-ssl/nnU-Net weights file (no 'network_weights' entry); "
            "build one with `nnunet-ssl export`"
        )
    metadata = dict(payload.get("metadata") or {})
    if metadata.get("format") == FORMAT_NAME:
        metadata.setdefault("family", LEGACY_FAMILY)  # written before families: a Swin network
    return payload["network_weights"], metadata


def weights_family(metadata: Mapping[str, Any], path: str | os.PathLike[str] = "weights file") -> NetworkFamily | None:
    """The network family a weights file's metadata names; None for a file without metadata (not an export).

    Raises:
        WeightsError: naming ``path`` when the family is unknown to this version.
    """
    if not metadata:
        return None
    try:
        return family_of(metadata)
    except ValueError as error:
        raise WeightsError(f"{path}: {error}") from error


def find_mismatches(weights: Mapping[str, Tensor], network_state: Mapping[str, Tensor]) -> list[str]:
    """Every problem nnU-Net's loader would hit, in state-dict order (heads are skipped as nnU-Net does)."""
    problems = []
    for key, tensor in network_state.items():
        if ".seg_layers." in key:
            continue
        if key not in weights:
            problems.append(f"missing key {key!r}")
        elif tuple(weights[key].shape) != tuple(tensor.shape):
            problems.append(f"{key!r}: file {tuple(weights[key].shape)} vs network {tuple(tensor.shape)}")
    return problems


def check_weights_against_network(
    path: str | os.PathLike[str], network: nn.Module, trainer_name: str = "the trainer"
) -> dict[str, Any]:
    """Raise :class:`WeightsError` naming the first mismatching keys and the fix; return the metadata.

    Works for a network of any family (:mod:`nnunet_ssl.networks.family`), and for other networks by
    keys and shapes alone: the hints compare the file's network record with the network's family and preset.
    """
    weights, metadata = load_weights_file(path)
    network_state = network.state_dict()
    problems = find_mismatches(weights, network_state)
    if not problems:
        return metadata
    hints = []
    export = "`nnunet-ssl export RUN_DIR -d DATASET -p PLANS --out FILE`"
    file_family, network_family = weights_family(metadata, path), family_of_network(network)
    network_preset = network_family.network_preset(network) if network_family is not None else None
    if file_family is not None and network_family is not None and metadata.get("preset") \
            and (file_family, metadata["preset"]) != (network_family, network_preset):
        same = file_family is network_family
        holds = f"preset {metadata['preset']!r}" if same else file_family.describe(metadata)
        builds = f"preset {network_preset!r}" if same and network_preset else network_family.describe({"preset": network_preset})
        if network_preset is None:  # a topology the plans chose (e.g. nnU-Net's dynamic ResEnc plans)
            hints.append(
                f"the file holds an encoder of {holds} but {trainer_name} builds a {builds} from these plans: "
                f"train with plans whose architecture is the file's ({file_family.describe(metadata)})"
            )
        else:
            hints.append(
                f"the file holds an encoder of {holds} but {trainer_name} builds {builds}: "
                f"train with a trainer of preset {metadata['preset']!r} (`nnunet-ssl trainers` lists each trainer's "
                f"preset), or pretrain with `nnunet-ssl pretrain --preset {network_preset} --method METHOD "
                f"--data DATA --out RUN_DIR` and export that run with {export}"
            )
    network_channels = _network_in_channels(network_family, network_state)
    if metadata.get("in_channels") and network_channels and metadata["in_channels"] != network_channels:
        hints.append(
            f"the file has {metadata['in_channels']} input channel(s), the dataset {network_channels}: "
            f"re-export the pretraining run for this dataset with {export}"
        )
    if not hints:
        hints.append(f"re-export the weights for this dataset, plans and trainer with {export}")
    shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    raise WeightsError(f"{path}: does not fit {trainer_name}: {shown}. Fix: " + " ".join(hints))


def _network_in_channels(family: NetworkFamily | None, network_state: Mapping[str, Tensor]) -> int | None:
    """Input channels of a network of ``family``, from its stem kernel; None for a network of no family."""
    if family is None:
        return None
    stem = network_state.get(f"{family.encoder_attribute}.{family.stem_keys[0]}")
    return None if stem is None else int(stem.shape[1])
