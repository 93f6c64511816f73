"""Swin encoder, SwinUNETR decoder and their presets."""
from nnunet_ssl.networks.presets import ENCODER_STRIDE, PRESETS, SwinPreset, get_preset
from nnunet_ssl.networks.segmentation import SwinUNETRSeg, unwrap
from nnunet_ssl.networks.swin import SwinEncoder

__all__ = ["ENCODER_STRIDE", "PRESETS", "SwinEncoder", "SwinPreset", "SwinUNETRSeg", "get_preset", "unwrap"]
