"""Rules the suite keeps about itself, checked on its own source.

One hung command must fail its test, not use up CI's 90 minutes: pytest-timeout ends a test, but a
``subprocess.run`` with no timeout of its own can outlive the test's worker thread and its hosts.
So every blocking subprocess call in the tests, the sandbox and the benchmarks names a timeout.
``Popen`` cannot take one; its callers wait with ``wait(timeout=...)``/``communicate(timeout=...)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: where the suite and the tools it runs start processes
TREES = ("tests", "llamadeploy/sandbox", "benchmarks", "scripts")
BLOCKING = {"run", "check_output", "check_call", "call"}


def untimed_calls(source: str) -> list[int]:
    """Lines of ``subprocess.<blocking>(...)`` calls that pass no ``timeout=`` (``**kw`` counts as
    passing one: the caller's own signature then names it)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                and node.func.attr in BLOCKING
                and not any(k.arg in ("timeout", None) for k in node.keywords)):
            lines.append(node.lineno)
    return lines


def test_the_rule_sees_a_missing_timeout():
    source = ("import subprocess\nsubprocess.run(['true'])\nsubprocess.run(['true'], timeout=5)\n"
              "subprocess.check_output(\n  ['x'],\n  text=True)\nsubprocess.run(['y'], **kw)\n")
    assert untimed_calls(source) == [2, 4]


@pytest.mark.parametrize("tree", TREES)
def test_every_subprocess_call_has_a_timeout(tree: str):
    missing = [f"{path.relative_to(REPO)}:{line}"
               for path in sorted((REPO / tree).rglob("*.py"))
               for line in untimed_calls(path.read_text())]
    assert not missing, f"subprocess calls without timeout=: {missing}"


def unremoved_temp_dirs(source: str) -> list[int]:
    """Lines of ``NAME = ...tempfile.mkdtemp(...)...`` in a function with no
    ``shutil.rmtree(NAME, ...)`` in a ``finally``: a benchmark's scratch directory (inventories,
    exported trees) is its own to remove, on success and failure alike, or every run leaves one in
    /tmp."""
    lines = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        finals = [stmt for node in ast.walk(fn) if isinstance(node, ast.Try) for stmt in node.finalbody]
        removed = {node.args[0].id for stmt in finals for node in ast.walk(stmt)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and isinstance(node.func.value, ast.Name) and node.func.value.id == "shutil"
                   and node.func.attr == "rmtree" and node.args and isinstance(node.args[0], ast.Name)}
        for node in ast.walk(fn):
            if (isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
                    and any(isinstance(c, ast.Call) and (
                        (isinstance(c.func, ast.Attribute) and c.func.attr == "mkdtemp")
                        or (isinstance(c.func, ast.Name) and c.func.id == "mkdtemp"))
                        for c in ast.walk(node.value))):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if not (len(targets) == 1 and isinstance(targets[0], ast.Name) and targets[0].id in removed):
                    lines.append(node.lineno)
    return sorted(set(lines))


def test_the_rule_sees_a_temp_dir_left_behind():
    source = ("def kept():\n    tmp = Path(tempfile.mkdtemp())\n"
              "def removed():\n    tmp = Path(tempfile.mkdtemp())\n    try:\n        pass\n"
              "    finally:\n        shutil.rmtree(tmp, ignore_errors=True)\n"
              "def on_success_only():\n    tmp: Path = Path(mkdtemp())\n    shutil.rmtree(tmp)\n")
    assert unremoved_temp_dirs(source) == [2, 10]


def test_every_benchmark_removes_its_temp_dir():
    left = {str(path.relative_to(REPO)): found for path in sorted((REPO / "benchmarks").rglob("*.py"))
            if (found := unremoved_temp_dirs(path.read_text()))}
    assert left == {}, f"mkdtemp without shutil.rmtree of it in the same function: {left}"
