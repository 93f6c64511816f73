"""Run: one ``nnunet-ssl cka``, from its settings to its files; the only module that knows the order.

How much of the pretrained encoder survives fine-tuning, layer by layer:

1. :mod:`.gather` loads both encoders, picks the layers, cuts the same preprocessed patches of the
   raw images for both and turns each layer's activations into a Gram matrix per minibatch;
2. :mod:`.compare` accumulates the unbiased HSIC of those Gram matrices over minibatches
   (:class:`~nnunet_ssl.analysis.cka.compare.MinibatchCKA`) into a CKA matrix;
3. :mod:`.render` writes the matrix as CSV tables, PNG figures and the settings with provenance.

:func:`run_cka` and :func:`write_outputs` are the command (pretrained vs fine-tuned);
:func:`cka_between_folds` compares two fine-tuned folds (the experiment report's few-shot vs full data).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nnunet_ssl.analysis.cka.compare import MinibatchCKA, same_layer_cka
from nnunet_ssl.analysis.cka.gather import (
    CasePreprocessor,
    FinetunedFold,
    RawCase,
    batch_sizes,
    check_same_architecture,
    encoder_in_channels,
    encoder_layer_names,
    fold_cases,
    iter_case_patches,
    iter_minibatches,
    layer_grams,
    load_finetuned_fold,
    load_pretrained_encoder,
    record_differences,
    select_layers,
    stage_layers,
)
from nnunet_ssl.analysis.cka.render import write_figures, write_summary, write_tables

logger = logging.getLogger(__name__)

CHECKPOINTS = ("final", "best")


@dataclass(frozen=True)
class CKASettings:
    """What ``nnunet-ssl cka`` compares and on which inputs (saved as ``cka_settings.json``)."""

    pretrained: str
    finetuned: str
    data: str
    out: str
    layers: str = "all"
    checkpoint: str = "final"
    patches_per_case: int = 4
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"--checkpoint must be one of {CHECKPOINTS}, got {self.checkpoint!r}")
        if self.patches_per_case < 1:
            raise ValueError(f"--patches-per-case must be >= 1, got {self.patches_per_case}")


@dataclass(frozen=True)
class CKAResult:
    """CKA of every pretrained layer (rows) against every fine-tuned layer (columns)."""

    layers: list[str]
    matrix: np.ndarray
    examples: int
    minibatches: int
    provenance: dict[str, Any]

    def per_layer(self) -> list[tuple[str, float]]:
        """``(layer, CKA(pretrained layer, same fine-tuned layer))`` in forward order."""
        return same_layer_cka(self.layers, self.matrix)


def run_cka(settings: CKASettings) -> CKAResult:
    """Load both encoders, preprocess ``settings.data`` as the fold did, accumulate minibatch CKA."""
    fold = load_finetuned_fold(Path(settings.finetuned), settings.checkpoint)
    pretrained = load_pretrained_encoder(Path(settings.pretrained), encoder_in_channels(fold.encoder))
    check_same_architecture(pretrained, fold, Path(settings.pretrained))
    layers = select_layers(encoder_layer_names(fold.encoder), settings.layers)
    matrix, examples, batches, preprocess, cases = accumulate_cka(
        pretrained.encoder, fold.encoder, fold, Path(settings.data), layers, settings.patches_per_case,
        settings.batch_size, settings.seed, resolve_device(settings.device),
    )
    provenance = {
        "pretrained_source": pretrained.source,
        "finetuned_checkpoint": str(fold.checkpoint),
        "trainer": fold.trainer_name,
        "family": fold.family.name,
        "preset": fold.preset_name,
        "configuration": fold.configuration,
        "patch_size": list(preprocess.patch_size),
        "cases": [case.identifier for case in cases],
    }
    return CKAResult(layers, matrix, examples, batches, provenance)


def cka_between_folds(
    fold_a: Path, fold_b: Path, data: Path, layers: list[str] | None = None, patches_per_case: int = 4,
    batch_size: int = 8, seed: int = 0, device: str = "cpu",
) -> CKAResult:
    """CKA between the encoders of two fine-tuned folds of one architecture (e.g. few-shot vs full data).

    Patches are preprocessed with ``fold_a``'s plans. ``layers`` default: one per stage (:func:`stage_layers`).

    Raises:
        ValueError: when the two folds' networks differ in architecture (:func:`record_differences`), naming both.
    """
    a, b = load_finetuned_fold(fold_a), load_finetuned_fold(fold_b)
    differences = record_differences(a.record, b.record)
    if differences:
        raise ValueError(
            f"{fold_a} ({a.family.describe(a.record)}) and {fold_b} ({b.family.describe(b.record)}) have different "
            f"encoders: {'; '.join(differences[:4])}"
        )
    layers = layers or stage_layers(a.encoder)
    matrix, examples, batches, preprocess, cases = accumulate_cka(
        a.encoder, b.encoder, a, data, layers, patches_per_case, batch_size, seed, resolve_device(device),
    )
    provenance = {"fold_a": str(a.checkpoint), "fold_b": str(b.checkpoint), "trainer": a.trainer_name,
                  "family": a.family.name, "preset": a.preset_name, "patch_size": list(preprocess.patch_size),
                  "cases": [case.identifier for case in cases]}
    return CKAResult(layers, matrix, examples, batches, provenance)


def accumulate_cka(
    encoder_a: nn.Module, encoder_b: nn.Module, fold: FinetunedFold, data: Path, layers: list[str],
    patches_per_case: int, batch_size: int, seed: int, device: torch.device,
) -> tuple[np.ndarray, int, int, CasePreprocessor, list[RawCase]]:
    """Minibatch CKA of two encoders on the same patches of ``data``, preprocessed as ``fold`` was.

    Returns:
        (CKA matrix ``(len(layers), len(layers))``, examples, minibatches, preprocessor, cases).
    """
    cases, preprocess = fold_cases(fold, data)
    sizes = batch_sizes(len(cases) * patches_per_case, batch_size)
    logger.info(
        "CKA of %d layer(s): %d case(s) x %d patch(es) of %s in %d minibatch(es)",
        len(layers), len(cases), patches_per_case, preprocess.patch_size, len(sizes),
    )
    encoder_a, encoder_b = encoder_a.to(device), encoder_b.to(device)
    accumulator = MinibatchCKA(layers, layers)
    batches = iter_minibatches(iter_case_patches(cases, preprocess, patches_per_case, seed), sizes)
    for images in tqdm(batches, total=len(sizes), desc="CKA minibatches", unit="batch", disable=None):
        images = images.to(device)
        accumulator.update(layer_grams(encoder_a, images, layers), layer_grams(encoder_b, images, layers))
    return accumulator.compute(), accumulator.examples, accumulator.batches, preprocess, cases


def write_outputs(result: CKAResult, settings: CKASettings) -> list[Path]:
    """CSV tables, PNG figures and the settings with provenance, in ``settings.out`` (:mod:`.render`)."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{result.provenance['trainer']}: {result.examples} patches"
    summary = {
        "settings": asdict(settings),
        "examples": result.examples,
        "minibatches": result.minibatches,
        **result.provenance,
    }
    return [
        *write_tables(out, result.layers, result.matrix),
        *write_figures(out, result.layers, result.matrix, title),
        write_summary(out, summary),
    ]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
