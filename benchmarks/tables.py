"""Plain-text and Markdown tables for the benchmark scripts."""
from __future__ import annotations


def format_table(header: list[str], rows: list[list[str]], markdown: bool, right_align: bool = False) -> str:
    """Render ``rows`` under ``header`` as a Markdown table or as aligned plain text."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    align = str.rjust if right_align else str.ljust
    lines = ["  ".join(align(cell, w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
