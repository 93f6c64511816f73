"""Find the volumes behind the configured inputs and fingerprint them.

An input is an image file, a folder (searched recursively for image files and DICOM series), an
nnU-Net raw dataset (``dataset.json`` with ``imagesTr``/``imagesTs``; every channel file is a
volume of its own, ``labelsTr`` is ignored), or a list file (``.txt`` or ``.json``) naming any of
these. Inputs that cannot be used at this stage (missing paths, unparsable lists, DICOM-like files
that belong to no readable series) become :class:`ScanProblem` records so that the manifest can
list them; nothing is dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk

from .config import MODALITIES, DataConfig
from .modality import AUTO

logger = logging.getLogger(__name__)

#: File suffixes read as volumes, and the kind recorded in the manifest.
IMAGE_SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
}

#: Suffixes of files that may be DICOM; files without a suffix are checked for the DICM magic.
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")

#: Ignored non-image files named in the log (the rest are counted).
IGNORED_SHOWN = 10

_DIGEST_BYTES = 1 << 20
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Source:
    """One volume to preprocess.

    Attributes:
        key: Unique, stable identifier: the absolute path, plus ``#series=<UID>`` for DICOM.
        path: The image file, or the folder of a DICOM series.
        kind: ``"nifti"``, ``"nrrd"``, ``"mha"`` or ``"dicom"``.
        modality: ``"ct"``, ``"mr"``, or ``"auto"`` (no modality information: decided from the
            intensities when preprocessing, see :mod:`.modality`).
        files: DICOM series files in slice order (empty for single files).
        channel: nnU-Net channel index, if the volume comes from an nnU-Net raw dataset.
        origin: The input (folder, dataset or list) it was found through.
    """

    key: str
    path: str
    kind: str
    modality: str
    files: tuple[str, ...] = ()
    channel: int | None = None
    origin: str = ""


@dataclass(frozen=True)
class ScanProblem:
    """An input that yields no volume (listed in the manifest as skipped).

    Attributes:
        key: Unique identifier (the path as given, made absolute).
        path: The offending path.
        reason: Short category, e.g. ``"not found"`` or ``"unreadable"``.
        detail: Human explanation.
        origin: The input it was found through.
    """

    key: str
    path: str
    reason: str
    detail: str
    origin: str = ""


@dataclass
class _Scan:
    config: DataConfig
    sources: dict[str, Source] = field(default_factory=dict)
    problems: dict[str, ScanProblem] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    duplicates: int = 0
    undetermined: int = 0
    visiting: set[str] = field(default_factory=set)

    def add(self, source: Source) -> None:
        if source.key in self.sources:
            self.duplicates += 1
            return
        self.sources[source.key] = source

    def problem(self, path: str, reason: str, detail: str, origin: str) -> None:
        key = os.path.abspath(path)
        self.problems.setdefault(key, ScanProblem(key, path, reason, detail, origin))


def image_kind(path: str) -> str | None:
    """The manifest kind of an image file (``"nifti"``, ``"nrrd"``, ``"mha"``) or ``None``."""
    name = path.lower()
    for suffix, kind in IMAGE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def _strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _looks_like_dicom(path: str) -> bool:
    lower = path.lower()
    if lower.endswith(DICOM_SUFFIXES):
        return True
    if "." in os.path.basename(path):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_nnunet_dataset(folder: str) -> bool:
    """Whether ``folder`` is an nnU-Net raw dataset (``dataset.json`` plus ``imagesTr`` or ``imagesTs``)."""
    return os.path.isfile(os.path.join(folder, "dataset.json")) and (
        os.path.isdir(os.path.join(folder, "imagesTr")) or os.path.isdir(os.path.join(folder, "imagesTs"))
    )


def modality_from_channel_name(name: str) -> str:
    """nnU-Net ``channel_names`` value to modality: ``"CT"`` -> ct, anything else -> mr."""
    return "ct" if str(name).strip().upper() == "CT" else "mr"


def _default_modality(scan: _Scan, override: str | None) -> str:
    if override is not None:
        return override
    if scan.config.modality is None:
        scan.undetermined += 1
        return AUTO
    return scan.config.modality


def _dicom_modality(first_file: str) -> str | None:
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(first_file)
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|0060"):
            value = reader.GetMetaData("0008|0060").strip().upper()
            return "ct" if value == "CT" else "mr" if value in ("MR", "MRI") else None
    except RuntimeError:
        return None
    return None


def _scan_nnunet_dataset(scan: _Scan, folder: str, override: str | None, origin: str) -> None:
    dataset_json = os.path.join(folder, "dataset.json")
    try:
        with open(dataset_json, encoding="utf-8") as fh:
            meta: Any = json.load(fh)
    except (OSError, ValueError) as exc:
        scan.problem(dataset_json, "unreadable", f"cannot parse dataset.json: {exc}", origin)
        return
    if not isinstance(meta, dict):
        scan.problem(dataset_json, "unreadable", "dataset.json is not a JSON object", origin)
        return
    channel_names = meta.get("channel_names") or meta.get("modality") or {}
    if not isinstance(channel_names, dict):
        channel_names = {}
    file_ending = str(meta.get("file_ending", "")).lower()
    found = 0
    for sub in ("imagesTr", "imagesTs"):
        images = os.path.join(folder, sub)
        if not os.path.isdir(images):
            continue
        for name in sorted(os.listdir(images)):
            path = os.path.abspath(os.path.join(images, name))
            if not os.path.isfile(path) or name.startswith("."):
                continue
            if file_ending and name.lower().endswith(file_ending):
                stem = name[: -len(file_ending)]
            elif image_kind(name) is not None:
                stem = _strip_image_suffix(name)
            else:
                scan.ignored.append(path)
                continue
            match = _CHANNEL_RE.match(stem)
            channel = int(match.group("channel")) if match else None
            if override is not None or scan.config.modality is not None:
                modality = _default_modality(scan, override)
            elif channel is not None and str(channel) in channel_names:
                modality = modality_from_channel_name(channel_names[str(channel)])
            else:
                modality = _default_modality(scan, None)
            # Files with the dataset's own ending but an unknown suffix (e.g. .png, .tif) are still
            # offered to the reader: it decides (and 2-D images are reported as such).
            scan.add(Source(path, path, image_kind(name) or "image", modality, channel=channel, origin=folder))
            found += 1
    if found == 0:
        scan.problem(folder, "no images", "nnU-Net dataset without files in imagesTr/imagesTs", origin)


def _scan_dicom_dir(scan: _Scan, folder: str, candidates: list[str], override: str | None, origin: str) -> None:
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    except RuntimeError as exc:
        scan.problem(folder, "unreadable", f"DICOM folder cannot be scanned: {exc}", origin)
        return
    used: set[str] = set()
    for uid in sorted(series_ids):
        files = tuple(os.path.abspath(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        if not files:
            continue
        used.update(files)
        modality = override or scan.config.modality or _dicom_modality(files[0]) or _default_modality(scan, None)
        key = f"{os.path.abspath(folder)}#series={uid}"
        scan.add(Source(key, os.path.abspath(folder), "dicom", modality, files=files, origin=origin))
    orphans = [f for f in candidates if os.path.abspath(f) not in used]
    if orphans:
        scan.problem(
            folder,
            "unreadable",
            f"{len(orphans)} DICOM-like file(s) belong to no readable DICOM image series (e.g. {os.path.basename(orphans[0])})",
            origin,
        )


def _scan_folder(scan: _Scan, folder: str, override: str | None, origin: str) -> None:
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        if root != folder and is_nnunet_dataset(root):
            dirs[:] = []
            _scan_nnunet_dataset(scan, os.path.abspath(root), override, origin)
            continue
        dicom_candidates: list[str] = []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            kind = image_kind(name)
            if kind is not None:
                full = os.path.abspath(path)
                scan.add(Source(full, full, kind, _default_modality(scan, override), origin=origin))
            elif _looks_like_dicom(path):
                dicom_candidates.append(path)
            else:
                scan.ignored.append(os.path.abspath(path))
        if dicom_candidates:
            _scan_dicom_dir(scan, root, dicom_candidates, override, origin)


def _read_list(path: str) -> list[tuple[str, str | None]]:
    """Entries ``(path, modality or None)`` of a ``.txt`` or ``.json`` list, relative to its folder."""
    base = os.path.dirname(os.path.abspath(path))
    entries: list[tuple[str, str | None]] = []
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict):
            data = data.get("inputs", data.get("paths", data.get("images")))
        if not isinstance(data, list):
            raise ValueError("a JSON list must be a list of paths or of {'path': ..., 'modality': ...} objects")
        for item in data:
            if isinstance(item, str):
                entries.append((item, None))
            elif isinstance(item, dict) and isinstance(item.get("path"), str):
                modality = item.get("modality")
                if modality is not None:
                    modality = str(modality).lower()
                    if modality not in MODALITIES:
                        raise ValueError(f"unknown modality {item.get('modality')!r} for {item['path']}")
                entries.append((item["path"], modality))
            else:
                raise ValueError(f"bad list item {item!r}")  # noqa: TRY004 - reported as a parse error
    else:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append((line, None))
    return [(p if os.path.isabs(os.path.expanduser(p)) else os.path.join(base, p), m) for p, m in entries]


def _is_list_file(path: str) -> bool:
    lower = path.lower()
    if lower.endswith(".txt"):
        return True
    if lower.endswith(".json"):
        return os.path.basename(lower) != "dataset.json"
    return False


def _scan_path(scan: _Scan, path: str, override: str | None, origin: str) -> None:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        scan.problem(path, "not found", "path does not exist", origin)
        return
    if os.path.isdir(path):
        if is_nnunet_dataset(path):
            _scan_nnunet_dataset(scan, path, override, origin or path)
        else:
            _scan_folder(scan, path, override, origin or path)
        return
    if os.path.basename(path).lower() == "dataset.json":
        _scan_path(scan, os.path.dirname(path), override, origin)
        return
    if _is_list_file(path):
        if path in scan.visiting:
            scan.problem(path, "unreadable", "list file includes itself", origin)
            return
        scan.visiting.add(path)
        try:
            entries = _read_list(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            scan.problem(path, "unreadable", f"cannot parse list file: {exc}", origin)
            return
        if not entries:
            scan.problem(path, "no images", "list file is empty", origin)
        for entry, modality in entries:
            _scan_path(scan, entry, modality or override, path)
        scan.visiting.discard(path)
        return
    kind = image_kind(path)
    if kind is not None:
        scan.add(Source(path, path, kind, _default_modality(scan, override), origin=origin))
    elif _looks_like_dicom(path):
        _scan_dicom_dir(scan, os.path.dirname(path), [path], override, origin)
    else:
        # Named explicitly, so offer it to the reader: it reports what is wrong with it.
        scan.add(Source(path, path, "image", _default_modality(scan, override), origin=origin))


def scan_inputs(config: DataConfig) -> tuple[list[Source], list[ScanProblem]]:
    """Every volume named by ``config.inputs``, and every input that yields none.

    Args:
        config: The data configuration; ``inputs`` and ``modality`` are used.

    Returns:
        ``(sources, problems)``, both sorted by key; a volume reachable twice appears once.
    """
    scan = _Scan(config)
    for path in config.inputs:
        _scan_path(scan, path, None, "")
    if scan.ignored:
        shown = ", ".join(scan.ignored[:IGNORED_SHOWN])
        more = f" and {len(scan.ignored) - IGNORED_SHOWN} more" if len(scan.ignored) > IGNORED_SHOWN else ""
        logger.info("ignored %d file(s) that are neither images nor DICOM: %s%s", len(scan.ignored), shown, more)
    if scan.undetermined:
        logger.warning(
            "%d volume(s) carry no modality information: each one's modality is decided from its intensities "
            "(CT: air near -1000 HU; MR: no negative values), ambiguous ones are skipped; give --modality ct|mr "
            "to choose instead", scan.undetermined,
        )
    if scan.duplicates:
        logger.info("%d volume(s) were reached through more than one input and are used once", scan.duplicates)
    problems = [p for k, p in scan.problems.items() if k not in scan.sources]
    return sorted(scan.sources.values(), key=lambda s: s.key), sorted(problems, key=lambda p: p.key)


def _file_digest(path: str, update: Any) -> None:
    stat = os.stat(path)
    update(f"{os.path.basename(path)}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
    with open(path, "rb") as fh:
        update(fh.read(_DIGEST_BYTES))
        if stat.st_size > 2 * _DIGEST_BYTES:
            fh.seek(-_DIGEST_BYTES, os.SEEK_END)
        update(fh.read(_DIGEST_BYTES))


def _companion_files(path: str) -> Iterable[str]:
    """Data files named by a detached header (``.mhd`` ElementDataFile, ``.nhdr`` data file)."""
    lower = path.lower()
    if not lower.endswith((".mhd", ".nhdr")):
        return []
    out: list[str] = []
    try:
        with open(path, encoding="latin-1") as fh:
            for line in fh.read(65536).splitlines():
                key, _, value = line.partition("=" if lower.endswith(".mhd") else ":")
                if key.strip().lower() in ("elementdatafile", "data file", "datafile"):
                    candidate = os.path.join(os.path.dirname(path), value.strip())
                    if os.path.isfile(candidate):
                        out.append(candidate)
    except OSError:
        return []
    return out


def source_digest(source: Source) -> str:
    """Fingerprint of a source: size, mtime and SHA-256 of the first and last MiB of its file(s).

    DICOM series hash every file's name, size and mtime plus the first and last file's bytes.

    Raises:
        OSError: if a file cannot be read.
    """
    h = hashlib.sha256()
    if source.files:
        for path in source.files:
            stat = os.stat(path)
            h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        _file_digest(source.files[0], h.update)
        _file_digest(source.files[-1], h.update)
    else:
        _file_digest(source.path, h.update)
        for companion in _companion_files(source.path):
            _file_digest(companion, h.update)
    return h.hexdigest()[:32]


def cache_name(source_key: str) -> str:
    """Stable file name of a source's cached array: readable stem plus a hash of the key."""
    path = source_key.partition("#series=")[0]
    stem = _strip_image_suffix(os.path.basename(path.rstrip("/")))
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60] or "volume"
    digest = hashlib.sha1(source_key.encode()).hexdigest()[:12]
    return f"{stem}_{digest}.b2nd"
