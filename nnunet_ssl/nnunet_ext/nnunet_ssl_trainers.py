"""Re-export of the nnunet-ssl trainers for nnU-Net's trainer lookup (no definitions here)."""
from nnunet_ssl.trainers.named import *  # noqa: F401,F403
