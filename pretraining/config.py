"""Run configuration of a pretraining run: paper defaults, overridable from a file or the CLI.

The merged configuration is saved as ``RUN_DIR/config.json`` and inside every checkpoint.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nnunet_ssl.optim import OPTIMIZERS, SCHEDULES
from nnunet_ssl.pretraining.data import DataConfig

logger = logging.getLogger(__name__)

#: The merged configuration of a run, in its run folder (also inside every checkpoint).
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class EngineConfig:
    """Optimisation and bookkeeping, shared by every method ([P] §3.3 defaults).

    Attributes:
        epochs: Passes over the pretraining volumes (paper: 500).
        max_steps: Stop after this many optimisation steps in total (None: epochs decide).
        batch_size: Volumes per process and step.
        base_lr: Peak learning rate at ``lr_reference_batch`` volumes per step; scaled linearly with
            the global batch (paper: 2e-4).
        lr_reference_batch: Global batch at which ``base_lr`` applies.
        min_lr: Learning rate at the end of the cosine (the poly schedule decays to 0, as nnU-Net's).
        warmup_epochs: Linear warm-up (paper: 30 epochs), converted to steps.
        weight_decay: Weight decay of the optimiser (none on norms, biases, position tables, mask token).
        grad_clip: Max global gradient norm (0 disables).
        optimizer: ``"adamw"`` (the paper's) or ``"sgd"`` (nnU-Net's), over the same decay/no-decay groups.
        momentum: SGD momentum (AdamW ignores it).
        nesterov: Nesterov momentum for SGD (AdamW ignores it).
        schedule: Learning rate after the linear warm-up: ``"cosine"`` down to ``min_lr``, or ``"poly"``,
            nnU-Net's ``PolyLRScheduler`` ``lr * (1 - t / T) ** 0.9`` over the steps after the warm-up
            (:func:`nnunet_ssl.optim.scheduled_lr`).
        amp: "auto" (bf16 on GPUs that support it, else fp16 with a grad scaler; off on CPU), "off",
            "bf16" or "fp16".
        checkpoint_every: Steps between checkpoints (one is always written at the end).
        seed: Seed of parameters, masks and crops.
    """

    epochs: int = 500
    max_steps: int | None = None
    batch_size: int = 2
    base_lr: float = 2e-4
    lr_reference_batch: int = 2
    min_lr: float = 1e-6
    warmup_epochs: float = 30.0
    weight_decay: float = 0.05
    grad_clip: float = 3.0
    amp: str = "auto"
    checkpoint_every: int = 200
    seed: int = 0
    optimizer: str = "adamw"
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.base_lr <= 0 or self.min_lr < 0:
            raise ValueError("learning rates must be positive")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov SGD needs a momentum > 0 (momentum is 0); set momentum or nesterov false")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pretraining run.

    Attributes:
        method: A key of ``nnunet_ssl.pretraining.methods.METHODS``.
        data: The data pipeline's settings.
        preset: The network preset, of the method's family; ``""`` (the default) takes the family's
            default (``DEFAULT_PRESETS``: ``"smit"`` for the Swin methods, ``"resenc_l"`` for ResEnc ones),
            and the resolved name is what ``to_dict`` records.
        in_channels: Image channels.
        method_overrides: Fields of the method's config dataclass to change.
        engine: Optimisation and bookkeeping.
    """

    method: str
    data: DataConfig
    preset: str = ""
    in_channels: int = 1
    method_overrides: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig = EngineConfig()

    def __post_init__(self) -> None:
        if not self.preset:
            from nnunet_ssl.pretraining.methods import default_preset

            object.__setattr__(self, "preset", default_preset(self.method))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Rebuild from :meth:`to_dict` output (as stored in config.json and checkpoints)."""
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown run config keys {sorted(unknown)}")
        data = data_config_from_dict(raw["data"])
        engine = EngineConfig(**raw.get("engine", {}))
        rest = {k: v for k, v in raw.items() if k not in ("data", "engine")}
        return cls(data=data, engine=engine, **rest)

    def with_engine(self, **changes: Any) -> RunConfig:
        return replace(self, engine=replace(self.engine, **changes))


def apply_method_defaults(
    method: str, engine_values: Mapping[str, Any], data_values: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Engine and data settings with ``method``'s recipe defaults under the values given.

    The order of precedence is: :class:`EngineConfig` / :class:`DataConfig` defaults, then the method
    class's ``engine_defaults`` / ``data_defaults``, then ``engine_values`` / ``data_values`` (a recorded
    run, a config file and flags, already merged by the caller). The log says which settings came from
    the method and which of its defaults were given otherwise. An unknown method has no defaults.

    Returns:
        ``(engine_values, data_values)`` to build the configs from.

    Raises:
        ValueError: The method declares a key that is no field of the config class (naming both).
    """
    from nnunet_ssl.pretraining.methods import method_defaults

    engine_defaults, data_defaults = method_defaults(method)
    used: list[str] = []
    given: list[str] = []
    sections = (("engine", EngineConfig, engine_defaults, engine_values), ("data", DataConfig, data_defaults, data_values))
    for section, config_class, defaults, values in sections:
        unknown = sorted(set(defaults) - {f.name for f in fields(config_class)})
        if unknown:
            raise ValueError(
                f"method {method!r} declares {section}_defaults for {unknown}, which {config_class.__name__} does not have"
            )
        for key, value in defaults.items():
            if key in values:
                given.append(f"{section}.{key}={values[key]!r} (method default {value!r})")
            else:
                used.append(f"{section}.{key}={value!r}")
    if used:
        logger.info("%s recipe: %s (the method's defaults)", method, ", ".join(used))
    if given:
        logger.info("%s recipe defaults overridden by the run's settings: %s", method, ", ".join(given))
    return {**engine_defaults, **engine_values}, {**data_defaults, **data_values}


def data_config_from_dict(values: dict[str, Any]) -> DataConfig:
    """A :class:`DataConfig` from JSON-style values (lists become the tuples the dataclass holds)."""
    settings: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return DataConfig(**settings)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML file of overrides: ``{"engine": {...}, "method_overrides": {...}, ...}``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        loaded = yaml.safe_load(text)
    else:
        loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return loaded
