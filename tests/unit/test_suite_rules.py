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
