"""Pretraining data: scan inputs, validate, resample, window, body-crop, cache, and sample crops.

Typical use (build once, then sample forever)::

    config = DataConfig(inputs=("/data/ct",), cache_dir="/cache/ct")
    manifest = build_cache(config)              # reuses what is cached and unchanged
    logger.info("%s", summarize(manifest))      # usable / skipped per reason
    loader = make_loader(manifest, config, batch_size=2, num_views=2, seed=0)
    batch = next(loader)                        # {"views": (2, 2, 1, 96, 96, 96), "index": (2,)}

Modules: ``config`` (:class:`DataConfig`), ``sources`` (finding volumes, digests),
``preprocess`` (validation, resampling, windowing or z-scoring, body crop), ``cache`` (blosc2 arrays
and the manifest), ``crops`` (views, the infinite data-parallel loader), ``augment`` (scaling,
rotation and mirroring of a view).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .augment import CropTransform, SpatialAugmentation, augment_view
from .cache import Manifest, ManifestEntry, build_cache, open_array, summarize
from .config import DataConfig
from .preprocess import SkipVolume, resample_to_spacing, scale_intensities, window_ct
from .sources import Source, scan_inputs

if TYPE_CHECKING:
    from .crops import (
        CropDataset,
        CropLoader,
        ViewSampler,
        make_loader,
        steps_per_epoch,
    )

# The crop loader needs torch; it is imported on first use so that the preprocessing worker
# processes (spawned) start without importing torch.
_LAZY = {name: ".crops" for name in ("CropDataset", "CropLoader", "ViewSampler", "make_loader", "steps_per_epoch")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CropDataset",
    "CropTransform",
    "CropLoader",
    "DataConfig",
    "Manifest",
    "ManifestEntry",
    "SkipVolume",
    "Source",
    "SpatialAugmentation",
    "ViewSampler",
    "augment_view",
    "build_cache",
    "make_loader",
    "open_array",
    "resample_to_spacing",
    "scale_intensities",
    "scan_inputs",
    "steps_per_epoch",
    "summarize",
    "window_ct",
]
