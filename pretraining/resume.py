"""Where a pretraining run continues from, and which settings a resume may change.

A resumed run must be the run that was started: the method, its settings, the data and the
optimisation that produced the checkpoint stay as they were, or the recorded configuration would
describe weights it never trained. Only the length of the run (``epochs``, ``max_steps``) and
bookkeeping that does not touch the weights (checkpoint interval, loader processes, cache
location) may change.

Checkpoints rotate: before a new ``checkpoint_latest.pt`` is written, the old one becomes
``checkpoint_previous.pt``, so a latest file that was damaged after it was written (a full disk, a
bad copy) still leaves a point to continue from.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_ssl.checkpoints import FINAL, LATEST, PREVIOUS, load_checkpoint
from nnunet_ssl.pretraining.config import CONFIG_FILE, RunConfig

logger = logging.getLogger(__name__)

#: Settings (dotted paths into :meth:`RunConfig.to_dict`) that a resume may change.
RESUMABLE_CHANGES = frozenset(
    {"engine.epochs", "engine.max_steps", "engine.checkpoint_every", "data.num_workers", "data.cache_dir"}
)
#: The files a run continues from, in the order they are tried.
RESUME_ORDER = (LATEST, PREVIOUS, FINAL)


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint a run continues from.

    Attributes:
        path: The checkpoint file.
        checkpoint: Its loaded contents.
        config: The configuration that trained it.
    """

    path: Path
    checkpoint: dict[str, Any]
    config: RunConfig


def find_resume_point(run_dir: Path) -> ResumePoint | None:
    """The newest readable checkpoint of ``run_dir`` (latest, then previous, then final).

    An unreadable file is skipped with a warning naming it and the reason; None when the folder
    holds no checkpoint at all.

    Raises:
        ValueError: there are checkpoints, but none of them can be read.
    """
    problems: list[str] = []
    for name in RESUME_ORDER:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            checkpoint = load_checkpoint(path)
            config = RunConfig.from_dict(checkpoint["config"])
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"{path}: {error}")
            logger.warning("cannot resume from %s (%s); trying the next checkpoint", path, error)
            continue
        if problems:
            logger.warning("resuming from %s (step %s) instead", path, checkpoint.get("step"))
        return ResumePoint(path, checkpoint, config)
    if problems:
        raise ValueError("no readable checkpoint to resume from:\n  " + "\n  ".join(problems))
    return None


def recorded_run_config(run_dir: Path) -> RunConfig | None:
    """The configuration a run recorded in ``config.json`` (None, with a warning, if it cannot be read).

    A resume starts from it, so ``pretrain --resume --out RUN`` needs no other flag; the checkpoint's
    own copy stays the reference that :func:`check_resume_config` compares with.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("cannot read %s (%s): the run's settings must be given again", path, error)
        return None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1}``; tuples and lists compare as lists."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(saved: RunConfig, requested: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Every setting whose value differs, as ``{dotted name: (saved, requested)}``."""
    before, after = flatten(saved.to_dict()), flatten(requested.to_dict())
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def check_resume_config(point: ResumePoint, requested: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that would change what the checkpoint was trained with.

    Returns:
        The allowed changes (run length, bookkeeping), for the log.

    Raises:
        ValueError: naming the checkpoint and listing every refused difference, or a ``max_steps``
            below the checkpoint's step.
    """
    differences = config_differences(point.config, requested)
    refused = {k: v for k, v in differences.items() if k not in RESUMABLE_CHANGES}
    if refused:
        lines = [f"  {key}: {saved!r} in the run, {now!r} now" for key, (saved, now) in refused.items()]
        raise ValueError(
            f"--resume would change how {point.path} was trained; a resumed run keeps its method, settings "
            "and data (only epochs, max_steps, checkpoint_every, workers and cache_dir may change). Differences:\n"
            + "\n".join(lines)
            + "\nleave these out to continue the run as it was, or start a new run with another --out"
        )
    step = int(point.checkpoint["step"])
    max_steps = requested.engine.max_steps
    if max_steps is not None and max_steps < step:
        raise ValueError(f"--max-steps {max_steps} is below the step {step} that {point.path} already reached")
    return {k: v for k, v in differences.items() if k in RESUMABLE_CHANGES}
