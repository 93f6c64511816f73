"""nnU-Net's residual-encoder U-Net (ResEnc), built with dynamic-network-architectures.

The network is DNA's :class:`~dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`
itself, never a subclass or a copy: its state dict is the one nnU-Net's own trainer builds from a
``nnUNetResEncUNetLPlans`` file (``tests/networks/test_resenc_nnunet.py`` plans a dataset with nnU-Net's
``nnUNetPlannerResEncL`` and compares), so weights made here load into nnU-Net's network with no
class of ours involved, and the other way round.

An architecture is written down as nnU-Net's plans write it (:meth:`ResEncPreset.architecture`): the
dotted class name, JSON-compatible ``arch_kwargs`` and the names of the kwargs that are classes. A
weights file keeps that record; :func:`network_from_architecture` builds it back, resolving the class
names through :data:`ALLOWED_CLASSES` (a file names what to build, it never chooses what to import).

Presets (make variants with :func:`dataclasses.replace`):

* ``resenc_l``: nnU-Net's ResEnc-L as ``nnUNetPlannerResEncL`` plans it for an isotropic dataset with a
  160^3 patch, and the network of the Spark3D paper (SSL_METHODS.md card 10): 6 stages, features
  32-64-128-256-320-320, residual blocks 1-3-4-6-6-6, 3^3 kernels, strides 1,2,2,2,2,2 (total 32), one
  conv per decoder stage, conv bias, InstanceNorm3d (eps 1e-5, affine), LeakyReLU.
* ``resenc_tiny``: the same topology with an eighth of the features (4-8-16-32-40-40) and fewer blocks
  (1-1-2-2-2-2), for tests and CPU runs (0.65M parameters; a 64^3 patch leaves a 2^3 bottleneck).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

#: Dotted name of the network class, as nnU-Net's plans write it (``network_class_name``).
RESENC_CLASS_NAME = f"{ResidualEncoderUNet.__module__}.{ResidualEncoderUNet.__name__}"
#: The ``arch_kwargs`` that name classes (nnU-Net's ``_kw_requires_import``).
KW_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
#: Encoder-relative state-dict keys of the input projection: DNA registers the stem conv twice
#: (``conv`` and ``all_modules.0``, one tensor), as its ``keys_to_in_proj`` says.
STEM_KEYS = ("stem.convs.0.conv.weight", "stem.convs.0.all_modules.0.weight")

#: The classes a recorded architecture may name, by every dotted name nnU-Net's planners and users
#: write for them. Anything else is refused: a weights file never makes us import what it names.
ALLOWED_CLASSES: dict[str, type[nn.Module]] = {
    RESENC_CLASS_NAME: ResidualEncoderUNet,
    "torch.nn.modules.conv.Conv3d": nn.Conv3d,
    "torch.nn.Conv3d": nn.Conv3d,
    "torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d,
    "torch.nn.Dropout3d": nn.Dropout3d,
    "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
    "torch.nn.LeakyReLU": nn.LeakyReLU,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.ReLU": nn.ReLU,
}


@dataclass(frozen=True)
class ResEncPreset:
    """Shape of a 3D residual-encoder U-Net with isotropic kernels and strides.

    Attributes:
        name: Key in :data:`RESENC_PRESETS`.
        features_per_stage: Channels of each encoder stage (the decoder mirrors them).
        blocks_per_stage: Residual blocks (DNA ``BasicBlockD``) per encoder stage.
        strides: Down-sampling of each stage, the same along every axis (the first is the stem's stage).
        kernel_size: Convolution kernel edge, every stage.
        conv_per_stage_decoder: Convolutions per decoder stage (one fewer stage than the encoder).
        input_size: Cubic patch edge the preset is designed for.
    """

    name: str
    features_per_stage: tuple[int, ...]
    blocks_per_stage: tuple[int, ...]
    strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    kernel_size: int = 3
    conv_per_stage_decoder: int = 1
    input_size: int = 160

    def __post_init__(self) -> None:
        stages = len(self.features_per_stage)
        if stages < 2:
            raise ValueError(f"preset {self.name!r}: a U-Net needs at least 2 stages, got {stages}")
        if len(self.blocks_per_stage) != stages or len(self.strides) != stages:
            raise ValueError(
                f"preset {self.name!r}: features_per_stage, blocks_per_stage and strides need one entry per stage "
                f"(got {stages}, {len(self.blocks_per_stage)}, {len(self.strides)})"
            )
        if min(self.features_per_stage) < 1 or min(self.blocks_per_stage) < 1 or self.conv_per_stage_decoder < 1:
            raise ValueError(f"preset {self.name!r}: features, blocks and decoder convs must be >= 1")
        if min(self.strides) < 1:
            raise ValueError(f"preset {self.name!r}: strides must be >= 1, got {self.strides}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"preset {self.name!r}: kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.input_size % self.total_stride:
            raise ValueError(
                f"preset {self.name!r}: input_size {self.input_size} is not a multiple of the total stride {self.total_stride}"
            )

    @property
    def n_stages(self) -> int:
        """Encoder stages (resolutions)."""
        return len(self.features_per_stage)

    @property
    def total_stride(self) -> int:
        """Down-sampling from the input to the bottleneck; every input axis must be a multiple of it."""
        return math.prod(self.strides)

    def arch_kwargs(self) -> dict[str, Any]:
        """The ``arch_kwargs`` nnU-Net's ResEnc planners write for this topology (JSON-compatible).

        Same keys, values and order as ``ResEncUNetPlanner.get_plans_for_configuration`` (nnU-Net 2.8)
        for a 3D configuration with isotropic kernels and strides.
        """
        n = self.n_stages
        return {
            "n_stages": n,
            "features_per_stage": list(self.features_per_stage),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[self.kernel_size] * 3 for _ in range(n)],
            "strides": [[s] * 3 for s in self.strides],
            "n_blocks_per_stage": list(self.blocks_per_stage),
            "n_conv_per_stage_decoder": [self.conv_per_stage_decoder] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }

    def architecture(self) -> dict[str, Any]:
        """The plans' ``architecture`` entry of this topology: class name, kwargs, kwargs naming classes."""
        return {
            "network_class_name": RESENC_CLASS_NAME,
            "arch_kwargs": self.arch_kwargs(),
            "_kw_requires_import": list(KW_REQUIRES_IMPORT),
        }


RESENC_PRESETS: dict[str, ResEncPreset] = {
    "resenc_l": ResEncPreset("resenc_l", features_per_stage=(32, 64, 128, 256, 320, 320), blocks_per_stage=(1, 3, 4, 6, 6, 6)),
    "resenc_tiny": ResEncPreset(
        "resenc_tiny", features_per_stage=(4, 8, 16, 32, 40, 40), blocks_per_stage=(1, 1, 2, 2, 2, 2), input_size=64
    ),
}


def get_resenc_preset(name: str) -> ResEncPreset:
    """Look up a ResEnc preset by name with an error that lists the valid names."""
    try:
        return RESENC_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown ResEnc preset {name!r}; choose one of {sorted(RESENC_PRESETS)}") from None


def build_resenc_unet(
    preset: ResEncPreset, in_channels: int, num_classes: int, deep_supervision: bool = True
) -> ResidualEncoderUNet:
    """The network of ``preset``, initialised as nnU-Net initialises it (see :func:`network_from_architecture`)."""
    return network_from_architecture(preset.architecture(), in_channels, num_classes, deep_supervision)


def network_from_architecture(
    architecture: Mapping[str, Any], in_channels: int, num_classes: int, deep_supervision: bool = True
) -> ResidualEncoderUNet:
    """Build a recorded architecture as nnU-Net's ``get_network_from_plans`` does.

    The kwargs naming classes are resolved through :data:`ALLOWED_CLASSES`, the network is made with
    ``input_channels``, ``num_classes`` and ``deep_supervision``, then initialised with the class's own
    ``initialize`` (He init, last norm of each residual block zeroed), as nnU-Net's trainer does.

    Args:
        architecture: ``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` (:meth:`ResEncPreset.architecture`).
        in_channels: Input channels.
        num_classes: Segmentation outputs.
        deep_supervision: One output per decoder stage (highest resolution first) instead of one.

    Raises:
        ValueError: A record that is not a ResidualEncoderUNet, names a class outside
            :data:`ALLOWED_CLASSES`, or lacks an entry.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    try:
        class_name = architecture["network_class_name"]
        kwargs = dict(architecture["arch_kwargs"])
        requires_import = tuple(architecture.get("_kw_requires_import", KW_REQUIRES_IMPORT))
    except (KeyError, TypeError) as error:
        raise ValueError(f"an architecture record needs network_class_name and arch_kwargs ({error!r} is missing)") from None
    if _resolve(class_name, "network_class_name") is not ResidualEncoderUNet:
        raise ValueError(f"network_class_name {class_name!r} is not {RESENC_CLASS_NAME}")
    for key in requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _resolve(kwargs[key], key)
    network = ResidualEncoderUNet(
        input_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kwargs
    )
    # nnU-Net's get_network_from_plans: network.apply(network.initialize) (DNA's staticmethod, untyped)
    network.apply(cast(Callable[[nn.Module], None], network.initialize))
    return network


def _resolve(name: object, what: str) -> type[nn.Module]:
    if not isinstance(name, str) or name not in ALLOWED_CLASSES:
        raise ValueError(f"{what} {name!r} is not one of the classes a recorded architecture may name: {sorted(ALLOWED_CLASSES)}")
    return ALLOWED_CLASSES[name]


def preset_of_architecture(architecture: Mapping[str, Any]) -> str | None:
    """The name of the preset whose :meth:`~ResEncPreset.architecture` equals ``architecture``; None when none does.

    Class names are compared as resolved classes, so ``torch.nn.Conv3d`` and ``torch.nn.modules.conv.Conv3d``
    match; kwargs are compared as JSON values (tuples equal lists).
    """
    wanted = _canonical(architecture)
    for name, preset in RESENC_PRESETS.items():
        if _canonical(preset.architecture()) == wanted:
            return name
    return None


def _canonical(architecture: Mapping[str, Any]) -> Any:
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    try:
        kwargs = plain(architecture["arch_kwargs"])
        requires_import = set(architecture.get("_kw_requires_import", KW_REQUIRES_IMPORT))
        for key in requires_import:
            if isinstance(kwargs.get(key), str):
                kwargs[key] = ALLOWED_CLASSES.get(kwargs[key], kwargs[key])
        return ALLOWED_CLASSES.get(architecture["network_class_name"]), kwargs
    except (KeyError, TypeError, AttributeError):
        return None


def architecture_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """Every entry in which two architecture records differ, as ``"key: file X, plans Y"`` (empty when equal).

    Compared as :func:`preset_of_architecture` compares (resolved class names, tuples equal lists).
    """
    ours_class, ours_kwargs = _canonical(ours) or (None, None)
    theirs_class, theirs_kwargs = _canonical(theirs) or (None, None)
    if ours_kwargs is None or theirs_kwargs is None:
        return ["an architecture record lacks network_class_name or arch_kwargs"]
    differences = []
    if ours_class is not theirs_class:
        differences.append(f"network_class_name: file {ours.get('network_class_name')}, plans {theirs.get('network_class_name')}")
    for key in [*ours_kwargs, *(k for k in theirs_kwargs if k not in ours_kwargs)]:  # the record's order: n_stages first
        if ours_kwargs.get(key) != theirs_kwargs.get(key):
            differences.append(f"{key}: file {ours_kwargs.get(key)!r}, plans {theirs_kwargs.get(key)!r}")
    return differences
