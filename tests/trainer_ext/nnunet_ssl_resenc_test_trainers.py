"""Re-export of the tests' ResEnc trainers for nnU-Net's trainer lookup (no definitions here; see tests/resenc_short_trainers.py)."""
from resenc_short_trainers import *  # noqa: F401,F403
