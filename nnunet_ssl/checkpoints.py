"""Reading checkpoints and digesting encoder weights, with no nnU-Net and no pretraining imports.

A foundation module (``nnunet_ssl.layers``): ``nnunet_ssl.pretraining`` (which writes run checkpoints)
and ``nnunet_ssl.weights`` (which exports and converts them, from what the checkpoint carries) both
read checkpoints here, and neither imports the other for it.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x (nnU-Net allows it)
    from numpy.core.multiarray import scalar as _numpy_scalar  # type: ignore[no-redef]

#: ``format`` entry of a checkpoint written by the pretraining engine.
CHECKPOINT_FORMAT = "nnunet-ssl-pretraining-checkpoint"
#: File names of a pretraining run's checkpoints.
LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
#: The latest checkpoint before the current one (kept so that a damaged latest file loses one interval).
PREVIOUS = "checkpoint_previous.pt"
#: Encoder keys that exist only for pretraining and are never exported.
PRETRAINING_ONLY_KEYS = ("mask_token",)


#: The only globals an nnU-Net 2.8.1 checkpoint needs beyond torch's own ``weights_only`` set (tensors,
#: ``OrderedDict``, ``torch.device``, ``set``, and plain ``dict``/``list``/``tuple``/``str``/``int``/``float``/
#: ``bool``/``None``, which need no global). ``nnUNetTrainer.save_checkpoint`` stores ``network_weights``,
#: ``optimizer_state`` and ``grad_scaler_state`` (tensors and plain values), ``init_args`` (plans and
#: dataset.json dicts, configuration, fold, a ``torch.device``), ``trainer_name``, ``current_epoch``,
#: ``inference_allowed_mirroring_axes`` (a tuple of ints) and, from its logger
#: (``nnunetv2/training/logging/nnunet_logger.py``), per-epoch lists of numpy scalars (losses and pseudo
#: Dice are ``np.mean``/``np.nanmean`` of float32 arrays, float64 where counts are integer) and
#: ``_best_ema``, one of those scalars. A numpy scalar pickles as ``numpy._core.multiarray.scalar(dtype,
#: bytes)`` and its dtype as ``numpy.dtype`` plus its dtype class; numpy 1.x names the same function
#: ``numpy.core.multiarray.scalar``, so both names are allowed. Numeric dtypes only: an object dtype
#: could carry anything.
_NUMERIC_DTYPES = (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64,
)
NNUNET_CHECKPOINT_GLOBALS: tuple[Any, ...] = (
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(t)) for t in _NUMERIC_DTYPES),
)

#: Where torch's ``weights_only`` message stops giving advice and says what it refused.
_WEIGHTS_ONLY_DETAIL = "WeightsUnpickler error:"
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)"),
    re.compile(r"but got <class '([^']+)'>"),
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects other than tensors and the plain values checkpoints store; it was not loaded."""


def read_torch_file(
    path: str | os.PathLike[str], what: str = "checkpoint", extra_globals: tuple[Any, ...] = (), mmap: bool = False
) -> Any:
    """``torch.load`` a file on the CPU with ``weights_only=True``; errors name the file and the problem.

    Nothing in the file is ever executed: pickled objects other than tensors, plain Python values and
    ``extra_globals`` are refused (``torch.serialization.safe_globals``, no global state is changed).

    Args:
        path: The file.
        what: What the file should be, for messages ("checkpoint", "weights file", ...).
        extra_globals: Further types and functions the unpickler may use (see :data:`NNUNET_CHECKPOINT_GLOBALS`).
        mmap: Memory-map the tensors instead of reading them (zip-format files only).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        IsADirectoryError: ``path`` is a folder.
        UnsafeCheckpointError: the file holds other objects; the message names their types, on one line.
        ValueError: the file is not a readable torch file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; expected the {what} file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        names = _refused_globals(path, extra_globals, error)
        if names:
            raise UnsafeCheckpointError(
                f"{path}: refused: the {what} holds {', '.join(names)}, not only tensors and plain values; "
                "nothing in it was run"
            ) from None
        raise ValueError(f"{path}: not a readable {what} (UnpicklingError: {_unpickler_reason(error)})") from None
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable {what} ({error.__class__.__name__}: {_first_line(error)})") from error


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def _unpickler_reason(error: Exception) -> str:
    """What torch's unpickler objected to, without torch's advice around it (one line)."""
    text = str(error)
    if _WEIGHTS_ONLY_DETAIL in text:
        text = text.split(_WEIGHTS_ONLY_DETAIL, 1)[1]
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _refused_globals(path: Path, extra_globals: tuple[Any, ...], error: Exception) -> list[str]:
    """Every global in the file outside the allowed set (read without unpickling), else what torch named."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file or a damaged archive: fall back to the message
        names = []
    if names:
        return names
    for pattern in _REFUSED_PATTERNS:
        match = pattern.search(str(error))
        if match:
            return [match.group(1)]
    return []


def load_nnunet_checkpoint(path: str | os.PathLike[str], mmap: bool = False) -> dict[str, Any]:
    """Load an nnU-Net ``checkpoint_*.pth`` safely: tensors, plain values and numpy scalars only.

    Raises:
        FileNotFoundError, IsADirectoryError: no such file.
        UnsafeCheckpointError: the file holds any other object (nothing in it is run).
        ValueError: not a readable torch file, or not a dict.
    """
    checkpoint = read_torch_file(path, "nnU-Net checkpoint", NNUNET_CHECKPOINT_GLOBALS, mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not an nnU-Net checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


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
