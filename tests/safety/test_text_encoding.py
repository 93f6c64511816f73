"""Text files are UTF-8 whatever the locale, and the CLI survives an ASCII terminal.

CI and many cluster nodes run Python with an ASCII locale (``LC_ALL=C`` with ``PYTHONUTF8=0``), where
``open()`` and ``Path.read_text()`` without an encoding use ASCII and fail on the reports' +/- signs.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("nnunet_ssl", "pretraining", "plans", "trainers", "benchmarks", "tests")
BINARY_MODULES = {"gzip", "tarfile", "zipfile", "blosc2", "Image", "os", "io", "bz2", "lzma", "webbrowser"}


def mode_of(call: ast.Call, position: int) -> str | None:
    """The call's mode argument if it is a literal; ``"?"`` if it is computed."""
    for keyword in call.keywords:
        if keyword.arg == "mode":
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "?"
    if len(call.args) > position:
        argument = call.args[position]
        return argument.value if isinstance(argument, ast.Constant) else "?"
    return None


def text_calls_without_encoding(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg in ("encoding", None) for k in node.keywords):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            mode = mode_of(node, 1)
        elif isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
            mode = "t"
        elif isinstance(func, ast.Attribute) and func.attr == "open" and not (
            isinstance(func.value, ast.Name) and func.value.id in BINARY_MODULES
        ):
            mode = mode_of(node, 0)
        else:
            continue
        if mode != "?" and "b" not in (mode or ""):
            yield node


def test_every_text_file_access_names_its_encoding() -> None:
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            offenders += [f"{path.relative_to(ROOT)}:{call.lineno}" for call in text_calls_without_encoding(tree)]
    assert not offenders, "text-mode file access without encoding=\"utf-8\": " + ", ".join(offenders)


def test_the_checker_finds_what_it_should() -> None:
    source = 'open(p)\nopen(p, "rb")\np.read_text()\np.write_text(s, encoding="utf-8")\np.open("w")\ngzip.open(p)\n'
    assert [c.lineno for c in text_calls_without_encoding(ast.parse(source))] == [1, 3, 5]


def test_cli_output_survives_an_ascii_locale() -> None:
    command = ["-c", "from nnunet_ssl.cli import tolerate_narrow_terminals as t; t(); print('0.81 \\u00b1 0.02 \\u2192 best')"]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": ""}
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    assert result.stdout.decode("ascii").strip() == "0.81 \\xb1 0.02 \\u2192 best"
