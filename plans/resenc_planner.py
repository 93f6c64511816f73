"""Plans for the ResEnc family whose architecture is the pretrained topology, so a Spark3D weights file always fits.

nnU-Net's own ResEnc planners (``nnUNetPlannerResEncL``) choose the spacing, patch and network per
dataset, so a network pretrained on one topology may not fit their plans. ``nnunet-ssl plan -d D
--family resenc [--preset resenc_l|resenc_tiny]`` runs :class:`ResEncSSLPlanner` through nnU-Net's API
(nnU-Net finds no plugin planner by name; see :mod:`nnunet_ssl.plans.plan_command`). It plans nnU-Net's
way, keeps only ``3d_fullres`` and then sets, in its own plans file (default :data:`RESENC_PLANS_NAME`,
data identifier ``<plans>_3d_fullres``), what the Spark3D pretraining used (SSL_METHODS.md card 10):

* spacing 1 mm isotropic (the pretraining data; the presets' kernels and strides are isotropic);
* ``ZScoreNormalization`` on every channel without the foreground mask: a per-image z-score over the
  whole image, as the pretraining normalised its crops (nnU-Net's built-in scheme, so training and
  ``nnUNetv2_predict`` apply the same);
* the architecture record exactly the preset's (:meth:`~nnunet_ssl.networks.resenc.ResEncPreset.architecture`:
  DNA's ``ResidualEncoderUNet``, its ``arch_kwargs`` and ``_kw_requires_import``), so nnU-Net's own
  ``nnUNetTrainer`` builds the pretrained network, key for key and shape for shape;
* the patch fitted to the data (:func:`fitted_patch`): each axis of the median image at 1 mm rounded up to
  a multiple of 32 (the preset's total stride), at least 64 (a 2-voxel bottleneck; 32 leaves 1, which
  fails in training) and at most the preset's ``input_size`` (160 for ``resenc_l``, the paper's patch; 64
  for ``resenc_tiny``). Rounding up, as nnU-Net pads its patch to the network's divisibility, covers the
  whole median image; a dataset whose median image is under 64 voxels along an axis at 1 mm is refused
  (most of every patch would be padding), unless ``--patch-size`` asks for a patch explicitly;
* batch size 2 (nnU-Net's ResEnc-L at 160^3).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ssl.networks.family import get_family
from nnunet_ssl.networks.resenc import RESENC_PRESETS, get_resenc_preset

#: Name of the plans file (and plans identifier) the ResEnc planner writes by default.
RESENC_PLANS_NAME = get_family("resenc").ssl_plans
#: Only this configuration is planned.
CONFIGURATION = "3d_fullres"
#: The pretraining spacing, mm (isotropic).
SPACING_MM = 1.0
#: The smallest patch edge: a multiple of the total stride 32 that leaves a bottleneck of 2 voxels.
MIN_PATCH = 64
#: nnU-Net's normalisation scheme for every channel (per-image z-score).
NORMALIZATION = "ZScoreNormalization"


class PlanRefusal(ValueError):
    """A dataset the ResEnc plans cannot serve; the message names the dataset, the sizes and the alternatives."""


@dataclass(frozen=True)
class ResEncPlanSettings:
    """What ``nnunet-ssl plan --family resenc`` applies on top of nnU-Net's planning.

    Attributes:
        preset: ResEnc preset (:data:`~nnunet_ssl.networks.resenc.RESENC_PRESETS`) whose architecture the plans name.
        patch_size: Patch edge lengths (nnU-Net's axis order), each a multiple of the total stride and >= 64;
            None: fitted to the data (:func:`fitted_patch`).
        batch_size: Patches per training step.
        plans_name: Plans identifier and file name (``<plans_name>.json``).
    """

    preset: str = "resenc_l"
    patch_size: tuple[int, int, int] | None = None
    batch_size: int = 2
    plans_name: str = RESENC_PLANS_NAME

    def __post_init__(self) -> None:
        stride = get_resenc_preset(self.preset).total_stride  # raises on unknown names, listing them
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < MIN_PATCH
                                            or any(p % stride for p in self.patch_size)):
            raise ValueError(
                f"patch size must be three multiples of {stride} (preset {self.preset!r}'s total stride), each >= "
                f"{MIN_PATCH}, got {self.patch_size}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.plans_name in ("nnUNetPlans", "nnUNetResEncUNetLPlans", "nnUNetResEncUNetMPlans", "nnUNetResEncUNetXLPlans"):
            raise ValueError(f"{self.plans_name} is a plans file of nnU-Net's own planners; choose another --plans-name")

    @property
    def spacing_nnunet(self) -> list[float]:
        """The target spacing in nnU-Net's axis order (isotropic, so any order)."""
        return [SPACING_MM] * 3


def fitted_patch(median_shape: Sequence[float], max_edge: int, stride: int = 32, dataset: str = "the dataset") -> list[int]:
    """The patch for a median image of ``median_shape`` voxels at 1 mm (see the module docstring).

    Each axis: the median rounded up to a multiple of ``stride``, then clamped to [64, ``max_edge``]
    (``max_edge`` rounded down to a multiple of ``stride``).

    Raises:
        PlanRefusal: an axis of the median image is under 64 voxels.
    """
    shape = [float(s) for s in median_shape]
    if len(shape) != 3:
        raise ValueError(f"a 3D median image shape is needed, got {list(median_shape)}")
    if min(shape) < MIN_PATCH:
        raise PlanRefusal(
            f"{dataset}: the median image is {' x '.join(f'{s:.0f}' for s in shape)} voxels at {SPACING_MM:g} mm "
            f"(nnU-Net's axis order), under {MIN_PATCH} along an axis: the pretrained ResEnc needs patches of at least "
            f"{MIN_PATCH}^3 at {SPACING_MM:g} mm, mostly padding here. Train nnU-Net's dynamic ResEnc plans instead "
            f"(`nnUNetv2_plan_and_preprocess -d {dataset} -pl nnUNetPlannerResEncL`, from scratch), or ask for a patch "
            f"explicitly with --patch-size"
        )
    top = max(MIN_PATCH, max_edge // stride * stride)
    return [min(top, max(MIN_PATCH, math.ceil(s / stride) * stride)) for s in shape]


class ResEncSSLPlanner(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner at 1 mm with the pretrained ResEnc topology on ``3d_fullres`` (see module doc)."""

    def __init__(self, dataset_name_or_id: str | int, settings: ResEncPlanSettings) -> None:
        super().__init__(dataset_name_or_id, plans_name=settings.plans_name,
                         overwrite_target_spacing=settings.spacing_nnunet)
        self.settings = settings

    def save_plans(self, plans: dict) -> None:
        """nnU-Net calls this at the end of ``plan_experiment``: adapt, then save as usual."""
        super().save_plans(self.adapt_plans(plans))

    def adapt_plans(self, plans: dict) -> dict:
        """Keep only ``3d_fullres``; set the preset's architecture, the fitted patch, batch size and z-scoring.

        Raises:
            PlanRefusal: the data's median image at 1 mm cannot hold a 64^3 patch (and no patch was asked for).
        """
        if CONFIGURATION not in plans["configurations"]:
            raise PlanRefusal(f"{self.dataset_name} is not a 3D dataset: nnU-Net planned no {CONFIGURATION}")
        config = plans["configurations"][CONFIGURATION]
        config.pop("next_stage", None)
        plans["configurations"] = {CONFIGURATION: config}
        preset = get_resenc_preset(self.settings.preset)
        median = [float(m) for m in np.asarray(config["median_image_size_in_voxels"]).tolist()]
        if self.settings.patch_size is not None:
            patch, rule = [int(p) for p in self.settings.patch_size], "--patch-size"
        else:
            patch = fitted_patch(median, preset.input_size, preset.total_stride, self.dataset_name)
            rule = (f"median image rounded up to multiples of {preset.total_stride}, within "
                    f"[{MIN_PATCH}, {preset.input_size}]")
        channels = len(config["normalization_schemes"])
        config.update({
            "patch_size": patch,
            "batch_size": self.settings.batch_size,
            "spacing": self.settings.spacing_nnunet,
            "normalization_schemes": [NORMALIZATION] * channels,
            "use_mask_for_norm": [False] * channels,
            "architecture": preset.architecture(),
        })
        plans["nnunet_ssl"] = {
            "planner": type(self).__name__,
            "family": "resenc",
            "preset": preset.name,
            "spacing_mm": self.settings.spacing_nnunet,
            "patch_rule": rule,
            "normalization": f"{NORMALIZATION} per image, whole image (no foreground mask), every channel",
        }
        return plans


def summarize_resenc_plans(plans: dict[str, Any]) -> str:
    """A short human summary of what was planned."""
    config = plans["configurations"][CONFIGURATION]
    ours = plans.get("nnunet_ssl", {})
    median = config.get("median_image_size_in_voxels")
    arch = config["architecture"]["arch_kwargs"]
    lines = [
        f"plans {plans['plans_name']} for {plans['dataset_name']} ({CONFIGURATION}, resenc preset {ours.get('preset')})",
        f"  network      {config['architecture']['network_class_name']}: {arch['n_stages']} stages, features "
        f"{arch['features_per_stage']}, blocks {arch['n_blocks_per_stage']}",
        f"  spacing      {' x '.join(f'{s:g}' for s in config['spacing'])} mm",
        f"  patch        {config['patch_size']} (z, y, x; {ours.get('patch_rule')}), batch size {config['batch_size']}",
    ]
    if median is not None:
        lines.append(f"  median image {[int(round(m)) for m in np.asarray(median).tolist()]} voxels at 1 mm")
    lines.append(f"  channels     {len(config['normalization_schemes'])} x {NORMALIZATION} (per image, no mask)")
    return "\n".join(lines)


def preset_names() -> list[str]:
    """The ResEnc presets ``--preset`` accepts with ``--family resenc``."""
    return sorted(RESENC_PRESETS)


#: The ResEnc trainers the closing hint names (``nnunet_ssl.trainers.named``; the engines do not import each
#: other, a test keeps the names right).
SPARK3D_TRAINER = "ResEncSpark3DTrainer"
SCRATCH_TRAINER = "ResEncScratchTrainer"


def resenc_training_hint(dataset_id: int, settings: ResEncPlanSettings) -> str:
    """The closing lines of ``nnunet-ssl plan --family resenc``: export, fine-tune and the scratch baseline."""
    plans = settings.plans_name
    return (
        f"export a spark3d pretraining run for these plans: `nnunet-ssl export RUN_DIR -d {dataset_id} -p {plans} "
        f"--out FILE`, then fine-tune: `nnUNetv2_train {dataset_id} {CONFIGURATION} FOLD -tr {SPARK3D_TRAINER} -p {plans} "
        f"-pretrained_weights FILE`; the scratch baseline on the same plans (the paper's 'No (Fixed)'): "
        f"`nnUNetv2_train {dataset_id} {CONFIGURATION} FOLD -tr {SCRATCH_TRAINER} -p {plans}`"
    )
