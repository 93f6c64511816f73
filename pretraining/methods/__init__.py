"""Pretraining methods behind one registry (``METHODS``).

Every entry maps a method name to ``(method class, config dataclass)``. A method class is built as
``cls(preset, config, in_channels)`` and implements
:class:`nnunet_ssl.pretraining.methods.base.PretrainingMethod`; its config is a frozen dataclass
validated in ``__post_init__``. Adding a method means adding one module and one line here.

A method class may also declare (all optional, see :class:`~nnunet_ssl.pretraining.methods.base.PretrainingMethod`):

* ``family``: the network family it pretrains (:data:`nnunet_ssl.networks.family.FAMILIES`; absent:
  ``"swin"``). It is built with a preset of that family (a ``SwinPreset`` or a ``ResEncPreset``), and a
  run without ``--preset`` gets the family's :data:`DEFAULT_PRESETS` entry;
* ``engine_defaults`` / ``data_defaults``: its recipe, as values of
  :class:`~nnunet_ssl.pretraining.config.EngineConfig` / :class:`~nnunet_ssl.pretraining.data.DataConfig`
  fields that replace those classes' defaults for its runs (:func:`method_defaults`, applied by
  ``nnunet_ssl.pretraining.config.apply_method_defaults``); a config file and command-line flags still
  override every one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from nnunet_ssl.networks.family import FAMILIES, NetworkFamily, family_of_preset
from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.networks.resenc import ResEncPreset
from nnunet_ssl.pretraining.methods.base import (
    DEFAULT_FAMILY,
    PretrainingMethod,
    StepContext,
    declared_family,
    recipe_defaults,
)
from nnunet_ssl.pretraining.methods.contrastive import Contrastive, ContrastiveConfig
from nnunet_ssl.pretraining.methods.dino import DINO, DINOConfig
from nnunet_ssl.pretraining.methods.ibot import IBOT, IBOTConfig
from nnunet_ssl.pretraining.methods.inpainting import Inpainting, InpaintingConfig
from nnunet_ssl.pretraining.methods.reconstruction import Reconstruction, ReconstructionConfig
from nnunet_ssl.pretraining.methods.rotation import Rotation, RotationConfig
from nnunet_ssl.pretraining.methods.simmim import SimMIM, SimMIMConfig
from nnunet_ssl.pretraining.methods.smit import SMIT, SMITConfig
from nnunet_ssl.pretraining.methods.spark3d import Spark3D, Spark3DConfig
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
    "spark3d": (Spark3D, Spark3DConfig),
}

#: The preset a run gets when it names none, by the family of its method.
DEFAULT_PRESETS: dict[str, str] = {"swin": "smit", "resenc": "resenc_l"}

#: Any family's preset object (what a method class is built with).
Preset = SwinPreset | ResEncPreset


def _method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name][0]


def method_family(name: str) -> NetworkFamily:
    """The network family method ``name`` pretrains (its class's ``family``, else :data:`DEFAULT_FAMILY`).

    Raises:
        ValueError: Unknown method, or a class naming a family :data:`FAMILIES` lacks.
    """
    method_class = _method_class(name)
    family = declared_family(method_class)
    if family not in FAMILIES:
        raise ValueError(f"method {name!r} ({method_class.__name__}) declares family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family]


def default_preset(name: str) -> str:
    """The preset a run of method ``name`` gets without ``--preset``: its family's :data:`DEFAULT_PRESETS` entry."""
    return DEFAULT_PRESETS[method_family(name).name]


def _choices(names: list[str]) -> str:
    """``"a, b or c"``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _wrong_family(name: str, family: NetworkFamily) -> ValueError:
    return ValueError(f"{name} pretrains {family.name} networks; choose --preset {_choices(sorted(family.presets))}")


def resolve_preset(name: str, preset: Preset | str) -> Preset:
    """The preset object method ``name`` is built with, checked to belong to the method's family.

    Args:
        name: Key of :data:`METHODS`.
        preset: A preset name of any family, or a preset object (``SwinPreset``, ``ResEncPreset``).

    Raises:
        ValueError: Unknown method or preset, or a preset of another family than the method's, in one
            line naming the method, its family and that family's presets.
    """
    family = method_family(name)
    if isinstance(preset, str):
        try:
            owner = family_of_preset(preset)
        except ValueError:
            raise ValueError(
                f"unknown preset {preset!r}; {name} pretrains {family.name} networks: choose "
                f"{_choices(sorted(family.presets))}"
            ) from None
        if owner.name != family.name:
            raise _wrong_family(name, family)
        resolved: Preset = family.presets[preset]
        return resolved
    if not any(isinstance(preset, type(known)) for known in family.presets.values()):
        raise _wrong_family(name, family)
    return preset


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
    preset: Preset | str,
    in_channels: int = 1,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a registered method.

    Args:
        name: Key of :data:`METHODS`.
        preset: A preset of the method's family (:func:`resolve_preset`), or its name.
        in_channels: Image channels.
        overrides: Config fields to change from the defaults (e.g. loaded from YAML).

    Returns:
        The method module (its config is at ``.config``).

    Raises:
        ValueError: Unknown method, preset or config key, a preset of another family, or an invalid
            config value.
    """
    config = build_config(name, overrides)
    return METHODS[name][0](resolve_preset(name, preset), config, in_channels)


def method_defaults(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(engine_defaults, data_defaults)`` that method ``name`` declares (empty when it declares none).

    An unknown method has none (the run's validation names it later). The keys are checked against
    the config classes where they are applied (``nnunet_ssl.pretraining.config.apply_method_defaults``).
    """
    if name not in METHODS:
        return {}, {}
    engine_defaults, data_defaults = recipe_defaults(METHODS[name][0])
    return dict(engine_defaults), dict(data_defaults)


__all__ = [
    "DEFAULT_FAMILY",
    "DEFAULT_PRESETS",
    "METHODS",
    "PretrainingMethod",
    "StepContext",
    "build_config",
    "build_method",
    "default_preset",
    "method_defaults",
    "method_family",
    "resolve_preset",
]
