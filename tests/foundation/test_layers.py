"""Imports follow the layer map of ``nnunet_ssl.layers``: none goes up, none goes round.

Every import in the package is read from the source with ``ast`` (module level, inside functions,
under ``TYPE_CHECKING``; relative ones resolved), so an import hidden in a function to dodge a
cycle is found like any other. Importing ``a.b.c`` also runs the package files ``a.b`` and ``a``:
those count as imports too (except the importer's own packages, which are running already).
Imports built from strings at run time (``importlib.import_module``) are not seen.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnunet_ssl.layers import LAYERS, NO_NNUNET, ROOT_PACKAGE, may_import, position, unit_of

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Source:
    """One module of the package: where it is (for messages), its text, and whether it is a package file."""

    path: str
    text: str
    is_package: bool = False


@dataclass(frozen=True)
class Import:
    """One project-internal import: ``importer`` -> ``imported`` at ``path:line``."""

    importer: str
    imported: str
    path: str
    line: int
    where: str  # "" at module level, else "in f()" / "under TYPE_CHECKING"
    via: str = ""  # the module named in the statement, when ``imported`` is a package file it runs

    def __str__(self) -> str:
        notes = [n for n in (self.where, f"package file, via {self.via}" if self.via else "") if n]
        return f"{self.path}:{self.line}: {self.importer} -> {self.imported}" + (f" ({'; '.join(notes)})" if notes else "")


def folder_to_package() -> dict[str, str]:
    """``setup.py``'s ``FOLDER_TO_PACKAGE``, read from its source (importing setup.py would run setup())."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FOLDER_TO_PACKAGE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no FOLDER_TO_PACKAGE")


def package_sources() -> dict[str, Source]:
    """Every module of the installed namespace, by dotted name, from the four source folders."""
    sources: dict[str, Source] = {}
    for folder, package in folder_to_package().items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            sources[name] = Source(str(path.relative_to(REPO)), path.read_text(encoding="utf-8"), is_package)
    return sources


def _enclosing(tree: ast.AST) -> dict[ast.AST, str]:
    """For each import node inside a function or a ``TYPE_CHECKING`` block, where it is."""
    where: dict[ast.AST, str] = {}

    def visit(node: ast.AST, context: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = context
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = f"in {child.name}()"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = context or "under TYPE_CHECKING"
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inner:
                where[child] = inner
            visit(child, inner)

    visit(tree, "")
    return where


def imports_of(name: str, source: Source, modules: set[str]) -> tuple[list[Import], list[tuple[str, int]]]:
    """Project imports of one module (resolved to modules of ``modules``) and its external ones ``(name, line)``."""
    tree = ast.parse(source.text, filename=source.path)
    where = _enclosing(tree)
    package = name if source.is_package else name.rpartition(".")[0]
    own_packages = {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)} | {name}
    found: list[Import] = []
    external: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [[alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import x``: x is a submodule when there is one, else a name in pkg
            candidates = [[f"{module}.{alias.name}", module] for alias in node.names]
        else:
            continue
        for options in candidates:
            target = next((_module_of(o, modules) for o in options if _module_of(o, modules)), None)
            if target is None:
                external.append((options[-1], node.lineno))
                continue
            # importing a.b.c runs the package files a.b and a first (not the importer's own: they are running)
            ancestors = [target.rsplit(".", n)[0] for n in range(1, target.count(".") + 1)]
            for imported in [target, *ancestors]:
                if imported != name and imported not in own_packages and imported in modules:
                    via = target if imported != target else ""
                    found.append(Import(name, imported, source.path, node.lineno, where.get(node, ""), via))
    unique = {(i.imported, i.line): i for i in reversed(found)}  # one per module and line (the direct one first)
    return sorted(unique.values(), key=lambda i: (i.line, i.imported)), external


def _module_of(dotted: str, modules: set[str]) -> str | None:
    """``dotted`` if it is a module of the package, else None (``a.b.Name`` is not ``a.b``: see imports_of)."""
    return dotted if dotted in modules else None


def _cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted, in a stable order."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:  # recursion depth is bounded by the module count (~120)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(groups)


def check_layers(sources: dict[str, Source]) -> list[str]:
    """Every breach of the layer map in ``sources`` (module name -> source), one line each with file:line.

    Reports modules no unit holds, map units that hold no module, imports into a higher layer or a
    sibling (or a later unit of an ordered layer), a root package that imports the project, units
    of ``NO_NNUNET`` importing nnU-Net, and every import cycle with the imports that close it.
    """
    modules = set(sources)
    problems: list[str] = []
    edges: list[Import] = []
    for name in sorted(sources):
        found, external = imports_of(name, sources[name], modules)
        edges += found
        if name != ROOT_PACKAGE and unit_of(name) is None:
            problems.append(f"{sources[name].path}: {name} is in no unit of nnunet_ssl.layers.LAYERS; add it to a layer")
        for imported, line in external:
            unit = unit_of(name)
            if unit in NO_NNUNET and (imported == "nnunetv2" or imported.startswith("nnunetv2.")):
                problems.append(f"{sources[name].path}:{line}: {name} imports {imported} ({unit} never imports nnU-Net)")
    for unit in (u for layer in LAYERS for u in layer.units):
        if not any(unit_of(m) == unit for m in modules):
            problems.append(f"nnunet_ssl.layers: unit {unit} holds no module; remove it from the map")
    for e in edges:
        if e.imported == ROOT_PACKAGE:
            continue
        if e.importer == ROOT_PACKAGE:
            problems.append(f"{e}: the root package imports nothing of the project")
            continue
        a, b = unit_of(e.importer), unit_of(e.imported)
        if a is None or b is None or may_import(a, b):
            continue
        if e.via and not may_import(a, unit_of(e.via) or b):
            continue  # the import of e.via itself is reported; its package files would only repeat it
        (layer_a, _), (layer_b, _) = position(a), position(b)
        if layer_b > layer_a:
            why = f"up from {LAYERS[layer_a].name} to {LAYERS[layer_b].name}"
        elif LAYERS[layer_a].ordered:
            why = f"{b} is listed after {a} in {LAYERS[layer_a].name}"
        else:
            why = f"{a} and {b} are siblings in {LAYERS[layer_a].name}"
        problems.append(f"{e}: {why}")
    for group in _cycles(edges):
        members = set(group)
        closing = sorted({str(e) for e in edges if e.importer in members and e.imported in members})
        problems.append(f"import cycle between {', '.join(group)}:\n      " + "\n      ".join(closing))
    return problems


def test_package_imports_follow_the_layer_map() -> None:
    problems = check_layers(package_sources())
    assert not problems, f"{len(problems)} breach(es) of nnunet_ssl.layers:\n  " + "\n  ".join(problems)


def test_every_folder_of_setup_py_is_read() -> None:
    """The four folders of the design card, each with modules, and the layer map covers them."""
    sources = package_sources()
    assert set(folder_to_package().values()) <= set(sources)
    assert {"nnunet_ssl.cli", "nnunet_ssl.pretraining.engine", "nnunet_ssl.trainers.base", "nnunet_ssl.plans.planner"} <= set(sources)


# --- the checker catches what it should (synthetic packages in the same namespace) ---------------


def _fake(modules: dict[str, str]) -> dict[str, Source]:
    """A synthetic package: module name -> source text (a trailing ``/`` in the name marks a package file)."""
    out = {}
    for name, text in modules.items():
        is_package = name.endswith("/")
        name = name.rstrip("/")
        out[name] = Source(name.replace(".", "/") + ("/__init__.py" if is_package else ".py"), textwrap.dedent(text), is_package)
    return out


def _only_breaches(problems: list[str]) -> list[str]:
    """Drop the map's 'unit holds no module' lines: a synthetic package has few modules."""
    return [p for p in problems if "holds no module" not in p]


def test_checker_passes_a_clean_package() -> None:
    sources = _fake({
        "nnunet_ssl/": "__version__ = '0'\n",
        "nnunet_ssl.io": "from nnunet_ssl.outputs import x\nfrom nnunet_ssl import __version__\n",
        "nnunet_ssl.outputs": "x = 1\n",
        "nnunet_ssl.pretraining/": "",
        "nnunet_ssl.pretraining.engine": "from . import methods\nfrom nnunet_ssl.io import y\n",
        "nnunet_ssl.pretraining.methods": "import torch\n",
        "nnunet_ssl.cli": "def main():\n    from nnunet_ssl.pretraining.engine import run\n",
    })
    assert _only_breaches(check_layers(sources)) == []


def test_checker_catches_a_planted_upward_import() -> None:
    """An export that rebuilds the method through the pretraining engine, hidden inside a function."""
    sources = _fake({
        "nnunet_ssl.weights/": "",
        "nnunet_ssl.weights.export": "def load():\n    from nnunet_ssl.pretraining.engine import build_run_method\n",
        "nnunet_ssl.pretraining/": "",
        "nnunet_ssl.pretraining.engine": "x = 1\n",
        "nnunet_ssl.plans/": "",
        "nnunet_ssl.plans.plan": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..trainers import named\n",
        "nnunet_ssl.trainers/": "",
        "nnunet_ssl.trainers.named": "",
        "nnunet_ssl.io": "from .splits import x\n",
        "nnunet_ssl.splits": "",
    })
    problems = _only_breaches(check_layers(sources))
    assert any(
        p.startswith("nnunet_ssl/weights/export.py:2: nnunet_ssl.weights.export -> nnunet_ssl.pretraining.engine (in load())")
        and "up from foundation to engines" in p for p in problems
    ), problems
    assert not any("package file" in p for p in problems), problems  # the statement is reported once, not per package
    assert any("plans/plan.py:3: nnunet_ssl.plans.plan -> nnunet_ssl.trainers.named (under TYPE_CHECKING)" in p
               and "siblings in engines" in p for p in problems), problems
    assert any("nnunet_ssl/io.py:1: nnunet_ssl.io -> nnunet_ssl.splits" in p and "listed after" in p for p in problems), problems


def test_checker_catches_a_planted_cycle_and_lists_every_import_of_it() -> None:
    sources = _fake({
        "nnunet_ssl.trainers/": "",
        "nnunet_ssl.trainers.base": "from nnunet_ssl.trainers.policy_trainer import Policy\n",
        "nnunet_ssl.trainers.policy_trainer": "x = 1\n\n\ndef f():\n    from .base import Base\n",
        "nnunet_ssl.trainers.named": "from . import base\n",
    })
    problems = _only_breaches(check_layers(sources))
    assert len(problems) == 1, problems
    assert problems[0].startswith("import cycle between nnunet_ssl.trainers.base, nnunet_ssl.trainers.policy_trainer")
    assert "nnunet_ssl/trainers/base.py:1: nnunet_ssl.trainers.base -> nnunet_ssl.trainers.policy_trainer" in problems[0]
    assert ("nnunet_ssl/trainers/policy_trainer.py:5: nnunet_ssl.trainers.policy_trainer -> nnunet_ssl.trainers.base "
            "(in f())") in problems[0]


def test_checker_finds_a_cycle_through_a_package_file() -> None:
    """io -> weights.format runs weights/__init__.py, which imports export, which imports io."""
    sources = _fake({
        "nnunet_ssl.io": "from nnunet_ssl.weights.format import f\n",
        "nnunet_ssl.weights/": "from nnunet_ssl.weights.export import e\n",
        "nnunet_ssl.weights.format": "f = 1\n",
        "nnunet_ssl.weights.export": "from nnunet_ssl.io import atomic\n",
    })
    problems = _only_breaches(check_layers(sources))
    cycles = [p for p in problems if p.startswith("import cycle")]
    assert len(cycles) == 1 and "nnunet_ssl.io, nnunet_ssl.weights, nnunet_ssl.weights.export" in cycles[0], problems
    assert ("nnunet_ssl/io.py:1: nnunet_ssl.io -> nnunet_ssl.weights (package file, via nnunet_ssl.weights.format)"
            in cycles[0]), cycles


def test_checker_catches_nnunet_in_pretraining_and_unmapped_modules() -> None:
    sources = _fake({
        "nnunet_ssl.pretraining/": "",
        "nnunet_ssl.pretraining.engine": "def f():\n    import nnunetv2.paths\n",
        "nnunet_ssl.newthing": "",
        "nnunet_ssl/": "from nnunet_ssl import io\n",
        "nnunet_ssl.io": "",
    })
    problems = _only_breaches(check_layers(sources))
    assert any("pretraining/engine.py:2: nnunet_ssl.pretraining.engine imports nnunetv2.paths" in p for p in problems), problems
    assert any("nnunet_ssl.newthing is in no unit" in p for p in problems), problems
    assert any("the root package imports nothing of the project" in p for p in problems), problems


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("nnunet_ssl.cli", "nnunet_ssl.pretraining.engine", True),
        ("nnunet_ssl.pretraining.__main__", "nnunet_ssl.cli", True),
        ("nnunet_ssl.pretraining.engine", "nnunet_ssl.cli", False),
        ("nnunet_ssl.trainers.base", "nnunet_ssl.weights.format", True),
        ("nnunet_ssl.weights.export", "nnunet_ssl.pretraining.engine", False),
        ("nnunet_ssl.plans.plan_command", "nnunet_ssl.trainers.named", False),
        ("nnunet_ssl.experiment.tables", "nnunet_ssl.analysis.report", True),
        ("nnunet_ssl.analysis.report", "nnunet_ssl.experiment.tables", False),
        ("nnunet_ssl.io", "nnunet_ssl.outputs", True),
        ("nnunet_ssl.outputs", "nnunet_ssl.io", False),
        ("nnunet_ssl.analysis.testset", "nnunet_ssl.nnunet_ext", True),
        ("nnunet_ssl.nnunet_ext.nnunet_ssl_trainers", "nnunet_ssl.trainers.named", True),
    ],
)
def test_layer_map_reads_as_the_readme_says(importer: str, imported: str, allowed: bool) -> None:
    assert may_import(unit_of(importer), unit_of(imported)) is allowed
