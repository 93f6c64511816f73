"""Pretraining losses: one per file, pure functions, re-exported here."""
from nnunet_ssl.pretraining.losses.centering import updated_center
from nnunet_ssl.pretraining.losses.cross_view_distillation import cross_view_distillation_loss
from nnunet_ssl.pretraining.losses.distillation import (
    entropy,
    soft_cross_entropy,
    student_log_probabilities,
    teacher_probabilities,
)
from nnunet_ssl.pretraining.losses.masked_patch_distillation import masked_patch_distillation_loss
from nnunet_ssl.pretraining.losses.masked_pixel import PIXEL_LOSS_KINDS, masked_pixel_loss
from nnunet_ssl.pretraining.losses.nt_xent import nt_xent_loss
from nnunet_ssl.pretraining.losses.reconstruction import reconstruction_loss
from nnunet_ssl.pretraining.losses.rotation import rotation_loss

__all__ = [
    "PIXEL_LOSS_KINDS",
    "cross_view_distillation_loss",
    "entropy",
    "masked_patch_distillation_loss",
    "masked_pixel_loss",
    "nt_xent_loss",
    "reconstruction_loss",
    "rotation_loss",
    "soft_cross_entropy",
    "student_log_probabilities",
    "teacher_probabilities",
    "updated_center",
]
