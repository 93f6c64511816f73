"""Find the volumes behind the configured inputs and fingerprint them.

An input is an image file, a folder (searched recursively for image files and DICOM series), an
nnU-Net raw dataset (``dataset.json`` with ``imagesTr``/``imagesTs``; every channel file is a
volume of its own, ``labelsTr`` is ignored), or a list file (``.txt`` or ``.json``) naming any of
these. Inputs that cannot be used at this stage (missing paths, unparsable lists, DICOM-like files
that belong to no readable series, names that are not UTF-8, FIFOs and other non-regular files,
folders that cannot be listed, a second name of a file already found, a file given two
modalities) become :class:`ScanProblem` records so that the manifest can list them; nothing is
dropped silently.

Only regular files are opened (after following symlinks), so a FIFO named like a volume cannot
block the scan. Symlinked folders are followed; a folder is scanned once however it is reached
(``(st_dev, st_ino)``), which also ends symlink loops. A file reached under two names (a symlink,
a hard link, a symlinked folder) is used once, under the first name found.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
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

# Reasons (manifest categories) of inputs skipped while scanning.
NOT_FOUND = "not found"
UNREADABLE = "unreadable"
NO_IMAGES = "no images"
NAME_NOT_UTF8 = "name not UTF-8"
NOT_REGULAR = "not a regular file"
DUPLICATE = "duplicate"
MODALITY_CONFLICT = "modality conflict"

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


class NotRegularFile(OSError):
    """A path that is not a regular file (a FIFO, socket or device): never opened."""


def shown_path(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 are shown as ``\\xNN``.

    ``os`` functions give such bytes back as lone surrogates (``surrogateescape``); they cannot be
    written to JSON or passed to SimpleITK.
    """
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


@dataclass
class _Scan:
    config: DataConfig
    sources: dict[str, Source] = field(default_factory=dict)
    problems: dict[str, ScanProblem] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    duplicates: int = 0
    visiting: set[str] = field(default_factory=set)
    #: File identity ``(st_dev, st_ino)`` (or the absolute path if it cannot be stat'ed; DICOM
    #: series: the folder's identity plus the series UID) -> key of the source using it.
    identities: dict[Any, str] = field(default_factory=dict)
    #: Keys whose modality was given for them (a list entry, dataset.json, a DICOM tag) -> who gave it.
    modality_given_by: dict[str, str] = field(default_factory=dict)
    #: Identities of files given two modalities (skipped, later names too).
    conflicts: set[Any] = field(default_factory=set)
    #: Folders scanned so far: ``(st_dev, st_ino)`` -> path.
    folders: dict[tuple[int, int], str] = field(default_factory=dict)

    def add(self, source: Source, identity: Any = None, given_by: str | None = None) -> None:
        """Use ``source`` unless its file is already used (under this or another name).

        Args:
            source: The volume.
            identity: What makes two names the same file (default: the key).
            given_by: Who gave the source its modality (a list entry, dataset.json, a DICOM tag);
                ``None`` if none did (the modality is ``"auto"`` or only the ``--modality`` default).
        """
        identity = source.key if identity is None else identity
        if identity in self.conflicts:
            return
        first_key = self.identities.get(identity)
        if first_key is None:
            self.identities[identity] = source.key
            self.sources[source.key] = source
            if given_by is not None:
                self.modality_given_by[source.key] = given_by
            return
        first = self.sources[first_key]
        first_by = self.modality_given_by.get(first_key)
        if given_by is not None and first_by is None:
            # The first name carried no modality of its own (none, or only --modality): this one's holds.
            self.sources[first_key] = replace(first, modality=source.modality)
            self.modality_given_by[first_key] = given_by
        elif given_by is not None and source.modality != first.modality:
            del self.sources[first_key]
            self.conflicts.add(identity)
            same = "" if source.key == first_key else f" (the same file as {source.key})"
            detail = (
                f"given two modalities: {first.modality.upper()} by {first_by} and "
                f"{source.modality.upper()} by {given_by}{same}; give it once"
            )
            logger.error("%s: %s", first_key, detail)
            self.problems[first_key] = ScanProblem(first_key, first.path, MODALITY_CONFLICT, detail, first.origin)
            return
        if source.key == first_key:
            self.duplicates += 1
        else:
            self.problem(
                source.key, DUPLICATE, f"the same file as {first_key}, which is used (once)", source.origin
            )

    def problem(self, path: str, reason: str, detail: str, origin: str) -> None:
        shown = shown_path(path)
        key = os.path.abspath(shown)
        self.problems.setdefault(key, ScanProblem(key, shown, reason, detail, shown_path(origin)))

    def ignore(self, path: str) -> None:
        self.ignored.append(shown_path(os.path.abspath(path)))

    @property
    def undetermined(self) -> int:
        return sum(1 for s in self.sources.values() if s.modality == AUTO)


def _identity(path: str) -> Any:
    """``(st_dev, st_ino)`` of the file ``path`` leads to, or the absolute path if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return (st.st_dev, st.st_ino)


def _entry_name(path: str, origin: str) -> str:
    """How a list entry, a dataset file or a folder file is named in messages."""
    return f"{origin} (entry {path})" if origin and origin != path else path


def _add_file(
    scan: _Scan,
    path: str,
    kind: str,
    override: str | None,
    origin: str,
    modality: str | None = None,
    given_by: str | None = None,
    channel: int | None = None,
) -> None:
    """Add the image file ``path`` (absolute), or list why not: a name that is not UTF-8, not a regular file.

    Args:
        scan: The scan.
        path: Absolute path.
        kind: Manifest kind.
        override: Modality given for the input (a list entry's), if any.
        origin: The input it was found through.
        modality: Modality read from the data (an nnU-Net dataset's ``channel_names``), if any.
        given_by: Who gave ``modality``.
        channel: nnU-Net channel index, if any.
    """
    if not _is_utf8(path):
        scan.problem(path, NAME_NOT_UTF8, "the file name is not valid UTF-8 (shown escaped): not read", origin)
        return
    try:
        st = os.stat(path)
    except OSError:
        identity: Any = path  # A dangling link: the digest reports it as unreadable.
    else:
        if not stat.S_ISREG(st.st_mode):
            scan.problem(path, NOT_REGULAR, f"{_file_type(st.st_mode)}, not a regular file: not opened", origin)
            return
        identity = (st.st_dev, st.st_ino)
    if override is not None:
        chosen, by = override, _entry_name(path, origin)
    elif scan.config.modality is not None:
        chosen, by = scan.config.modality, None  # a default: a list entry's modality wins
    elif modality is not None:
        chosen, by = modality, given_by
    else:
        chosen, by = AUTO, None
    scan.add(Source(path, path, kind, chosen, channel=channel, origin=origin), identity, by)


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


def _list_folder(scan: _Scan, folder: str, origin: str) -> list[str] | None:
    """Sorted entry names of ``folder``, or ``None`` (listed as unreadable) if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entry.name for entry in entries)
    except OSError as exc:
        scan.problem(folder, UNREADABLE, f"cannot list the folder: {exc.strerror or exc}", origin)
        return None


def _scan_nnunet_dataset(scan: _Scan, folder: str, override: str | None, origin: str) -> None:
    dataset_json = os.path.join(folder, "dataset.json")
    try:
        with open(dataset_json, encoding="utf-8") as fh:
            meta: Any = json.load(fh)
    except (OSError, ValueError) as exc:
        scan.problem(dataset_json, UNREADABLE, f"cannot parse dataset.json: {exc}", origin)
        return
    if not isinstance(meta, dict):
        scan.problem(dataset_json, UNREADABLE, "dataset.json is not a JSON object", origin)
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
        for name in _list_folder(scan, images, origin) or []:
            path = os.path.abspath(os.path.join(images, name))
            if name.startswith(".") or os.path.isdir(path):
                continue
            if file_ending and name.lower().endswith(file_ending):
                stem = name[: -len(file_ending)]
            elif image_kind(name) is not None:
                stem = _strip_image_suffix(name)
            else:
                scan.ignore(path)
                continue
            match = _CHANNEL_RE.match(stem)
            channel = int(match.group("channel")) if match else None
            modality = given_by = None
            if channel is not None and str(channel) in channel_names:
                modality = modality_from_channel_name(channel_names[str(channel)])
                given_by = f"{dataset_json} (channel {channel}: {channel_names[str(channel)]!r})"
            # Files with the dataset's own ending but an unknown suffix (e.g. .png, .tif) are still
            # offered to the reader: it decides (and 2-D images are reported as such).
            _add_file(scan, path, image_kind(name) or "image", override, folder, modality, given_by, channel)
            found += 1
    if found == 0:
        scan.problem(folder, NO_IMAGES, "nnU-Net dataset without files in imagesTr/imagesTs", origin)


def _gdcm_safe(folder: str) -> bool:
    """Whether GDCM may scan ``folder``: every entry is a folder or a regular file with a UTF-8 name.

    GDCM reads every file of the folder it scans: it must not meet a FIFO (it silently drops files
    of the series then), and SimpleITK cannot hand back names that are not UTF-8.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    for name in names:
        if not _is_utf8(name):
            return False
        try:
            mode = os.stat(os.path.join(folder, name)).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return False
    return True


def _dicom_tags(path: str) -> dict[str, str] | None:
    """Series UID, position, orientation and instance number of one DICOM file, or ``None`` if unreadable."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    tags = {"uid": "0020|000e", "position": "0020|0032", "orientation": "0020|0037", "instance": "0020|0013"}
    return {name: reader.GetMetaData(tag).strip() for name, tag in tags.items() if reader.HasMetaDataKey(tag)}


def _floats(text: str | None, count: int) -> list[float] | None:
    try:
        values = [float(v) for v in (text or "").split("\\")]
    except ValueError:
        return None
    return values if len(values) == count else None


def _group_dicom_files(scan: _Scan, candidates: list[str], origin: str) -> dict[str, list[str]]:
    """Series UID -> files in slice order, read file by file (where GDCM cannot scan the folder).

    Files are ordered along the slice normal when every file has a position and orientation, else
    by instance number, else by name. Names that are not UTF-8 are listed as skipped.
    """
    found: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for path in candidates:
        if not _is_utf8(path):
            scan.problem(path, NAME_NOT_UTF8, "the file name is not valid UTF-8 (shown escaped): not read", origin)
            continue
        tags = _dicom_tags(path)
        if tags and tags.get("uid"):
            found.setdefault(tags["uid"], []).append((os.path.abspath(path), tags))
    series: dict[str, list[str]] = {}
    for uid, files in found.items():
        read = [_floats(t.get("position"), 3) for _, t in files]
        positions = [p for p in read if p is not None]
        orientation = _floats(files[0][1].get("orientation"), 6)
        if orientation is not None and len(positions) == len(files):
            row, col = orientation[:3], orientation[3:]
            normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
            order = sorted(range(len(files)), key=lambda i: (sum(a * b for a, b in zip(positions[i], normal, strict=True)), files[i][0]))
        elif all(t.get("instance", "").lstrip("-").isdigit() for _, t in files):
            order = sorted(range(len(files)), key=lambda i: (int(files[i][1]["instance"]), files[i][0]))
        else:
            order = sorted(range(len(files)), key=lambda i: files[i][0])
        series[uid] = [files[i][0] for i in order]
    return series


def _scan_dicom_dir(
    scan: _Scan, folder: str, candidates: list[str], override: str | None, origin: str, gdcm_safe: bool | None = None
) -> None:
    if gdcm_safe is None:
        gdcm_safe = _gdcm_safe(folder)
    if gdcm_safe:
        try:
            series = {
                uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
            }
        except RuntimeError as exc:
            scan.problem(folder, UNREADABLE, f"DICOM folder cannot be scanned: {exc}", origin)
            return
    else:
        series = _group_dicom_files(scan, candidates, origin)
    folder_identity = _identity(folder)
    used: set[str] = set()
    for uid in sorted(series):
        files: list[str] = []
        seen: set[Any] = set()
        for name in series[uid]:
            path = os.path.abspath(name)
            identity = _identity(path)
            if identity in seen:  # The same file under two names (a symlinked slice): read once.
                scan.duplicates += 1
                used.add(path)
                continue
            seen.add(identity)
            files.append(path)
        if not files:
            continue
        used.update(files)
        if override is not None:
            modality, by = override, _entry_name(folder, origin)
        elif scan.config.modality is not None:
            modality, by = scan.config.modality, None  # a default: a list entry's modality wins
        else:
            tag = _dicom_modality(files[0])
            modality, by = (tag, f"the DICOM Modality tag of {files[0]}") if tag else (AUTO, None)
        key = f"{os.path.abspath(folder)}#series={uid}"
        scan.add(
            Source(key, os.path.abspath(folder), "dicom", modality, files=tuple(files), origin=origin),
            (folder_identity, uid),
            by,
        )
    orphans = [f for f in candidates if os.path.abspath(f) not in used and _is_utf8(f)]
    if orphans:
        scan.problem(
            folder,
            UNREADABLE,
            f"{len(orphans)} DICOM-like file(s) belong to no readable DICOM image series (e.g. {os.path.basename(orphans[0])})",
            origin,
        )


def _scan_folder(scan: _Scan, folder: str, override: str | None, origin: str) -> None:
    """Scan ``folder`` recursively: files first, then subfolders; symlinked subfolders after all others.

    A folder already scanned (through any input or link) is not scanned again; a symlink leading
    to one is listed as a duplicate (or as a loop, if it leads back to a folder above it).
    """
    folders = [folder]
    linked: list[str] = []
    while folders or linked:
        current = folders.pop() if folders else linked.pop()
        try:
            st = os.stat(current)
        except OSError as exc:
            scan.problem(current, UNREADABLE, f"cannot open the folder: {exc.strerror or exc}", origin)
            continue
        identity = (st.st_dev, st.st_ino)
        first = scan.folders.get(identity)
        if first is not None:
            if os.path.islink(current):
                real, parent = os.path.realpath(current), os.path.realpath(os.path.dirname(current))
                loop = parent == real or parent.startswith(real.rstrip(os.sep) + os.sep)
                what = "a symlink loop: leads back to" if loop else "a symlink to"
                scan.problem(current, DUPLICATE, f"{what} {first}, a folder already scanned", origin)
            continue
        scan.folders[identity] = current
        if current != folder and is_nnunet_dataset(current):
            _scan_nnunet_dataset(scan, os.path.abspath(current), override, origin)
            continue
        names = _list_folder(scan, current, origin)
        if names is None:
            continue
        subfolders: list[str] = []
        linked_subfolders: list[str] = []
        images: list[tuple[str, str]] = []
        linked_images: list[tuple[str, str]] = []
        dicom_candidates: list[str] = []
        gdcm_safe = True
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(current, name)
            try:
                mode: int | None = os.stat(path).st_mode
            except OSError:
                mode = None  # A dangling link: an image name is reported unreadable by the digest.
            if mode is not None and stat.S_ISDIR(mode):
                if not _is_utf8(name):
                    scan.problem(path, NAME_NOT_UTF8, "the folder name is not valid UTF-8 (shown escaped): not scanned", origin)
                else:
                    (linked_subfolders if os.path.islink(path) else subfolders).append(path)
                continue
            if mode is not None and not stat.S_ISREG(mode):
                gdcm_safe = False
                scan.problem(path, NOT_REGULAR, f"{_file_type(mode)}, not a regular file: not opened", origin)
                continue
            gdcm_safe = gdcm_safe and _is_utf8(name)
            kind = image_kind(name)
            if kind is not None:
                (linked_images if os.path.islink(path) else images).append((os.path.abspath(path), kind))
            elif _looks_like_dicom(path):
                dicom_candidates.append(path)
            else:
                scan.ignore(path)
        for path, kind in images + linked_images:  # a file's own name before a link's
            _add_file(scan, path, kind, override, origin)
        if dicom_candidates:
            _scan_dicom_dir(scan, current, dicom_candidates, override, origin, gdcm_safe)
        folders.extend(reversed(subfolders))
        linked.extend(reversed(linked_subfolders))


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
    if not _is_utf8(path):
        scan.problem(path, NAME_NOT_UTF8, "the path is not valid UTF-8 (shown escaped): not read", origin)
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        scan.problem(path, NOT_FOUND, "path does not exist", origin)
        return
    except OSError as exc:
        scan.problem(path, UNREADABLE, f"cannot open it: {exc.strerror or exc}", origin)
        return
    if stat.S_ISDIR(mode):
        if is_nnunet_dataset(path):
            _scan_nnunet_dataset(scan, path, override, origin or path)
        else:
            _scan_folder(scan, path, override, origin or path)
        return
    if not stat.S_ISREG(mode):
        scan.problem(path, NOT_REGULAR, f"{_file_type(mode)}, not a regular file: not opened", origin)
        return
    if os.path.basename(path).lower() == "dataset.json":
        _scan_path(scan, os.path.dirname(path), override, origin)
        return
    if _is_list_file(path):
        if path in scan.visiting:
            scan.problem(path, UNREADABLE, "list file includes itself", origin)
            return
        scan.visiting.add(path)
        try:
            entries = _read_list(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            scan.problem(path, UNREADABLE, f"cannot parse list file: {exc}", origin)
            return
        if not entries:
            scan.problem(path, NO_IMAGES, "list file is empty", origin)
        for entry, modality in entries:
            _scan_path(scan, entry, modality or override, path)
        scan.visiting.discard(path)
        return
    kind = image_kind(path)
    if kind is not None:
        _add_file(scan, path, kind, override, origin)
    elif _looks_like_dicom(path):
        _scan_dicom_dir(scan, os.path.dirname(path), [path], override, origin)
    else:
        # Named explicitly, so offer it to the reader: it reports what is wrong with it.
        _add_file(scan, path, "image", override, origin)


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
            "(CT: an air peak near -1000 HU; MR: no negative values, or noise around zero far below the tissue), "
            "ambiguous ones are skipped; give --modality ct|mr "
            "to choose instead", scan.undetermined,
        )
    if scan.duplicates:
        logger.info("%d volume(s) were reached through more than one input and are used once", scan.duplicates)
    problems = [p for k, p in scan.problems.items() if k not in scan.sources]
    return sorted(scan.sources.values(), key=lambda s: s.key), sorted(problems, key=lambda p: p.key)


def _regular_stat(path: str) -> os.stat_result:
    """``os.stat(path)``, refusing what is not a regular file (a FIFO would block the reader).

    Raises:
        NotRegularFile: if ``path`` is a FIFO, socket, device or folder.
        OSError: if it cannot be stat'ed.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{shown_path(path)} is {_file_type(st.st_mode)}, not a regular file: not opened")
    return st


def _file_digest(path: str, update: Any) -> None:
    st = _regular_stat(path)
    update(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}|".encode("utf-8", "surrogateescape"))
    with open(path, "rb") as fh:
        update(fh.read(_DIGEST_BYTES))
        if st.st_size > 2 * _DIGEST_BYTES:
            fh.seek(-_DIGEST_BYTES, os.SEEK_END)
        update(fh.read(_DIGEST_BYTES))


def _companion_files(path: str) -> Iterable[str]:
    """Data files named by a detached header (``.mhd`` ElementDataFile, ``.nhdr`` data file) that exist."""
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
                    if os.path.exists(candidate) and not os.path.isdir(candidate):
                        out.append(candidate)
    except OSError:
        return []
    return out


def source_digest(source: Source) -> str:
    """Fingerprint of a source: size, mtime and SHA-256 of the first and last MiB of its file(s).

    DICOM series hash every file's name, size and mtime plus the first and last file's bytes.

    Raises:
        NotRegularFile: if a file (a DICOM slice, a detached header's data file) is not a regular file.
        OSError: if a file cannot be read.
    """
    h = hashlib.sha256()
    if source.files:
        for path in source.files:
            st = _regular_stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
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
    digest = hashlib.sha1(source_key.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{stem}_{digest}.b2nd"
