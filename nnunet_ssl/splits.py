"""Few-shot and data-limited folds appended to nnU-Net's ``splits_final.json``.

nnU-Net trains on any fold index below the length of ``splits_final.json``, so extra folds can be
appended after its five cross-validation folds. For each seed the training subsets are nested (the
5 cases are inside the 10, which are inside the 20) and every fold of a request shares one fixed
validation set. A manifest, ``splits_manifest.json`` beside the split file, maps each appended fold
to (kind, size, seed, cases) for the trainers (few-shot schedule) and the report (grouping).

Nothing is ever lost: existing folds are never rewritten or reordered, the split file is backed up
before it changes, and asking again for a fold that exists returns its index.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_ssl.case_ids import check_case_id, check_case_ids
from nnunet_ssl.io import default_mode
from nnunet_ssl.outputs import WriteError

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits_final.json"
MANIFEST_FILE = "splits_manifest.json"
MANIFEST_FORMAT = "nnunet-ssl-splits"
MANIFEST_VERSION = 1
KINDS = ("few_shot", "data_limited")
#: nnU-Net's seed and fold count for its default cross-validation split.
NNUNET_SPLIT_SEED = 12345
NNUNET_NUM_FOLDS = 5
#: Seed of the random draw of ``--val-cases`` (fixed, so every request of a dataset gets the same set).
VALIDATION_DRAW_SEED = 2024


class SplitError(ValueError):
    """A split request that cannot be honoured without losing or corrupting folds."""


class SplitWriteError(WriteError):
    """A :class:`WriteError` of the split files, all of which were left as they were."""

    def __str__(self) -> str:
        return f"{super().__str__()}; nothing was changed"


@dataclass(frozen=True)
class FoldEntry:
    """One appended fold, as listed in the manifest."""

    fold: int
    kind: str
    size: int
    seed: int
    train: list[str]
    val: list[str]

    def key(self) -> tuple[str, int, int, tuple[str, ...]]:
        return self.kind, self.size, self.seed, tuple(sorted(self.val))


@dataclass(frozen=True)
class SplitRequest:
    """What ``nnunet-ssl split`` asks for.

    Attributes:
        kind: ``"few_shot"`` (``--shots``) or ``"data_limited"`` (``--sizes``).
        sizes: Training-set sizes; nested per seed.
        seeds: One nested family of subsets per seed.
        val_cases: Draw a validation set of this many cases (fixed seed), or
        val_from_fold: take the validation set of this existing fold (default: nnU-Net's fold 0).
    """

    kind: str
    sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    val_cases: int | None = None
    val_from_fold: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SplitError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise SplitError(f"sizes must be positive case counts, got {list(self.sizes)}")
        if not self.seeds:
            raise SplitError("give at least one seed")
        if self.val_cases is not None and self.val_from_fold is not None:
            raise SplitError("use either --val-cases or --val-from-fold, not both")
        if self.val_cases is not None and self.val_cases < 1:
            raise SplitError(f"--val-cases must be >= 1, got {self.val_cases}")


# ---------------------------------------------------------------------------- pure split logic
def nnunet_default_splits(identifiers: list[str]) -> list[dict[str, list[str]]]:
    """The 5-fold split nnU-Net creates when ``splits_final.json`` is missing (same code, same seed)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if len(identifiers) < NNUNET_NUM_FOLDS:
        raise SplitError(f"nnU-Net's 5-fold split needs at least 5 training cases, found {len(identifiers)}")
    splits = generate_crossval_split(sorted(identifiers), seed=NNUNET_SPLIT_SEED, n_splits=NNUNET_NUM_FOLDS)
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def choose_validation(request: SplitRequest, identifiers: list[str], splits: list[dict[str, list[str]]]) -> list[str]:
    """The fixed validation set of a request (sorted)."""
    if request.val_cases is not None:
        if request.val_cases >= len(identifiers):
            raise SplitError(
                f"--val-cases {request.val_cases} leaves no training cases: the dataset has {len(identifiers)}"
            )
        rng = np.random.default_rng(VALIDATION_DRAW_SEED)
        chosen = rng.choice(sorted(identifiers), size=request.val_cases, replace=False)
        return sorted(str(c) for c in chosen)
    fold = 0 if request.val_from_fold is None else request.val_from_fold
    if not 0 <= fold < len(splits):
        has = f"has folds 0-{len(splits) - 1}" if splits else "has no folds"
        asked = "the validation set of fold 0 (the default)" if request.val_from_fold is None else f"--val-from-fold {fold}"
        raise SplitError(f"{asked}: the split file {has}; give --val-cases N to draw a validation set instead")
    return sorted(splits[fold]["val"])


def nested_subsets(pool: list[str], sizes: tuple[int, ...], seed: int) -> dict[int, list[str]]:
    """For one seed, training subsets of each size, each the first ``size`` cases of one permutation.

    The permutation depends only on the seed and the sorted pool, so smaller sets are inside larger
    ones and a re-run reproduces them.
    """
    largest = max(sizes)
    if largest > len(pool):
        raise SplitError(
            f"asked for {largest} training cases but only {len(pool)} remain outside the validation set"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    ranked = [sorted(pool)[i] for i in order]
    return {size: sorted(ranked[:size]) for size in sorted(set(sizes))}


def plan_folds(request: SplitRequest, identifiers: list[str], splits: list[dict[str, list[str]]]) -> list[FoldEntry]:
    """Every fold a request describes, with fold index -1 (not yet placed)."""
    val = choose_validation(request, identifiers, splits)
    unknown = set(val) - set(identifiers)
    if unknown:
        raise SplitError(f"validation cases not in the dataset: {sorted(unknown)[:5]}")
    pool = sorted(set(identifiers) - set(val))
    entries = []
    for seed in request.seeds:
        for size, train in nested_subsets(pool, request.sizes, seed).items():
            entries.append(FoldEntry(-1, request.kind, size, seed, train, val))
    return entries


def place_folds(
    planned: list[FoldEntry], splits: list[dict[str, list[str]]], manifest: list[FoldEntry]
) -> tuple[list[FoldEntry], list[FoldEntry]]:
    """Reuse folds the manifest already has, append the others after the last existing fold.

    Returns (all folds of the request with their indices, the newly appended ones).

    Raises:
        SplitError: when a matching manifest fold no longer holds the cases it should (the dataset
            changed, or the split file was edited by hand).
    """
    existing = {entry.key(): entry for entry in manifest}
    placed, new = [], []
    next_index = len(splits)
    for entry in planned:
        old = existing.get(entry.key())
        if old is not None:
            if sorted(old.train) != entry.train:
                raise SplitError(
                    f"fold {old.fold} ({old.kind}, {old.size} cases, seed {old.seed}) was made from other cases "
                    "than the dataset has now; it is left as it is. Use other --seeds for new folds."
                )
            placed.append(old)
            continue
        fresh = FoldEntry(next_index, entry.kind, entry.size, entry.seed, entry.train, entry.val)
        next_index += 1
        placed.append(fresh)
        new.append(fresh)
    return placed, new


# ---------------------------------------------------------------------------- files
def check_regular_file(path: Path) -> bool:
    """Whether ``path`` exists, refusing anything but a regular file or a link to one.

    Raises:
        SplitError: for a folder (or other non-file) at ``path``, or a symbolic link whose target is missing.
    """
    if not os.path.lexists(path):
        return False
    if path.is_symlink() and not path.exists():
        raise SplitError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                         "fix or remove the link, nothing was changed")
    if not path.is_file():
        raise SplitError(f"{path} is not a regular file; move it away, nothing was changed")
    return True


def read_splits(path: Path, known: Collection[str] | None = None) -> list[dict[str, list[str]]]:
    """``splits_final.json`` checked for nnU-Net's shape (a list of {"train": [...], "val": [...]}).

    Every entry must be a safe case identifier (:func:`nnunet_ssl.case_ids.check_case_id`) and, when
    ``known`` is given, one of those cases.

    Raises:
        SplitError: when the file is not JSON, not of that shape, or names a case not in ``known``;
            CaseIdError (a ValueError) for an entry that is not a plain file name (``NaN``, ``"../x"``).
    """
    check_regular_file(path)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SplitError(f"{path} is not valid JSON ({error}); fix or move it, nothing was changed") from error
    if not isinstance(splits, list):
        raise SplitError(f"{path} is not an nnU-Net split file (a list of {{'train': [...], 'val': [...]}})")
    known = None if known is None else set(known)
    for index, fold in enumerate(splits):
        if not (isinstance(fold, dict) and isinstance(fold.get("train"), list) and isinstance(fold.get("val"), list)):
            raise SplitError(f"{path}: fold {index} is not {{'train': [...], 'val': [...]}} (an nnU-Net split file "
                             "is a list of those); nothing was changed")
        for part in ("train", "val"):
            for position, case in enumerate(fold[part]):
                where = f"fold {index}, {part!r} entry {position}"
                check_case_id(case, path, where)
                if known is not None and case not in known:
                    raise SplitError(f"{path}: case {case!r} ({where}) is not among the {len(known)} preprocessed "
                                     f"cases of {path.parent.name}; nothing was changed")
    return splits


def refuse_empty_splits(splits: list[dict[str, list[str]]], path: Path) -> None:
    """An empty split file is refused: it has no fold 0 for the validation set, appended folds would
    take nnU-Net's fold numbers, and nnU-Net itself trains every fold of it on a random 80:20 split.

    Raises:
        SplitError: when ``splits`` is empty.
    """
    if not splits:
        raise SplitError(
            f"{path} holds no folds (an empty list); delete it to start from nnU-Net's default 5 folds "
            "(or write your own folds into it), nothing was changed"
        )


def read_manifest(path: Path) -> list[FoldEntry]:
    """The folds listed in ``splits_manifest.json`` (empty when the file does not exist)."""
    if not check_regular_file(path):
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise SplitError(
                f"{path}: expected an nnunet-ssl split manifest ({MANIFEST_FORMAT!r} version {MANIFEST_VERSION}), "
                f"got {data.get('format')!r} version {data.get('version')!r}"
            )
        return [FoldEntry(**entry) for entry in data["folds"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise SplitError(f"{path} is unreadable ({error}); fix or move it, nothing was changed") from error


def manifest_entry_for_fold(preprocessed_dataset_dir: Path, fold: int | str) -> FoldEntry | None:
    """The manifest entry of ``fold`` (None for nnU-Net's own folds, ``all``, or no manifest)."""
    if not isinstance(fold, int):
        return None
    for entry in read_manifest(Path(preprocessed_dataset_dir) / MANIFEST_FILE):
        if entry.fold == fold:
            return entry
    return None


def check_consistency(splits: list[dict[str, list[str]]], manifest: list[FoldEntry], splits_path: Path) -> None:
    """Every manifest fold must still be in the split file with the same cases."""
    for entry in manifest:
        if entry.fold >= len(splits):
            raise SplitError(
                f"splits_manifest.json lists fold {entry.fold} but {splits_path} has only {len(splits)} folds; "
                "was the split file replaced? Restore it from its backup (splits_final.json.bak-*)"
            )
        fold = splits[entry.fold]
        if sorted(fold["train"]) != sorted(entry.train) or sorted(fold["val"]) != sorted(entry.val):
            raise SplitError(
                f"fold {entry.fold} in {splits_path} no longer matches splits_manifest.json; "
                "restore the split file from its backup (splits_final.json.bak-*)"
            )


def dataset_identifiers(preprocessed_dataset_dir: Path) -> list[str]:
    """Training case identifiers of a preprocessed dataset, read like nnU-Net's ``do_split`` does.

    Raises:
        SplitError: when the dataset has no preprocessed data yet.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    for plans_file in sorted(Path(preprocessed_dataset_dir).glob("*.json")):
        try:
            plans = json.loads(plans_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if not isinstance(plans, dict) or "configurations" not in plans:
            continue
        for config in plans["configurations"].values():
            data_dir = Path(preprocessed_dataset_dir) / str(config.get("data_identifier", ""))
            if config.get("data_identifier") and data_dir.is_dir() and any(data_dir.iterdir()):
                identifiers = infer_dataset_class(str(data_dir)).get_identifiers(str(data_dir))
                if identifiers:
                    return sorted(check_case_ids([str(i) for i in identifiers], data_dir))
    raise SplitError(
        f"{preprocessed_dataset_dir} has no preprocessed data; run `nnUNetv2_plan_and_preprocess -d ID` "
        "or `nnunet-ssl plan -d ID` first"
    )


def read_checked_manifest(preprocessed_dataset_dir: Path) -> list[FoldEntry]:
    """The manifest's folds after checking them against ``splits_final.json`` (for listings).

    Raises:
        SplitError: when either file is unreadable, or the split file lacks or changed a listed fold.
    """
    folder = Path(preprocessed_dataset_dir)
    splits_path = folder / SPLITS_FILE
    manifest = read_manifest(folder / MANIFEST_FILE)
    if check_regular_file(splits_path):
        check_consistency(read_splits(splits_path), manifest, splits_path)
    elif manifest:
        raise SplitError(f"{folder / MANIFEST_FILE} lists {len(manifest)} fold(s) but {splits_path} does not exist")
    return manifest


def ensure_default_splits(preprocessed_dataset_dir: Path) -> bool:
    """Write nnU-Net's default 5 folds to ``splits_final.json`` when it does not exist (True if written).

    The same folds nnU-Net would write on its first training, written up front so fold indices are fixed.
    """
    path = Path(preprocessed_dataset_dir) / SPLITS_FILE
    if check_regular_file(path):
        refuse_empty_splits(read_splits(path), path)
        return False
    write_files({path: splits_text(nnunet_default_splits(dataset_identifiers(Path(preprocessed_dataset_dir))))})
    return True


@dataclass(frozen=True)
class SplitResult:
    folds: list[FoldEntry]
    new_folds: list[FoldEntry]
    created_default: bool
    backup: Path | None


def manifest_text(dataset: str, folds: list[FoldEntry]) -> str:
    """``splits_manifest.json``'s content."""
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dataset": dataset,
                "folds": [asdict(f) for f in sorted(folds, key=lambda f: f.fold)]}
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def write_manifest(path: Path, dataset: str, folds: list[FoldEntry]) -> None:
    write_files({path: manifest_text(dataset, folds)})


def apply_split_request(preprocessed_dataset_dir: Path, request: SplitRequest) -> SplitResult:
    """Create or extend the split file and manifest of a preprocessed dataset for ``request``."""
    folder = Path(preprocessed_dataset_dir)
    splits_path, manifest_path = folder / SPLITS_FILE, folder / MANIFEST_FILE
    identifiers = dataset_identifiers(folder)
    created_default = not check_regular_file(splits_path)
    if created_default:
        splits = nnunet_default_splits(identifiers)
    else:
        splits = read_splits(splits_path, known=identifiers)
        refuse_empty_splits(splits, splits_path)
    manifest = read_manifest(manifest_path)
    check_consistency(splits, manifest, splits_path)

    placed, new = place_folds(plan_folds(request, identifiers, splits), splits, manifest)
    if not new and not created_default:
        return SplitResult(placed, [], False, None)

    files: dict[Path, str] = {}
    backup = None
    if not created_default:
        backup = splits_path.with_name(f"{SPLITS_FILE}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9}")
        files[backup] = splits_path.read_text(encoding="utf-8")
    files[splits_path] = splits_text(splits + [{"train": f.train, "val": f.val} for f in new])
    files[manifest_path] = manifest_text(folder.name, manifest + new)
    write_files(files)
    return SplitResult(placed, new, created_default, backup)


def splits_text(splits: list[dict[str, Any]]) -> str:
    """nnU-Net's split file layout (a list; key order train, val)."""
    return json.dumps(splits, indent=4) + "\n"


def write_files(contents: dict[Path, str]) -> None:
    """Write every file or none, each atomically, in the order given.

    A symbolic link is written through: the file it points at gets the new content and the link stays
    (a split file shared by a link keeps being shared). Each content goes to a temporary file beside
    its target first; only when all are written are they renamed into place, and a failed rename puts
    back the files already renamed. Temporary files never outlive a failure.

    Raises:
        SplitError: for a folder at a path or a link to nothing (before anything is written).
        SplitWriteError: an ``OSError`` while writing (permission, disk full), naming the path meant.
    """
    targets = {path: (Path(os.path.realpath(path)) if check_regular_file(path) else path) for path in contents}
    staged: list[tuple[Path, str]] = []  # (file written, temporary file)

    def failed(error: OSError, path: Path) -> SplitWriteError:
        target = targets[path]
        name = str(path) if target == path else f"{path} (a link to {target})"
        return SplitWriteError(error.errno, error.strerror or str(error), name)

    try:
        for path, text in contents.items():
            try:
                staged.append((targets[path], _stage(targets[path], text.encode("utf-8"))))
            except OSError as error:
                raise failed(error, path) from error
        previous = {target: target.read_bytes() if target.is_file() else None for target, _ in staged}
        done: list[Path] = []
        for path, (target, tmp) in zip(contents, staged, strict=True):
            try:
                os.replace(tmp, target)
            except OSError as error:
                _put_back(done, previous)
                raise failed(error, path) from error
            done.append(target)
    finally:
        for _, tmp in staged:
            _remove_quietly(tmp)


def _stage(target: Path, data: bytes) -> str:
    """A temporary file beside ``target`` holding ``data`` (removed again if writing it fails)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, default_mode(directory=False))  # mkstemp makes 0600; give what open() would
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(tmp: str) -> None:
    if os.path.lexists(tmp):
        try:
            os.remove(tmp)
        except OSError:  # the error that brought us here is the one to report
            logger.warning("could not remove the temporary file %s", tmp)


def _put_back(done: list[Path], previous: dict[Path, bytes | None]) -> None:
    """Undo the renames of :func:`write_files` after a later one failed (each file atomically; failures logged)."""
    for target in reversed(done):
        old = previous[target]
        try:
            if old is None:
                target.unlink()
            else:
                os.replace(_stage(target, old), target)
        except OSError as error:
            logger.error("could not restore %s after a failed write: %s", target, error)


# ---------------------------------------------------------------------------- table
def fold_table(folds: list[FoldEntry]) -> str:
    """Fold indices by (kind, size) rows and seed columns, for ``nnUNetv2_train ... FOLD``."""
    if not folds:
        return "no few-shot or data-limited folds yet (nnunet-ssl split -d ID --shots 5 10 20 --seeds 0 1 2)"
    seeds = sorted({f.seed for f in folds})
    rows = sorted({(f.kind, f.size) for f in folds})
    by_key = {(f.kind, f.size, f.seed): f for f in folds}
    header = f"{'kind':13s} {'cases':>5s} " + " ".join(f"{'seed ' + str(s):>7s}" for s in seeds) + "  validation"
    lines = [header, "-" * len(header)]
    for kind, size in rows:
        cells = [by_key.get((kind, size, s)) for s in seeds]
        val_sizes = {len(c.val) for c in cells if c is not None}
        lines.append(
            f"{kind:13s} {size:5d} "
            + " ".join(f"{(str(c.fold) if c else '-'):>7s}" for c in cells)
            + f"  {'/'.join(str(v) for v in sorted(val_sizes))} cases"
        )
    return "\n".join(lines)
