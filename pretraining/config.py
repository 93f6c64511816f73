"""Run configuration of a pretraining run: paper defaults, overridable from a file or the CLI.

The merged configuration is saved as ``RUN_DIR/config.json`` and inside every checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nnunet_ssl.pretraining.data import DataConfig

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
        min_lr: Learning rate at the end of the cosine.
        warmup_epochs: Linear warm-up (paper: 30 epochs), converted to steps.
        weight_decay: AdamW weight decay (none on norms, biases, position tables, mask token).
        grad_clip: Max global gradient norm (0 disables).
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


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pretraining run."""

    method: str
    data: DataConfig
    preset: str = "smit"
    in_channels: int = 1
    method_overrides: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig = EngineConfig()

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
