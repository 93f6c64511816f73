"""View generation and augmentations for pretraining: pure functions on tensors.

Every function takes a ``torch.Generator`` (the step's ``context.generator``), never edits its
input and never reads the global RNG, so masks and augmentations are reproducible per
``(seed, rank, step)``. Arrays are ``(N, C, D, H, W)`` in the cached axis order, where ``D`` is
the slice axis (2 mm) and ``(H, W)`` the axial plane (1.5 mm).
"""
from __future__ import annotations
