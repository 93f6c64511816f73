"""Pretraining methods behind one registry (``METHODS``).

Every entry maps a method name to ``(method class, config dataclass)``. A method class is built as
``cls(preset, config, in_channels)`` and implements
:class:`nnunet_ssl.pretraining.methods.base.PretrainingMethod`; its config is a frozen dataclass
validated in ``__post_init__``. Adding a method means adding one module and one line here.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from nnunet_ssl.networks.presets import SwinPreset, get_preset
from nnunet_ssl.pretraining.methods.base import PretrainingMethod, StepContext
from nnunet_ssl.pretraining.methods.contrastive import Contrastive, ContrastiveConfig
from nnunet_ssl.pretraining.methods.dino import DINO, DINOConfig
from nnunet_ssl.pretraining.methods.ibot import IBOT, IBOTConfig
from nnunet_ssl.pretraining.methods.inpainting import Inpainting, InpaintingConfig
from nnunet_ssl.pretraining.methods.reconstruction import Reconstruction, ReconstructionConfig
from nnunet_ssl.pretraining.methods.rotation import Rotation, RotationConfig
from nnunet_ssl.pretraining.methods.simmim import SimMIM, SimMIMConfig
from nnunet_ssl.pretraining.methods.smit import SMIT, SMITConfig
from nnunet_ssl.pretraining.methods.swinunetr import SwinUNETRConfig, SwinUNETRPretraining

METHODS: dict[str, tuple[type, type]] = {
    "smit": (SMIT, SMITConfig),
    "simmim": (SimMIM, SimMIMConfig),
    "dino": (DINO, DINOConfig),
    "ibot": (IBOT, IBOTConfig),
    "inpainting": (Inpainting, InpaintingConfig),
    "reconstruction": (Reconstruction, ReconstructionConfig),
    "contrastive": (Contrastive, ContrastiveConfig),
    "rotation": (Rotation, RotationConfig),
    "swinunetr": (SwinUNETRPretraining, SwinUNETRConfig),
}


def build_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The config dataclass of method ``name`` with ``overrides`` applied and validated.

    Raises:
        ValueError: Unknown method, unknown override key (the message lists the valid ones), or an
            invalid value (from the config's own validation).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    config_cls = METHODS[name][1]
    overrides = dict(overrides or {})
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown {name} config key(s) {unknown}; valid keys: {valid}")
    return config_cls(**overrides)


def build_method(
    name: str,
    preset: SwinPreset | str,
    in_channels: int = 1,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a registered method.

    Args:
        name: Key of :data:`METHODS`.
        preset: A :class:`SwinPreset` or its name in ``PRESETS``.
        in_channels: Image channels.
        overrides: Config fields to change from the defaults (e.g. loaded from YAML).

    Returns:
        The method module (its config is at ``.config``).

    Raises:
        ValueError: Unknown method, preset or config key, or an invalid config value.
    """
    config = build_config(name, overrides)
    if isinstance(preset, str):
        preset = get_preset(preset)
    return METHODS[name][0](preset, config, in_channels)


__all__ = ["METHODS", "PretrainingMethod", "StepContext", "build_config", "build_method"]
