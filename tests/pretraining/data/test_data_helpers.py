"""Shared helpers for the pretraining data tests: tiny synthetic volumes written with SimpleITK.

Imported by the ``test_data_*`` modules (pytest puts this folder on ``sys.path``); it holds no
tests itself.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from nnunet_ssl.pretraining.data import DataConfig
from nnunet_ssl.pretraining.data.cache import ManifestEntry, process_source
from nnunet_ssl.pretraining.data.sources import Source

#: Default test geometry: (x, y, z) voxels and spacing, as the brief suggests.
SIZE_XYZ = (40, 48, 48)
SPACING_XYZ = (1.0, 1.0, 2.5)


def ct_volume(
    size_xyz: tuple[int, int, int] = SIZE_XYZ,
    spacing_xyz: tuple[float, float, float] = SPACING_XYZ,
    seed: int = 0,
    air_margin: int = 4,
) -> sitk.Image:
    """int16 CT-like image: air (-1000 HU) around a box of soft tissue (0..100 HU) with a bone rod."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    arr = np.full((nz, ny, nx), -1000, dtype=np.int16)
    m = air_margin
    arr[m : nz - m, m : ny - m, m : nx - m] = rng.integers(0, 100, size=(nz - 2 * m, ny - 2 * m, nx - 2 * m))
    arr[m : nz - m, ny // 2 - 2 : ny // 2 + 2, nx // 2 - 2 : nx // 2 + 2] = 800
    return image_from_array(arr, spacing_xyz)


def mr_volume(seed: int = 0) -> sitk.Image:
    """float32 MR-like image: background ~0 plus noise, a bright box with a few outliers."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = SIZE_XYZ
    arr = rng.normal(5.0, 1.0, size=(nz, ny, nx)).astype(np.float32)
    arr[4:-4, 6:-6, 6:-6] += rng.normal(400.0, 30.0, size=(nz - 8, ny - 12, nx - 12)).astype(np.float32)
    arr[10, 20, 20] = 5000.0
    return image_from_array(arr, SPACING_XYZ)


def image_from_array(arr: np.ndarray, spacing_xyz: tuple[float, float, float] = SPACING_XYZ) -> sitk.Image:
    """SimpleITK image from a ``(z, y, x)`` array."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return img


def write(img: sitk.Image, path: str | Path) -> str:
    """Write ``img`` (compressed where the format allows) and return the path."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return str(path)


def write_dicom_series(img: sitk.Image, folder: str | Path, modality: str = "CT") -> str:
    """Write an int16 3-D image as a DICOM series, one file per slice, with position tags."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    img = sitk.Cast(img, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    date, clock = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    uid_root = "1.2.826.0.1.3680043.2.1125"
    series_uid = f"{uid_root}.2.{zlib.crc32(folder.encode())}"
    d = img.GetDirection()
    tags = {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0021": date,
        "0008|0031": clock,
        "0008|0060": modality,
        "0008|103e": "nnunet-ssl test series",
        "0010|0010": "Test^Patient",
        "0020|000d": f"{uid_root}.1.{zlib.crc32(folder.encode())}",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0028|1052": "0",
        "0028|1053": "1",
    }
    for i in range(img.GetDepth()):
        sl = img[:, :, i]
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        sl.SetMetaData("0008|0018", f"{series_uid}.{i + 1}")
        sl.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, i))))
        sl.SetMetaData("0020|0013", str(i + 1))
        writer.SetFileName(os.path.join(folder, f"slice{i:03d}.dcm"))
        writer.Execute(sl)
    return folder


def nnunet_dataset(root: str | Path, channels: dict[str, str], n_tr: int = 2, n_ts: int = 1) -> str:
    """An nnU-Net raw dataset with ``len(channels)`` channels, ``n_tr`` training and ``n_ts`` test cases."""
    root = str(root)
    for sub, n in (("imagesTr", n_tr), ("imagesTs", n_ts)):
        for case in range(n):
            for ch, name in channels.items():
                img = ct_volume(seed=case * 10 + int(ch)) if name.upper() == "CT" else mr_volume(seed=case * 10 + int(ch))
                write(img, os.path.join(root, sub, f"case{sub[-2:]}{case:03d}_{int(ch):04d}.nii.gz"))
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    for case in range(n_tr):
        label = sitk.Cast(ct_volume(seed=case) > 0, sitk.sitkUInt8)
        write(label, os.path.join(root, "labelsTr", f"caseTr{case:03d}.nii.gz"))
    meta: dict[str, Any] = {
        "channel_names": channels,
        "labels": {"background": 0, "organ": 1},
        "numTraining": n_tr,
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh)
    return root


def config(inputs: list[str] | tuple[str, ...], cache_dir: str | Path, **kwargs: Any) -> DataConfig:
    """Test configuration: 32^3 crops in 48^3 regions, preprocessing in-process."""
    base: dict[str, Any] = {"crop_size": 32, "region_size": 48, "num_workers": 0}
    base.update(kwargs)
    return DataConfig(inputs=tuple(str(p) for p in inputs), cache_dir=str(cache_dir), **base)


def by_name(manifest: Any) -> dict[str, Any]:
    """Manifest entries keyed by the source's base name (the folder name for DICOM)."""
    return {os.path.basename(e.source.rstrip("/")): e for e in manifest.entries}


def crash_on_named_file(source: Source, cfg: DataConfig, cache_dir: str, digest: str) -> ManifestEntry:
    """Preprocessing worker that kills its process on files named ``crash*`` (a reader segfault)."""
    if os.path.basename(source.path).startswith("crash"):
        os._exit(3)
    return process_source(source, cfg, cache_dir, digest)
