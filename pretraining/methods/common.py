"""Settings checks and student-encoder helpers shared by the methods (each method still owns its config)."""
from __future__ import annotations

import dataclasses

from torch import Tensor

from nnunet_ssl.networks.presets import ENCODER_STRIDE, SwinPreset
from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.pretraining.losses import PIXEL_LOSS_KINDS
from nnunet_ssl.pretraining.masking import validate_mask_settings


def validate_masked_image_settings(
    pixel_loss: str, mask_ratio: float, crop_size: int, unit: int, drop_path_rate: float | None
) -> None:
    """Raise ``ValueError`` for pixel-loss, mask, crop or stochastic-depth settings that cannot work."""
    if pixel_loss not in PIXEL_LOSS_KINDS:
        raise ValueError(f"pixel_loss must be one of {PIXEL_LOSS_KINDS}, got {pixel_loss!r}")
    validate_masking_settings(mask_ratio, crop_size, unit, drop_path_rate)


def validate_masking_settings(mask_ratio: float, crop_size: int, unit: int, drop_path_rate: float | None) -> None:
    """Raise ``ValueError`` for mask, crop or stochastic-depth settings that cannot work."""
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1], got {mask_ratio}")
    validate_crop_settings(crop_size, drop_path_rate)
    validate_mask_settings((crop_size,) * 3, unit, mask_ratio)


def validate_crop_settings(crop_size: int, drop_path_rate: float | None) -> None:
    """Raise ``ValueError`` unless the crop tiles the encoder stride and the drop-path rate lies in [0, 1)."""
    if crop_size <= 0 or crop_size % ENCODER_STRIDE:
        raise ValueError(f"crop_size must be a positive multiple of {ENCODER_STRIDE}, got {crop_size}")
    if drop_path_rate is not None and not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")


def checked_views(batch: dict[str, Tensor], num_views: int, crop_size: int) -> Tensor:
    """``batch["views"] (B, V, C, D, H, W)`` -> ``(B * V, C, D, H, W)`` (sample-major) after shape checks.

    This checks the loader's global views (``crop_size`` is the method's configured crop, which
    masks and the pixel head depend on). Views of other sizes that a method makes itself, such
    as DINO's local crops (:func:`nnunet_ssl.pretraining.views.local_crops`), go through the
    encoder as their own group: a step's views need not share one size.
    """
    views = batch["views"]
    crop = (crop_size,) * 3
    if views.ndim != 6 or views.shape[1] != num_views or tuple(views.shape[3:]) != crop:
        raise ValueError(
            f"expected views (B, {num_views}, C, {crop[0]}, {crop[1]}, {crop[2]}), got {tuple(views.shape)}"
        )
    return views.flatten(0, 1)


#: Smallest crop for heads that read x4 through InstanceNorm (ConvUpHead needs x4 wider than 1 voxel).
MIN_CONV_HEAD_CROP = 2 * ENCODER_STRIDE


def validate_student_settings(crop_size: int, drop_path_rate: float | None, min_crop: int = ENCODER_STRIDE) -> None:
    """Raise ``ValueError`` for a crop that is not a multiple of 32 (or below ``min_crop``) or a bad drop-path rate."""
    if crop_size < min_crop or crop_size % ENCODER_STRIDE:
        raise ValueError(f"crop_size must be a multiple of {ENCODER_STRIDE} and >= {min_crop}, got {crop_size}")
    if drop_path_rate is not None and not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")


def validate_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` and the valid ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def with_drop_path(preset: SwinPreset, drop_path_rate: float | None) -> SwinPreset:
    """``preset`` with the method's student stochastic depth (None keeps the preset's)."""
    return preset if drop_path_rate is None else dataclasses.replace(preset, drop_path_rate=drop_path_rate)


def student_encoder(preset: SwinPreset, drop_path_rate: float | None, in_channels: int) -> SwinEncoder:
    """A student encoder without mask token, with the method's stochastic depth (None keeps the preset's)."""
    return SwinEncoder(with_drop_path(preset, drop_path_rate), in_channels, use_mask_token=False)


def student_encoder_state(encoder: SwinEncoder, source: str, method: str) -> dict[str, Tensor]:
    """Exported weights of a teacher-free method's encoder (``"default"`` and ``"student"`` are the same).

    Raises:
        ValueError: For ``"teacher"`` or any other source.
    """
    if source not in ("default", "student"):
        raise ValueError(f"{method} has no {source!r} encoder (no teacher); choose 'default' or 'student'")
    return {k: v.detach().clone() for k, v in encoder.state_dict().items() if k != "mask_token"}
