"""Where nnU-Net keeps a dataset's files, read from the environment at call time (never at import)."""
from __future__ import annotations

import os
from pathlib import Path


def nnunet_folder(variable: str) -> Path:
    """The folder in ``nnUNet_raw``, ``nnUNet_preprocessed`` or ``nnUNet_results``.

    Raises:
        FileNotFoundError: when the variable is unset.
    """
    value = os.environ.get(variable)
    if not value:
        raise FileNotFoundError(f"{variable} is not set; export it as for any nnU-Net command")
    return Path(value)


def dataset_name(dataset: str | int) -> str:
    """``Dataset501_Phantom`` for ``501``, ``"501"`` or the name itself (nnU-Net's own lookup).

    Raises:
        FileNotFoundError: when no dataset with that id exists in nnU-Net's folders.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset))
    except RuntimeError as error:  # nnU-Net raises RuntimeError for unknown ids
        raise FileNotFoundError(f"dataset {dataset!r}: {error}") from error


def preprocessed_dataset_folder(dataset: str | int) -> Path:
    """``$nnUNet_preprocessed/<DatasetName>``."""
    return nnunet_folder("nnUNet_preprocessed") / dataset_name(dataset)


def raw_dataset_folder(dataset: str | int) -> Path:
    """``$nnUNet_raw/<DatasetName>``."""
    return nnunet_folder("nnUNet_raw") / dataset_name(dataset)
