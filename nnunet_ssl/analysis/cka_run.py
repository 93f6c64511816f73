"""``nnunet-ssl cka``: how much of the pretrained encoder survives fine-tuning, layer by layer.

Both encoders see the same preprocessed patches in minibatches; each layer's activations become a
Gram matrix per minibatch and :class:`MinibatchCKA` accumulates unbiased HSIC over minibatches.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ssl.analysis.cka.compare import MinibatchCKA
from nnunet_ssl.analysis.cka.gather import (
    CasePreprocessor,
    FinetunedFold,
    batch_sizes,
    check_same_architecture,
    encoder_layer_names,
    iter_case_patches,
    iter_minibatches,
    layer_grams,
    list_raw_cases,
    load_finetuned_fold,
    load_pretrained_encoder,
    network_plans,
    select_layers,
    stage_layers,
)
from nnunet_ssl.analysis.plots import plot_cka_heatmap, plot_cka_per_layer
from nnunet_ssl.io import atomic_json_dump
from nnunet_ssl.networks.presets import get_preset

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
        return [(name, float(self.matrix[i, i])) for i, name in enumerate(self.layers)]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_cka(settings: CKASettings) -> CKAResult:
    """Load both encoders, preprocess ``settings.data`` as the fold did, accumulate minibatch CKA."""
    fold = load_finetuned_fold(Path(settings.finetuned), settings.checkpoint)
    pretrained = load_pretrained_encoder(Path(settings.pretrained), fold.encoder.in_channels)
    check_same_architecture(pretrained, fold, Path(settings.pretrained))
    layers = select_layers(encoder_layer_names(get_preset(fold.preset_name)), settings.layers)
    matrix, examples, batches, preprocess, cases = accumulate_cka(
        pretrained.encoder, fold.encoder, fold, Path(settings.data), layers, settings.patches_per_case,
        settings.batch_size, settings.seed, resolve_device(settings.device),
    )
    provenance = {
        "pretrained_source": pretrained.source,
        "finetuned_checkpoint": str(fold.checkpoint),
        "trainer": fold.trainer_name,
        "preset": fold.preset_name,
        "configuration": fold.configuration,
        "patch_size": list(preprocess.patch_size),
        "cases": [case.identifier for case in cases],
    }
    return CKAResult(layers, matrix, examples, batches, provenance)


def accumulate_cka(
    encoder_a: torch.nn.Module, encoder_b: torch.nn.Module, fold: FinetunedFold, data: Path, layers: list[str],
    patches_per_case: int, batch_size: int, seed: int, device: torch.device,
) -> tuple[np.ndarray, int, int, CasePreprocessor, list[Any]]:
    """Minibatch CKA of two encoders on the same patches of ``data``, preprocessed as ``fold`` was.

    Returns:
        (CKA matrix ``(len(layers), len(layers))``, examples, minibatches, preprocessor, cases).
    """
    channels = len(fold.dataset_json.get("channel_names") or fold.dataset_json.get("modality") or {})
    if channels != fold.encoder.in_channels:
        raise ValueError(f"{fold.checkpoint}: the network takes {fold.encoder.in_channels} channel(s), dataset.json lists {channels}")
    cases = list_raw_cases(data, fold.dataset_json["file_ending"], channels)
    preprocess = CasePreprocessor(network_plans(fold), fold.configuration, fold.dataset_json)
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


def cka_between_folds(
    fold_a: Path, fold_b: Path, data: Path, layers: list[str] | None = None, patches_per_case: int = 4,
    batch_size: int = 8, seed: int = 0, device: str = "cpu",
) -> CKAResult:
    """CKA between the encoders of two fine-tuned folds of one architecture (e.g. few-shot vs full data).

    Patches are preprocessed with ``fold_a``'s plans. ``layers`` default: one per stage (:func:`stage_layers`).

    Raises:
        ValueError: when the two folds use different presets.
    """
    a, b = load_finetuned_fold(fold_a), load_finetuned_fold(fold_b)
    if a.preset_name != b.preset_name:
        raise ValueError(f"{fold_a} ({a.preset_name}) and {fold_b} ({b.preset_name}) have different encoders")
    layers = layers or stage_layers(a.preset_name)
    matrix, examples, batches, preprocess, cases = accumulate_cka(
        a.encoder, b.encoder, a, data, layers, patches_per_case, batch_size, seed, resolve_device(device),
    )
    provenance = {"fold_a": str(a.checkpoint), "fold_b": str(b.checkpoint), "trainer": a.trainer_name,
                  "preset": a.preset_name, "patch_size": list(preprocess.patch_size),
                  "cases": [case.identifier for case in cases]}
    return CKAResult(layers, matrix, examples, batches, provenance)


def write_outputs(result: CKAResult, settings: CKASettings) -> list[Path]:
    """CSV tables, PNG figures and the settings with provenance, in ``settings.out``."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    per_layer = result.per_layer()
    paths = [
        _write_rows(out / "cka_per_layer.csv", ["layer", "cka"], [[n, f"{v:.6f}"] for n, v in per_layer]),
        _write_rows(
            out / "cka_matrix.csv",
            ["pretrained \\ fine-tuned", *result.layers],
            [[name, *(f"{v:.6f}" for v in row)] for name, row in zip(result.layers, result.matrix)],
        ),
    ]
    title = f"{result.provenance['trainer']}: {result.examples} patches"
    paths.append(plot_cka_per_layer([n for n, _ in per_layer], [v for _, v in per_layer], out / "cka_per_layer.png", title))
    paths.append(plot_cka_heatmap(result.matrix, result.layers, result.layers, out / "cka_heatmap.png", title))
    summary = {
        "settings": asdict(settings),
        "examples": result.examples,
        "minibatches": result.minibatches,
        **result.provenance,
    }
    paths.append(atomic_json_dump(summary, out / "cka_settings.json"))
    return paths


def format_table(per_layer: list[tuple[str, float]]) -> str:
    """A two-column text table for the log."""
    width = max(len("layer"), *(len(name) for name, _ in per_layer))
    lines = [f"{'layer':{width}s}  CKA", "-" * (width + 8)]
    lines += [f"{name:{width}s}  {value:.4f}" for name, value in per_layer]
    return "\n".join(lines)


def _write_rows(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
