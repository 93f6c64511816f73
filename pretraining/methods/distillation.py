"""Settings and small pieces shared by the self-distillation methods (SMIT, DINO, iBOT).

Each method's config inherits :class:`DistillationConfig` (heads, temperatures, centre and EMA
momenta, frozen last layer: SSL_METHODS.md §1, the same defaults for all three) and adds its own
fields. The teacher itself is :class:`~nnunet_ssl.pretraining.teacher.EMATeacher`.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnunet_ssl.networks.presets import SwinPreset
from nnunet_ssl.networks.swin import SwinEncoder
from nnunet_ssl.pretraining.heads import DINOHead
from nnunet_ssl.pretraining.losses import entropy, teacher_probabilities, updated_center
from nnunet_ssl.pretraining.methods.base import StepContext
from nnunet_ssl.pretraining.schedules import linear_warmup
from nnunet_ssl.pretraining.teacher import EMATeacher


@dataclass(frozen=True)
class DistillationConfig:
    """Self-distillation settings ([P] where stated, else SSL_METHODS.md §1).

    Attributes:
        out_dim: Prototypes ``K`` of each DINO head.
        head_hidden_dim: Hidden width of the DINO heads.
        head_bottleneck_dim: Bottleneck width of the DINO heads.
        student_temp: ``tau_s``.
        teacher_temp_start: ``tau_t`` at epoch 0.
        teacher_temp_end: ``tau_t`` after the warm-up.
        teacher_temp_warmup_epochs: Length of the linear ``tau_t`` ramp, in epochs.
        center_momentum: EMA momentum of the centre(s).
        ema_base: Teacher EMA momentum at step 0.
        ema_final: Teacher EMA momentum at the last step (cosine in between, by global step).
        freeze_last_layer_epochs: Epochs during which the heads' last layers get no update.
    """

    out_dim: int = 8192
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp_end: float = 0.07
    teacher_temp_warmup_epochs: float = 30
    center_momentum: float = 0.9
    ema_base: float = 0.996
    ema_final: float = 1.0
    freeze_last_layer_epochs: float = 1

    def __post_init__(self) -> None:
        if min(self.out_dim, self.head_hidden_dim, self.head_bottleneck_dim) < 1:
            raise ValueError("out_dim, head_hidden_dim and head_bottleneck_dim must be positive")
        if min(self.student_temp, self.teacher_temp_start, self.teacher_temp_end) <= 0:
            raise ValueError("temperatures must be positive")
        if self.teacher_temp_warmup_epochs < 0 or self.freeze_last_layer_epochs < 0:
            raise ValueError("teacher_temp_warmup_epochs and freeze_last_layer_epochs must be >= 0")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1], got {self.center_momentum}")
        if not 0.0 <= self.ema_base <= self.ema_final <= 1.0:
            raise ValueError(f"need 0 <= ema_base <= ema_final <= 1, got {self.ema_base}, {self.ema_final}")

    def teacher_temp(self, context: StepContext) -> float:
        """``tau_t`` at this step: linear from start to end over the warm-up epochs, then constant."""
        return linear_warmup(
            context.epoch, self.teacher_temp_start, self.teacher_temp_end, self.teacher_temp_warmup_epochs
        )

    def head(self, in_dim: int) -> DINOHead:
        """A fresh DINOHead(in_dim, K) with this config's widths."""
        return DINOHead(in_dim, self.out_dim, self.head_hidden_dim, self.head_bottleneck_dim)


def student_branch(preset: SwinPreset, in_channels: int, mask_token: bool, heads: dict[str, DINOHead]) -> nn.ModuleDict:
    """``ModuleDict(encoder, norm, **heads)``: the encoder, the dense6 LayerNorm(8E, eps 1e-6) and the heads."""
    return nn.ModuleDict(
        {
            "encoder": SwinEncoder(preset, in_channels, use_mask_token=mask_token),
            "norm": nn.LayerNorm(preset.feature_dims[3], eps=1e-6),
            **heads,
        }
    )


def branch_encoder(branch: nn.ModuleDict | EMATeacher) -> SwinEncoder:
    """The Swin encoder of a :func:`student_branch` or of its EMA teacher (``branch["encoder"]``, typed).

    Raises:
        TypeError: when the branch's ``encoder`` is not a :class:`SwinEncoder`.
    """
    encoder = branch["encoder"]
    if not isinstance(encoder, SwinEncoder):
        raise TypeError(f"the branch's encoder is a {type(encoder).__name__}, not a SwinEncoder")
    return encoder


def freeze_last_layers(heads: Iterable[DINOHead], config: DistillationConfig, context: StepContext) -> None:
    """During the first ``freeze_last_layer_epochs``, drop the heads' last-layer gradients.

    Gradients are set to None (as [DINO]'s ``cancel_gradients_last_layer``), so AdamW skips those
    weights entirely (no moment or weight-decay update).
    """
    if context.epoch < config.freeze_last_layer_epochs:
        for head in heads:
            head.last_layer.weight.grad = None


@torch.no_grad()
def teacher_entropy(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Mean entropy (nats) of the centred, sharpened teacher distribution: 0 = collapse, ln K = uniform."""
    return entropy(teacher_probabilities(teacher_logits, center, teacher_temp)).mean()


@torch.no_grad()
def advance_center(
    center: Tensor, teacher_logits: Tensor, teacher_temp: float, config: DistillationConfig, context: StepContext
) -> Tensor:
    """After the loss: the teacher entropy under the current centre (returned for the log), then the
    centre's EMA update in place, averaged over ranks through ``context.collectives``."""
    mean_entropy = teacher_entropy(teacher_logits, center, teacher_temp)
    center.copy_(updated_center(center, teacher_logits, config.center_momentum, context.collectives))
    return mean_entropy
