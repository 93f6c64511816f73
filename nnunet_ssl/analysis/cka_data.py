"""CKA inputs: raw images preprocessed as the fine-tuned network saw them, cut into fixed, seeded patches.

Preprocessing is nnU-Net's own (``configuration_manager.preprocessor_class().run_case``, as
``nnUNetPredictor`` does), built from the fold's ``plans.json`` and ``dataset.json``. Volumes smaller
than the patch are padded with zeros around the centre as nnU-Net's sliding-window inference does
(``pad_nd_image``). Patches are seeded uniform random crops: every case gives the same patches for a
given seed, whatever the other cases are, and the two networks see identical tensors.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nnunet_ssl.analysis.cka.compare import MIN_EXAMPLES


@dataclass(frozen=True)
class RawCase:
    """One case of an nnU-Net raw images folder: ``{identifier}_{channel:04d}{file_ending}`` files."""

    identifier: str
    files: tuple[Path, ...]


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
        return tuple(self.configuration_manager.patch_size)  # type: ignore[return-value]

    def __call__(self, case: RawCase) -> np.ndarray:
        """Preprocessed float32 volume ``(C, D, H, W)``."""
        data, _, _ = self.preprocessor.run_case(
            [str(f) for f in case.files], None, self.plans_manager, self.configuration_manager, self.dataset_json
        )
        return np.asarray(data, dtype=np.float32)


def pad_to_patch(volume: Tensor, patch: Sequence[int]) -> Tensor:
    """Zero-pad ``(C, D, H, W)`` around the centre to at least ``patch`` (nnU-Net's inference padding)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    return pad_nd_image(volume, tuple(patch), "constant", {"value": 0})


def patch_starts(shape: Sequence[int], patch: Sequence[int], count: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``count`` uniform random corners of ``patch``-sized crops inside a volume of ``shape`` (>= patch)."""
    if any(s < p for s, p in zip(shape, patch)):
        raise ValueError(f"volume {tuple(shape)} is smaller than the patch {tuple(patch)}; pad it first")
    highs = [s - p + 1 for s, p in zip(shape, patch)]
    return [tuple(int(rng.integers(0, h)) for h in highs) for _ in range(count)]


def case_patches(volume: np.ndarray, patch: Sequence[int], count: int, rng: np.random.Generator) -> Tensor:
    """``(count, C, *patch)`` seeded crops of a preprocessed ``(C, D, H, W)`` volume."""
    padded = pad_to_patch(torch.from_numpy(volume), patch)
    crops = []
    for start in patch_starts(padded.shape[1:], patch, count, rng):
        slices = tuple(slice(s, s + p) for s, p in zip(start, patch))
        crops.append(padded[(slice(None), *slices)])
    return torch.stack(crops)


def iter_case_patches(
    cases: Sequence[RawCase], preprocess: CasePreprocessor, count: int, seed: int
) -> Iterator[Tensor]:
    """Patches of each case in turn, ``(count, C, *patch)``; case ``i`` uses the seed ``(seed, i)``."""
    for index, case in enumerate(cases):
        rng = np.random.default_rng([seed, index])
        yield case_patches(preprocess(case), preprocess.patch_size, count, rng)


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
