"""Read a report.md back: its sections, Markdown tables, Files list and Mean Dice tables (for the file-agreement tests)."""
from __future__ import annotations

import csv
import re
from pathlib import Path

#: A Mean Dice cell: "0.912", "0.912 (-0.2%, p=1.000)", "0.500 [3 cases] (gap n/a: ...)", "n/a", "missing".
CELL = re.compile(r"^(?P<value>n/a|missing|-?\d+\.\d+)(?: \[(?P<cases>\d+) cases\])?(?: \((?P<gap>[^,]+), (?P<p>[^)]+)\))?$")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def sections(markdown: str, level: str = "##") -> dict[str, str]:
    """Heading text -> the text under it, up to the next heading of the same level."""
    parts: dict[str, str] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith(level + " "):
            current = line[len(level) + 1:].strip()
            parts[current] = ""
        elif current is not None:
            parts[current] += line + "\n"
    return parts


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text``, as rows keyed by the header."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]
            found.append([dict(zip(header, row, strict=True)) for row in rows])
            block = []
    return found


def files_listed(markdown: str) -> list[str]:
    """The names under ``## Files`` (each bullet's first code span)."""
    text = sections(markdown)["Files"]
    return [re.match(r"- `([^`]+)`", line).group(1) for line in text.splitlines() if line.startswith("- `")]


def mean_dice_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Setting title -> rows of its Mean Dice table (one ``### title`` per setting, or the caption's title)."""
    text = sections(markdown)["Mean Dice"]
    subsections = sections(text, "###")
    if subsections:
        return {title: tables(body)[0] for title, body in subsections.items()}
    caption = next(line for line in text.splitlines() if ". Mean Dice over cases" in line)
    return {caption.split(". Mean Dice over cases")[0]: tables(text)[0]}


def cell(text: str) -> dict[str, str | None]:
    match = CELL.match(text)
    assert match is not None, f"not a Mean Dice cell: {text!r}"
    return match.groupdict()
