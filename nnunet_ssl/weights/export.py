"""Turn a pretraining run into an nnU-Net ``-pretrained_weights`` file."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nnunet_ssl.checkpoints import find_checkpoint, load_checkpoint
from nnunet_ssl.pretraining.config import RunConfig
from nnunet_ssl.pretraining.engine import build_run_method
from nnunet_ssl.weights.targets import DatasetTarget, build_weights_for_target

logger = logging.getLogger(__name__)


def load_run_encoder(run_dir: Path, source: str = "default") -> tuple[dict[str, Any], Any, str]:
    """Encoder weights of a run's final (else latest) checkpoint.

    Args:
        run_dir: A ``nnunet-ssl pretrain`` output folder, or one of its checkpoint files.
        source: ``"default"`` (the teacher for methods that have one, else the student),
            ``"teacher"`` or ``"student"``.

    Returns:
        ``(encoder_state, run_config, checkpoint_path)``.
    """
    run_dir = Path(run_dir)
    checkpoint_path = run_dir if run_dir.is_file() else find_checkpoint(run_dir)
    if checkpoint_path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint_final.pt or checkpoint_latest.pt; is this a pretraining run?")
    checkpoint = load_checkpoint(checkpoint_path)
    config = RunConfig.from_dict(checkpoint["config"])
    method = build_run_method(config)
    method.load_state_dict(checkpoint["method"])
    if checkpoint_path.name != "checkpoint_final.pt":
        logger.warning("%s: the run has not finished; exporting its latest checkpoint (step %d)", run_dir, checkpoint["step"])
    return method.encoder_state(source), config, str(checkpoint_path)


def intensity_of(config: Any) -> dict[str, Any]:
    """The intensity mapping pretraining used, recorded in the export's metadata.

    Without a ``modality`` setting, the modalities the cache manifest records (given or decided from
    the intensities) say it: ``"CT"``, ``"MR"``, or ``"mixed"``.
    """
    data = config.data
    modalities = {data.modality} if data.modality else _cached_modalities(data.cache_dir) or {"ct"}
    ct = {"window": list(data.ct_window)}
    mr = {"percentiles": list(data.mr_percentiles), "per_image": True}
    if modalities == {"ct"}:
        return {"modality": "CT", **ct, "range": [0.0, 1.0]}
    if modalities == {"mr"}:
        return {"modality": "MR", **mr, "range": [0.0, 1.0]}
    return {"modality": "mixed", **ct, **mr, "range": [0.0, 1.0]}


def _cached_modalities(cache_dir: str) -> set[str]:
    from nnunet_ssl.pretraining.data import Manifest

    try:
        manifest = Manifest.load(cache_dir)
    except (OSError, ValueError):
        return set()
    return {e.modality for e in manifest.usable() if e.modality in ("ct", "mr")}


def export_run(
    run_dir: Path,
    target: DatasetTarget,
    source: str = "default",
    decoder_seed: int = 0,
    channels: str = "replicate",
    finetune_policy: str = "",
) -> dict[str, Any]:
    """Build the weights payload of ``run_dir`` for ``target`` (a dataset's plans).

    Args:
        run_dir: A ``nnunet-ssl pretrain`` output folder.
        target: The dataset's channels and classes.
        source: Which encoder (``default``, ``teacher``, ``student``).
        decoder_seed: Seed of the fresh decoder.
        channels: Stem adaptation when the channel counts differ (``replicate``, ``first``, ``mean``).
        finetune_policy: A validated policy string stored for the trainer ("" for none).
    """
    encoder_state, config, checkpoint_path = load_run_encoder(run_dir, source)
    return build_weights_for_target(
        encoder_state,
        config.preset,
        target,
        method=config.method,
        source=f"{checkpoint_path} ({source})",
        intensity=intensity_of(config),
        decoder_seed=decoder_seed,
        channels=channels,
        finetune_policy=finetune_policy,
    )
