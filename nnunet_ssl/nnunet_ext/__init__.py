"""The folder nnUNet_extTrainer points at (``nnunet-ssl ext-path``): re-export shims only.

nnU-Net imports every module in this folder under its bare file name and drops it from
sys.modules afterwards, so no trainer may be defined here: the classes live in
``nnunet_ssl.trainers``. This package file is not one of those modules (nnU-Net never imports it);
it only says where the folder is, and imports nothing of nnunet_ssl, so every module may use it.
"""
from __future__ import annotations

from pathlib import Path


def ext_trainer_path() -> Path:
    """Folder to put in ``nnUNet_extTrainer`` (re-export shims of the plugin's trainers)."""
    return Path(__file__).resolve().parent
