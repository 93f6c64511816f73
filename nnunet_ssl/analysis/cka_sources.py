"""The two encoders a CKA analysis compares: pretrained (export or run) and fine-tuned (nnU-Net fold)."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from nnunet_ssl.checkpoints import load_nnunet_checkpoint
from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.weights.format import (
    PRETRAINING_ONLY_KEYS,
    STEM_KEY,
    WeightsError,
    adapt_stem,
    load_weights_file,
)

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
#: Prefixes nnU-Net leaves on saved keys when the network was wrapped by DDP or torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class FinetunedFold:
    """A trained nnU-Net fold of an nnunet-ssl trainer."""

    encoder: SwinEncoder
    preset_name: str
    trainer_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    checkpoint: Path


@dataclass(frozen=True)
class PretrainedEncoder:
    """A pretrained encoder and where it came from."""

    encoder: SwinEncoder
    preset_name: str
    source: str


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop leading ``module.`` / ``_orig_mod.`` (in any order and number) from every key."""
    stripped = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def encoder_part(state: Mapping[str, Tensor], origin: Path) -> dict[str, Tensor]:
    """The ``encoder.*`` entries of a full-network state dict, without the prefix."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise WeightsError(f"{origin}: no 'encoder.*' weights; is this an nnunet-ssl network?")
    return encoder


def build_encoder(state: Mapping[str, Tensor], preset_name: str, origin: Path) -> SwinEncoder:
    """A :class:`SwinEncoder` of ``preset_name`` holding ``state``, in eval mode.

    Raises:
        WeightsError: naming ``origin`` when keys or shapes do not fit the preset.
    """
    state = {k: v for k, v in state.items() if k not in PRETRAINING_ONLY_KEYS}
    if STEM_KEY not in state:
        raise WeightsError(f"{origin}: the encoder weights have no {STEM_KEY!r}")
    encoder = SwinEncoder(get_preset(preset_name), in_channels=state[STEM_KEY].shape[1])
    expected = encoder.state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise WeightsError(
            f"{origin}: encoder weights do not fit preset {preset_name!r}: shapes {wrong[:3]}, "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    encoder.load_state_dict(state)
    return encoder.eval()


def load_finetuned_fold(fold_dir: Path, checkpoint: str = "final") -> FinetunedFold:
    """Read ``fold_N/checkpoint_{final,best}.pth`` and the results folder's plans.json and dataset.json.

    The preset comes from the trainer class named in the checkpoint (``TRAINERS[name].preset_name``).
    """
    from nnunet_ssl.trainers.named import TRAINERS

    fold_dir = Path(fold_dir)
    path = fold_dir / f"checkpoint_{checkpoint}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an nnU-Net fold folder (.../fold_N) and --checkpoint")
    payload = load_nnunet_checkpoint(path)  # tensors, plain values and numpy scalars only; nothing is run
    trainer_name = payload.get("trainer_name")
    if not isinstance(trainer_name, str) or trainer_name not in TRAINERS:
        raise WeightsError(f"{path}: trainer {trainer_name!r} is not an nnunet-ssl trainer (`nnunet-ssl trainers`)")
    weights, init_args = payload.get("network_weights"), payload.get("init_args")
    if not isinstance(weights, Mapping) or not isinstance(init_args, Mapping) \
            or not isinstance(init_args.get("configuration"), str):
        raise WeightsError(f"{path}: not an nnU-Net checkpoint (no network_weights or init_args.configuration)")
    preset_name = TRAINERS[trainer_name].preset_name
    state = strip_wrapper_prefixes(weights)
    plans, dataset_json = (_read_json(fold_dir.parent / name) for name in ("plans.json", "dataset.json"))
    return FinetunedFold(
        encoder=build_encoder(encoder_part(state, path), preset_name, path),
        preset_name=preset_name,
        trainer_name=trainer_name,
        configuration=init_args["configuration"],
        plans=plans,
        dataset_json=dataset_json,
        checkpoint=path,
    )


def load_pretrained_encoder(path: Path, in_channels: int, source: str = "default") -> PretrainedEncoder:
    """Encoder of an ``nnunet-ssl export`` weights file, or of a pretraining run folder.

    A run's encoder gets its stem adapted to ``in_channels`` exactly as ``nnunet-ssl export`` would;
    an export file must already have ``in_channels``.
    """
    path = Path(path)
    if path.is_dir():
        from nnunet_ssl.weights.export import load_run_encoder

        state, config, checkpoint_path = load_run_encoder(path, source)
        state = dict(state)
        state[STEM_KEY], adaptation = adapt_stem(state[STEM_KEY], in_channels)
        if adaptation != "none":
            logger.info("%s: %s", path, adaptation)
        return PretrainedEncoder(build_encoder(state, config.preset, path), config.preset, f"{checkpoint_path} ({source})")
    weights, metadata = load_weights_file(path)
    preset_name = metadata.get("preset")
    if not preset_name:
        raise WeightsError(f"{path}: no 'preset' in the metadata; write the file with `nnunet-ssl export`")
    encoder = build_encoder(encoder_part(strip_wrapper_prefixes(weights), path), preset_name, path)
    if encoder.in_channels != in_channels:
        raise WeightsError(
            f"{path}: the encoder takes {encoder.in_channels} input channel(s) but the fine-tuned network "
            f"{in_channels}; export the weights for the fine-tuned dataset"
        )
    return PretrainedEncoder(encoder, preset_name, str(path))


def check_same_architecture(pretrained: PretrainedEncoder, finetuned: FinetunedFold, pretrained_path: Path) -> None:
    """Refuse to compare encoders of different presets (their layers do not correspond)."""
    if pretrained.preset_name != finetuned.preset_name:
        raise WeightsError(
            f"{pretrained_path} holds a {pretrained.preset_name!r} encoder but {finetuned.checkpoint} was trained "
            f"by {finetuned.trainer_name} with preset {finetuned.preset_name!r}; compare encoders of one preset"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (nnU-Net writes it beside the fold_N folders)")
    return json.loads(path.read_text(encoding="utf-8"))
