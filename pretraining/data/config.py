"""Configuration of the pretraining data pipeline (scan, preprocess, cache, crops).

Axis conventions used throughout ``nnunet_ssl.pretraining.data``:

* spacings are ``(x, y, z)`` in millimetres, as SimpleITK reports them;
* arrays, cached volumes, shapes and crops are ``(z, y, x)`` (``(D, H, W)``), as
  ``SimpleITK.GetArrayFromImage`` returns them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

#: Modalities the pipeline knows how to normalise.
MODALITIES = ("ct", "mr")

#: Intensity mappings of the cached volumes (:attr:`DataConfig.intensity`), the default first.
INTENSITIES = ("window", "zscore", "zscore_nonzero", "minmax")

#: Edge of the region multi-view crops are drawn from, unless the crops are larger (:attr:`DataConfig.region_size`).
DEFAULT_REGION_SIZE = 128

#: Spatial augmentations of the crops (:attr:`DataConfig.augmentation`), the default first.
AUGMENTATIONS = ("none", "scale_rotate_mirror")

#: Bumped whenever the preprocessing changes so that existing caches are rebuilt.
PREPROCESSING_VERSION = 1

#: Bumped whenever the CT/MR detection of volumes without modality information changes.
MODALITY_DETECTION_VERSION = 2


@dataclass(frozen=True)
class DataConfig:
    """Where the pretraining volumes come from and how they are preprocessed and cropped.

    Attributes:
        inputs: Paths to image files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``,
            ``.mhd``), folders of them (searched recursively, DICOM series included), nnU-Net raw
            dataset folders (``dataset.json`` + ``imagesTr``/``imagesTs``; every channel file is
            its own volume), or list files (``.txt``: one path per line; ``.json``: a list of
            paths or of ``{"path": ..., "modality": ...}`` objects).
        cache_dir: Folder holding the cached ``.b2nd`` volumes and ``manifest.json``.
        modality: ``"ct"``, ``"mr"`` or ``None`` (auto: nnU-Net ``channel_names`` ("CT" -> ct,
            anything else -> mr), the DICOM Modality tag, else decided per volume from its
            intensities (:mod:`.modality`; ambiguous volumes are skipped)).
        spacing: Target spacing ``(x, y, z)`` in mm.
        ct_window: CT window ``(low, high)`` in HU, mapped linearly to ``[0, 1]`` and clipped
            (``intensity="window"``).
        mr_percentiles: MR percentiles ``(low, high)`` of each image mapped to ``[0, 1]`` and clipped
            (the paper: 5 and 95; ``nnunet-ssl plan`` uses the same default for MR channels); with
            ``intensity="zscore"`` they still set the MR body threshold.
        mr_window: A fixed MR window ``(low, high)`` mapped to ``[0, 1]`` and clipped instead of each
            image's percentiles (``intensity="window"`` only; the body is still found from the
            percentiles): what plans that map MR with one ``CTNormalization`` window for every image
            do (``pretrain --intensity-like``). None: the percentiles.
        intensity: How the cached intensities are mapped: ``"window"`` (CT window / MR percentiles or
            ``mr_window`` to ``[0, 1]``, the Swin paper's), ``"zscore"`` (per image, ``(x - mean) /
            max(std, 1e-8)`` over the whole resampled image, not clipped: nnU-Net's
            ``ZScoreNormalization``, for CT and MR alike; the Spark3D recipe), ``"zscore_nonzero"``
            (the same inside the image's nonzero region, 0 outside: ``ZScoreNormalization`` with
            ``use_mask_for_norm``) or ``"minmax"`` (each image's minimum and maximum to 0 and 1:
            ``RescaleTo01Normalization``); the last two with the statistics of the source grid, as
            nnU-Net normalises before resampling. Crops reaching past a volume are padded with 0 in
            every case: the window's low end, a z-scored image's mean, or the outside of its nonzero
            region.
        crop_size: Edge of the cubic crops (views), in voxels.
        region_size: Edge of the cubic region the views of one volume are drawn from when more
            than one view is requested (views then overlap by ``2 * crop_size - region_size``
            voxels or more per axis); 0 (the default) means ``max(128, crop_size)``: 128 for the
            Swin methods' 96^3 crops, the crop itself for larger ones (e.g. Spark3D's 160^3).
        augmentation: Spatial augmentation of every crop, drawn in the loader from the crop's own
            seeded generator (:mod:`.augment`): ``"none"`` or ``"scale_rotate_mirror"`` (nnU-Net's and
            Spark3D's: scaling 0.7-1.4 and rotation, each with p 0.2, mirroring per axis with p 0.5).
        num_workers: Background processes for preprocessing and for the crop loader (0: in the
            calling process).
        ct_body_hu: CT body mask threshold in HU (before windowing).
        mr_body_threshold: MR body mask threshold on the ``[0, 1]`` scaled image.
        body_margin: Voxels kept around the body bounding box.
        min_size: Volumes whose body crop is smaller than this along any axis (in voxels at the
            target spacing) are skipped as "too small"; larger ones that are still smaller than
            a crop are zero-padded when sampled.
        max_spacing: Spacings above this (mm) are rejected as absurd.
        min_spacing: Spacings below this (mm) are rejected as "spacing too fine" (a header error
            far more often than a real voxel size).
    """

    inputs: tuple[str, ...]
    cache_dir: str
    modality: str | None = None
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    ct_window: tuple[float, float] = (-500.0, 500.0)
    mr_percentiles: tuple[float, float] = (5.0, 95.0)
    mr_window: tuple[float, float] | None = None
    crop_size: int = 96
    region_size: int = 0
    intensity: str = "window"
    augmentation: str = "none"
    num_workers: int = 2
    ct_body_hu: float = -500.0
    mr_body_threshold: float = 0.1
    body_margin: int = 4
    min_size: int = 16
    max_spacing: float = 20.0
    min_spacing: float = 0.05

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(str(p) for p in self.inputs)
        if not inputs:
            raise ValueError("inputs must name at least one file, folder or list")
        object.__setattr__(self, "inputs", inputs)
        if not str(self.cache_dir):
            raise ValueError("cache_dir must be a folder path")
        object.__setattr__(self, "cache_dir", str(self.cache_dir))
        if self.modality is not None:
            modality = str(self.modality).lower()
            if modality not in MODALITIES:
                raise ValueError(f"modality must be one of {MODALITIES} or None, got {self.modality!r}")
            object.__setattr__(self, "modality", modality)
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be three positive finite mm values (x, y, z), got {self.spacing!r}")
        object.__setattr__(self, "spacing", spacing)
        window = tuple(float(v) for v in self.ct_window)
        if len(window) != 2 or not all(math.isfinite(v) for v in window) or window[0] >= window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window!r}")
        object.__setattr__(self, "ct_window", window)
        pct = tuple(float(v) for v in self.mr_percentiles)
        if len(pct) != 2 or not 0.0 <= pct[0] < pct[1] <= 100.0:
            raise ValueError(f"mr_percentiles must be (low, high) with 0 <= low < high <= 100, got {self.mr_percentiles!r}")
        object.__setattr__(self, "mr_percentiles", pct)
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITIES)}, got {self.intensity!r}")
        if self.mr_window is not None:
            mr_window = tuple(float(v) for v in self.mr_window)
            if len(mr_window) != 2 or not all(math.isfinite(v) for v in mr_window) or mr_window[0] >= mr_window[1]:
                raise ValueError(f"mr_window must be (low, high) with low < high, got {self.mr_window!r}")
            if self.intensity != "window":
                raise ValueError(f"mr_window is a window (intensity 'window'); it does not go with intensity "
                                 f"{self.intensity!r} (drop one of them)")
            object.__setattr__(self, "mr_window", mr_window)
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {self.augmentation!r}")
        if int(self.crop_size) != self.crop_size or self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive integer, got {self.crop_size!r}")
        if self.region_size == 0:
            object.__setattr__(self, "region_size", max(DEFAULT_REGION_SIZE, int(self.crop_size)))
        if int(self.region_size) != self.region_size or self.region_size < self.crop_size:
            raise ValueError(f"region_size must be an integer >= crop_size ({self.crop_size}), got {self.region_size!r}")
        if int(self.num_workers) != self.num_workers or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not math.isfinite(self.ct_body_hu) or not math.isfinite(self.mr_body_threshold):
            raise ValueError("ct_body_hu and mr_body_threshold must be finite")
        if not 0.0 <= self.mr_body_threshold < 1.0:
            raise ValueError(f"mr_body_threshold must be in [0, 1), got {self.mr_body_threshold!r}")
        if int(self.body_margin) != self.body_margin or self.body_margin < 0:
            raise ValueError(f"body_margin must be an integer >= 0, got {self.body_margin!r}")
        if int(self.min_size) != self.min_size or self.min_size < 1:
            raise ValueError(f"min_size must be a positive integer, got {self.min_size!r}")
        if not math.isfinite(self.max_spacing) or self.max_spacing <= 0:
            raise ValueError(f"max_spacing must be a positive finite mm value, got {self.max_spacing!r}")
        if not math.isfinite(self.min_spacing) or not 0 < self.min_spacing < self.max_spacing:
            raise ValueError(f"min_spacing must be in (0, max_spacing) mm, got {self.min_spacing!r}")
        for name in ("crop_size", "region_size", "num_workers", "body_margin", "min_size"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def preprocessing_params(self, modality: str) -> dict[str, Any]:
        """Everything that changes the cached array of a volume of ``modality`` (not the crops).

        ``intensity`` is recorded only when it is not the default ``"window"``, and ``mr_window`` only
        when set, so the caches built before they existed keep their keys; a z-scored or min-max
        cache does not depend on the CT window.
        """
        params: dict[str, Any] = {
            "version": PREPROCESSING_VERSION,
            "modality": modality,
            "spacing": list(self.spacing),
            "body_margin": self.body_margin,
            "min_size": self.min_size,
            "max_spacing": self.max_spacing,
            "min_spacing": self.min_spacing,
        }
        if self.intensity != INTENSITIES[0]:
            params.update(intensity=self.intensity)
        if modality in ("ct", "auto"):
            params.update(ct_body_hu=self.ct_body_hu)
            if self.intensity == "window":
                params.update(ct_window=list(self.ct_window))
        if modality in ("mr", "auto"):
            params.update(mr_percentiles=list(self.mr_percentiles), mr_body_threshold=self.mr_body_threshold)
            if self.mr_window is not None:
                params.update(mr_window=list(self.mr_window))
        if modality == "auto":
            params.update(modality_detection=MODALITY_DETECTION_VERSION)
        return params

    def params_key(self, modality: str) -> str:
        """Short digest of :meth:`preprocessing_params`; a cached entry is reused only if it matches."""
        text = json.dumps(self.preprocessing_params(modality), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
