"""The ``nnunet-ssl pretrain --list-methods`` table: one line per registered method from its ``info``."""
from __future__ import annotations

from nnunet_ssl.pretraining.methods import METHODS
from nnunet_ssl.pretraining.methods.base import MethodInfo


def method_lines() -> list[str]:
    """``name  family | views | heads | losses`` for every method in :data:`METHODS` (registry order).

    Raises:
        TypeError: A registered method class without a :class:`MethodInfo` ``info``.
    """
    width = max(len(name) for name in METHODS)
    lines = []
    for name, (method_class, _) in METHODS.items():
        info = getattr(method_class, "info", None)
        if not isinstance(info, MethodInfo):
            raise TypeError(f"method {name!r} ({method_class.__name__}) has no MethodInfo 'info'")
        lines.append(
            f"{name:{width}s}  {info.family} | views: {info.views} | heads: {info.heads} | losses: {info.losses}"
        )
    return lines
