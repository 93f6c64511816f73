"""The segmentation network nnU-Net trains: Swin encoder + SwinUNETR decoder."""
from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.decoder import SwinUNETRDecoder
from nnunet_ssl.networks.presets import ENCODER_STRIDE, SwinPreset
from nnunet_ssl.networks.swin import SwinEncoder

#: Bytes reserved for the provenance tag that travels inside ``network_weights``.
PROVENANCE_BYTES = 512


class SwinUNETRSeg(nn.Module):
    """Swin encoder (``.encoder``) and SwinUNETR decoder (``.decoder``, heads in ``.decoder.seg_layers``).

    The buffer ``weights_provenance`` holds a short JSON tag (method, preset, encoder digest) written
    by ``nnunet-ssl export``. nnU-Net's ``-pretrained_weights`` loader copies it with the weights, so
    the trainer can log which weights it started from; it is all zeros for a network built from scratch.
    """

    weights_provenance: Tensor

    def __init__(
        self,
        preset: SwinPreset,
        in_channels: int,
        num_classes: int,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.preset = preset
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = SwinEncoder(preset, in_channels, use_mask_token=False)
        self.decoder = SwinUNETRDecoder(
            in_channels, preset.feature_dims, num_classes, deep_supervision, preset.gradient_checkpointing
        )
        self.register_buffer("weights_provenance", torch.zeros(PROVENANCE_BYTES, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        """Segment ``(B, C, D, H, W)``; every spatial axis must be a multiple of 32."""
        check_input(x, self.in_channels)
        return self.decoder(x, self.encoder(x))

    def provenance(self) -> dict | None:
        """The decoded provenance tag, or None when the network was not loaded from an export."""
        return decode_provenance(self.weights_provenance)


def check_batch_channels(x: Tensor, in_channels: int, what: str = "network") -> None:
    """Raise a ValueError unless ``x`` is a 5-D batch with ``in_channels`` channels (any network family)."""
    if x.ndim != 5:
        raise ValueError(f"expected a 5-D batch (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"the {what} was built for {in_channels} input channel(s) but got {x.shape[1]}; "
            "check the dataset's channel_names against the weights"
        )


def check_input(x: Tensor, in_channels: int) -> None:
    """Raise a ValueError that says what to change when ``x`` cannot pass through the network."""
    check_batch_channels(x, in_channels)
    bad = [n for n in x.shape[2:] if n % ENCODER_STRIDE or n < 2 * ENCODER_STRIDE]
    if bad:
        fixed = [max(2 * ENCODER_STRIDE, -(-n // ENCODER_STRIDE) * ENCODER_STRIDE) for n in x.shape[2:]]
        raise ValueError(
            f"spatial size {tuple(x.shape[2:])} is not usable: every axis must be a multiple of "
            f"{ENCODER_STRIDE} and at least {2 * ENCODER_STRIDE}; use a patch size such as {tuple(fixed)}"
        )


def encode_provenance(tag: dict) -> Tensor:
    """Encode a small JSON-serialisable dict into the fixed-size provenance buffer."""
    raw = json.dumps(tag, sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > PROVENANCE_BYTES:
        raise ValueError(f"provenance tag is {len(raw)} bytes, the limit is {PROVENANCE_BYTES}")
    buffer = torch.zeros(PROVENANCE_BYTES, dtype=torch.uint8)
    buffer[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return buffer


def decode_provenance(buffer: Tensor) -> dict | None:
    """Inverse of :func:`encode_provenance`; None for an all-zero buffer."""
    raw = bytes(buffer.cpu().tolist()).rstrip(b"\x00")
    return json.loads(raw) if raw else None


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    module = getattr(network, "module", network)
    return getattr(module, "_orig_mod", module)
