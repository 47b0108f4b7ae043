"""The code's layout rules, checked on the source itself (no imports are executed):

- dependencies run one way: ray_jobs -> serve -> pipelines -> olmoearth (the model library imports nothing
  of ours outside itself);
- inside pipelines the rooms run common -> imagery -> corpus -> pretrain -> evaluation: a room imports only
  itself and rooms to its left;
- units a reader holds in their head: no source file over 500 lines, no function over 80 lines.

Every import counts, including those inside functions."""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("olmoearth", "pipelines", "serve", "ray_jobs")  # each may import those before it and itself
ROOMS = ("common", "imagery", "selection", "corpus", "pretrain", "evaluation", "finetune")  # the same, inside pipelines
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def _sources():
    for top in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    yield os.path.relpath(path, ROOT), open(path).read()


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(rel: str, tree: ast.AST):
    """(line, absolute module name) of every import in the file."""
    package = _module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's package
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name


def _violations() -> list[str]:
    bad = []
    for rel, src in _sources():
        tree = ast.parse(src)
        own = _module_name(rel).split(".")
        for line, name in _imports(rel, tree):
            target = name.split(".")
            if target[0] not in PACKAGES:
                continue
            if PACKAGES.index(target[0]) > PACKAGES.index(own[0]):
                bad.append(f"{rel}:{line} imports {name} ({own[0]} must not depend on {target[0]})")
            elif own[0] == target[0] == "pipelines" and len(own) > 1 and len(target) > 1:
                if own[1] in ROOMS and target[1] in ROOMS and ROOMS.index(target[1]) > ROOMS.index(own[1]):
                    bad.append(f"{rel}:{line} imports {name} (pipelines/{own[1]} is left of {target[1]})")
    return bad


def _oversized() -> list[str]:
    bad = []
    for rel, src in _sources():
        lines = src.count("\n")
        if lines > MAX_FILE_LINES:
            bad.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{rel}:{node.lineno} {node.name}() {length} lines")
    return bad


def test_dependencies_run_one_way():
    bad = _violations()
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_no_file_over_500_lines_and_no_function_over_80():
    bad = _oversized()
    assert not bad, "units over the size limits:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "rel, src, expected",
    [
        ("olmoearth/x.py", "def f():\n    from pipelines.common import storage\n", "olmoearth must not depend"),
        ("pipelines/corpus/x.py", "from ..pretrain import stream\n", "pipelines/corpus is left of pretrain"),
        ("pipelines/pretrain/x.py", "import pipelines.corpus.build\nfrom . import stream\n", None),
    ],
)
def test_the_checker_sees_imports_inside_functions_and_relative_ones(rel, src, expected, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_sources", lambda: iter([(rel, src)]))
    bad = _violations()
    if expected is None:
        assert bad == []
    else:
        assert len(bad) == 1 and expected in bad[0]
