"""nnunet-ssl: self-supervised pretraining of 3D Swin Transformers for nnU-Net v2."""

__version__ = "0.1.0"
