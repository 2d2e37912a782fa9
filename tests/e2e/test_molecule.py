"""``molecule test`` around the deploy, as CI runs it: create and destroy through the sandbox,
converge with pyinfra, idempotence from pyinfra's own change report, verify with the shipped
testinfra suite (``tests/molecule/default/``).

molecule's summary can say "Successful" for a failed step, so only its exit code counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_molecule_scenario(testhosts):
    """The whole scenario passes; the sandbox host is gone afterwards, pass or fail."""
    del testhosts  # only for its root check and the reaping of earlier leftovers
    from llamadeploy.sandbox import running

    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "MOLECULE_GLOB": "tests/molecule/*/molecule.yml", "ANSIBLE_NOCOLOR": "1"}
    try:
        proc = subprocess.run([str(venv_bin / "molecule"), "test"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1800)
    finally:
        subprocess.run([str(venv_bin / "molecule"), "destroy"], cwd=REPO, env=env, capture_output=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # the steps really ran: a first converge that changed, an idempotent second, a passing verify
    assert "Run pyinfra" in out and "idempotence" in out and "passed" in out, out[-4000:]
    assert "molecule" not in running()
