"""The documentation holds together: README.md stays short and points to every page under docs/, and no link breaks.

Checked on README.md and docs/*.md: every relative Markdown link resolves to a file or folder of the
repository and, where it has a ``#anchor``, to a heading of that file (GitHub's anchor rule); the README
stays under 200 lines and links every docs page; every docs page but benchmarks.md shows its commands
(a fenced code block) before its second heading. Links inside code blocks and inline code are not links.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: The README's length limit: a newcomer reads it in five minutes (issue 21).
README_MAX_LINES = 200
#: Pages that are not "commands first": the measurements.
NOT_COMMANDS_FIRST = ("benchmarks.md",)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass(frozen=True)
class Link:
    """One Markdown link: the file it is in, its line (1-based) and its target as written."""

    source: Path
    line: int
    target: str


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks, fence lines dropped."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, line))
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered (no inline code marks, link text only),
    lower case, every character but letters, digits, '-', '_' and spaces dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get GitHub's suffixes -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(path: Path) -> list[Link]:
    """The links of a Markdown file outside code blocks and inline code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append(Link(path, number, match.group(1)))
    return found


def is_relative(target: str) -> bool:
    """A link into the repository: not a URL (http:, https:, mailto:, ...) and not absolute."""
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("/")


def broken_links(path: Path, root: Path) -> list[str]:
    """Every relative link of ``path`` that names no file or folder under ``root``, or a #anchor that is
    no heading of the Markdown file it names, as ``file:line: target (reason)``."""
    problems = []
    for link in links(path):
        if not is_relative(link.target):
            continue
        file_part, _, anchor = link.target.partition("#")
        target = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{link.line}: {link.target}"
        if not target.exists():
            problems.append(f"{where} (no such file)")
        elif root.resolve() not in target.resolve().parents and target.resolve() != root.resolve():
            problems.append(f"{where} (outside the repository)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{where} (no heading with anchor #{anchor} in {target.name})")
    return problems


def first_code_before_second_heading(text: str) -> bool:
    """Whether a fenced code block opens before the file's second heading (or anywhere, with one heading)."""
    headings = 0
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            if not in_fence:
                return True
            in_fence = False
            continue
        if HEADING.match(line):
            headings += 1
            if headings == 2:
                return False
    return False


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# --- the rules, on hand-made examples: each can fail ---------------------------------------------------------


def test_github_anchor_rule() -> None:
    assert github_anchor("Transfer report: `nnunet-ssl report`") == "transfer-report-nnunet-ssl-report"
    assert github_anchor("Fine-tuning policies (frozen, warmed-up or layer-wise decayed encoders)") == (
        "fine-tuning-policies-frozen-warmed-up-or-layer-wise-decayed-encoders")
    assert github_anchor("All nine methods at the smit preset, 96^3, and a lighter ConvUpHead pass (2026-11-30)") == (
        "all-nine-methods-at-the-smit-preset-963-and-a-lighter-convuphead-pass-2026-11-30")
    assert github_anchor("Weights files (`-pretrained_weights`)") == "weights-files--pretrained_weights"
    assert github_anchor("See [the page](x.md) now") == "see-the-page-now"


def test_broken_links_are_found(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "examples").mkdir()
    (root / "docs" / "a.md").write_text("# A\n\n## Same\n\n## Same\n\ntext\n", encoding="utf-8")
    (tmp_path / "elsewhere.md").write_text("x", encoding="utf-8")
    (root / "README.md").write_text(
        "# R\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same) [ok](docs/a.md#same-1) [ok](examples/) [self](#r)\n"
        "[web](https://example.org/x.md) `[code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
        "[bad file](docs/b.md)\n"
        "[bad anchor](docs/a.md#same-2) [bad self](#nothing)\n"
        "[outside](../elsewhere.md)\n", encoding="utf-8")
    assert broken_links(root / "README.md", root) == [
        "README.md:8: docs/b.md (no such file)",
        "README.md:9: docs/a.md#same-2 (no heading with anchor #same-2 in a.md)",
        "README.md:9: #nothing (no heading with anchor #nothing in README.md)",
        "README.md:10: ../elsewhere.md (outside the repository)"]


def test_commands_first_rule() -> None:
    assert first_code_before_second_heading("# T\n\nwhat\n\n```bash\ncmd\n```\n\n## Next\n")
    assert not first_code_before_second_heading("# T\n\nwhat\n\n## Commands\n\n```bash\ncmd\n```\n")
    assert not first_code_before_second_heading("# T\n\nno commands at all\n")
    assert first_code_before_second_heading("# T\n\n```\n# not a heading\n```\n## Next\n")


# --- the repository's documentation --------------------------------------------------------------------------


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path, ROOT) == []


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move a topic to a page under docs/"


def test_every_docs_page_shows_its_commands_first() -> None:
    late = [p.name for p in sorted(DOCS.glob("*.md"))
            if p.name not in NOT_COMMANDS_FIRST and not first_code_before_second_heading(p.read_text(encoding="utf-8"))]
    assert late == [], f"docs pages without a code block before their second heading: {late}"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / link.target.partition("#")[0]).resolve() for link in links(README) if is_relative(link.target)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"


def method_table_rows(text: str) -> dict[str, list[str]]:
    """The cells of each ``| `method` | ... |`` row of a Markdown table, by method name."""
    rows: dict[str, list[str]] = {}
    for _, line in prose_lines(text):
        match = re.match(r"^\| `([a-z0-9]+)` \| (.*) \|\s*$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


def test_method_table_says_what_list_methods_prints() -> None:
    """docs/pretraining.md names each Swin method's family and heads in `pretrain --list-methods`' words."""
    from nnunet_ssl.pretraining.methods import METHODS

    rows = method_table_rows((DOCS / "pretraining.md").read_text(encoding="utf-8"))
    swin_methods = sorted(name for name in METHODS if name != "spark3d")
    assert sorted(rows) == swin_methods
    for name in swin_methods:
        info = METHODS[name][0].info
        family, _views, heads, _losses = rows[name]
        assert (family, heads) == (info.family, f"`{info.heads}`"), name


def test_method_table_rows_are_read_from_the_table() -> None:
    text = "intro `smit` here\n| `--method` | family |\n|---|---|\n| `smit` | a | b | c | d |\n```\n| `dino` | x |\n```\n"
    assert method_table_rows(text) == {"smit": ["a", "b", "c", "d"]}
