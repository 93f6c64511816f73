"""The preprocessed-volume cache: blosc2 ``.b2nd`` arrays plus a JSON manifest.

Layout of ``cache_dir``::

    manifest.json                 every source: status, reason, digest, shape, spacing, stats
    <stem>_<hash>.b2nd            one float16 (z, y, x) array per usable volume, values in [0, 1]

Arrays are chunked (64^3 chunks, 32^3 blocks), byte-shuffled and LZ4HC-compressed (level 5: as
small as ZSTD within 15 %, and 3-7x faster to decompress), and opened memory-mapped, so a 96^3 crop
decompresses only the chunks it touches. :func:`build_cache` reuses an entry when the
source's digest (size, mtime, first/last MiB) and the preprocessing parameters are unchanged,
re-processes changed sources and drops removed ones (deleting their arrays). Skipped sources are
kept in the manifest with their reason; :func:`summarize` counts them.

When several processes train together, build the cache on one of them and :meth:`Manifest.load`
it on the others.

The cache never reads, writes or deletes a file outside its folder, whatever ``manifest.json``
says (it may sit in a shared folder): an entry's ``cache_file`` must be a ``.b2nd`` file name that
resolves inside the folder (no ``..``, no absolute path, no symlink leading out), or the entry is
ignored with a warning. Files being written are named ``<name>.tmp-<host>-<pid>[.b2nd]``; a build
removes those of this host whose process is gone (a killed build), and no other file.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import socket
import stat
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import blosc2
import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .modality import AUTO
from .preprocess import UNREADABLE, SkipVolume, preprocess_source
from .sources import NOT_REGULAR, NotRegularFile, ScanProblem, Source, cache_name, scan_inputs, shown_path, source_digest

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

#: Chunk and block edges of the cached arrays (clipped to the array's shape).
CHUNK_EDGE = 64
BLOCK_EDGE = 32

OK = "ok"
SKIPPED = "skipped"
#: Reason of a skipped entry when preprocessing failed unexpectedly (retried on the next build).
ERROR = "error"
#: Note of a usable entry smaller than one crop along some axis (zero-padded when sampled).
PADDED = "padded"

_SAVE_EVERY_S = 30.0

ARRAY_SUFFIX = ".b2nd"
#: Temporary files of a write in progress: ``<name>.tmp-<host>-<pid>`` (arrays: ``.b2nd`` appended).
_TEMP_RE = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]+)(?P<suffix>\.b2nd)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", socket.gethostname()) or "localhost"


def temp_path(path: str) -> str:
    """Where ``path`` is written before it is renamed into place: ``<path>.tmp-<host>-<pid>``.

    ``.b2nd`` arrays keep their suffix (``<stem>.tmp-<host>-<pid>.b2nd``).
    """
    tag = f".tmp-{_host()}-{os.getpid()}"
    if path.endswith(ARRAY_SUFFIX):
        return f"{path[: -len(ARRAY_SUFFIX)]}{tag}{ARRAY_SUFFIX}"
    return f"{path}{tag}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # Not a process of ours: never remove its file.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def remove_stale_temp_files(cache_dir: str) -> list[str]:
    """Remove the temporary files left in ``cache_dir`` by killed writes of this host.

    Only regular files named ``<name>.tmp-<host>-<pid>[.b2nd]`` whose host is this host and whose
    process no longer exists are removed (another host's files, a live writer's files, and any
    other file are left alone).

    Returns:
        The names removed.
    """
    host = _host()
    removed: list[str] = []
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return removed
    for name in sorted(names):
        match = _TEMP_RE.match(name)
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        if match["suffix"] is None and match["name"] != MANIFEST_NAME:
            continue
        path = os.path.join(cache_dir, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            os.remove(path)
        except OSError as exc:
            logger.warning("cannot remove the stale temporary file %s: %s", path, exc)
            continue
        removed.append(name)
    return removed


def _remove_if_there(path: str) -> None:
    """Remove ``path`` itself (a link, not its target) if anything is there."""
    if os.path.lexists(path):
        os.remove(path)


def cache_file_path(cache_dir: str, name: Any) -> str | None:
    """The path of the array file ``name`` inside ``cache_dir``, or ``None`` if it would lead outside.

    ``name`` must be a plain ``.b2nd`` file name (no folder part, no ``..``, not absolute) that,
    symlinks resolved, stays inside ``cache_dir``.
    """
    if not isinstance(name, str) or not name.endswith(ARRAY_SUFFIX) or name != os.path.basename(name):
        return None
    if name in (".", "..") or "\0" in name or "/" in name or (os.altsep and os.altsep in name):
        return None
    path = os.path.join(cache_dir, name)
    real_dir = os.path.realpath(cache_dir)
    if os.path.dirname(os.path.realpath(path)) != real_dir:
        return None
    return path


def _json_safe(value: Any) -> Any:
    """``value`` with every string made valid UTF-8 (lone surrogates from file names escaped)."""
    if isinstance(value, str):
        return shown_path(value)
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class ManifestEntry:
    """What the cache knows about one source.

    Attributes:
        key: Unique source identifier (absolute path, ``#series=<UID>`` appended for DICOM).
        source: The file, or the DICOM series folder.
        kind: ``"nifti"``, ``"nrrd"``, ``"mha"``, ``"dicom"``, ``"image"`` or ``"input"``.
        modality: ``"ct"`` or ``"mr"`` (``"auto"`` for a volume without modality information that
            was skipped before a decision; empty for inputs that yielded no volume).
        status: ``"ok"`` or ``"skipped"``.
        reason: Why it was skipped (a short category, see :func:`summarize`).
        detail: Specifics of the reason.
        note: Remarks on usable volumes, e.g. ``"padded"`` (smaller than a crop on some axis).
        channel: nnU-Net channel index, if any.
        origin: The input it was found through.
        digest: Source fingerprint the entry was built from.
        params_key: Digest of the preprocessing parameters it was built with.
        cache_file: Array file name inside the cache folder.
        cache_bytes: Size of the array file.
        source_bytes: Total size of the source file(s).
        shape: ``(z, y, x)`` voxels of the cached array.
        spacing: ``(x, y, z)`` mm of the cached array.
        source_shape: ``(z, y, x)`` voxels of the source.
        source_spacing: ``(x, y, z)`` mm of the source.
        bbox: ``[[z0, z1], [y0, y1], [x0, x1]]`` of the body crop in the resampled grid.
        stats: Intensity statistics (see :class:`~.preprocess.Preprocessed`).
        modality_decision: How the modality was decided from the intensities, for sources without
            modality information (``modality`` is then the decision; ``"auto"`` if undecided).
    """

    key: str
    source: str
    kind: str
    modality: str
    status: str
    reason: str | None = None
    detail: str | None = None
    note: str | None = None
    channel: int | None = None
    origin: str = ""
    digest: str | None = None
    params_key: str | None = None
    cache_file: str | None = None
    cache_bytes: int | None = None
    source_bytes: int | None = None
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    source_shape: tuple[int, int, int] | None = None
    source_spacing: tuple[float, float, float] | None = None
    bbox: list[list[int]] | None = None
    stats: dict[str, float] = field(default_factory=dict)
    modality_decision: str | None = None

    @property
    def usable(self) -> bool:
        """Whether the entry has a cached array to sample from."""
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict."""
        out = asdict(self)
        for name in ("shape", "spacing", "source_shape", "source_spacing"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ManifestEntry:
        """Inverse of :meth:`to_json` (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for name in ("shape", "source_shape"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(int(v) for v in kwargs[name])
        for name in ("spacing", "source_spacing"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(float(v) for v in kwargs[name])
        return cls(**kwargs)


@dataclass
class Manifest:
    """All sources of a cache, usable or skipped, sorted by key.

    Attributes:
        path: Location of ``manifest.json``; array files live next to it.
        entries: One entry per source (and per input that yielded no volume).
        config: The :class:`DataConfig` (as a dict) of the last build, for reference.
    """

    path: str
    entries: list[ManifestEntry] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_dir(self) -> str:
        """The folder holding the manifest and the arrays."""
        return os.path.dirname(os.path.abspath(self.path))

    def usable(self) -> list[ManifestEntry]:
        """Entries with a cached array, in manifest order (the loader's ``index`` refers to this list)."""
        return [e for e in self.entries if e.usable]

    def skipped(self) -> list[ManifestEntry]:
        """Entries that are not used, each with its reason."""
        return [e for e in self.entries if not e.usable]

    def array_path(self, entry: ManifestEntry) -> str:
        """Absolute path of an entry's cached array.

        Raises:
            ValueError: if the entry has no array, or its ``cache_file`` would lead outside the cache folder.
        """
        if entry.cache_file is None:
            raise ValueError(f"{entry.key} has no cached array (status {entry.status!r})")
        path = cache_file_path(self.cache_dir, entry.cache_file)
        if path is None:
            raise ValueError(f"{entry.key}: array file {entry.cache_file!r} is not a file inside the cache {self.cache_dir}")
        return path

    def save(self) -> None:
        """Write the manifest atomically (temporary file, then rename)."""
        os.makedirs(self.cache_dir, exist_ok=True)
        data = {
            "version": MANIFEST_VERSION,
            "config": self.config,
            "entries": [e.to_json() for e in self.entries],
        }
        tmp = temp_path(self.path)
        _remove_if_there(tmp)
        with open(tmp, "x", encoding="utf-8") as fh:  # never through a planted link
            json.dump(_json_safe(data), fh, indent=1)
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: str) -> Manifest:
        """Read a manifest from its file or from its cache folder.

        Entries whose array file would lie outside the cache folder (``..``, an absolute path, a
        symlink leading out) are left out with a warning naming the manifest and the entry.

        Raises:
            FileNotFoundError: if there is no manifest.
            ValueError: if it cannot be parsed.
        """
        if os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        path = os.path.abspath(path)
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
                entries = [ManifestEntry.from_json(e) for e in data["entries"]]
                config = data.get("config", {})
                if not all(isinstance(e.key, str) and isinstance(e.status, str) for e in entries):
                    raise ValueError("an entry's key or status is not a string")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"cannot parse manifest {path}: {exc}") from exc
        cache_dir = os.path.dirname(path)
        kept = []
        for entry in entries:
            if entry.cache_file is not None and cache_file_path(cache_dir, entry.cache_file) is None:
                logger.warning(
                    "manifest %s: ignoring the entry %s: its array file %r is not a file inside the cache folder",
                    path, shown_path(str(entry.key)), entry.cache_file,
                )
                continue
            kept.append(entry)
        return cls(path=path, entries=kept, config=config if isinstance(config, dict) else {})


def summarize(manifest: Manifest) -> str:
    """Human summary: usable and skipped counts, then skipped counts per reason with examples.

    Args:
        manifest: A built manifest.

    Returns:
        Multi-line text, e.g. ``"12 volumes: 10 usable (1 padded), 2 skipped\\n  unreadable: 1 ..."``.
    """
    usable = manifest.usable()
    skipped = manifest.skipped()
    padded = sum(1 for e in usable if e.note and PADDED in e.note)
    modalities = Counter(e.modality for e in usable)
    head = f"{len(manifest.entries)} source(s): {len(usable)} usable"
    if usable:
        head += " (" + ", ".join(f"{n} {m.upper()}" for m, n in sorted(modalities.items()))
        head += f"; {padded} padded)" if padded else ")"
    head += f", {len(skipped)} skipped"
    lines = [head]
    by_reason: dict[str, list[ManifestEntry]] = {}
    for entry in skipped:
        by_reason.setdefault(entry.reason or "unknown", []).append(entry)
    for reason, group in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append(f"  {reason}: {len(group)}")
        for entry in group[:3]:
            lines.append(f"    {entry.source}: {entry.detail or ''}".rstrip(": "))
        if len(group) > 3:
            lines.append(f"    ... and {len(group) - 3} more")
    return "\n".join(lines)


def _source_bytes(source: Source) -> int:
    paths = source.files or (source.path,)
    return int(sum(os.path.getsize(p) for p in paths if os.path.isfile(p)))


def write_array(path: str, array: np.ndarray) -> int:
    """Write ``array`` as a chunked, compressed ``.b2nd`` file atomically; returns its size in bytes."""
    chunks = tuple(min(CHUNK_EDGE, s) for s in array.shape)
    blocks = tuple(min(BLOCK_EDGE, c) for c in chunks)
    tmp = temp_path(path)
    _remove_if_there(tmp)  # a link too: blosc2 would write through it
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
    blosc2.asarray(np.ascontiguousarray(array), urlpath=tmp, chunks=chunks, blocks=blocks, cparams=cparams)
    os.replace(tmp, path)
    return os.path.getsize(path)


def open_array(path: str) -> blosc2.NDArray:
    """Open a cached array read-only and memory-mapped (single-threaded decompression)."""
    return blosc2.open(path, mode="r", mmap_mode="r", dparams={"nthreads": 1})


def process_source(source: Source, config: DataConfig, cache_dir: str, digest: str) -> ManifestEntry:
    """Preprocess one source into the cache; never raises (failures become skipped entries).

    Args:
        source: The volume.
        config: Preprocessing settings.
        cache_dir: Where the ``.b2nd`` file goes.
        digest: The source fingerprint to record.

    Returns:
        The manifest entry (``"ok"`` with the array written, or ``"skipped"`` with a reason).
    """
    entry = ManifestEntry(
        key=source.key,
        source=source.path,
        kind=source.kind,
        modality=source.modality,
        status=SKIPPED,
        channel=source.channel,
        origin=source.origin,
        digest=digest,
        params_key=config.params_key(source.modality),
    )
    try:
        entry.source_bytes = _source_bytes(source)
        result = preprocess_source(source, config)
        name = cache_name(source.key)
        entry.cache_bytes = write_array(os.path.join(cache_dir, name), result.array)
    except SkipVolume as exc:
        entry.reason, entry.detail = exc.reason, exc.detail
        return entry
    except MemoryError:
        entry.reason, entry.detail = ERROR, "out of memory while preprocessing"
        return entry
    except Exception as exc:  # noqa: BLE001 - a bad input must never end the run
        entry.reason = ERROR
        entry.detail = f"{type(exc).__name__}: {exc}"[:300]
        entry.stats = {}
        logger.debug("preprocessing %s failed:\n%s", source.key, traceback.format_exc())
        return entry
    entry.status = OK
    entry.cache_file = name
    entry.shape = tuple(int(s) for s in result.array.shape)  # type: ignore[assignment]
    entry.spacing = result.spacing
    entry.source_shape = result.source_shape
    entry.source_spacing = result.source_spacing
    entry.bbox = [list(b) for b in result.bbox]
    entry.stats = {k: round(v, 6) for k, v in result.stats.items()}
    entry.modality = result.modality
    entry.modality_decision = result.modality_decision
    return entry


def _failed_entry(source: Source, config: DataConfig, digest: str, reason: str, detail: str) -> ManifestEntry:
    return ManifestEntry(
        key=source.key,
        source=source.path,
        kind=source.kind,
        modality=source.modality,
        status=SKIPPED,
        reason=reason,
        detail=detail[:300],
        channel=source.channel,
        origin=source.origin,
        digest=digest,
        params_key=config.params_key(source.modality),
    )


Worker = Callable[[Source, DataConfig, str, str], ManifestEntry]


def _run_jobs(
    jobs: list[tuple[Source, str]],
    config: DataConfig,
    cache_dir: str,
    on_done: Callable[[ManifestEntry], None],
    worker: Worker = process_source,
) -> None:
    """Run ``worker`` on ``jobs`` (source, digest) here or in ``config.num_workers`` spawned processes.

    A process that dies (a reader crash, the OOM killer) breaks the pool; the unfinished jobs are
    then retried one process each, so the culprit is recorded as unreadable and the rest still run.
    """
    workers = min(config.num_workers, len(jobs))
    if workers <= 1:
        for source, digest in jobs:
            on_done(worker(source, config, cache_dir, digest))
        return
    context = multiprocessing.get_context("spawn")
    pending = {source.key: (source, digest) for source, digest in jobs}
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(worker, s, config, cache_dir, d): s.key for s, d in jobs}
            for future in as_completed(futures):
                try:
                    entry = future.result()
                except BrokenProcessPool:
                    break
                except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be unpickled
                    source, digest = pending[futures[future]]
                    entry = _failed_entry(source, config, digest, ERROR, f"{type(exc).__name__}: {exc}")
                pending.pop(futures[future], None)
                on_done(entry)
    except BrokenProcessPool:
        pass
    if not pending:
        return
    logger.warning("a preprocessing process died; retrying %d volume(s) one process each", len(pending))
    for source, digest in pending.values():
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as single:
                entry = single.submit(worker, source, config, cache_dir, digest).result()
        except BrokenProcessPool:
            entry = _failed_entry(source, config, digest, UNREADABLE, "reading it killed the preprocessing process")
        except Exception as exc:  # noqa: BLE001
            entry = _failed_entry(source, config, digest, ERROR, f"{type(exc).__name__}: {exc}")
        on_done(entry)


def _problem_entry(problem: ScanProblem) -> ManifestEntry:
    return ManifestEntry(
        key=problem.key,
        source=problem.path,
        kind="input",
        modality="",
        status=SKIPPED,
        reason=problem.reason,
        detail=problem.detail,
        origin=problem.origin,
    )


def _reusable(old: ManifestEntry | None, source: Source, digest: str, config: DataConfig, cache_dir: str) -> bool:
    if old is None or old.digest != digest or old.params_key != config.params_key(source.modality):
        return False
    if (old.modality != source.modality and source.modality != AUTO) or old.reason == ERROR:
        return False
    if old.status != OK:
        return True
    path = cache_file_path(cache_dir, old.cache_file)
    if path is None:
        return False
    return os.path.isfile(path) and os.path.getsize(path) == old.cache_bytes


def _set_note(entry: ManifestEntry, config: DataConfig) -> None:
    if entry.usable and entry.shape is not None and min(entry.shape) < config.crop_size:
        entry.note = f"{PADDED}: shape {tuple(entry.shape)} is smaller than the {config.crop_size}^3 crop"
    else:
        entry.note = None


def _log_modality_decisions(manifest: Manifest) -> None:
    """Say loudly which modality was decided from the intensities, volume by volume."""
    decided = [e for e in manifest.entries if e.modality_decision and e.usable]
    if not decided:
        return
    counts = Counter(e.modality.upper() for e in decided)
    lines = [f"  {os.path.basename(e.source)}: {e.modality_decision}" for e in decided[:20]]
    more = [f"  ... and {len(decided) - 20} more (manifest.json: modality_decision)"] if len(decided) > 20 else []
    logger.warning(
        "modality decided from the intensities for %d volume(s) without modality information: %s; give --modality "
        "to override\n%s", len(decided), ", ".join(f"{n} {m}" for m, n in sorted(counts.items())),
        "\n".join(lines + more),
    )


def _load_previous(path: str) -> Manifest | None:
    if not os.path.isfile(path):
        return None
    try:
        return Manifest.load(path)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable manifest %s (%s): rebuilding the cache", path, exc)
        return None


def _remove_stale(cache_dir: str, previous: Iterable[ManifestEntry], keep: set[str]) -> int:
    """Delete the arrays of ``previous`` entries not in ``keep``: only regular files inside ``cache_dir``."""
    removed = 0
    for entry in previous:
        if not entry.cache_file or entry.cache_file in keep:
            continue
        path = cache_file_path(cache_dir, entry.cache_file)
        if path is None or not os.path.isfile(path):
            continue
        try:
            os.remove(path)
        except OSError as exc:
            logger.warning("cannot delete the stale array %s: %s", path, exc)
            continue
        removed += 1
    return removed


def build_cache(config: DataConfig, progress: bool = True) -> Manifest:
    """Scan the inputs, preprocess what is new or changed into the cache, and save the manifest.

    Unchanged sources (same digest and preprocessing parameters) are reused without reading
    them; changed ones are re-processed; sources that disappeared leave the manifest and their
    arrays are deleted. Bad inputs are recorded as skipped with a reason and never raise; log
    :func:`summarize` of the result to report them.

    Args:
        config: Inputs, cache folder and preprocessing settings; ``num_workers`` processes
            preprocess in parallel (0 or 1: in this process).
        progress: Show a tqdm progress bar (only when stderr is a terminal).

    Returns:
        The saved manifest.

    Raises:
        ValueError: if no usable volume remains (the message lists the reasons).
    """
    cache_dir = os.path.abspath(config.cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    manifest_path = os.path.join(cache_dir, MANIFEST_NAME)
    stale = remove_stale_temp_files(cache_dir)
    if stale:
        logger.info("removed %d temporary file(s) of killed cache writes: %s", len(stale), ", ".join(stale[:5]))
    previous = _load_previous(manifest_path)
    old_by_key = {e.key: e for e in previous.entries} if previous else {}

    sources, problems = scan_inputs(config)
    entries: dict[str, ManifestEntry] = {p.key: _problem_entry(p) for p in problems}
    jobs: list[tuple[Source, str]] = []
    reused = 0
    for source in sources:
        try:
            digest = source_digest(source)
        except OSError as exc:
            reason, detail = (NOT_REGULAR, str(exc)) if isinstance(exc, NotRegularFile) else (UNREADABLE, f"cannot read the file: {exc}")
            entries[source.key] = ManifestEntry(
                key=source.key, source=source.path, kind=source.kind, modality=source.modality,
                status=SKIPPED, reason=reason, detail=detail[:300],
                channel=source.channel, origin=source.origin,
            )
            continue
        old = old_by_key.get(source.key)
        if old is not None and _reusable(old, source, digest, config, cache_dir):
            # What names the source comes from the scan, never from the (possibly shared) manifest.
            old.source, old.kind, old.channel, old.origin = source.path, source.kind, source.channel, source.origin
            entries[source.key] = old
            reused += 1
        else:
            jobs.append((source, digest))

    manifest = Manifest(path=manifest_path, config=asdict(config))
    logger.info(
        "pretraining cache %s: %d source(s), %d reused, %d to preprocess", cache_dir, len(sources), reused, len(jobs)
    )
    last_save = time.monotonic()

    def on_done(entry: ManifestEntry) -> None:
        nonlocal last_save
        entries[entry.key] = entry
        bar.update(1)
        if entry.reason == ERROR:
            logger.warning("preprocessing %s failed unexpectedly: %s", entry.source, entry.detail)
        if time.monotonic() - last_save > _SAVE_EVERY_S:
            # Keep finished work if the build is interrupted: save what is done plus the old entries.
            merged = {**old_by_key, **entries}
            manifest.entries = [merged[k] for k in sorted(merged)]
            manifest.save()
            last_save = time.monotonic()

    show = progress and sys.stderr.isatty()
    with tqdm(total=len(jobs), desc="preprocessing", unit="vol", disable=not show) as bar:
        _run_jobs(jobs, config, cache_dir, on_done)

    manifest.entries = [entries[k] for k in sorted(entries)]
    for entry in manifest.entries:
        _set_note(entry, config)
    keep = {e.cache_file for e in manifest.entries if e.cache_file}
    removed = _remove_stale(cache_dir, old_by_key.values(), keep)
    dropped = len(set(old_by_key) - set(entries))
    if dropped:
        logger.info("%d source(s) no longer among the inputs: dropped (%d array(s) deleted)", dropped, removed)
    manifest.save()
    _log_modality_decisions(manifest)
    if not manifest.usable():
        raise ValueError(
            f"no usable pretraining volume in {list(config.inputs)} (manifest: {manifest_path}):\n" + summarize(manifest)
        )
    return manifest
