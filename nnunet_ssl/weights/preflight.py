"""Check a ``-pretrained_weights`` file before nnU-Net creates anything.

``nnUNetv2_train`` constructs the trainer (which creates the results fold folder and its log),
initialises it and only then loads the weights, failing with an assertion and a traceback. The
trainer calls :func:`preflight_weights` first thing in its constructor, from the plans and
dataset.json alone, with the network built on the meta device (shapes only, no memory).
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch import nn

from nnunet_ssl.weights.format import WeightsError, check_weights_against_network


class NetworkBuilder(Protocol):
    """An nnU-Net trainer, as far as these checks use its class (nnU-Net's own classes are untyped)."""

    @classmethod
    def build_network_architecture(
        cls, plans_manager: Any, configuration_manager: Any, num_input_channels: int, num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module: ...


def network_shape_for(
    trainer_class: type[NetworkBuilder], plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any]
) -> nn.Module:
    """The network ``trainer_class`` will build for these plans, on the meta device."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    in_channels = determine_num_input_channels(manager, config, dataset_json)
    num_classes = manager.get_label_manager(dataset_json).num_segmentation_heads
    with torch.device("meta"):
        return trainer_class.build_network_architecture(manager, config, in_channels, num_classes, True)


def preflight_weights(
    path: str | os.PathLike[str],
    trainer_class: type[NetworkBuilder],
    plans: dict[str, Any],
    configuration: str,
    dataset_json: dict[str, Any],
    continue_training: bool = False,
) -> dict[str, Any]:
    """Return the file's metadata, or raise :class:`WeightsError` naming the problem and an existing fix.

    Checks the file is readable, and that every key and shape of the network (heads excepted, as
    nnU-Net does) is in it: this is where a preset or channel mismatch shows.
    """
    if continue_training:
        raise WeightsError(
            f"{path}: -pretrained_weights starts a new training and cannot be combined with --c (continue); "
            "drop one of them"
        )
    network = network_shape_for(trainer_class, plans, configuration, dataset_json)
    return check_weights_against_network(path, network, trainer_class.__name__)
