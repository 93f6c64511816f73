"""Case identifiers that can only name files inside their folder.

nnU-Net builds file names from case identifiers: preprocessing writes
``join(data_folder, identifier) + ".b2nd"`` and copies labels to
``gt_segmentations/<identifier><file_ending>``, prediction writes ``<identifier><file_ending>``.
Identifiers come from file names in ``imagesTr`` or, in nnU-Net 2.8, from the keys of the
``"dataset"`` mapping of ``dataset.json``, which may be any string: a key ``"../../../x"`` writes
three folders above the data folder. Every identifier read from a user's file (``dataset.json``,
``splits_final.json``, a data or test folder, a validation summary) goes through :func:`check_case_id`
before anything is written.

The rule: a case identifier is a non-empty string that is a plain file name. Refused are a path
separator (``/`` or ``\\``, which is one on Windows), a leading ``.`` (``.`` and ``..`` name folders,
other dot names are hidden files), control characters (NUL included) and text that is not valid
Unicode (undecodable file name bytes). Everything nnU-Net's datasets use is allowed: letters,
digits, ``_``, ``-``, inner dots (``1.2.840.113619``), spaces and non-ASCII letters.
"""
from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable

RULE = "a case identifier must be a plain file name: not empty, no '/' or '\\', not starting with '.', " \
    "no control characters"


class CaseIdError(ValueError):
    """A case identifier (or file ending) that is not a plain file name."""


def case_id_problem(value: object) -> str | None:
    """Why ``value`` is not a safe case identifier, or None when it is."""
    if not isinstance(value, str):
        return f"is not a string but {type(value).__name__} {value!r}"
    if not value:
        return "is empty"
    if value.startswith("."):
        return "names a folder" if value in (".", "..") else "starts with '.'"
    return _characters_problem(value)


def _characters_problem(value: str) -> str | None:
    for separator in ("/", "\\"):
        if separator in value:
            return f"contains the path separator {separator!r}"
    for character in value:
        category = unicodedata.category(character)
        if category == "Cc":
            return f"contains the control character {character!r}"
        if category == "Cs":
            return "is not valid text (a file name with bytes that are not UTF-8)"
    return None


def _message(source: str | os.PathLike[str], what: str, value: object, where: str, problem: str, rule: str) -> str:
    place = f" ({where})" if where else ""
    return f"{source}: {what} {value!r}{place} {problem}; {rule}"


def check_case_id(value: object, source: str | os.PathLike[str], where: str = "") -> str:
    """``value`` when it is a safe case identifier.

    Args:
        value: The identifier as read.
        source: The file or folder it was read from (named in the error).
        where: Where in that file, e.g. ``"fold 3, 'train' entry 2"``.

    Raises:
        CaseIdError: when it is not a plain file name (see the module docstring).
    """
    problem = case_id_problem(value)
    if problem is not None:
        raise CaseIdError(_message(source, "case identifier", value, where, problem, RULE))
    return value  # type: ignore[return-value]  # a str: case_id_problem checked it


def check_case_ids(values: Iterable[object], source: str | os.PathLike[str]) -> list[str]:
    """Every identifier of ``values`` checked with :func:`check_case_id` (the first bad one raises)."""
    return [check_case_id(value, source) for value in values]


def check_file_ending(value: object, source: str | os.PathLike[str]) -> str:
    """``dataset.json``'s ``file_ending`` when appending it to a safe identifier keeps a plain file name.

    Raises:
        CaseIdError: when it is not a string, or holds a path separator or a control character.
    """
    problem = (f"is not a string but {type(value).__name__} {value!r}" if not isinstance(value, str)
               else _characters_problem(value))
    if problem is not None:
        raise CaseIdError(_message(source, "file_ending", value, "", problem,
                                   "file_ending must be a file name suffix such as '.nii.gz'"))
    return value  # type: ignore[return-value]
