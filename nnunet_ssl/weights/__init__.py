"""The -pretrained_weights file format: build, save, load, check."""
from nnunet_ssl.weights.format import (
    WeightsError,
    WeightsMetadata,
    build_weights_file,
    check_weights_against_network,
    encoder_digest,
    load_weights_file,
    save_weights_file,
)

__all__ = [
    "WeightsError",
    "WeightsMetadata",
    "build_weights_file",
    "check_weights_against_network",
    "encoder_digest",
    "load_weights_file",
    "save_weights_file",
]
