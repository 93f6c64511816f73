"""Reading checkpoints and digesting encoder weights, with no nnU-Net and no pretraining imports.

Both ``nnunet_ssl.pretraining`` (which writes run checkpoints) and ``nnunet_ssl.weights`` (which
exports and converts them) import this module, so the two packages import one way only:
``weights`` -> ``pretraining`` -> ``checkpoints``.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: ``format`` entry of a checkpoint written by the pretraining engine.
CHECKPOINT_FORMAT = "nnunet-ssl-pretraining-checkpoint"
#: File names of a pretraining run's checkpoints.
LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
#: The latest checkpoint before the current one (kept so that a damaged latest file loses one interval).
PREVIOUS = "checkpoint_previous.pt"
#: Encoder keys that exist only for pretraining and are never exported.
PRETRAINING_ONLY_KEYS = ("mask_token",)


def read_torch_file(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load`` a file on the CPU with ``weights_only=True``; errors name the file and the problem.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a readable torch file (or holds objects ``weights_only`` refuses).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable {what} ({error.__class__.__name__}: {error})") from error


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint the pretraining engine wrote (``weights_only=True``), with a clear error otherwise."""
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an nnunet-ssl pretraining checkpoint")
    return checkpoint


def find_checkpoint(run_dir: Path) -> Path | None:
    """The final checkpoint of a run, else its latest one, else None."""
    for name in (FINAL, LATEST):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def encoder_digest(encoder_state: Mapping[str, Tensor]) -> str:
    """Stable 16-hex-digit digest of encoder weights (keys, shapes and float32 values).

    Pretraining-only keys are ignored, so the pretraining encoder and the exported copy agree.
    """
    sha = hashlib.sha256()
    for key in sorted(encoder_state):
        if key in PRETRAINING_ONLY_KEYS:
            continue
        tensor = encoder_state[key].detach().to("cpu", torch.float32).contiguous()
        sha.update(key.encode())
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.numpy().tobytes())
    return sha.hexdigest()[:16]
