"""The layer map: which part of the package may import which (checked by ``tests/foundation/test_layers.py``).

The four source folders import as one namespace (``setup.py``): ``nnunet_ssl/`` -> ``nnunet_ssl``,
``pretraining/`` -> ``nnunet_ssl.pretraining``, ``trainers/`` -> ``nnunet_ssl.trainers``,
``plans/`` -> ``nnunet_ssl.plans``. :data:`LAYERS` lists the layers from the foundation up. Each
layer is a tuple of *units*, module prefixes (a prefix covers the module of that name and every
module under it; the longest prefix that fits a module names its unit). The rules, for every
import in the package, at module level or inside a function, ``TYPE_CHECKING`` ones included:

- a module may import any module of its own unit, and any module of a lower layer;
- inside an *ordered* layer a unit may also import the units listed before it, never after;
- inside a layer of *siblings* no unit imports another;
- no module imports a higher layer, and no chain of imports between modules comes back to where it
  started (a cycle, even inside one unit);
- the root package (``nnunet_ssl/__init__.py``, the version string only) imports nothing and may
  be imported by all;
- the units in :data:`NO_NNUNET` never import ``nnunetv2``.

Why this shape:

- **foundation** (ordered): small modules that build on one another and know nothing of training:
  files and refusals (``outputs``, ``io``, ``case_ids``, ``nnunet_paths``), reading checkpoints, the
  optimiser recipe, the networks, the split files, the weights file format with export and convert,
  the phantom generator. Listed in the order they build on each other, so that the foundation
  cannot grow a cycle and a reader can go through it top to bottom. Export is here because a
  pretraining checkpoint carries what export needs (encoder states by role, the intensity
  mapping); export reads the file and imports no training code.
- **engines** (siblings): ``pretraining`` (our training loop; never nnU-Net), ``trainers`` (nnU-Net
  trainers) and ``plans`` (nnU-Net planning) are three programs that meet only through files: the
  pretraining checkpoint (read by ``weights.export``), the weights file (read by the trainers) and
  the plans file (read by nnU-Net and the trainers). None imports another, so a trainer never drags
  the pretraining machinery into ``nnUNetv2_train``, and pretraining runs without nnU-Net.
- **studies** (ordered): ``analysis`` (metrics, statistics, CKA, report) reads results of the
  engines; ``experiment`` runs a grid of them and renders their tables with ``analysis``.
- **front ends** (ordered): the demo (which runs the story through the layers below), the CLI (the
  only module that parses arguments and sets up logging; it may start the demo) and the entry
  points that nothing imports: ``python -m nnunet_ssl.pretraining`` (the CLI's ``pretrain``) and the
  re-export shims nnU-Net finds through ``nnUNet_extTrainer``. The ``nnunet_ext`` package file
  itself only says where that folder is and imports nothing, so it sits in the foundation.

Where things go: a new pretraining method is a module in ``pretraining/methods/`` (engines); a new
network family in ``networks/`` (foundation) with its trainers in ``trainers/``; a new command in
``cli.py`` (front ends) calling code in the layer that owns the job; a new report table in
``analysis/`` (studies).
"""
from __future__ import annotations

from dataclasses import dataclass

#: The package every module lives in; its ``__init__`` holds only the version string.
ROOT_PACKAGE = "nnunet_ssl"


@dataclass(frozen=True)
class Layer:
    """One floor of the package.

    Attributes:
        name: What the layer is, for messages.
        units: Module prefixes, in the order they may import each other when ``ordered``.
        ordered: True: a unit may import the units listed before it in this layer. False: the
            units are siblings and never import one another.
    """

    name: str
    units: tuple[str, ...]
    ordered: bool


#: The layers from the foundation up (see the module docstring for the rules and the reasons).
LAYERS: tuple[Layer, ...] = (
    Layer(
        "foundation",
        (
            "nnunet_ssl.layers",
            "nnunet_ssl.outputs",
            "nnunet_ssl.io",
            "nnunet_ssl.case_ids",
            "nnunet_ssl.nnunet_paths",
            "nnunet_ssl.nnunet_ext",  # the package file only: where the shim folder is
            "nnunet_ssl.cpu_memory",
            "nnunet_ssl.checkpoints",
            "nnunet_ssl.optim",
            "nnunet_ssl.networks",
            "nnunet_ssl.splits",
            "nnunet_ssl.weights",
            "nnunet_ssl.data",
        ),
        ordered=True,
    ),
    Layer("engines", ("nnunet_ssl.pretraining", "nnunet_ssl.trainers", "nnunet_ssl.plans"), ordered=False),
    Layer("studies", ("nnunet_ssl.analysis", "nnunet_ssl.experiment"), ordered=True),
    Layer(
        "front ends",
        (
            "nnunet_ssl.demo_progress",
            "nnunet_ssl.demo",
            "nnunet_ssl.cli",
            "nnunet_ssl.pretraining.__main__",
            "nnunet_ssl.nnunet_ext.nnunet_ssl_trainers",
        ),
        ordered=True,
    ),
)

#: Units that never import ``nnunetv2``: pretraining runs without nnU-Net's environment, and the
#: networks and the checkpoint reader serve it.
NO_NNUNET: tuple[str, ...] = ("nnunet_ssl.pretraining", "nnunet_ssl.checkpoints", "nnunet_ssl.networks")


def unit_of(module: str) -> str | None:
    """The unit (longest prefix in :data:`LAYERS`) that holds ``module``; None when no unit does."""
    fits = [u for layer in LAYERS for u in layer.units if module == u or module.startswith(u + ".")]
    return max(fits, key=len) if fits else None


def position(unit: str) -> tuple[int, int]:
    """``(layer index, index in the layer)`` of ``unit``, from the foundation up."""
    for i, layer in enumerate(LAYERS):
        if unit in layer.units:
            return i, layer.units.index(unit)
    raise KeyError(unit)


def may_import(importer_unit: str, imported_unit: str) -> bool:
    """Whether a module of ``importer_unit`` may import a module of ``imported_unit`` (cycles aside)."""
    if importer_unit == imported_unit:
        return True
    (layer_a, index_a), (layer_b, index_b) = position(importer_unit), position(imported_unit)
    if layer_a != layer_b:
        return layer_b < layer_a
    return LAYERS[layer_a].ordered and index_b < index_a
