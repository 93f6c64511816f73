"""Gather: the two encoders, their layers, the patches both see, and each layer's Gram matrix per minibatch.

In the order of a run:

1. **Encoders.** The fine-tuned one comes from an nnU-Net fold (``fold_N/checkpoint_{final,best}.pth``,
   read by the safe checkpoint loader, with the results folder's plans.json and dataset.json); the
   pretrained one from an ``nnunet-ssl export`` weights file or a pretraining run folder. Both must
   be of one preset, so that their layers correspond.
2. **Layers**, in forward order: ``embed`` (the patch-embedding convolution's output) and every Swin
   block's output, ``stage{s}.block{b}`` (1-based). The ``smit`` preset (depths 2-2-8-2) has 1 + 14.
3. **Patches.** Raw images are preprocessed as the fine-tuned network saw them, by nnU-Net's own
   preprocessor (``configuration_manager.preprocessor_class().run_case``, as ``nnUNetPredictor`` does)
   built from the fold's plans and dataset.json. Volumes smaller than the patch are padded with
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
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_ssl.analysis.cka.compare import MIN_EXAMPLES, gram
from nnunet_ssl.checkpoints import load_nnunet_checkpoint
from nnunet_ssl.networks.presets import SwinPreset, get_preset
from nnunet_ssl.networks.segmentation import check_input
from nnunet_ssl.networks.swin import SwinEncoder, SwinStage
from nnunet_ssl.weights.format import (
    PRETRAINING_ONLY_KEYS,
    STEM_KEY,
    WeightsError,
    adapt_stem,
    load_weights_file,
)

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
#: Prefixes nnU-Net leaves on saved keys when the network was wrapped by DDP or torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EMBED_LAYER = "embed"


# ---------------------------------------------------------------- 1. encoders


@dataclass(frozen=True)
class FinetunedFold:
    """A trained nnU-Net fold of an nnunet-ssl trainer."""

    encoder: SwinEncoder
    preset_name: str
    trainer_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    checkpoint: Path


@dataclass(frozen=True)
class PretrainedEncoder:
    """A pretrained encoder and where it came from."""

    encoder: SwinEncoder
    preset_name: str
    source: str


def load_finetuned_fold(fold_dir: Path, checkpoint: str = "final") -> FinetunedFold:
    """Read ``fold_N/checkpoint_{final,best}.pth`` and the results folder's plans.json and dataset.json.

    The preset comes from the trainer class named in the checkpoint, found as ``nnUNetv2_train`` finds
    it (a named trainer, else one in ``nnUNet_extTrainer``'s folders).
    """
    from nnunet_ssl.trainers.named import UnknownTrainerError, find_trainer

    fold_dir = Path(fold_dir)
    path = fold_dir / f"checkpoint_{checkpoint}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an nnU-Net fold folder (.../fold_N) and --checkpoint")
    payload = load_nnunet_checkpoint(path)  # tensors, plain values and numpy scalars only; nothing is run
    trainer_name = payload.get("trainer_name")
    if not isinstance(trainer_name, str):
        raise WeightsError(f"{path}: trainer {trainer_name!r} is not an nnunet-ssl trainer (`nnunet-ssl trainers`)")
    try:
        trainer_class = find_trainer(trainer_name)
    except UnknownTrainerError as error:
        raise WeightsError(f"{path}: {error}") from error
    weights, init_args = payload.get("network_weights"), payload.get("init_args")
    if not isinstance(weights, Mapping) or not isinstance(init_args, Mapping) \
            or not isinstance(init_args.get("configuration"), str):
        raise WeightsError(f"{path}: not an nnU-Net checkpoint (no network_weights or init_args.configuration)")
    preset_name = trainer_class.preset_name
    state = strip_wrapper_prefixes(weights)
    plans, dataset_json = (_read_json(fold_dir.parent / name) for name in ("plans.json", "dataset.json"))
    return FinetunedFold(
        encoder=build_encoder(encoder_part(state, path), preset_name, path),
        preset_name=preset_name,
        trainer_name=trainer_name,
        configuration=init_args["configuration"],
        plans=plans,
        dataset_json=dataset_json,
        checkpoint=path,
    )


def load_pretrained_encoder(path: Path, in_channels: int, source: str = "default") -> PretrainedEncoder:
    """Encoder of an ``nnunet-ssl export`` weights file, or of a pretraining run folder.

    A run's encoder gets its stem adapted to ``in_channels`` exactly as ``nnunet-ssl export`` would;
    an export file must already have ``in_channels``.
    """
    path = Path(path)
    if path.is_dir():
        from nnunet_ssl.weights.export import load_run_encoder

        state, config, checkpoint_path = load_run_encoder(path, source)
        state = dict(state)
        state[STEM_KEY], adaptation = adapt_stem(state[STEM_KEY], in_channels)
        if adaptation != "none":
            logger.info("%s: %s", path, adaptation)
        return PretrainedEncoder(build_encoder(state, config.preset, path), config.preset, f"{checkpoint_path} ({source})")
    weights, metadata = load_weights_file(path)
    preset_name = metadata.get("preset")
    if not preset_name:
        raise WeightsError(f"{path}: no 'preset' in the metadata; write the file with `nnunet-ssl export`")
    encoder = build_encoder(encoder_part(strip_wrapper_prefixes(weights), path), preset_name, path)
    if encoder.in_channels != in_channels:
        raise WeightsError(
            f"{path}: the encoder takes {encoder.in_channels} input channel(s) but the fine-tuned network "
            f"{in_channels}; export the weights for the fine-tuned dataset"
        )
    return PretrainedEncoder(encoder, preset_name, str(path))


def check_same_architecture(pretrained: PretrainedEncoder, finetuned: FinetunedFold, pretrained_path: Path) -> None:
    """Refuse to compare encoders of different presets (their layers do not correspond)."""
    if pretrained.preset_name != finetuned.preset_name:
        raise WeightsError(
            f"{pretrained_path} holds a {pretrained.preset_name!r} encoder but {finetuned.checkpoint} was trained "
            f"by {finetuned.trainer_name} with preset {finetuned.preset_name!r}; compare encoders of one preset"
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
        raise WeightsError(f"{origin}: no 'encoder.*' weights; is this an nnunet-ssl network?")
    return encoder


def build_encoder(state: Mapping[str, Tensor], preset_name: str, origin: Path) -> SwinEncoder:
    """A :class:`SwinEncoder` of ``preset_name`` holding ``state``, in eval mode.

    Raises:
        WeightsError: naming ``origin`` when keys or shapes do not fit the preset.
    """
    state = {k: v for k, v in state.items() if k not in PRETRAINING_ONLY_KEYS}
    if STEM_KEY not in state:
        raise WeightsError(f"{origin}: the encoder weights have no {STEM_KEY!r}")
    encoder = SwinEncoder(get_preset(preset_name), in_channels=state[STEM_KEY].shape[1])
    expected = encoder.state_dict()
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise WeightsError(
            f"{origin}: encoder weights do not fit preset {preset_name!r}: shapes {wrong[:3]}, "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    encoder.load_state_dict(state)
    return encoder.eval()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (nnU-Net writes it beside the fold_N folders)")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- 2. layers


def encoder_layer_names(preset: SwinPreset) -> list[str]:
    """``["embed", "stage1.block1", ...]`` in forward order: ``1 + sum(preset.depths)`` names."""
    blocks = [f"stage{s + 1}.block{b + 1}" for s, depth in enumerate(preset.depths) for b in range(depth)]
    return [EMBED_LAYER, *blocks]


def select_layers(available: Sequence[str], spec: str) -> list[str]:
    """Parse ``"all"`` or a comma-separated list of layer names, keeping forward order.

    Raises:
        ValueError: naming unknown layers and listing the valid ones.
    """
    if spec.strip() == "all":
        return list(available)
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in available]
    if unknown or not wanted:
        raise ValueError(f"unknown layer(s) {unknown or spec!r}; choose 'all' or names from {list(available)}")
    return [name for name in available if name in wanted]


def stage_layers(preset_name: str) -> list[str]:
    """The last block of every encoder stage (``stage1.block2``, ...): one layer per stage."""
    names = encoder_layer_names(get_preset(preset_name))
    last: dict[str, str] = {}
    for name in names:
        if name.startswith("stage"):
            last[name.split(".")[0]] = name
    return list(last.values())


def encoder_layer_modules(encoder: SwinEncoder) -> dict[str, nn.Module]:
    """The module whose output is each named layer, in forward order."""
    modules: dict[str, nn.Module] = {EMBED_LAYER: encoder.patch_embed}
    for s, stage in enumerate(encoder.stages):
        for b, block in enumerate(cast(SwinStage, stage).blocks):
            modules[f"stage{s + 1}.block{b + 1}"] = block
    return modules


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
    if channels != fold.encoder.in_channels:
        raise ValueError(f"{fold.checkpoint}: the network takes {fold.encoder.in_channels} channel(s), dataset.json lists {channels}")
    cases = list_raw_cases(data, fold.dataset_json["file_ending"], channels)
    return cases, CasePreprocessor(network_plans(fold), fold.configuration, fold.dataset_json)


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


def network_plans(fold: FinetunedFold) -> dict[str, Any]:
    """The plans as the trainer used them (its Swin patch-size fitting applied; a no-op on saved plans)."""
    from nnunet_ssl.trainers.named import find_trainer

    plans = copy.deepcopy(fold.plans)
    find_trainer(fold.trainer_name).fit_plans_to_swin(plans, fold.configuration)
    return plans


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
def layer_grams(encoder: SwinEncoder, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Run ``encoder`` on ``images`` and return each layer's ``(B, B)`` float64 Gram matrix.

    Args:
        encoder: The encoder, in eval mode.
        images: ``(B, C, D, H, W)`` with every spatial axis a multiple of 32 (at least 64).
        layers: Names from :func:`encoder_layer_names`.

    Returns:
        ``{layer: K}`` with ``K = X X^T`` of the flattened ``(B, -1)`` layer output.
    """
    check_input(images, encoder.in_channels)
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
