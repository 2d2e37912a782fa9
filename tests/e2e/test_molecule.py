"""``molecule test`` around the deploy, as CI runs it: create and destroy through the sandbox,
converge with pyinfra, idempotence from pyinfra's own change report, verify with the shipped
testinfra suite (``tests/molecule/default/``).

molecule's summary can say "Successful" for a failed step, so its summary text is not trusted:
its exit code counts, and the verify step's own pytest summary line (every check of the suite
passed or skipped, none failed or errored).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SUBPROCESS_TIMEOUT

pytestmark = pytest.mark.e2e

#: seconds for ``molecule destroy`` after the run (stops the host: up to half a minute), within
#: the per-test timeout together with the run's own ``SUBPROCESS_TIMEOUT``
DESTROY_TIMEOUT = 240
#: seconds for ``pytest --collect-only`` of the testinfra suite (imports only, connects nowhere)
COLLECT_TIMEOUT = 120
#: pytest's final summary line, e.g. ``11 passed, 2 skipped in 20.31s`` (inside ansible's debug
#: output: quoted, indented)
SUMMARY = re.compile(r"^\W*((?:\d+ [a-z]+, )*\d+ [a-z]+) in \d+(?:\.\d+)?s\b", re.MULTILINE)
#: the colour codes molecule wraps each line of a step's output in (``ANSIBLE_NOCOLOR`` or not)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pytest_summary(out: str) -> dict[str, int]:
    """The counts of the last pytest summary line in ``out``: ``{"passed": 11, "skipped": 2}``."""
    lines = SUMMARY.findall(ANSI.sub("", out))
    assert lines, f"no pytest summary line in molecule's output: {out[-4000:]}"
    return {word: int(n) for n, word in re.findall(r"(\d+) ([a-z]+)", lines[-1])}


def collected_checks() -> int:
    """How many checks the shipped testinfra suite has for one host (collected, not run)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/testinfra",
         "--hosts=ssh://root@molecule"], cwd=REPO, capture_output=True, text=True, timeout=COLLECT_TIMEOUT)
    found = re.search(r"^(\d+)(?:/\d+)? tests? collected", proc.stdout, re.MULTILINE)
    assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]
    return int(found.group(1))


def test_pytest_summary_parsed():
    """The summary line as ansible's debug task shows the verify step's output."""
    out = ('    "msg": [\n        "..........ss                      [100%]",\n'
           '        "12.01s call     tests/testinfra/test_llama_server.py::test_health",\n'
           '        "10 passed, 2 skipped, 1 warning in 20.31s (0:00:20)"\n    ]\n'
           'molecule : ok=4 changed=0 unreachable=0 failed=0 skipped=0\n')
    assert pytest_summary(out) == {"passed": 10, "skipped": 2, "warning": 1}
    assert pytest_summary('"1 failed, 3 passed, 1 error in 2.00s"') == {"failed": 1, "passed": 3, "error": 1}
    # as molecule prints it: the step's box and colours around each line
    coloured = '\x1b[2m\x1b[32m\u2502\x1b[0m \x1b[0;32m        "11 passed, 3 skipped in 9.65s"\x1b[0m\n'
    assert pytest_summary(coloured) == {"passed": 11, "skipped": 3}


def test_molecule_scenario(testhosts):
    """The whole scenario passes; the sandbox host is gone afterwards, pass or fail."""
    del testhosts  # only for its root check and the reaping of earlier leftovers
    from llamadeploy.sandbox import running

    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "MOLECULE_GLOB": "tests/molecule/*/molecule.yml", "ANSIBLE_NOCOLOR": "1"}
    try:
        proc = subprocess.run([str(venv_bin / "molecule"), "test"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    finally:
        subprocess.run([str(venv_bin / "molecule"), "destroy"], cwd=REPO, env=env, capture_output=True,
                       timeout=DESTROY_TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # the steps really ran: a first converge that changed, an idempotent second, a verify whose
    # testinfra run passed every check it did not skip (a GPU check on this CPU host)
    assert "Run pyinfra" in out and "idempotence" in out, out[-4000:]
    checks = pytest_summary(out)
    assert not (checks.get("failed") or checks.get("error") or checks.get("errors")), (checks, out[-4000:])
    assert checks.get("passed", 0) > 0, (checks, out[-4000:])
    assert checks.get("passed", 0) + checks.get("skipped", 0) == collected_checks(), (checks, out[-4000:])
    assert "molecule" not in running()
