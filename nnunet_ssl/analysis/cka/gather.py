"""Gather: the two encoders, their layers, the patches both see, and each layer's Gram matrix per minibatch.

In the order of a run:

1. **Encoders.** The fine-tuned one comes from an nnU-Net fold (``fold_N/checkpoint_{final,best}.pth``,
   read by the safe checkpoint loader, with the results folder's plans.json and dataset.json); the
   pretrained one from an ``nnunet-ssl export`` weights file or a pretraining run folder. Each is
   described by its network record (:mod:`nnunet_ssl.networks.family`) and built by its family:
   a weights file names its record, a run its preset, and a fold's trainer either builds a preset
   whatever the plans say (the Swin trainers: ``preset_name``) or lets nnU-Net build the plans'
   ``architecture`` (any other trainer, nnU-Net's own ``nnUNetTrainer`` with ResEnc plans included).
   Both must be of one architecture (:func:`record_differences`), so that their layers correspond.
2. **Layers**, in forward order (:mod:`.layers`, one scheme per family): the input projection's
   output (``embed`` for Swin, ``stem`` for ResEnc), then every block's output ``stage{s}.block{b}``
   (1-based).
3. **Patches.** Raw images are preprocessed as the fine-tuned network saw them, by nnU-Net's own
   preprocessor (``configuration_manager.preprocessor_class().run_case``, as ``nnUNetPredictor`` does)
   built from the fold's plans (with the trainer's patch fitting, for the trainers that fit one) and
   dataset.json. Volumes smaller than the patch are padded with
   zeros around the centre as nnU-Net's sliding-window inference does (``pad_nd_image``). Patches
   are seeded uniform random crops: every case gives the same patches for a given seed, whatever
   the other cases are, and the two networks see identical tensors. They are regrouped into
   minibatches of at least 4 (the unbiased HSIC needs ``n >= 4``).
4. **Features.** Forward hooks reduce each layer's activation to its ``(B, B)`` Gram matrix at once
   (:func:`~nnunet_ssl.analysis.cka.compare.gram`, in float64 chunks). Each example's feature map is
   flattened to one vector, as in Kornblith et al. 2019 and Nguyen et al. 2021: spatial pooling
   would discard where a feature fires, which is what a segmentation encoder encodes. Flattening is
   affordable because at most one layer's activation is alive at a time, so memory is bounded by
   the minibatch, not by the data set.
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_ssl.analysis.cka.compare import MIN_EXAMPLES, gram
from nnunet_ssl.analysis.cka.layers import (  # noqa: F401 (the layer functions: re-exported, gather's step 2)
    check_encoder_input,
    encoder_in_channels,
    encoder_layer_modules,
    encoder_layer_names,
    select_layers,
    stage_layers,
)
from nnunet_ssl.checkpoints import load_nnunet_checkpoint
from nnunet_ssl.networks.family import FAMILIES, NetworkFamily, family_of, family_of_preset
from nnunet_ssl.weights.format import PRETRAINING_ONLY_KEYS, WeightsError, adapt_stem, load_weights_file, weights_family

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
#: Prefixes nnU-Net leaves on saved keys when the network was wrapped by DDP or torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------- 1. encoders


@dataclass(frozen=True)
class FinetunedFold:
    """A trained nnU-Net fold: its encoder, what network it is, and what it was trained on.

    Attributes:
        encoder: The fold's encoder (its family's encoder class), in eval mode.
        record: The network record (:mod:`nnunet_ssl.networks.family`): ``{"family", "preset", ...}``.
        trainer_name: The trainer named in the checkpoint.
        configuration: The nnU-Net configuration, e.g. ``"3d_fullres"``.
        plans: The plans as the network used them (the trainer's patch fitting applied, if it has one).
        dataset_json: The results folder's dataset.json.
        checkpoint: The checkpoint file read.
    """

    encoder: nn.Module
    record: dict[str, Any]
    trainer_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    checkpoint: Path

    @property
    def preset_name(self) -> str:
        """The record's preset, ``""`` for a network of a topology no preset has."""
        return str(self.record.get("preset") or "")

    @property
    def family(self) -> NetworkFamily:
        """The record's network family."""
        return family_of(self.record)


@dataclass(frozen=True)
class PretrainedEncoder:
    """A pretrained encoder, its network record and where it came from."""

    encoder: nn.Module
    record: dict[str, Any]
    source: str

    @property
    def preset_name(self) -> str:
        """The record's preset, ``""`` for a network of a topology no preset has."""
        return str(self.record.get("preset") or "")


def load_finetuned_fold(fold_dir: Path, checkpoint: str = "final") -> FinetunedFold:
    """Read ``fold_N/checkpoint_{final,best}.pth`` and the results folder's plans.json and dataset.json.

    The network is the one the checkpoint's trainer built (:func:`fold_network`): the preset of an
    nnunet-ssl Swin trainer, else the plans' architecture.
    """
    fold_dir = Path(fold_dir)
    path = fold_dir / f"checkpoint_{checkpoint}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an nnU-Net fold folder (.../fold_N) and --checkpoint")
    payload = load_nnunet_checkpoint(path)  # tensors, plain values and numpy scalars only; nothing is run
    trainer_name = payload.get("trainer_name")
    if not isinstance(trainer_name, str):
        raise WeightsError(f"{path}: trainer {trainer_name!r} is not a trainer name; is this an nnU-Net checkpoint?")
    weights, init_args = payload.get("network_weights"), payload.get("init_args")
    if not isinstance(weights, Mapping) or not isinstance(init_args, Mapping) \
            or not isinstance(init_args.get("configuration"), str):
        raise WeightsError(f"{path}: not an nnU-Net checkpoint (no network_weights or init_args.configuration)")
    configuration = init_args["configuration"]
    plans, dataset_json = (_read_json(fold_dir.parent / name) for name in ("plans.json", "dataset.json"))
    record, plans = fold_network(trainer_name, plans, configuration, fold_dir.parent / "plans.json")
    return FinetunedFold(
        encoder=build_encoder(encoder_part(strip_wrapper_prefixes(weights), path), record, path),
        record=record,
        trainer_name=trainer_name,
        configuration=configuration,
        plans=plans,
        dataset_json=dataset_json,
        checkpoint=path,
    )


def fold_network(
    trainer_name: str, plans: Mapping[str, Any], configuration: str, plans_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The network record of a fold and its plans as the trainer used them.

    A trainer of a preset whose family ignores the plans (the Swin trainers, found as ``nnUNetv2_train``
    finds them: a named trainer, else one in ``nnUNet_extTrainer``'s folders) built that preset, on
    the plans it fitted (its ``fit_plans_to_swin``; a no-op on saved plans). Any other trainer,
    nnU-Net's own included, let nnU-Net build the configuration's ``architecture`` (:func:`plans_record`).

    Raises:
        WeightsError: naming ``plans_path`` when the plans' network is of no family nnunet-ssl knows.
    """
    fitted: dict[str, Any] = copy.deepcopy(dict(plans))
    trainer_class = _swin_trainer_class(trainer_name)
    preset = getattr(trainer_class, "preset_name", None)
    if isinstance(preset, str) and preset and not family_of_preset(preset).built_from_plans:
        fit = getattr(trainer_class, "fit_plans_to_swin", None)
        if fit is not None:
            fit(fitted, configuration)
        return family_of_preset(preset).record(preset), fitted
    return plans_record(fitted, configuration, plans_path, trainer_name), fitted


def _swin_trainer_class(trainer_name: str) -> type | None:
    """The nnunet-ssl Swin trainer of that name; None for any other trainer (nnU-Net's, a ResEnc one, unknown)."""
    from nnunet_ssl.trainers.named import UnknownTrainerError, find_trainer

    try:
        return find_trainer(trainer_name)
    except UnknownTrainerError:
        return None


def plans_record(
    plans: Mapping[str, Any], configuration: str, plans_path: Path, trainer_name: str = "the trainer"
) -> dict[str, Any]:
    """The network record of the network nnU-Net builds from a configuration's ``architecture``.

    The family is the one, among those whose networks trainers build from the plans, whose network
    class the architecture names; the preset is the one whose architecture the family finds no
    difference with, ``""`` when none has it. Whether the family can build it is for
    :func:`build_encoder` to say.

    Raises:
        WeightsError: naming ``plans_path`` when the configuration is missing, or names a network of no
            family nnunet-ssl knows.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:  # PlansManager resolves inherits_from and nnU-Net's older plans format
        architecture = dict(PlansManager(dict(plans)).get_configuration(configuration).configuration["architecture"])
        class_name = str(architecture["network_class_name"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise WeightsError(f"{plans_path}: no network architecture for configuration {configuration!r} ({error!r})") from None
    short_name = class_name.rsplit(".", 1)[-1]
    families = [f for f in FAMILIES.values() if f.built_from_plans and f.network_class.__name__ == short_name]
    if not families:
        known = ", ".join(f"{f.name} ({f.network_class.__name__})" for f in FAMILIES.values() if f.built_from_plans)
        raise WeightsError(
            f"{plans_path}: {trainer_name} builds the {configuration} network from the plans, a {class_name}, "
            f"which is of no network family nnunet-ssl knows (from plans it knows {known}; Swin networks come from "
            "the nnunet-ssl Swin trainers: is nnUNet_extTrainer set for a trainer of your own?)"
        )
    family = families[0]
    preset = next((name for name in family.presets if not family.plans_differences(family.record(name), architecture)), "")
    return {"family": family.name, "preset": preset, "architecture": architecture}


def load_pretrained_encoder(path: Path, in_channels: int, source: str = "default") -> PretrainedEncoder:
    """Encoder of an ``nnunet-ssl export`` weights file, or of a pretraining run folder.

    A run's encoder gets its stem adapted to ``in_channels`` exactly as ``nnunet-ssl export`` would;
    an export file must already have ``in_channels``.
    """
    path = Path(path)
    if path.is_dir():
        from nnunet_ssl.weights.export import load_run_encoder

        state, run, checkpoint_path = load_run_encoder(path, source)
        try:
            run_family = family_of_preset(run.preset)
        except ValueError as error:
            raise WeightsError(f"{path}: {error}") from None
        state = dict(state)
        if run_family.stem_keys[0] in state:  # else build_encoder names the missing stem
            stem, adaptation = adapt_stem(state[run_family.stem_keys[0]], in_channels)
            state.update({key: stem for key in run_family.stem_keys if key in state})
            if adaptation != "none":
                logger.info("%s: %s", path, adaptation)
        run_record = run_family.record(run.preset)
        return PretrainedEncoder(build_encoder(state, run_record, path), run_record, f"{checkpoint_path} ({source})")
    weights, metadata = load_weights_file(path)
    family = weights_family(metadata, path)
    if family is None or not (metadata.get("preset") or metadata.get("architecture")):
        raise WeightsError(f"{path}: no 'preset' in the metadata; write the file with `nnunet-ssl export`")
    record: dict[str, Any] = {"family": family.name, "preset": str(metadata.get("preset") or "")}
    if metadata.get("architecture") is not None:
        record["architecture"] = metadata["architecture"]
    encoder = build_encoder(encoder_part(strip_wrapper_prefixes(weights), path), record, path)
    channels = encoder_in_channels(encoder)
    if channels != in_channels:
        raise WeightsError(
            f"{path}: the encoder takes {channels} input channel(s) but the fine-tuned network "
            f"{in_channels}; export the weights for the fine-tuned dataset"
        )
    return PretrainedEncoder(encoder, record, str(path))


def record_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """How two network records differ so that their layers do not correspond (empty when they are one network).

    Another family differs; a family whose networks are built from the plans compares architectures
    (:meth:`~nnunet_ssl.networks.family.NetworkFamily.plans_differences`: ``"key: file X, plans Y"``, ``a``
    being the file), any other compares presets.
    """
    family_a, family_b = family_of(a), family_of(b)
    if family_a is not family_b:
        return [f"family: {family_a.name} vs {family_b.name}"]
    if family_a.built_from_plans:
        architecture = b.get("architecture")
        if architecture is None:
            architecture = family_b.record(str(b.get("preset"))).get("architecture")
        return family_a.plans_differences(a, architecture)
    return [] if a.get("preset") == b.get("preset") else [f"preset: {a.get('preset')!r} vs {b.get('preset')!r}"]


def check_same_architecture(pretrained: PretrainedEncoder, finetuned: FinetunedFold, pretrained_path: Path) -> None:
    """Refuse to compare encoders of different architectures (their layers do not correspond), naming both."""
    differences = record_differences(pretrained.record, finetuned.record)
    if differences:
        raise WeightsError(
            f"{pretrained_path} holds a {family_of(pretrained.record).describe(pretrained.record)} encoder but "
            f"{finetuned.checkpoint} was trained by {finetuned.trainer_name} with a "
            f"{finetuned.family.describe(finetuned.record)} ({'; '.join(differences[:4])}); compare encoders of "
            "one architecture"
        )


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop leading ``module.`` / ``_orig_mod.`` (in any order and number) from every key."""
    stripped = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def encoder_part(state: Mapping[str, Tensor], origin: Path) -> dict[str, Tensor]:
    """The ``encoder.*`` entries of a full-network state dict, without the prefix."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise WeightsError(f"{origin}: no 'encoder.*' weights; is this an nnunet-ssl or nnU-Net network?")
    return encoder


def build_encoder(state: Mapping[str, Tensor], record: Mapping[str, Any], origin: Path) -> nn.Module:
    """The encoder of the network ``record`` describes, holding ``state``, in eval mode.

    The family builds the whole network (with the stem's input channels; decoder and heads are
    dropped) and the encoder is taken from it, so the encoder is exactly the fine-tuned network's.

    Raises:
        WeightsError: naming ``origin`` when keys or shapes do not fit the record.
    """
    family = family_of(record)
    state = {k: v for k, v in state.items() if k not in PRETRAINING_ONLY_KEYS}
    stem_key = family.stem_keys[0]
    if stem_key not in state:
        raise WeightsError(f"{origin}: the encoder weights have no {stem_key!r}; is this a {family.name} network?")
    try:
        with torch.random.fork_rng(devices=[]):
            encoder = family.encoder(family.build(record, family.in_channels(state), 1, False))
    except ValueError as error:
        raise WeightsError(f"{origin}: {error}") from None
    expected = encoder.state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise WeightsError(
            f"{origin}: encoder weights do not fit the {family.describe(record)}: shapes {wrong[:3]}, "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    encoder.load_state_dict(state)
    return encoder.eval()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (nnU-Net writes it beside the fold_N folders)")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- 2. layers: see .layers (one scheme per family)


# ---------------------------------------------------------------- 3. patches


@dataclass(frozen=True)
class RawCase:
    """One case of an nnU-Net raw images folder: ``{identifier}_{channel:04d}{file_ending}`` files."""

    identifier: str
    files: tuple[Path, ...]


class CasePreprocessor:
    """nnU-Net's preprocessor for one configuration of a plans dict.

    Args:
        plans: The plans the network was trained with (the results folder's plans.json).
        configuration: e.g. ``"3d_fullres"``.
        dataset_json: The results folder's dataset.json.
    """

    def __init__(self, plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any]) -> None:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.plans_manager = PlansManager(plans)
        self.configuration_manager = self.plans_manager.get_configuration(configuration)
        self.dataset_json = dataset_json
        self.preprocessor = self.configuration_manager.preprocessor_class(verbose=False)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The configuration's patch size ``(D, H, W)``."""
        return tuple(self.configuration_manager.patch_size)

    def __call__(self, case: RawCase) -> np.ndarray:
        """Preprocessed float32 volume ``(C, D, H, W)``."""
        data, _, _ = self.preprocessor.run_case(
            [str(f) for f in case.files], None, self.plans_manager, self.configuration_manager, self.dataset_json
        )
        return np.asarray(data, dtype=np.float32)


def fold_cases(fold: FinetunedFold, data: Path) -> tuple[list[RawCase], CasePreprocessor]:
    """The raw cases of ``data`` and the preprocessor that turns them into what ``fold`` was trained on.

    Raises:
        ValueError: when the network's input channels and dataset.json's channels differ.
        FileNotFoundError: when ``data`` holds no complete case (:func:`list_raw_cases`).
    """
    channels = len(fold.dataset_json.get("channel_names") or fold.dataset_json.get("modality") or {})
    network_channels = encoder_in_channels(fold.encoder)
    if channels != network_channels:
        raise ValueError(f"{fold.checkpoint}: the network takes {network_channels} channel(s), dataset.json lists {channels}")
    cases = list_raw_cases(data, fold.dataset_json["file_ending"], channels)
    return cases, CasePreprocessor(fold.plans, fold.configuration, fold.dataset_json)


def list_raw_cases(folder: Path, file_ending: str, num_channels: int) -> list[RawCase]:
    """Cases of ``folder`` in sorted order, each with all ``num_channels`` channel files.

    Raises:
        FileNotFoundError: when the folder has no ``*_0000{file_ending}`` image or a channel is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of raw images")
    first = f"_0000{file_ending}"
    identifiers = sorted(p.name[: -len(first)] for p in folder.iterdir() if p.name.endswith(first))
    if not identifiers:
        raise FileNotFoundError(f"{folder}: no images named CASE{first} (nnU-Net raw format, e.g. imagesTs)")
    cases = []
    for identifier in identifiers:
        files = tuple(folder / f"{identifier}_{c:04d}{file_ending}" for c in range(num_channels))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: case {identifier!r} lacks channel file(s) {missing}")
        cases.append(RawCase(identifier, files))
    return cases


def iter_case_patches(
    cases: Sequence[RawCase], preprocess: CasePreprocessor, count: int, seed: int
) -> Iterator[Tensor]:
    """Patches of each case in turn, ``(count, C, *patch)``; case ``i`` uses the seed ``(seed, i)``."""
    for index, case in enumerate(cases):
        rng = np.random.default_rng([seed, index])
        yield case_patches(preprocess(case), preprocess.patch_size, count, rng)


def case_patches(volume: np.ndarray, patch: Sequence[int], count: int, rng: np.random.Generator) -> Tensor:
    """``(count, C, *patch)`` seeded crops of a preprocessed ``(C, D, H, W)`` volume."""
    padded = pad_to_patch(torch.from_numpy(volume), patch)
    crops = []
    for start in patch_starts(padded.shape[1:], patch, count, rng):
        slices = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        crops.append(padded[(slice(None),) + slices])
    return torch.stack(crops)


def pad_to_patch(volume: Tensor, patch: Sequence[int]) -> Tensor:
    """Zero-pad ``(C, D, H, W)`` around the centre to at least ``patch`` (nnU-Net's inference padding)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    return pad_nd_image(volume, tuple(patch), "constant", {"value": 0})


def patch_starts(shape: Sequence[int], patch: Sequence[int], count: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``count`` uniform random corners of ``patch``-sized crops inside a volume of ``shape`` (>= patch)."""
    if any(s < p for s, p in zip(shape, patch, strict=True)):
        raise ValueError(f"volume {tuple(shape)} is smaller than the patch {tuple(patch)}; pad it first")
    highs = [s - p + 1 for s, p in zip(shape, patch, strict=True)]
    return [tuple(int(rng.integers(0, h)) for h in highs) for _ in range(count)]


def batch_sizes(total: int, batch_size: int) -> list[int]:
    """Split ``total`` examples into minibatches of ``batch_size``; a remainder under 4 joins the last one.

    Raises:
        ValueError: when ``batch_size < 4`` or there are fewer than 4 examples in all.
    """
    if batch_size < MIN_EXAMPLES:
        raise ValueError(f"--batch-size must be at least {MIN_EXAMPLES} (the unbiased HSIC needs n >= 4), got {batch_size}")
    if total < MIN_EXAMPLES:
        raise ValueError(f"only {total} patch(es) in all; CKA needs at least {MIN_EXAMPLES} (add cases or patches)")
    sizes = [batch_size] * (total // batch_size)
    remainder = total % batch_size
    if remainder >= MIN_EXAMPLES or not sizes:
        sizes.append(remainder)
    elif remainder:
        sizes[-1] += remainder
    return sizes


def iter_minibatches(patches: Iterable[Tensor], sizes: Sequence[int]) -> Iterator[Tensor]:
    """Regroup per-case patch tensors into minibatches of the given ``sizes`` (which sum to the total)."""
    pending: list[Tensor] = []
    held = 0
    sizes_left = list(sizes)
    for block in patches:
        for example in block:
            pending.append(example)
            held += 1
            if sizes_left and held == sizes_left[0]:
                yield torch.stack(pending)
                pending, held = [], 0
                sizes_left.pop(0)
    if pending or sizes_left:
        raise ValueError(f"minibatch sizes {list(sizes)} do not match the number of patches")


# ---------------------------------------------------------------- 4. features


@torch.no_grad()
def layer_grams(encoder: nn.Module, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Run ``encoder`` on ``images`` and return each layer's ``(B, B)`` float64 Gram matrix.

    Args:
        encoder: An encoder of a family in :data:`~nnunet_ssl.analysis.cka.layers.ENCODER_LAYERS`, in eval mode.
        images: ``(B, C, D, H, W)`` that the encoder takes (:func:`~nnunet_ssl.analysis.cka.layers.check_encoder_input`:
            Swin every axis a multiple of 32 and at least 64, ResEnc a multiple of its total stride).
        layers: Names from :func:`~nnunet_ssl.analysis.cka.layers.encoder_layer_names`.

    Returns:
        ``{layer: K}`` with ``K = X X^T`` of the flattened ``(B, -1)`` layer output.
    """
    check_encoder_input(encoder, images)
    modules = encoder_layer_modules(encoder)
    grams: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            grams[name] = gram(output)

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        encoder(images)
    finally:
        for handle in handles:
            handle.remove()
    return grams
