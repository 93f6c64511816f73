"""Few-shot and data-limited folds: read ``splits_manifest.json`` and summarise runs over seeds.

The manifest (written by ``nnunet-ssl split`` beside nnU-Net's ``splits_final.json``) lists the
appended folds: ``{"format": "nnunet-ssl-splits", "version": 1, "dataset": ..., "folds": [{"fold": 5,
"kind": "few_shot", "size": 5, "seed": 0, "train": [...], "val": [...]}, ...]}``. nnU-Net's own
folds are not listed.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nnunet_ssl.analysis.results import RunResult
from nnunet_ssl.analysis.stats import (
    OVERALL,
    Spread,
    performance_gap,
    spread,
    structure_means,
)
from nnunet_ssl.splits import FoldEntry, read_manifest


def manifest_by_fold(path: Path) -> dict[int, FoldEntry]:
    """fold -> manifest entry (see :mod:`nnunet_ssl.splits`); empty when the file does not exist.

    Raises:
        ValueError: for an unreadable file or another format or version.
    """
    return {entry.fold: entry for entry in read_manifest(path)}


@dataclass(frozen=True)
class FewShotRow:
    """One method at one (kind, size) for one structure (or :data:`OVERALL`).

    Attributes:
        seeds: Mean Dice of each complete seed's fold, by seed.
        missing: Folds of this group that are not complete, with the reason.
        stats: Mean and spread over seeds of the per-fold mean Dice.
        gap_pct: Performance gap of ``stats.mean`` vs the reference method at the same size.
        gap_vs_best_full_pct: Gap vs the best method's mean Dice on the ordinary (full) folds, the
            paper's few-to-many-shot gap; NaN when there are none.
    """

    kind: str
    size: int
    trainer: str
    structure: str
    seeds: dict[int, float]
    missing: dict[int, str]
    stats: Spread
    gap_pct: float
    gap_vs_best_full_pct: float


def fold_means(run: RunResult, structures: list[str]) -> dict[str, float]:
    """Mean Dice per structure and overall of one run."""
    return structure_means(run.dice, structures)


def few_shot_rows(
    runs: list[RunResult],
    manifest: Mapping[int, FoldEntry],
    trainers: list[str],
    reference: str,
    structures: list[str],
    best_full: Mapping[str, float] | None = None,
) -> list[FewShotRow]:
    """Group the manifest's folds by (kind, size) and summarise each method over seeds.

    Only complete runs count; a listed fold that is not complete appears in ``missing``.
    """
    by_key = {(r.trainer, r.fold): r for r in runs}
    groups: dict[tuple[str, int], list[FoldEntry]] = {}
    for entry in sorted(manifest.values(), key=lambda f: (f.kind, f.size, f.seed, f.fold)):
        groups.setdefault((entry.kind, entry.size), []).append(entry)
    rows: list[FewShotRow] = []
    for (kind, size), entries in groups.items():
        per_trainer: dict[str, tuple[dict[int, dict[str, float]], dict[int, str]]] = {}
        for trainer in trainers:
            seeds, missing = {}, {}
            for entry in entries:
                run = by_key.get((trainer, entry.fold))
                if run is not None and run.complete:
                    seeds[entry.seed] = fold_means(run, structures)
                else:
                    missing[entry.fold] = "not run" if run is None else f"{run.status}: {run.reason}"
            per_trainer[trainer] = (seeds, missing)
        for key in [*structures, OVERALL]:
            reference_mean = spread([m[key] for m in per_trainer[reference][0].values()]).mean
            for trainer in trainers:
                seeds, missing = per_trainer[trainer]
                values = {seed: means[key] for seed, means in seeds.items()}
                stats = spread(list(values.values()))
                best = (best_full or {}).get(key, float("nan"))
                rows.append(FewShotRow(
                    kind, size, trainer, key, values, missing, stats,
                    performance_gap(stats.mean, reference_mean), performance_gap(stats.mean, best),
                ))
    return rows
