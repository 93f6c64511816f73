"""Turn a pretraining run into an nnU-Net ``-pretrained_weights`` file: a pure function of its checkpoint.

Export reads what a pretraining checkpoint carries and imports no training code (``nnunet_ssl.layers``):
the encoders by role (``"teacher"``, ``"student"``), which one ``"default"`` means, the intensity
mapping of the data, all written by the pretraining engine (checkpoint version 2), and the decoders by
role of a method that pretrains one (Spark3D's U-Net decoder; the entry ``"decoders"``, absent otherwise).
Such a decoder is exported with its encoder by default; ``encoder_only`` gives a fresh seeded decoder
instead (the two variants the Spark3D paper compares).

A version-1 checkpoint, written before those entries existed, still exports the same file: its
encoders are read from the method's state under the key prefixes that every method of that version
used (:data:`V1_ENCODER_PREFIXES`), and its intensity mapping from the run's settings and its cache
manifest, as the engine of that version decided it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from nnunet_ssl.checkpoints import FINAL, PRETRAINING_ONLY_KEYS, find_checkpoint, load_checkpoint
from nnunet_ssl.weights.intensity import pretraining_intensity
from nnunet_ssl.weights.targets import DatasetTarget, build_weights_for_target

logger = logging.getLogger(__name__)

#: ``--from`` choices of ``nnunet-ssl export``: ``"default"`` is the role the run names (its teacher if it has one).
ENCODER_SOURCES = ("default", "teacher", "student")
#: Where a version-1 checkpoint's ``method`` state keeps each encoder, tried in this order: the methods
#: with an EMA teacher (SMIT, DINO, iBOT) hold ``teacher.encoder`` (their default) and ``student.encoder``,
#: the others their only encoder as ``encoder``. Frozen with that version: newer checkpoints say it themselves.
V1_ENCODER_PREFIXES = (("teacher", "teacher.encoder."), ("student", "student.encoder."), ("student", "encoder."))
#: The file in a pretraining cache that lists its volumes, and the status of a usable one.
CACHE_MANIFEST, USABLE = "manifest.json", "ok"


@dataclass(frozen=True)
class PretrainingRun:
    """What export needs from one checkpoint of a pretraining run.

    Attributes:
        method: Pretraining method name, e.g. ``"smit"``.
        preset: Encoder preset name.
        in_channels: Input channels of the pretrained encoder.
        encoders: Encoder state dicts by role (``"teacher"``, ``"student"``), without pretraining-only keys.
        default_encoder: The role that ``"default"`` exports.
        decoders: Pretrained decoder state dicts by role (empty for methods that train no decoder).
        config: The run's configuration as the checkpoint records it (method, preset, data, engine).
        intensity: The intensity mapping pretraining used (:func:`~nnunet_ssl.weights.intensity.pretraining_intensity`).
        checkpoint: The checkpoint file read.
        step: Optimisation steps the checkpoint holds.
    """

    method: str
    preset: str
    in_channels: int
    encoders: dict[str, dict[str, Tensor]]
    default_encoder: str
    intensity: dict[str, Any]
    checkpoint: Path
    step: int
    decoders: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def role(self, source: str) -> str:
        """The role (``"teacher"``, ``"student"``) that ``source`` names (one of :data:`ENCODER_SOURCES`)."""
        if source not in ENCODER_SOURCES:
            raise ValueError(f"unknown encoder source {source!r}; choose one of {ENCODER_SOURCES}")
        return self.default_encoder if source == "default" else source

    def decoder(self, source: str = "default") -> dict[str, Tensor] | None:
        """The pretrained decoder of the same role as :meth:`encoder` of ``source``; None when the method trained none."""
        return self.decoders.get(self.role(source))

    def encoder(self, source: str = "default") -> dict[str, Tensor]:
        """The encoder of ``source`` (one of :data:`ENCODER_SOURCES`).

        Raises:
            ValueError: For an unknown source, or ``"teacher"`` of a run without one.
        """
        role = self.role(source)
        if role not in self.encoders:
            raise ValueError(
                f"{self.checkpoint}: {self.method} has no {source!r} encoder; choose one of {('default', *self.encoders)}"
            )
        return self.encoders[role]


def read_run(run_dir: Path) -> PretrainingRun:
    """The final (else latest) checkpoint of a run, or the checkpoint file given, as export reads it.

    Raises:
        FileNotFoundError: When the folder holds no checkpoint.
        ValueError: When the file is not a pretraining checkpoint or lacks an entry export needs.
    """
    run_dir = Path(run_dir)
    path = run_dir if run_dir.is_file() else find_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint_final.pt or checkpoint_latest.pt; is this a pretraining run?")
    checkpoint = load_checkpoint(path)
    try:
        config = checkpoint["config"]
        if "encoders" in checkpoint:
            encoders, default, intensity = checkpoint["encoders"], checkpoint["default_encoder"], checkpoint["intensity"]
        else:
            encoders, default = _v1_encoders(checkpoint["method"])
            intensity = _v1_intensity(config["data"])
        run = PretrainingRun(
            method=config["method"], preset=config["preset"], in_channels=int(config["in_channels"]),
            encoders=dict(encoders), default_encoder=default, intensity=intensity, checkpoint=path,
            step=int(checkpoint["step"]), decoders=dict(checkpoint.get("decoders") or {}), config=dict(config),
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: a pretraining checkpoint without {error}; it cannot be exported") from error
    if not run.encoders or run.default_encoder not in run.encoders:
        raise ValueError(f"{path}: no encoder found in the checkpoint; it cannot be exported")
    return run


def _v1_encoders(method_state: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], str]:
    """Encoders by role of a version-1 checkpoint's ``method`` state, and the default role."""
    encoders: dict[str, dict[str, Tensor]] = {}
    for role, prefix in V1_ENCODER_PREFIXES:
        state = {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if k not in PRETRAINING_ONLY_KEYS}
        if state and role not in encoders:
            encoders[role] = state
    return encoders, "teacher" if "teacher" in encoders else "student"


def _v1_intensity(data: dict[str, Any]) -> dict[str, Any]:
    """The intensity mapping of a version-1 run: its settings, else the modalities its cache manifest lists."""
    cached: list[str] = []
    if not data.get("modality"):
        try:
            manifest = json.loads((Path(data["cache_dir"]) / CACHE_MANIFEST).read_text(encoding="utf-8"))
            cached = [e.get("modality") for e in manifest["entries"] if e.get("status") == USABLE]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cached = []  # no manifest left: CT, as the engine of version 1 decided then
    return pretraining_intensity(data.get("modality"), cached, data["ct_window"], data["mr_percentiles"])


def load_run_encoder(run_dir: Path, source: str = "default") -> tuple[dict[str, Tensor], PretrainingRun, str]:
    """Encoder weights of a run's final (else latest) checkpoint.

    Args:
        run_dir: A ``nnunet-ssl pretrain`` output folder, or one of its checkpoint files.
        source: ``"default"`` (the teacher for methods that have one, else the student),
            ``"teacher"`` or ``"student"``.

    Returns:
        ``(encoder_state, run, checkpoint_path)``; ``run.preset``, ``run.method`` describe the run.
    """
    run = read_run(run_dir)
    state = run.encoder(source)
    if run.checkpoint.name != FINAL:
        logger.warning("%s: the run has not finished; exporting its latest checkpoint (step %d)", run_dir, run.step)
    return state, run, str(run.checkpoint)


def export_run(
    run_dir: Path,
    target: DatasetTarget,
    source: str = "default",
    decoder_seed: int = 0,
    channels: str = "replicate",
    finetune_policy: str = "",
    encoder_only: bool = False,
) -> dict[str, Any]:
    """Build the weights payload of ``run_dir`` for ``target`` (a dataset's plans).

    Args:
        run_dir: A ``nnunet-ssl pretrain`` output folder.
        target: The dataset's channels and classes.
        source: Which encoder (``default``, ``teacher``, ``student``).
        decoder_seed: Seed of the fresh decoder.
        channels: Stem adaptation when the channel counts differ (``replicate``, ``first``, ``mean``).
        finetune_policy: A validated policy string stored for the trainer ("" for none).
        encoder_only: A fresh decoder (seeded by ``decoder_seed``) even when the run pretrained one.
    """
    encoder_state, run, checkpoint_path = load_run_encoder(run_dir, source)
    decoder_state = None if encoder_only else run.decoder(source)
    if decoder_state is not None:
        logger.info("exporting the pretrained decoder of %s with its encoder (--encoder-only for a fresh one)", run.method)
    return build_weights_for_target(
        encoder_state,
        run.preset,
        target,
        method=run.method,
        source=f"{checkpoint_path} ({source})",
        intensity=run.intensity,
        decoder_seed=decoder_seed,
        channels=channels,
        finetune_policy=finetune_policy,
        decoder_state=decoder_state,
    )


def export_nnssl(run_dir: Path, out: Path, source: str = "default") -> tuple[Path, Path]:
    """Write a ResEnc pretraining run in nnssl's interchange form (:mod:`nnunet_ssl.weights.nnssl`).

    The checkpoint holds the whole pretrained U-Net (encoder and decoder, as nnssl's own checkpoints do) and
    ``adaptation_plan.json`` is written beside it; nnssl's fine-tuning reads the stem and encoder from it and
    re-normalises with z-scores, so only a z-score pretraining (Spark3D's default) is written.

    Args:
        run_dir: A ``nnunet-ssl pretrain`` folder (or one of its checkpoints) of a ResEnc method.
        out: The checkpoint file to write (nnssl names it ``checkpoint_final.pth``).
        source: Which encoder and decoder (``default``, ``student``; ``teacher`` where a method has one).

    Returns:
        ``(checkpoint file, adaptation_plan.json)``.

    Raises:
        WeightsError: a run of another family, without a pretrained decoder, or not z-scored.
    """
    from nnunet_ssl.networks.family import family_of_preset
    from nnunet_ssl.weights.format import WeightsError
    from nnunet_ssl.weights.intensity import ZSCORE
    from nnunet_ssl.weights.nnssl import nnssl_pretrain_plan, write_nnssl_checkpoint

    encoder_state, run, checkpoint_path = load_run_encoder(run_dir, source)
    family = family_of_preset(run.preset)
    if family.name != "resenc":
        raise WeightsError(
            f"{checkpoint_path}: nnssl's interchange holds ResEnc U-Nets; this run pretrained a {family.name} network "
            f"(preset {run.preset!r}); export it for nnU-Net without --format nnssl"
        )
    decoder_state = run.decoder(source)
    if decoder_state is None:
        raise WeightsError(f"{checkpoint_path}: the run holds no pretrained decoder; nnssl checkpoints hold the whole U-Net")
    if run.intensity.get("normalization") != ZSCORE:
        raise WeightsError(
            f"{checkpoint_path}: the run was pretrained on {run.intensity.get('modality', '?')} intensities mapped to "
            "[0, 1], but nnssl fine-tunes with per-image z-scores; pretrain with `--intensity zscore` (Spark3D's "
            "default) to share weights with nnssl"
        )
    data = run.config.get("data", {})
    spacing = [float(s) for s in reversed(data.get("spacing", (1.0, 1.0, 1.0)))]  # (x, y, z) -> nnU-Net's (z, y, x)
    patch = [int(data.get("crop_size", 160))] * 3
    weights = {**{f"encoder.{k}": v for k, v in encoder_state.items()},
               **{f"decoder.{k}": v for k, v in decoder_state.items()}}
    plan = nnssl_pretrain_plan(dataset_name=f"nnunet-ssl {run.method} {Path(run_dir).name}", patch_size=patch,
                               spacing=spacing, normalization_schemes=["ZScoreNormalization"] * run.in_channels)
    written = write_nnssl_checkpoint(weights, family.record(run.preset), out, pretrain_plan=plan,
                                     recommended_patch_size=patch, in_channels=run.in_channels)
    logger.info("wrote %s and %s: %s %s at step %d in nnssl's form", *written, run.method, run.preset, run.step)
    return written
