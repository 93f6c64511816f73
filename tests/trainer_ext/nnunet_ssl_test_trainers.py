"""Re-export of the tests' trainers for nnU-Net's trainer lookup (no definitions here; see tests/short_trainers.py)."""
from short_trainers import *  # noqa: F401,F403
