"""Fine-tuning policies: frozen or warmed-up encoders and layer-wise learning-rate decay, as data.

A policy is a short string, selected without writing a trainer class (see
:mod:`nnunet_ssl.trainers.policy_trainer` for where it comes from)::

    freeze_encoder_epochs=50,encoder_lr_warmup_epochs=10,llrd=0.75,frozen_stages=0-1

Keys (all optional; ``""`` or ``"none"`` is the empty policy, today's behaviour):

* ``freeze_encoder_epochs=K``: the whole encoder is frozen for epochs ``0..K-1`` (decoder warm-up),
  then trained;
* ``encoder_lr_warmup_epochs=W``: once trainable, the encoder's learning rate ramps linearly over
  ``W`` epochs (factor ``1/W, 2/W, ..., 1`` for epochs ``K .. K+W-1``) on top of the recipe's
  schedule;
* ``network_lr_warmup_epochs=W``: after the decoder-only warm-up (from epoch ``K``; from epoch 0
  without one), *every* group's learning rate, decoder and heads included, ramps linearly over ``W``
  epochs (factor ``1/W, 2/W, ..., 1`` for epochs ``K .. K+W-1``; 1 before ``K``) on top of the
  recipe's schedule: the Spark3D paper's whole-network warm-up (SSL_METHODS.md card 10). With
  ``encoder_lr_warmup_epochs`` too, the encoder gets the product of both ramps. The poly schedule
  (:func:`nnunet_ssl.trainers.recipe.staged_poly_lr`) starts its decay after both warm-ups;
* ``llrd=d`` in ``(0, 1]``: layer-wise learning-rate decay over the encoder *levels*. With ``S``
  stages level ``l`` gets ``lr * d ** (S + 1 - l)``: the deepest stage ``lr * d``, the stem
  ``lr * d ** (S + 1)``; the decoder and heads keep ``lr``;
* ``frozen_stages=...``: encoder levels frozen for the whole run (linear-probe style): one level
  (``2``), a range (``0-1``), levels joined by ``+`` (``0+3``) or ``all`` (the whole encoder, whatever
  its number of levels).

Encoder levels are asked of the network's family (:mod:`nnunet_ssl.networks.family`,
:func:`encoder_levels`): level 0 is the input stem (the module holding the family's ``stem_keys``),
level ``i`` the encoder's ``stages[i-1]``:

* ``swin``: ``encoder.patch_embed.`` then four Swin stages (with their patch merging): levels 0-4;
* ``resenc``: ``encoder.stem.`` then DNA's ``encoder.stages.0 ..`` (six for ResEnc-L): levels 0-6.

The stem is part of the encoder: it is frozen with it (a stem replicated over several input channels
at export stays frozen during the decoder warm-up, as the Spark3D paper keeps it).

Frozen means no optimizer update at all: the parameters get ``requires_grad=False`` (no gradient, so
AdamW and SGD skip them, weight decay included) and their group's learning rate is 0. Under DDP, where
``requires_grad`` cannot change after wrapping, temporarily frozen levels keep their gradients
and get learning rate 0, which leaves AdamW's update and its decoupled weight decay
(``p *= 1 - lr * wd``) exactly zero; SGD's update ``lr * (g + wd * p + momentum terms)`` is zero too.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from nnunet_ssl.networks.family import FAMILIES, family_of_network
from nnunet_ssl.optim import uses_weight_decay

#: Policy keys in their canonical order.
POLICY_KEYS = ("freeze_encoder_epochs", "encoder_lr_warmup_epochs", "network_lr_warmup_epochs", "llrd", "frozen_stages")
#: Module names of the encoder levels inside SwinUNETRSeg: level 0 the stem, level i ``stages.{i-1}``.
STEM_PREFIX = "encoder.patch_embed."
STAGE_PREFIX = "encoder.stages."
ENCODER_PREFIX = "encoder."
#: Levels of every Swin preset's encoder: the stem and four Swin stages.
ENCODER_LEVELS = 5


class PolicyError(ValueError):
    """A policy string or dict that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class EncoderLevels:
    """Where the levels of a network's encoder are (see the module docstring).

    Attributes:
        family: The network's family (:data:`nnunet_ssl.networks.family.FAMILIES`).
        stem_prefix: Parameter-name prefix of level 0, e.g. ``encoder.patch_embed.`` or ``encoder.stem.``.
        num_stages: Stages after the stem (levels ``1 .. num_stages``).
        stage_prefix: Prefix of the stages, followed by the stage index.
    """

    family: str
    stem_prefix: str
    num_stages: int
    stage_prefix: str = STAGE_PREFIX

    @property
    def num_levels(self) -> int:
        """The stem and every stage."""
        return 1 + self.num_stages

    def level_of(self, name: str) -> int | None:
        """Encoder level of a parameter name, None for the decoder and heads."""
        if name.startswith(self.stem_prefix):
            return 0
        if name.startswith(self.stage_prefix):
            return int(name[len(self.stage_prefix):].split(".", 1)[0]) + 1
        if name.startswith(ENCODER_PREFIX):
            return self.num_levels - 1  # any other encoder parameter (none today) goes with the deepest stage
        return None


#: The Swin encoder's levels (every Swin preset has four stages).
SWIN_LEVELS = EncoderLevels("swin", STEM_PREFIX, ENCODER_LEVELS - 1)


@dataclass(frozen=True)
class FineTunePolicy:
    """How the encoder is trained during fine-tuning (see the module docstring).

    Attributes:
        freeze_encoder_epochs: Epochs ``0..K-1`` train the decoder only.
        encoder_lr_warmup_epochs: Linear encoder-lr ramp once the encoder trains.
        llrd: Layer-wise lr decay factor ``d``; 1 = off.
        frozen_stages: Encoder levels (0 = stem, 1..S = stages) frozen throughout, sorted.
        network_lr_warmup_epochs: Linear ramp of every group's lr after the decoder-only warm-up.
        frozen_encoder: ``frozen_stages=all``: every encoder level frozen throughout, whatever the
            encoder's number of levels (``frozen_stages`` is then empty).
    """

    freeze_encoder_epochs: int = 0
    encoder_lr_warmup_epochs: int = 0
    llrd: float = 1.0
    frozen_stages: tuple[int, ...] = ()
    network_lr_warmup_epochs: int = 0
    frozen_encoder: bool = False

    def __post_init__(self) -> None:
        for name in ("freeze_encoder_epochs", "encoder_lr_warmup_epochs", "network_lr_warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PolicyError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.llrd, bool) or not isinstance(self.llrd, (int, float)) or not 0 < self.llrd <= 1 \
                or not math.isfinite(self.llrd):
            raise PolicyError(f"llrd must be a number in (0, 1], got {self.llrd!r}")
        object.__setattr__(self, "llrd", float(self.llrd))
        if not isinstance(self.frozen_encoder, bool):
            raise PolicyError(f"frozen_encoder must be true or false, got {self.frozen_encoder!r}")
        stages = tuple(self.frozen_stages)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in stages):
            raise PolicyError(f"frozen_stages must be encoder levels >= 0 (0 = stem), got {list(stages)}")
        object.__setattr__(self, "frozen_stages", () if self.frozen_encoder else tuple(sorted(set(stages))))

    # ------------------------------------------------------------------ text and dict forms
    @property
    def is_default(self) -> bool:
        """True for the empty policy: every parameter trained at the recipe's learning rate."""
        return self == FineTunePolicy()

    def to_string(self) -> str:
        """Canonical string (keys in :data:`POLICY_KEYS` order, defaults left out); ``"none"`` when empty."""
        parts = []
        if self.freeze_encoder_epochs:
            parts.append(f"freeze_encoder_epochs={self.freeze_encoder_epochs}")
        if self.encoder_lr_warmup_epochs:
            parts.append(f"encoder_lr_warmup_epochs={self.encoder_lr_warmup_epochs}")
        if self.network_lr_warmup_epochs:
            parts.append(f"network_lr_warmup_epochs={self.network_lr_warmup_epochs}")
        if self.llrd != 1.0:
            parts.append(f"llrd={self.llrd:g}")
        if self.frozen_encoder:
            parts.append("frozen_stages=all")
        elif self.frozen_stages:
            parts.append(f"frozen_stages={format_levels(self.frozen_stages)}")
        return ",".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the nnU-Net checkpoint (``init_args``)."""
        values = asdict(self)
        values["frozen_stages"] = list(self.frozen_stages)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], origin: str = "policy") -> FineTunePolicy:
        """The policy of :meth:`to_dict`; a dict written before a key existed gets that key's default."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise PolicyError(f"{origin}: unknown policy keys {sorted(unknown)}; known: {', '.join(POLICY_KEYS)}")
        try:
            return cls(**{**values, "frozen_stages": tuple(values.get("frozen_stages", ()))})
        except PolicyError as error:
            raise PolicyError(f"{origin}: {error}") from error

    # ------------------------------------------------------------------ per epoch and level
    def encoder_factor(self, epoch: int) -> float:
        """Multiplier of every (not permanently frozen) encoder level's lr at ``epoch``: 0 while frozen, then the ramp."""
        if epoch < self.freeze_encoder_epochs:
            return 0.0
        since = epoch - self.freeze_encoder_epochs
        if since < self.encoder_lr_warmup_epochs:
            return (since + 1) / self.encoder_lr_warmup_epochs
        return 1.0

    def network_factor(self, epoch: int) -> float:
        """Multiplier of every group's lr at ``epoch``: 1 during the decoder-only warm-up, then the whole-network ramp."""
        if epoch < self.freeze_encoder_epochs:
            return 1.0
        since = epoch - self.freeze_encoder_epochs
        if since < self.network_lr_warmup_epochs:
            return (since + 1) / self.network_lr_warmup_epochs
        return 1.0

    @property
    def warmup_epochs(self) -> int:
        """Epochs before the recipe's schedule runs unmodified: the decoder-only and the whole-network warm-ups."""
        return self.freeze_encoder_epochs + self.network_lr_warmup_epochs

    def level_scale(self, level: int, num_levels: int) -> float:
        """LLRD multiplier of encoder level ``level`` (0 = stem) in an encoder of ``num_levels`` levels."""
        return self.llrd ** (num_levels - level)

    def permanently_frozen(self, level: int) -> bool:
        """Whether encoder level ``level`` is frozen for the whole run (``frozen_stages``)."""
        return self.frozen_encoder or level in self.frozen_stages

    def level_frozen(self, level: int, epoch: int) -> bool:
        """Whether encoder level ``level`` is frozen at ``epoch``."""
        return self.permanently_frozen(level) or epoch < self.freeze_encoder_epochs

    def group_lr(self, group: dict[str, Any], base_lr: float, epoch: int) -> float:
        """Learning rate of an optimizer param group at ``epoch`` given the recipe's lr ``base_lr``.

        Groups from :func:`policy_parameter_groups` carry ``level`` (None for the decoder) and
        ``lr_scale``; other groups (the plain decay/no-decay pair) follow ``base_lr`` (times the
        whole-network ramp).
        """
        level = group.get("level")
        lr = base_lr * group.get("lr_scale", 1.0) * self.network_factor(epoch)
        if level is None:
            return lr
        if self.permanently_frozen(level):
            return 0.0
        return lr * self.encoder_factor(epoch)

    def check_levels(self, num_levels: int) -> None:
        """Raise :class:`PolicyError` if ``frozen_stages`` names a level the encoder does not have."""
        bad = [s for s in self.frozen_stages if s >= num_levels]
        if bad:
            raise PolicyError(
                f"frozen_stages={format_levels(self.frozen_stages)}: the encoder has levels 0 (stem) .. {num_levels - 1} "
                f"(stage {num_levels - 1}); no level {bad[0]}"
            )

    def describe(self, num_levels: int) -> str:
        """One paragraph for the training log."""
        if self.is_default:
            return "none (every parameter trained at the recipe's learning rate)"
        lines = [self.to_string()]
        if self.freeze_encoder_epochs:
            warmup = (f", then its lr ramps linearly over {self.encoder_lr_warmup_epochs} epoch(s)"
                      if self.encoder_lr_warmup_epochs else "")
            lines.append(f"  encoder frozen for epochs 0-{self.freeze_encoder_epochs - 1} (decoder warm-up), "
                         f"trained from epoch {self.freeze_encoder_epochs}{warmup}")
        elif self.encoder_lr_warmup_epochs:
            lines.append(f"  encoder lr ramps linearly over epochs 0-{self.encoder_lr_warmup_epochs - 1}")
        if self.network_lr_warmup_epochs:
            start = self.freeze_encoder_epochs
            lines.append(f"  whole-network lr warm-up: every group's lr ramps linearly over epochs "
                         f"{start}-{start + self.network_lr_warmup_epochs - 1}")
        scales = []
        for level in range(num_levels):
            name = level_name(level)
            scales.append(f"{name} frozen" if self.permanently_frozen(level)
                          else f"{name} x{self.level_scale(level, num_levels):.4g}")
        lines.append("  encoder levels: " + ", ".join(scales) + "; decoder x1")
        return "\n".join(lines)


def level_name(level: int) -> str:
    return "stem" if level == 0 else f"stage{level}"


def format_levels(levels: Iterable[int]) -> str:
    """``(0, 1, 2)`` -> ``"0-2"``, ``(0, 3)`` -> ``"0+3"``."""
    levels = sorted(levels)
    runs: list[list[int]] = []
    for level in levels:
        if runs and level == runs[-1][-1] + 1:
            runs[-1].append(level)
        else:
            runs.append([level])
    return "+".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _parse_levels(text: str, origin: str) -> tuple[int, ...]:
    levels: list[int] = []
    for part in text.split("+"):
        low, sep, high = part.partition("-")
        try:
            start, stop = int(low), int(high if sep else low)
        except ValueError:
            raise PolicyError(
                f"{origin}: frozen_stages={text!r} is not a level list: use a level (2), a range (0-1), levels "
                "joined by + (0+3) or all; level 0 is the stem, 1.. the encoder's stages (Swin 1-4, ResEnc-L 1-6)"
            ) from None
        if start > stop or start < 0:
            raise PolicyError(f"{origin}: frozen_stages range {part!r} must go up from level 0 or more")
        levels.extend(range(start, stop + 1))
    return tuple(levels)


def parse_policy(text: str | None, origin: str = "policy") -> FineTunePolicy:
    """Parse ``key=value,key=value`` (see the module docstring); ``None``, ``""`` and ``"none"`` are empty.

    Args:
        text: The policy string.
        origin: Where it came from (an environment variable, a weights file), for error messages.

    Raises:
        PolicyError: naming ``origin``, the bad entry and the accepted form.
    """
    if text is None or text.strip().lower() in ("", "none"):
        return FineTunePolicy()
    values: dict[str, Any] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise PolicyError(f"{origin}: {entry!r} is not key=value (e.g. freeze_encoder_epochs=50,llrd=0.75)")
        if key not in POLICY_KEYS:
            raise PolicyError(f"{origin}: unknown key {key!r}; known keys: {', '.join(POLICY_KEYS)}")
        if key in values:
            raise PolicyError(f"{origin}: {key!r} given twice")
        if key == "frozen_stages":
            if value == "all":
                values["frozen_encoder"] = True
            else:
                values[key] = _parse_levels(value, origin)
        elif key == "llrd":
            try:
                values[key] = float(value)
            except ValueError:
                raise PolicyError(f"{origin}: llrd={value!r} is not a number; use a factor in (0, 1], e.g. 0.75") from None
        else:
            try:
                values[key] = int(value)
            except ValueError:
                raise PolicyError(f"{origin}: {key}={value!r} is not a whole number of epochs") from None
    try:
        return FineTunePolicy(**values)
    except PolicyError as error:
        raise PolicyError(f"{origin}: {error}") from error


def encoder_levels(network: nn.Module) -> EncoderLevels:
    """The encoder levels of ``network`` (unwrapped), asked of its family.

    Level 0 is the stem, the module of the family's first ``stem_keys`` entry; level ``i`` the
    encoder's ``stages[i-1]``.

    Raises:
        TypeError: for a network of no family, or whose encoder has no ``stages``.
    """
    family = family_of_network(network)
    if family is None:
        raise TypeError(
            f"fine-tuning policies split the encoder of a network of a known family ({', '.join(FAMILIES)}) into "
            f"levels, not a {type(network).__name__}"
        )
    stages = getattr(family.encoder(network), "stages", None)
    if not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"the {family.name} encoder of {type(network).__name__} has no stages to split into levels")
    root = family.encoder_attribute
    stem = family.stem_keys[0].split(".", 1)[0]
    return EncoderLevels(family.name, f"{root}.{stem}.", len(stages), f"{root}.stages.")


def encoder_level(name: str, levels: EncoderLevels = SWIN_LEVELS) -> int | None:
    """Encoder level of a parameter name, None for the decoder and heads (default: the Swin layout)."""
    return levels.level_of(name)


def num_encoder_levels(network: nn.Module) -> int:
    """1 (stem) + the number of stages of ``network``'s encoder (see :func:`encoder_levels`)."""
    return encoder_levels(network).num_levels


def policy_parameter_groups(
    network: nn.Module, weight_decay: float, policy: FineTunePolicy, exempt_norms_and_biases: bool = True
) -> list[dict[str, Any]]:
    """Optimizer param groups: decoder first, then one or two per encoder level.

    Every group carries ``name``, ``level`` (None for the decoder) and ``lr_scale`` (the LLRD factor),
    read by :meth:`FineTunePolicy.group_lr`. Group 0 is the decoder's decayed group, so nnU-Net's
    logged learning rate (``param_groups[0]``) stays the recipe's. Empty groups are left out.
    Permanently frozen levels are included (their lr stays 0) and get ``requires_grad=False``.

    Args:
        network: A network of a known family (unwrapped), :func:`encoder_levels`.
        weight_decay: Weight decay of the decayed groups.
        policy: The policy (``frozen_stages`` already checked against the encoder).
        exempt_norms_and_biases: True (AdamW, Swin): norms, biases and position tables get no decay, so
            each level has a ``decay`` and a ``no_decay`` group. False (nnU-Net's SGD): every parameter
            is decayed, as ``nnUNetTrainer.configure_optimizers`` does, one ``decay`` group per level.
    """
    levels = encoder_levels(network)
    num_levels = levels.num_levels
    buckets: dict[tuple[int | None, bool], list[nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        decay = uses_weight_decay(name, parameter) if exempt_norms_and_biases else True
        buckets.setdefault((levels.level_of(name), decay), []).append(parameter)
    groups = []
    for level in (None, *range(num_levels)):
        for decay in (True, False):
            params = buckets.get((level, decay), [])
            if not params:
                continue
            if level is not None and policy.permanently_frozen(level):
                for parameter in params:
                    parameter.requires_grad_(False)
            groups.append({
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'decoder' if level is None else level_name(level)}/{'decay' if decay else 'no_decay'}",
                "level": level,
                "lr_scale": 1.0 if level is None else policy.level_scale(level, num_levels),
            })
    return groups


def apply_freezing(network: nn.Module, policy: FineTunePolicy, epoch: int, toggle_requires_grad: bool = True) -> None:
    """Set ``requires_grad`` of every encoder parameter (stem included) for ``epoch``.

    Permanently frozen levels are always ``False``. With ``toggle_requires_grad=False`` (DDP) the
    temporarily frozen levels keep ``requires_grad=True`` and rely on a zero learning rate.
    """
    levels = encoder_levels(network)
    for name, parameter in network.named_parameters():
        level = levels.level_of(name)
        if level is None:
            continue
        if policy.permanently_frozen(level):
            parameter.requires_grad_(False)
        elif toggle_requires_grad:
            parameter.requires_grad_(not policy.level_frozen(level, epoch))
