"""Uninstall on a real host: boot a fresh host, deploy, remove; the host's file tree, users and
units then match the fresh host's (package-manager state and logs aside)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import PYINFRA, REPO, SUBPROCESS_TIMEOUT, run_deploy

pytestmark = pytest.mark.e2e

#: what a host "is" for this comparison. Left out: apt and dpkg state, logs, systemd's own state,
#: caches (the test host bind-mounts the shared ccache and .deb cache under /var/cache) and the
#: linker cache, which package installs rewrite by design
SNAPSHOT = (
    "find /etc /opt /srv /usr /var/lib -xdev \\( -path /var/lib/apt -o -path /var/lib/dpkg "
    "-o -path /var/lib/systemd -o -path /var/lib/ucf -o -path /etc/ld.so.cache \\) -prune -o -print | sort; "
    "echo '## users'; getent passwd | cut -d: -f1,3,6,7 | sort; echo '## groups'; getent group | cut -d: -f1 | sort; "
    "echo '## units'; systemctl list-unit-files --no-legend --no-pager | awk '{print $1, $2}' | sort"
)


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("un5", 5)


def remove(inventory: Path, *args: str) -> subprocess.CompletedProcess:
    """The uninstall, as an operator runs it: pyinfra with the packaged @deploy function."""
    return subprocess.run([PYINFRA, "-y", "--json", str(inventory), "llamadeploy.deploy.llama_server_removed", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def test_deploy_then_uninstall_leaves_the_fresh_host(host, tmp_path):
    fresh = host.ssh(SNAPSHOT).stdout
    inventory = write_inventory(tmp_path / "un.py", [host], default_data())
    result = run_deploy(inventory)
    assert result.rc == 0, result.stderr[-4000:]
    assert host.ssh("systemctl is-active llama-server").stdout.strip() == "active"
    assert host.ssh(SNAPSHOT).stdout != fresh
    # an operator's own file beside the deploy's model: not the deploy's to remove
    host.ssh("echo weights > /var/lib/llama-server/models/operators-own.gguf")
    # and a file in the ccache bind-mounted under the cache directory (the same filesystem as the
    # host's tree: rm --one-file-system alone would empty it)
    marker = "/var/cache/llama.cpp/ccache/.uninstall-keeps-this"
    host.ssh(f"echo shared > {marker}")
    try:
        gone = remove(inventory)
        assert host.ssh(f"cat {marker}", check=False).stdout == "shared\n", "the bind-mounted ccache was emptied"
    finally:
        host.ssh(f"rm -f {marker}", check=False)
    assert gone.returncode == 0, (gone.stdout + gone.stderr)[-4000:]
    after = host.ssh(SNAPSHOT).stdout
    import difflib

    diff = "\n".join(difflib.unified_diff(fresh.splitlines(), after.splitlines(), "fresh", "after", lineterm="", n=0))
    # exactly the operator's file is left, with the directories that hold it; nothing of the deploy
    assert [line for line in diff.splitlines()[2:] if not line.startswith("@@")] == [
        "+/var/lib/llama-server", "+/var/lib/llama-server/models", "+/var/lib/llama-server/models/operators-own.gguf",
    ], diff[:6000]
    assert host.ssh("cat /var/lib/llama-server/models/operators-own.gguf").stdout == "weights\n"
    assert "operators-own.gguf" in gone.stdout + gone.stderr  # the run says what it left
    # the shared ccache mounted under the cache directory was not followed into
    assert host.ssh("ls /var/cache/llama.cpp").stdout.split() == ["ccache"]

    again = remove(inventory)  # nothing left to do: zero changes
    assert again.returncode == 0, again.stderr[-3000:]
    import json

    assert json.loads(again.stdout)["results"]["totals"]["success"] == 0, again.stdout[-3000:]
    host.ssh("rm -r /var/lib/llama-server")  # the operator's to remove
    assert host.ssh(SNAPSHOT).stdout == fresh
