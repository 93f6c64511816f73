"""nnssl's checkpoint interchange: read the checkpoints nnssl writes, write ours in the form it reads.

nnssl (github MIC-DKFZ/nnssl, the framework of the Spark3D / "Revisiting MAE pre-training" paper,
SSL_METHODS.md card 10) is CC BY-SA: everything below is written from the facts its code shows, no
code of it is copied. Facts, with the files they come from (nnssl at 7044864; its segmentation
fine-tuning branch, github TaWald/nnUNet branch ``nnssl_finetuning_inclusion`` at 91b1e04):

* **The checkpoint** is a ``torch.save`` dict. ``AbstractBaseTrainer.save_checkpoint``
  (``src/nnssl/training/nnsslTrainer/AbstractTrainer.py``) stores ``network_weights`` (the state dict
  of the unwrapped network: the DDP ``module`` and the ``torch.compile`` ``_orig_mod`` are taken off
  before saving), ``optimizer_state``, ``grad_scaler_state``, ``logging``, ``_best_ema``,
  ``current_epoch``, ``init_args``, ``trainer_name`` and ``nnssl_adaptation_plan``, after
  ``_convert_numpy`` turned numpy scalars into Python numbers and numpy arrays into tensors, so that
  ``torch.load(weights_only=True)`` reads it. ``SparkMAETrainer.save_checkpoint``
  (``.../masked_image_modeling/SparkTrainer.py``) stores no plan in the file (plus ``spark_weights``,
  the SparK wrapper's state, which is not the network). ``src/nnssl/utilities/add_adaptation_plan.py``
  rewrites a checkpoint as ``checkpoint_final.pth`` without optimiser state, with
  ``nnssl_adaptation_plan``, and writes ``adaptation_plan.json`` (the same plan plus
  ``trainer_name``) beside it; the published OpenMind checkpoints are such a pair (the fine-tuning
  branch downloads ``adaptation_plan.json`` and ``checkpoint_final.pth``).
* **Where the JSON lies:** a trainer writes ``adaptation_plan.json`` into its output folder, one level
  above the ``fold_<k>`` folder that holds its checkpoints (``AbstractTrainer.py``:
  ``adaptation_json_plan``, ``output_folder``); ``add_adaptation_plan.py`` writes it beside the file.
* **The plan** is ``AdaptationPlan.serialize()`` (``src/nnssl/adaptation_planning/adaptation_plan.py``):
  ``architecture_plans`` {``arch_class_name``, ``arch_kwargs``, ``arch_kwargs_requiring_import``},
  ``pretrain_plan`` (``Plan.serialize()``, ``src/nnssl/experiment_planning/experiment_planners/plan.py``:
  dataset name, plans name, median spacing, reader, transposes, ``configurations`` with the one
  configuration trained on (spacing, patch size, normalisation schemes, resampling), planner),
  ``pretrain_num_input_channels``, ``recommended_downstream_patchsize`` (160^3 by default),
  ``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj`` (module paths, no ``.weight``) and
  ``key_to_lpe``. Inside the torch file tuples stay tuples (``serialize_kwargs`` turns the numpy arrays
  it meets as dict values into lists; one it leaves, say inside a list, ``_convert_numpy`` makes a
  tensor); the JSON holds lists.
* **Architectures:** ``arch_class_name`` ``"ResEncL"`` comes with ``arch_kwargs`` None and means the
  fixed network of ``get_res_enc_l`` (``src/nnssl/architectures/architecture_registry.py``; the
  fine-tuning branch's ``nnunetv2/utilities/get_network_via_name.py`` builds the same):
  DNA's ResidualEncoderUNet, 6 stages, features 32-64-128-256-320-320, 3^3 kernels, strides
  1,2,2,2,2,2, blocks 1-3-4-6-6-6, one conv per decoder stage, conv bias, InstanceNorm3d (eps 1e-5,
  affine), LeakyReLU (inplace), no dropout: :data:`NNSSL_RESENC_L_KWARGS`, our ``resenc_l`` preset.
  The MAE and SparK trainers write it so (``BaseMAETrainer.py``, ``SparkTrainer.py``), with
  ``key_to_encoder`` "encoder.stages", ``key_to_stem`` "encoder.stem" and ``keys_to_in_proj``
  ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"). Any other ResEnc topology is
  ``arch_class_name`` ``"ResidualEncoderUNet"`` (the short name: ``DYN_ARCHITECTURE_PRESETS`` in
  ``adaptation_plan.py``; ``verify_adaptation_plans`` builds only those two names from kwargs,
  a dotted name would go to ``get_network_by_name`` and be refused) with the 14 fields of
  ``DynamicArchitecturePlans`` as ``arch_kwargs`` (class names as strings) and
  ``arch_kwargs_requiring_import`` listing the kwargs whose value is a class or a string
  (``get_kwargs_requiring_import``). ``NoSkipResEncL`` (a ResEnc without skips) and the Primus
  transformers are other classes.
* **Fine-tuning** (``nnunetv2/experiment_planning/like_nnssl.py``,
  ``nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py`` of the branch) loads the file
  with ``torch.load(weights_only=True)``, reads the plan *from inside the file*
  (``nnssl_adaptation_plan``; optional ``citations``), takes spacing and patch size of the first
  ``pretrain_plan`` configuration, builds ``ResEncL`` by name or ``ResidualEncoderUNet`` from the
  kwargs, and loads the ``network_weights`` under ``key_to_encoder`` and ``key_to_stem`` strictly
  into the network's ``encoder.stages`` and ``encoder.stem``, repeating the ``keys_to_in_proj``
  kernels (``+ ".weight"``) over more input channels.
* **Aliased keys:** DNA registers each conv and norm twice (``conv`` / ``all_modules.0``, ``norm`` /
  ``all_modules.1``) and the decoder keeps the encoder (``decoder.encoder.*``): several keys, one
  tensor. SparK's ``convert_to_spark_cnn`` (``src/nnssl/architectures/spark_utils.py``) replaces each
  Conv3d / InstanceNorm3d child by a copy once per parent, so in a SparK checkpoint ``conv`` and
  ``all_modules.0`` are two tensors, and only ``all_modules.*`` (what ``forward`` runs) was trained.
  ``load_state_dict`` writes every key in turn, so the last alias wins: ``all_modules.*``. The
  reader keeps exactly that value under every alias.

Decisions: the plan inside the file is the one returned (it is what fine-tuning reads); an
``adaptation_plan.json`` beside the file (or, for a file in ``fold_<k>``, in the folder above) is
read too and must agree with it on every entry both hold (``trainer_name``, which only the JSON of
``add_adaptation_plan`` holds, is thus no disagreement), else the file is refused. Without a plan
inside, the JSON is the plan. The writer writes the same plan in both places, in plain JSON values
(lists, never tuples or tensors), so the two always agree.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import Tensor

from nnunet_ssl import __version__
from nnunet_ssl.checkpoints import NNUNET_CHECKPOINT_GLOBALS, read_torch_file
from nnunet_ssl.io import atomic_json_dump, atomic_torch_save
from nnunet_ssl.networks.family import family_of
from nnunet_ssl.networks.resenc import (
    ALLOWED_CLASSES,
    KW_REQUIRES_IMPORT,
    RESENC_CLASS_NAME,
    RESENC_PRESETS,
    STEM_KEYS,
    preset_of_architecture,
)
from nnunet_ssl.weights.format import WeightsError

logger = logging.getLogger(__name__)

#: File name nnssl's checkpoints and the published models use (``add_adaptation_plan.py``, ``like_nnssl.py``).
CHECKPOINT_FILE = "checkpoint_final.pth"
#: The plan's JSON file, beside the checkpoint (or one folder above ``fold_<k>``).
PLAN_FILE = "adaptation_plan.json"
#: Entries of the checkpoint dict.
WEIGHTS_ENTRY = "network_weights"
PLAN_ENTRY = "nnssl_adaptation_plan"
#: ``arch_class_name`` of nnssl's fixed ResEnc-L, and of a ResEnc built from ``arch_kwargs``.
RESENC_L_NAME = "ResEncL"
DYNAMIC_RESENC_NAME = "ResidualEncoderUNet"
#: Where DNA's ResidualEncoderUNet keeps its encoder stages, stem and input projection (module paths).
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
KEYS_TO_IN_PROJ = tuple(f"encoder.{key.removesuffix('.weight')}" for key in STEM_KEYS)

#: Fields of nnssl's ``AdaptationPlan``, in its order.
ADAPTATION_PLAN_FIELDS = (
    "architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
    "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe",
)
#: Fields of nnssl's ``Plan`` (``Plan(**d)`` takes exactly these).
PRETRAIN_PLAN_FIELDS = (
    "dataset_name", "plans_name", "original_median_spacing_after_transp", "image_reader_writer",
    "transpose_forward", "transpose_backward", "configurations", "experiment_planner_used",
)
#: Fields of nnssl's ``ConfigurationPlan`` (``ConfigurationPlan(**d)`` takes exactly these).
CONFIGURATION_FIELDS = (
    "data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes", "use_mask_for_norm",
    "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask", "resampling_fn_mask_kwargs",
    "spacing", "patch_size",
)
#: nnssl's ``PREPROCESS_SPACING_STYLES``; its planner names each configuration after its style.
SPACING_STYLES = ("onemmiso", "median", "noresample")
#: Fields of nnssl's ``DynamicArchitecturePlans`` (the ``arch_kwargs`` of ``"ResidualEncoderUNet"``; no defaults).
DYNAMIC_KWARGS = (
    "n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_blocks_per_stage",
    "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
    "nonlin", "nonlin_kwargs",
)
#: nnssl's ResEnc-L (``get_res_enc_l``), written as nnU-Net's plans write kwargs.
NNSSL_RESENC_L_KWARGS: dict[str, Any] = {
    "n_stages": 6,
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
#: The ``arch_class_name`` values nnssl knows that are not a DNA ResidualEncoderUNet, and what they are.
OTHER_ARCHITECTURES = {
    "NoSkipResEncL": "nnssl's ResidualEncoderUNet_noskip (a ResEnc-L without skip connections)",
    "PrimusS": "a Primus transformer", "PrimusB": "a Primus transformer",
    "PrimusM": "a Primus transformer", "PrimusL": "a Primus transformer",
    "PlainConvUNet": "DNA's PlainConvUNet (no residual encoder)",
}
#: Key prefixes of wrapped networks: DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_SEG_LAYER = re.compile(r"^decoder\.seg_layers\.(\d+)\.weight$")


class NnsslFormatError(WeightsError):
    """A file that is not an nnssl checkpoint we can use, or weights we cannot write as one; the message names the file."""


@dataclass(frozen=True)
class NnsslCheckpoint:
    """What an nnssl checkpoint holds, in our terms.

    Attributes:
        source: The checkpoint file.
        network_weights: The full network's state dict, keys of DNA's ResidualEncoderUNet (wrapper prefixes taken
            off; aliased keys hold one tensor, the value ``load_state_dict`` would leave).
        adaptation_plan: nnssl's plan as read, in plain JSON values (tensors and tuples as lists).
        plan_sources: The files the plan was read from (the checkpoint, its JSON, or both).
        record: Our ``resenc`` network record (``family``, ``preset`` or ``""``, ``architecture``).
        arch_class_name: The plan's ``arch_class_name`` (``"ResEncL"`` or ``"ResidualEncoderUNet"``).
        in_channels: Input channels of the weights (the stem kernel's), equal to ``pretrain_num_input_channels``.
        num_classes: Output channels of the segmentation heads (1 for MAE-style reconstruction).
        recommended_patch_size: ``recommended_downstream_patchsize``; None when the plan has none.
        pretrain_patch_size, pretrain_spacing, pretrain_normalization: From the ``pretrain_plan`` configuration
            (the first, as fine-tuning reads it); None / empty when absent. ``pretrain_spacing`` is None also
            for ``noresample``.
        pretrain_configuration: That configuration's name (``"onemmiso"``, ...), ``""`` when none.
        trainer_name: The file's ``trainer_name`` (or the JSON's), ``""`` when none.
        notes: What was adjusted on reading (prefixes taken off, aliases that disagreed, ignored kwargs).
    """

    source: Path
    network_weights: dict[str, Tensor]
    adaptation_plan: dict[str, Any]
    plan_sources: tuple[Path, ...]
    record: dict[str, Any]
    arch_class_name: str
    in_channels: int
    num_classes: int
    recommended_patch_size: tuple[int, ...] | None
    pretrain_patch_size: tuple[int, ...] | None
    pretrain_spacing: tuple[float, ...] | None
    pretrain_normalization: tuple[str, ...]
    pretrain_configuration: str
    trainer_name: str
    notes: tuple[str, ...]

    @property
    def preset(self) -> str:
        """Our preset of this topology, ``""`` when none has it."""
        return str(self.record["preset"])


# ---------------------------------------------------------------- reading


def read_nnssl_checkpoint(path: str | os.PathLike[str], *, plan_path: str | os.PathLike[str] | None = None) -> NnsslCheckpoint:
    """Read an nnssl checkpoint (a file, or a folder holding ``checkpoint_final.pth``) with ``weights_only=True``.

    The plan is the file's ``nnssl_adaptation_plan``. A JSON plan is read too: ``plan_path``, else an
    ``adaptation_plan.json`` beside the file, else (for a file in a ``fold_<k>`` folder) one in the folder
    above, where nnssl's trainers write it (:func:`plan_json_candidates`). With both, they must agree on
    every entry both hold; without a plan in the file, the JSON is the plan. A training checkpoint is read
    whole (optimiser state too): ``torch.load`` cannot skip entries.

    Raises:
        FileNotFoundError, IsADirectoryError: no such file (or a folder without ``checkpoint_final.pth``).
        UnsafeCheckpointError: the file holds objects other than tensors and plain values (nothing was run).
        ValueError: not a readable torch file.
        NnsslFormatError: no ``network_weights``, no plan, plans that disagree, an ``arch_class_name`` we cannot
            build, or weights that do not fit the architecture; one line naming the file.
    """
    source = _checkpoint_file(Path(path))
    payload = read_torch_file(source, "nnssl checkpoint", NNUNET_CHECKPOINT_GLOBALS)
    if not isinstance(payload, dict):
        raise NnsslFormatError(f"{source}: not an nnssl checkpoint (a {type(payload).__name__}, not a dict)")
    weights = payload.get(WEIGHTS_ENTRY)
    if not isinstance(weights, Mapping) or not weights:
        raise NnsslFormatError(
            f"{source}: no {WEIGHTS_ENTRY} (top-level entries: {sorted(map(str, payload))[:8]}); an nnssl checkpoint "
            "keeps the network's state dict there"
        )
    not_tensors = [str(k) for k, v in weights.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise NnsslFormatError(f"{source}: {WEIGHTS_ENTRY} holds values that are not tensors (first: {not_tensors[:3]})")
    plan, plan_sources, json_plan = _read_plan(source, payload, None if plan_path is None else Path(plan_path))
    notes: list[str] = []
    arch_class_name, architecture = _architecture_of_plan(plan, source, notes)
    state, prefix = _strip_wrapper_prefixes({str(k): v for k, v in weights.items()})
    if prefix:
        notes.append(f"took the wrapper prefix {prefix!r} off every key")
    in_channels, num_classes, aliases = _check_fit(state, architecture, f"{source}: {WEIGHTS_ENTRY}", arch_class_name)
    state = _resolve_aliases(state, aliases, notes)
    planned = plan.get("pretrain_num_input_channels")
    if planned is not None and planned != in_channels:
        raise NnsslFormatError(
            f"{source}: the plan's pretrain_num_input_channels is {planned!r} but the stem kernel "
            f"{KEYS_TO_IN_PROJ[0]}.weight has {in_channels} input channels; fix the plan (fine-tuning adapts the stem from it)"
        )
    preset = preset_of_architecture(architecture) or ""
    configuration, spacing, normalization, pretrain_patch = _pretrain_info(plan, notes)
    trainer = payload.get("trainer_name") or (json_plan or {}).get("trainer_name") or ""
    for note in notes:
        logger.info("%s: %s", source, note)
    return NnsslCheckpoint(
        source=source,
        network_weights=state,
        adaptation_plan=plan,
        plan_sources=plan_sources,
        record={"family": "resenc", "preset": preset, "architecture": architecture},
        arch_class_name=arch_class_name,
        in_channels=in_channels,
        num_classes=num_classes,
        recommended_patch_size=_int_tuple(plan.get("recommended_downstream_patchsize")),
        pretrain_patch_size=pretrain_patch,
        pretrain_spacing=spacing,
        pretrain_normalization=normalization,
        pretrain_configuration=configuration,
        trainer_name=str(trainer),
        notes=tuple(notes),
    )


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        inside = path / CHECKPOINT_FILE
        if not inside.is_file():
            raise FileNotFoundError(f"{path}: a folder without {CHECKPOINT_FILE}; give the nnssl checkpoint file")
        return inside
    return path


def plan_json_candidates(checkpoint: str | os.PathLike[str]) -> list[Path]:
    """Where an ``adaptation_plan.json`` of ``checkpoint`` may lie, in the order looked at: beside it, then (for a
    file in ``fold_<k>``) in the trainer's output folder above."""
    checkpoint = Path(checkpoint)
    candidates = [checkpoint.parent / PLAN_FILE]
    if checkpoint.parent.name.startswith("fold_"):
        candidates.append(checkpoint.parent.parent / PLAN_FILE)
    return candidates


def _read_plan(
    source: Path, payload: Mapping[str, Any], plan_path: Path | None
) -> tuple[dict[str, Any], tuple[Path, ...], dict[str, Any] | None]:
    """``(plan, files it came from, the JSON plan or None)``; refuses a missing plan and plans that disagree."""
    inside = payload.get(PLAN_ENTRY)
    if inside is not None and not isinstance(inside, Mapping):
        raise NnsslFormatError(f"{source}: {PLAN_ENTRY} is a {type(inside).__name__}, not a dict")
    if plan_path is not None and not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path}: no such adaptation plan file")
    json_file = plan_path or next((p for p in plan_json_candidates(source) if p.is_file()), None)
    if json_file is None:
        if inside is None:
            looked = ", ".join(str(p) for p in plan_json_candidates(source))
            raise NnsslFormatError(
                f"{source}: no adaptation plan: no {PLAN_ENTRY} in the file and no {PLAN_FILE} at {looked}; give its "
                "adaptation_plan.json (nnssl writes it into the trainer's output folder), or add the plan with nnssl's "
                "src/nnssl/utilities/add_adaptation_plan.py"
            )
        return _plain(inside), (source,), None
    json_plan = _read_plan_json(json_file)
    if inside is None:
        return json_plan, (json_file,), json_plan
    plan = _plain(inside)
    difference = _plan_difference(plan, json_plan)
    if difference:
        raise NnsslFormatError(
            f"{source}: its {PLAN_ENTRY} and {json_file} disagree ({difference}); remove or fix the stale one "
            f"(fine-tuning reads the plan inside the file), or give the right JSON with plan_path"
        )
    return plan, (source, json_file), json_plan


def _read_plan_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise NnsslFormatError(f"{path}: not a JSON adaptation plan (not UTF-8 text: {error.reason})") from None
    except json.JSONDecodeError as error:
        raise NnsslFormatError(f"{path}: not a JSON adaptation plan ({error.msg} at line {error.lineno})") from None
    if not isinstance(value, dict):
        raise NnsslFormatError(f"{path}: not an adaptation plan (a JSON {type(value).__name__}, not an object)")
    return value


def _plan_difference(inside: Mapping[str, Any], beside: Mapping[str, Any]) -> str:
    """The first entry where two plans differ (``""`` when none): the plan's fields (a missing ``key_to_lpe`` is None)
    and every other entry that both hold."""
    keys = [*ADAPTATION_PLAN_FIELDS, *sorted(k for k in inside if k in beside and k not in ADAPTATION_PLAN_FIELDS)]
    for key in keys:
        a, b = inside.get(key), beside.get(key)
        if key in ADAPTATION_PLAN_FIELDS and key != "key_to_lpe" and (key in inside) != (key in beside):
            return f"{key} is only in {'the file' if key in inside else 'the JSON'}"
        found = _first_difference(a, b, key)
        if found:
            return found
    return ""


def _first_difference(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return f"{where}.{key} is only in {'the file' if key in a else 'the JSON'}"
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((f for i, (x, y) in enumerate(zip(a, b, strict=True)) if (f := _first_difference(x, y, f"{where}[{i}]"))), "")
    return "" if a == b else f"{where}: {_short(a)} in the file, {_short(b)} in the JSON"


def _short(value: Any) -> str:
    text = json.dumps(value) if _is_json(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _plain(value: Any) -> Any:
    """Plain JSON values: tensors (numpy arrays after ``_convert_numpy``) and tuples become lists, keys strings."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _architecture_of_plan(plan: Mapping[str, Any], source: Path, notes: list[str]) -> tuple[str, dict[str, Any]]:
    """``(arch_class_name, our architecture entry)`` of a plan's ``architecture_plans``."""
    plans = plan.get("architecture_plans")
    if not isinstance(plans, Mapping) or "arch_class_name" not in plans:
        raise NnsslFormatError(f"{source}: the adaptation plan has no architecture_plans.arch_class_name")
    name = plans["arch_class_name"]
    try:
        architecture = architecture_of_nnssl(plans)
    except ValueError as error:
        raise NnsslFormatError(f"{source}: {error}") from None
    if name == RESENC_L_NAME and plans.get("arch_kwargs") is not None:
        notes.append("arch_kwargs of 'ResEncL' ignored, as nnssl's get_network_by_name ignores them")
    return str(name), architecture


def architecture_of_nnssl(architecture_plans: Mapping[str, Any]) -> dict[str, Any]:
    """Our architecture entry (``network_class_name``, ``arch_kwargs``, ``_kw_requires_import``) of nnssl's
    ``architecture_plans``; a topology of one of our presets comes back exactly as that preset writes it.

    Raises:
        ValueError: an ``arch_class_name`` that is not a DNA ResidualEncoderUNet, kwargs missing, or a kwarg naming
            a class we do not resolve.
    """
    name = architecture_plans.get("arch_class_name")
    if name == RESENC_L_NAME:
        architecture: dict[str, Any] = {
            "network_class_name": RESENC_CLASS_NAME, "arch_kwargs": _plain(NNSSL_RESENC_L_KWARGS),
            "_kw_requires_import": list(KW_REQUIRES_IMPORT),
        }
    elif name == DYNAMIC_RESENC_NAME or _names_resenc(name):
        kwargs = architecture_plans.get("arch_kwargs")
        if not isinstance(kwargs, Mapping) or not kwargs:
            raise ValueError(f"arch_class_name {name!r} needs arch_kwargs, got {kwargs!r}")
        requires = architecture_plans.get("arch_kwargs_requiring_import") or []
        unknown = [k for k in requires if k not in KW_REQUIRES_IMPORT]
        if unknown:
            raise ValueError(
                f"arch_kwargs_requiring_import names {unknown}, kwargs naming classes that nnunet-ssl does not resolve "
                f"(it resolves {list(KW_REQUIRES_IMPORT)} through its allowed classes)"
            )
        for key in KW_REQUIRES_IMPORT:
            value = kwargs.get(key)
            if value is not None and not (isinstance(value, str) and value in ALLOWED_CLASSES):
                raise ValueError(f"arch_kwargs {key} {value!r} is not one of the classes nnunet-ssl builds: {sorted(ALLOWED_CLASSES)}")
        architecture = {
            "network_class_name": RESENC_CLASS_NAME, "arch_kwargs": _plain(kwargs), "_kw_requires_import": list(KW_REQUIRES_IMPORT),
        }
    elif name in OTHER_ARCHITECTURES:
        raise ValueError(
            f"arch_class_name {name!r} is {OTHER_ARCHITECTURES[str(name)]}, not DNA's ResidualEncoderUNet; nnunet-ssl reads "
            f"{RESENC_L_NAME!r} and {DYNAMIC_RESENC_NAME!r} checkpoints only"
        )
    else:
        raise ValueError(
            f"arch_class_name {name!r} is no architecture nnunet-ssl can build; it reads {RESENC_L_NAME!r} and "
            f"{DYNAMIC_RESENC_NAME!r} (with arch_kwargs) checkpoints"
        )
    preset = preset_of_architecture(architecture)
    return RESENC_PRESETS[preset].architecture() if preset else architecture


def _names_resenc(name: object) -> bool:
    """Whether ``name`` is one of the dotted names of DNA's ResidualEncoderUNet that a record may hold."""
    return isinstance(name, str) and ALLOWED_CLASSES.get(name) is ResidualEncoderUNet


def _strip_wrapper_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Take DDP/compile prefixes off when every key has them (``module._orig_mod.`` too); returns the prefix taken."""
    taken = ""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state, taken
        state = {k[len(prefix):]: v for k, v in state.items()}
        taken += prefix


def _check_fit(
    state: Mapping[str, Tensor], architecture: Mapping[str, Any], what: str, name: str
) -> tuple[int, int, list[list[str]]]:
    """``(in_channels, num_classes, alias groups)`` of weights that fit ``architecture`` exactly (keys and shapes).

    The channels are read off the stem kernel and the heads, then the network is built on the meta device
    (no memory, no init cost) and compared. An alias group lists the keys of one tensor in state-dict order.
    """
    stem = state.get(f"encoder.{STEM_KEYS[0]}")
    in_channels = int(stem.shape[1]) if stem is not None and stem.dim() == 5 else 1
    heads = [(int(m.group(1)), v) for k, v in state.items() if (m := _SEG_LAYER.match(k))]
    num_classes = int(max(heads, key=lambda item: item[0])[1].shape[0]) if heads else 1
    description = f"{name!r} ({preset_of_architecture(architecture) or 'a ResidualEncoderUNet of a topology no preset has'})"
    try:
        network = _meta_network(architecture, in_channels, num_classes)
    except (ValueError, TypeError) as error:
        raise NnsslFormatError(f"{what}: cannot build {description}: {error}") from None
    expected = network.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ (first: {'; '.join(shapes[:2])} expected)")
    if problems:
        raise NnsslFormatError(
            f"{what} do not fit {description} with {in_channels} input channels and {num_classes} outputs: {'; '.join(problems)}"
        )
    groups: dict[int, list[str]] = defaultdict(list)
    for key, value in expected.items():
        groups[id(value)].append(key)
    return in_channels, num_classes, [keys for keys in groups.values() if len(keys) > 1]


def _meta_network(architecture: Mapping[str, Any], in_channels: int, num_classes: int) -> ResidualEncoderUNet:
    """DNA's network of ``architecture`` on the meta device, for its keys and shapes: classes resolved as
    :func:`~nnunet_ssl.networks.resenc.network_from_architecture` resolves them, but not initialised (DNA's
    ``initialize`` on the meta device imports ``torch._dynamo``, a second for nothing)."""
    name = architecture["network_class_name"]
    if not _names_resenc(name):
        raise ValueError(f"network_class_name {name!r} is not {RESENC_CLASS_NAME}")
    kwargs = dict(architecture["arch_kwargs"])
    for key in KW_REQUIRES_IMPORT:
        value = kwargs.get(key)
        if value is not None:
            if not isinstance(value, str) or value not in ALLOWED_CLASSES:
                raise ValueError(f"{key} {value!r} is not one of the classes nnunet-ssl builds: {sorted(ALLOWED_CLASSES)}")
            kwargs[key] = ALLOWED_CLASSES[value]
    with torch.device("meta"):
        network = ResidualEncoderUNet(input_channels=in_channels, num_classes=num_classes, deep_supervision=False, **kwargs)
    return network


def _resolve_aliases(state: dict[str, Tensor], aliases: list[list[str]], notes: list[str]) -> dict[str, Tensor]:
    """Every key of an alias group -> the group's last key's tensor (what ``load_state_dict`` leaves, and what
    DNA's ``forward`` runs: ``all_modules.*``); notes how many groups disagreed."""
    resolved = dict(state)
    differing: list[str] = []
    for keys in aliases:
        kept = state[keys[-1]]
        for key in keys[:-1]:
            value = state[key]
            if not _same_tensor(value, kept):
                differing.append(f"{key} vs {keys[-1]}")
            resolved[key] = kept
    if differing:
        notes.append(
            f"{len(differing)} aliased keys held other values than the alias the network runs (first: {differing[0]}), as "
            "SparK's convert_to_spark_cnn leaves them; kept the values load_state_dict leaves (all_modules.*)"
        )
    return resolved


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Equal dtype, shape and values (a view of the same memory counts without reading it)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def _pretrain_info(
    plan: Mapping[str, Any], notes: list[str]
) -> tuple[str, tuple[float, ...] | None, tuple[str, ...], tuple[int, ...] | None]:
    """``(configuration name, spacing, normalisation schemes, patch size)`` of the first pretraining configuration."""
    pretrain = plan.get("pretrain_plan")
    configurations = pretrain.get("configurations") if isinstance(pretrain, Mapping) else None
    if not isinstance(configurations, Mapping) or not configurations:
        notes.append("the plan has no pretrain_plan configuration: pretraining spacing and normalisation unknown")
        return "", None, (), None
    name, configuration = next(iter(configurations.items()))
    if not isinstance(configuration, Mapping):
        notes.append(f"pretrain_plan configuration {name!r} is not a dict: pretraining spacing and normalisation unknown")
        return str(name), None, (), None
    spacing = configuration.get("spacing")
    schemes = configuration.get("normalization_schemes")
    return (
        str(name),
        tuple(float(s) for s in spacing) if isinstance(spacing, list) and all(isinstance(s, (int, float)) for s in spacing) else None,
        tuple(str(s) for s in schemes) if isinstance(schemes, list) else (),
        _int_tuple(configuration.get("patch_size")),
    )


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and float(v).is_integer() for v in value):
        return tuple(int(v) for v in value)
    return None


# ---------------------------------------------------------------- writing


def nnssl_pretrain_plan(
    *,
    dataset_name: str,
    patch_size: Sequence[int],
    spacing: Sequence[float] | None,
    normalization_schemes: Sequence[str] = ("ZScoreNormalization",),
    plans_name: str = "nnsslPlans",
    image_reader_writer: str = "SimpleITKIO",
    experiment_planner_used: str = f"nnunet-ssl {__version__}",
    original_median_spacing: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A ``pretrain_plan`` as nnssl's planner and trainers write it, for weights pretrained elsewhere.

    The one configuration is named after its spacing style as nnssl's ``ExperimentPlanner`` names them
    (``default_experiment_planner.py``): ``onemmiso`` for a 1 mm isotropic ``spacing``, ``noresample`` for
    None, ``median`` otherwise; the preprocessor, resampling function and kwargs are the planner's
    defaults. nnssl's own normalisation names are ZScoreNormalization, NoNormalization, RescaleTo01 and
    RGBTo01 (``normalization_schemes.py``); the fine-tuning branch re-normalises with z-scores anyway.

    Args:
        dataset_name: The pretraining data's name.
        patch_size: The pretraining patch (nnssl's MAE and SparK trainers: 160^3).
        spacing: Target spacing of the pretraining data in mm (None: not resampled).
        normalization_schemes: One scheme per input channel.
        plans_name, image_reader_writer, experiment_planner_used: Provenance entries.
        original_median_spacing: Median spacing of the data; default ``spacing`` (or None).
    """
    if spacing is None:
        style = "noresample"
    elif [float(s) for s in spacing] == [1.0, 1.0, 1.0]:
        style = "onemmiso"
    else:
        style = "median"
    configuration = {
        "data_identifier": f"{plans_name}_{style}",
        "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": style,
        "normalization_schemes": list(normalization_schemes),
        "use_mask_for_norm": [False] * len(normalization_schemes),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "patch_size": [int(p) for p in patch_size],
    }
    median = original_median_spacing if original_median_spacing is not None else spacing
    plan = {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": None if median is None else [float(s) for s in median],
        "image_reader_writer": image_reader_writer,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {style: configuration},
        "experiment_planner_used": experiment_planner_used,
    }
    return _checked_pretrain_plan(plan)


def nnssl_adaptation_plan(
    record: Mapping[str, Any], *, pretrain_plan: Mapping[str, Any], recommended_patch_size: Sequence[int], in_channels: int
) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` nnssl's trainers would write for a network of ``record`` (plain JSON values).

    nnssl's ResEnc-L topology is written as they write it (``"ResEncL"``, ``arch_kwargs`` None); any other
    ResEnc as ``"ResidualEncoderUNet"`` with the 14 ``DynamicArchitecturePlans`` kwargs.

    Raises:
        NnsslFormatError: a record of another family, kwargs nnssl's plan cannot hold, a patch size the network
            cannot take, fewer than 1 input channel, or a ``pretrain_plan`` nnssl's ``Plan`` would not load.
    """
    architecture = _record_architecture(record)
    if int(in_channels) != in_channels or in_channels < 1:
        raise NnsslFormatError(f"in_channels must be a positive integer, got {in_channels!r}")
    patch = [int(p) for p in recommended_patch_size]
    strides = _total_strides(architecture)
    if len(patch) != 3 or any(p < 1 or p % s for p, s in zip(patch, strides, strict=True)) or list(recommended_patch_size) != patch:
        raise NnsslFormatError(
            f"recommended_patch_size {list(recommended_patch_size)} must be 3 positive integers, each a multiple of the "
            f"network's total stride {strides} (nnssl recommends [160, 160, 160])"
        )
    return {
        "architecture_plans": _nnssl_architecture_plans(architecture),
        "pretrain_plan": _checked_pretrain_plan(pretrain_plan),
        "pretrain_num_input_channels": int(in_channels),
        "recommended_downstream_patchsize": patch,
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
        "key_to_lpe": None,
    }


def write_nnssl_checkpoint(
    network_weights: Mapping[str, Tensor],
    record: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    pretrain_plan: Mapping[str, Any],
    recommended_patch_size: Sequence[int],
    in_channels: int,
) -> tuple[Path, Path]:
    """Write ResEnc weights in nnssl's interchange form: ``path`` and ``adaptation_plan.json`` beside it.

    The torch file holds ``network_weights`` (on the CPU; aliased keys share one tensor, as a state dict
    does), ``nnssl_adaptation_plan`` (:func:`nnssl_adaptation_plan`) and ``created_by``; it loads with
    ``weights_only=True``. Both files are written atomically, the torch file first: a crash in between
    leaves a JSON that disagrees with the file, which :func:`read_nnssl_checkpoint` refuses rather than
    mixing. One checkpoint per folder (the JSON's name is fixed); nnssl names the file ``checkpoint_final.pth``.

    Args:
        network_weights: The full ResidualEncoderUNet state dict (DNA keys, decoder and heads included).
        record: Our ``resenc`` network record.
        path: The checkpoint file to write.
        pretrain_plan: nnssl's ``pretrain_plan`` (:func:`nnssl_pretrain_plan` makes one).
        recommended_patch_size: The downstream patch nnssl's fine-tuning will train with.
        in_channels: Input channels of the weights (checked against the stem kernel).

    Returns:
        ``(checkpoint file, adaptation_plan.json)``.

    Raises:
        NnsslFormatError: see :func:`nnssl_adaptation_plan`; weights that do not fit the record's network, or
            whose stem has another number of input channels.
        WriteError: the files could not be written.
    """
    path = Path(path)
    if path.is_dir():
        raise NnsslFormatError(f"{path}: is a folder; give the checkpoint file to write (nnssl names it {CHECKPOINT_FILE})")
    plan = nnssl_adaptation_plan(record, pretrain_plan=pretrain_plan, recommended_patch_size=recommended_patch_size, in_channels=in_channels)
    not_tensors = [str(k) for k, v in network_weights.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise NnsslFormatError(f"{path}: network_weights holds values that are not tensors (first: {not_tensors[:3]})")
    state = {str(k): v.detach().cpu() for k, v in network_weights.items()}
    name = plan["architecture_plans"]["arch_class_name"]
    stem_channels, _, aliases = _check_fit(state, _record_architecture(record), f"{path}: the weights to write", name)
    if stem_channels != in_channels:
        raise NnsslFormatError(f"{path}: in_channels is {in_channels} but the stem kernel has {stem_channels} input channels")
    notes: list[str] = []
    state = _resolve_aliases(state, aliases, notes)
    for note in notes:
        logger.warning("%s: %s", path, note)
    atomic_torch_save({WEIGHTS_ENTRY: state, PLAN_ENTRY: plan, "created_by": f"nnunet-ssl {__version__}"}, path)
    plan_file = atomic_json_dump(plan, path.parent / PLAN_FILE)
    return path, plan_file


def _record_architecture(record: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture entry of a ``resenc`` record (its own, or its preset's)."""
    try:
        family = family_of(record)
    except ValueError as error:
        raise NnsslFormatError(str(error)) from None
    if family.name != "resenc":
        raise NnsslFormatError(
            f"nnssl's checkpoints hold DNA ResidualEncoderUNet networks; a {family.describe(record)} record cannot be written as one"
        )
    architecture = record.get("architecture")
    if architecture is None:
        preset = record.get("preset")
        if preset not in RESENC_PRESETS:
            raise NnsslFormatError(f"a resenc record needs an architecture or a preset of {sorted(RESENC_PRESETS)}, got {preset!r}")
        return RESENC_PRESETS[str(preset)].architecture()
    if not isinstance(architecture, Mapping) or "arch_kwargs" not in architecture or "network_class_name" not in architecture:
        raise NnsslFormatError("a resenc record's architecture needs network_class_name and arch_kwargs")
    return dict(architecture)


def _nnssl_architecture_plans(architecture: Mapping[str, Any]) -> dict[str, Any]:
    if not check_architecture_matches(architecture, _resenc_l_architecture()):
        return {"arch_class_name": RESENC_L_NAME, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    if not _names_resenc(architecture["network_class_name"]):
        raise NnsslFormatError(f"network_class_name {architecture['network_class_name']!r} is not {RESENC_CLASS_NAME}")
    kwargs = _plain(architecture["arch_kwargs"])
    missing = [k for k in DYNAMIC_KWARGS if k not in kwargs]
    extra = [k for k in kwargs if k not in DYNAMIC_KWARGS]
    if missing or extra:
        raise NnsslFormatError(
            f"nnssl's DynamicArchitecturePlans takes exactly the kwargs {list(DYNAMIC_KWARGS)}; this architecture "
            + "; ".join(part for part in (f"lacks {missing}" if missing else "", f"has also {extra}" if extra else "") if part)
        )
    ordered = {k: kwargs[k] for k in DYNAMIC_KWARGS}
    return {
        "arch_class_name": DYNAMIC_RESENC_NAME,
        "arch_kwargs": ordered,
        # get_kwargs_requiring_import: the kwargs whose value is a class or a (class-name) string
        "arch_kwargs_requiring_import": [k for k, v in ordered.items() if isinstance(v, str)],
    }


def _total_strides(architecture: Mapping[str, Any]) -> list[int]:
    strides = architecture["arch_kwargs"].get("strides") or [[1, 1, 1]]
    per_axis = [[s] * 3 if isinstance(s, int) else list(s) for s in strides]
    return [math.prod(int(stage[axis]) for stage in per_axis) for axis in range(3)]


def _checked_pretrain_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a ``pretrain_plan`` that nnssl's ``Plan.from_dict`` and ``serialize`` accept."""
    if not isinstance(plan, Mapping):
        raise NnsslFormatError(f"pretrain_plan must be a dict, got {type(plan).__name__}")
    plain = _plain(plan)
    _exact_fields(plain, PRETRAIN_PLAN_FIELDS, "pretrain_plan (nnssl's Plan)")
    configurations = plain["configurations"]
    if not isinstance(configurations, dict) or not configurations:
        raise NnsslFormatError(
            "pretrain_plan.configurations must hold the configuration pretrained with, first (nnssl's trainers keep only "
            f"that one; fine-tuning reads the first), got {configurations!r}"
        )
    for name, configuration in configurations.items():
        _check_configuration(name, configuration)
    if not _is_json(plain):
        raise NnsslFormatError("pretrain_plan must hold only JSON values (numbers, strings, lists, dicts, None)")
    return plain


def _check_configuration(name: str, configuration: Any) -> None:
    where = f"pretrain_plan.configurations.{name} (nnssl's ConfigurationPlan)"
    if not isinstance(configuration, dict):
        raise NnsslFormatError(f"{where} must be a dict")
    _exact_fields(configuration, CONFIGURATION_FIELDS, where)
    if configuration["spacing_style"] not in SPACING_STYLES:
        raise NnsslFormatError(f"{where}: spacing_style {configuration['spacing_style']!r} is not one of {list(SPACING_STYLES)}")
    if _int_tuple(configuration["patch_size"]) is None:
        raise NnsslFormatError(f"{where}: patch_size must be a list of integers, got {configuration['patch_size']!r}")
    if configuration["spacing"] is None and configuration["spacing_style"] != "noresample":
        raise NnsslFormatError(f"{where}: spacing is None but spacing_style is {configuration['spacing_style']!r} (only noresample has none)")
    schemes = configuration["normalization_schemes"]
    if not isinstance(schemes, list) or not schemes or not all(isinstance(s, str) and s for s in schemes):
        raise NnsslFormatError(f"{where}: normalization_schemes must be a non-empty list of names, got {schemes!r}")


def _exact_fields(value: Mapping[str, Any], fields: tuple[str, ...], what: str) -> None:
    missing = [f for f in fields if f not in value]
    extra = [k for k in value if k not in fields]
    if missing or extra:
        parts = [f"lacks {missing}" if missing else "", f"has unknown {extra}" if extra else ""]
        raise NnsslFormatError(f"{what} takes exactly {list(fields)}; this one {' and '.join(p for p in parts if p)}")


# ---------------------------------------------------------------- comparing


def check_architecture_matches(record: Mapping[str, Any], plans_architecture: Mapping[str, Any]) -> list[str]:
    """How two architecture descriptions differ, one readable line per difference (empty: the same network).

    Either side may be our record (``{"family": "resenc", ...}``), an architecture entry of nnU-Net's plans
    (``network_class_name``, ``arch_kwargs``; also the fine-tuning branch's ``"ResEncL"`` with kwargs None),
    a plans configuration holding one (``{"architecture": {...}}``), nnssl's ``architecture_plans`` or a whole
    adaptation plan. Lists equal tuples, class names equal every spelling of the same class, a kwarg one side
    leaves out equals DNA's default for it, and ``_kw_requires_import`` is not compared. Each line reads
    ``"<kwarg>: <first side> vs <second side>"``, e.g. ``"n_stages: 6 vs 5"``.

    Raises:
        ValueError: a side that is none of these, or that names a network that is not a ResidualEncoderUNet.
    """
    ours, theirs = _architecture_entry(record), _architecture_entry(plans_architecture)
    differences = []
    class_a, class_b = ours["network_class_name"], theirs["network_class_name"]
    if ALLOWED_CLASSES.get(class_a, class_a) is not ALLOWED_CLASSES.get(class_b, class_b):
        differences.append(f"network_class_name: {class_a} vs {class_b}")
    kwargs_a, kwargs_b = ours["arch_kwargs"], theirs["arch_kwargs"]
    full_a, full_b = _expanded(kwargs_a), _expanded(kwargs_b)
    defaults = _resenc_defaults()
    for key in [*kwargs_a, *(k for k in kwargs_b if k not in kwargs_a)]:
        a, b = full_a.get(key, defaults.get(key, _ABSENT)), full_b.get(key, defaults.get(key, _ABSENT))
        if _comparable(a) != _comparable(b):
            differences.append(f"{key}: {_side(kwargs_a, key, a)} vs {_side(kwargs_b, key, b)}")
    return differences


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _resenc_l_architecture() -> dict[str, Any]:
    return {"network_class_name": RESENC_CLASS_NAME, "arch_kwargs": _plain(NNSSL_RESENC_L_KWARGS), "_kw_requires_import": list(KW_REQUIRES_IMPORT)}


def _architecture_entry(value: Mapping[str, Any]) -> dict[str, Any]:
    """``{"network_class_name", "arch_kwargs"}`` of any description :func:`check_architecture_matches` takes."""
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an architecture description (a dict), got {type(value).__name__}")
    if "family" in value:
        return _record_architecture(value)
    if "architecture_plans" in value:
        return architecture_of_nnssl(value["architecture_plans"])
    if "arch_class_name" in value:
        return architecture_of_nnssl(value)
    if "network_class_name" in value:
        name = value["network_class_name"]
        if name == RESENC_L_NAME or (name == DYNAMIC_RESENC_NAME and value.get("arch_kwargs")):
            return architecture_of_nnssl({**value, "arch_class_name": name})
        if not isinstance(value.get("arch_kwargs"), Mapping):
            raise ValueError(f"architecture {name!r} has no arch_kwargs")
        return {"network_class_name": name, "arch_kwargs": dict(value["arch_kwargs"])}
    if isinstance(value.get("architecture"), Mapping):
        return _architecture_entry(value["architecture"])
    raise ValueError(f"not an architecture description (entries: {sorted(map(str, value))[:8]})")


def _resenc_defaults() -> dict[str, Any]:
    """DNA's defaults of ResidualEncoderUNet's kwargs (what a plans entry that leaves one out gets)."""
    parameters = inspect.signature(ResidualEncoderUNet.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _expanded(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Per-stage kwargs as DNA expands them: an int for every stage (``n_blocks_per_stage=2``), an int for every axis
    (``strides=[1, 2, ...]``), as plain lists."""
    full = _plain(kwargs)
    n = full.get("n_stages")
    if not isinstance(n, int):
        return dict(full)
    for key, count in (("features_per_stage", n), ("n_blocks_per_stage", n), ("n_conv_per_stage_decoder", n - 1)):
        if isinstance(full.get(key), int):
            full[key] = [full[key]] * count
    for key in ("kernel_sizes", "strides"):
        value = full.get(key)
        if isinstance(value, int):
            value = [value] * n
        if isinstance(value, list):
            full[key] = [[v] * 3 if isinstance(v, int) else v for v in value]
    return dict(full)


def _comparable(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, str) and value in ALLOWED_CLASSES:
        return ALLOWED_CLASSES[value]
    return value


def _side(kwargs: Mapping[str, Any], key: str, value: Any) -> str:
    """One side of a difference: the value as written, or that it is left out (and DNA's default then)."""
    if key in kwargs:
        return _shown(kwargs[key])
    return "absent" if value is _ABSENT else f"absent (DNA default {_shown(value)})"


def _shown(value: Any) -> str:
    if isinstance(value, type):
        return f"{value.__module__}.{value.__name__}"
    return _short(_plain(value))
