"""Uninstall on a real host: boot a fresh host, deploy, remove; the host's file tree, users and
units then match the fresh host's (package-manager state and logs aside). Then the deploy lock
and the audit trail on the same host: two runs at once, a run that dies holding the lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from llamadeploy.audit import AUDIT_PATH
from llamadeploy.lock import LOCK_PATH
from llamadeploy.manifest import manifest_path
from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import (
    PYINFRA,
    REPO,
    SNAPSHOT,
    SUBPROCESS_TIMEOUT,
    audit_rows,
    cli,
    merged_data,
    run_deploy,
    stub_deb,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("un5", 5)


def remove(inventory: Path, *args: str) -> subprocess.CompletedProcess:
    """The uninstall, as an operator runs it: pyinfra with the packaged @deploy function."""
    return subprocess.run([PYINFRA, "-y", "--json", str(inventory), "llamadeploy.deploy.llama_server_removed", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


#: an operator's own units under the fixed names of the RPC worker and its fence guard (one they
#: run by hand): not the deploy's, so no deploy and no uninstall stops or removes them
OPERATORS_UNITS = ("ggml-rpc-server.service", "ggml-rpc-server-fence.service")


def test_deploy_then_uninstall_leaves_the_fresh_host(host, tmp_path):
    for unit in OPERATORS_UNITS:
        host.ssh(f"printf '%s\\n' '[Unit]' 'Description=the operator s own' '[Service]' 'ExecStart=/bin/sleep infinity' "
                 f"'[Install]' 'WantedBy=multi-user.target' > /etc/systemd/system/{unit}")
    host.ssh(f"systemctl daemon-reload && systemctl enable --now {' '.join(OPERATORS_UNITS)}")
    # and a file of theirs where a monitor's Alertmanager keeps its webhook token: this host runs no
    # Alertmanager the deploy installed, so no uninstall of it removes that file
    host.ssh("mkdir -p /etc/prometheus && echo theirs > /etc/prometheus/alertmanager-webhook-token")
    fresh = host.ssh(SNAPSHOT).stdout
    inventory = write_inventory(tmp_path / "un.py", [host], default_data())
    result = run_deploy(inventory)
    assert result.rc == 0, result.stderr[-4000:]
    assert host.ssh("systemctl is-active llama-server").stdout.strip() == "active"
    assert host.ssh(SNAPSHOT).stdout != fresh
    operators = f"systemctl is-active {' '.join(OPERATORS_UNITS)}"
    assert host.ssh(operators, check=False).stdout.split() == ["active", "active"]  # a server's deploy removes no RPC worker's
    # an operator's own file beside the deploy's model: not the deploy's to remove, neither by a
    # prune nor by the uninstall
    host.ssh("echo weights > /var/lib/llama-server/models/operators-own.gguf")
    first = Path(default_data()["llama_model"]["path"]).name
    # a prune that does remove a model file: the same weights under another name serve two releases
    # (keep_releases 1), and the third pushes the first release, and its file, out
    renamed = tmp_path / "renamed-copy.gguf"
    shutil.copyfile(default_data()["llama_model"]["path"], renamed)
    for threads in (2, 1):
        models = host.ssh("ls /var/lib/llama-server/models").stdout.split()
        assert first in models, models  # kept until the third release pushes the first one out
        moved = write_inventory(tmp_path / f"moved{threads}.py", [host], merged_data(
            llama_model={"path": str(renamed)}, llama_service={"keep_releases": 1}, llama_server={"threads": threads}))
        step = run_deploy(moved)
        assert step.rc == 0, step.stderr[-4000:]
    models = host.ssh("ls /var/lib/llama-server/models").stdout.split()
    assert first not in models and "renamed-copy.gguf" in models and "operators-own.gguf" in models, models
    # a CUDA host's packages pushed from llama_gpu.packages_dir (air-gapped): recorded by the names
    # in their control data before apt installs them, so that the uninstall purges them. This host
    # has no GPU: the run installs them, then stops for the reboot a new driver needs (roles/gpu);
    # the package is a stand-in built here by dpkg-deb, under a file name that is not its own
    debs = tmp_path / "gpu-debs"
    debs.mkdir()
    stub_deb(debs, "llamadeploy-e2e-gpu-stub", "driver.deb")
    cuda = write_inventory(tmp_path / "cuda.py", [host], merged_data(
        llama_model={"path": str(renamed)}, llama_service={"keep_releases": 1}, llama_server={"threads": 1},
        llama_build={"backend": "cuda"}, llama_gpu={"packages_dir": str(debs)}))
    step = run_deploy(cuda)
    assert step.rc == 0, (step.stdout + step.stderr)[-4000:]
    assert host.ssh("dpkg-query -W -f '${Status}' llamadeploy-e2e-gpu-stub").stdout == "install ok installed"
    assert "llamadeploy-e2e-gpu-stub" in host.ssh("cat /var/cache/llama.cpp/installed-packages.gpu").stdout.split()
    assert host.ssh("systemctl is-active llama-server").stdout.strip() == "active"  # the CPU release serves on
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
    assert host.ssh("dpkg-query -W -f '${Status}' llamadeploy-e2e-gpu-stub", check=False).stdout.strip() in (
        "", "unknown ok not-installed"), "the package the deploy installed from packages_dir was not purged"
    after = host.ssh(SNAPSHOT).stdout
    assert host.ssh(operators, check=False).stdout.split() == ["active", "active"], gone.stdout[-3000:]
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
    # an uninstall on a host without a record or an earlier deploy's manifest (never deployed)
    # takes no account, not even a system account whose home is the configured data_dir
    host.ssh("useradd -r -d /var/lib/llama-server -s /usr/sbin/nologin llama")
    try:
        bare = remove(inventory)
        assert bare.returncode == 0, (bare.stdout + bare.stderr)[-3000:]
        assert host.ssh("getent passwd llama", check=False).returncode == 0, "the operator's account was removed"
    finally:
        host.ssh("userdel llama", check=False)
    assert host.ssh(SNAPSHOT).stdout == fresh
    # an uninstall under a service name that is someone else's unit: sshd.service is the alias link
    # of Debian's ssh.service; it is neither stopped nor removed, and the host stays as it was
    assert host.ssh("readlink /etc/systemd/system/sshd.service").stdout.strip().endswith("/ssh.service")
    alien = remove(write_inventory(tmp_path / "sshd.py", [host], merged_data(llama_service={"name": "sshd"})))
    assert alien.returncode == 0, (alien.stdout + alien.stderr)[-3000:]
    assert host.ssh("systemctl is-active ssh").stdout.strip() == "active"
    assert host.ssh(SNAPSHOT).stdout == fresh


def start_deploy(inventory: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([PYINFRA, "-y", "--json", str(inventory), "deploy.py"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def wait_locked(host, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until the host's lock file exists, while ``proc`` still runs."""
    deadline = time.monotonic() + seconds
    while host.ssh(f"test -e {LOCK_PATH}", check=False).returncode != 0:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before its lock was seen"
        assert time.monotonic() < deadline, "the lock never appeared"
        time.sleep(0.05)


def test_one_run_at_a_time_a_dead_runs_lock_released_by_hand_and_the_audit_trail(host, tmp_path):
    """A deploy holds the host's lock from its prepare to its disconnect. A second deploy then is
    refused, naming the first (pid, operator, controller), and changes nothing; a third with
    ``LLAMADEPLOY_LOCK_WAIT`` waits and then runs. A run killed while holding the lock leaves it:
    the next is refused and told the holder is dead; ``lock release`` (no ``--force``) removes it,
    and never a live run's. ``llamadeploy audit`` then lists the runs that held the lock, newest
    first, with the release each began and ended with."""
    inventory = write_inventory(tmp_path / "lk.py", [host], default_data())
    first = start_deploy(inventory)
    try:
        wait_locked(host, first)
        second = run_deploy(inventory)
        assert second.rc != 0
        assert (f"{host.address}: locked by deploy by root@{socket.gethostname()} (pid {first.pid}), since "
                in second.stderr), second.stderr[-3000:]
        assert "nothing was changed" in second.stderr
        status = cli("lock", "status", str(inventory))
        assert status.returncode == 0 and f"(pid {first.pid})" in status.stdout, status.stdout
        kept = cli("lock", "release", str(inventory))  # a live run's lock is not released
        assert kept.returncode == 1 and "kept: locked by deploy" in kept.stdout and "still runs" in kept.stdout
        third = start_deploy(inventory, env={"LLAMADEPLOY_LOCK_WAIT": "600"})
        out, err = first.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert first.returncode == 0, err[-3000:]
        out3, err3 = third.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert third.returncode == 0, err3[-3000:]
        assert f"{host.address}: locked by deploy by" in err3 and "waiting up to 600 s" in err3, err3[-3000:]
        assert json.loads(out3)["results"]["totals"]["success"] == 0  # it ran after the first, on its result
    finally:
        for proc in (first, locals().get("third")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
    assert host.ssh(f"test -e {LOCK_PATH}", check=False).returncode != 0  # released by each run

    # two deploys started at the same moment: exactly one takes the lock and runs, the other is
    # refused naming it (link(2) on the host decides, not the order the two were started in)
    racers = [start_deploy(inventory), start_deploy(inventory)]
    ends = [p.communicate(timeout=SUBPROCESS_TIMEOUT) for p in racers]
    assert sorted(p.returncode != 0 for p in racers) == [False, True], [e[1][-1500:] for e in ends]
    winner, loser = (0, 1) if racers[0].returncode == 0 else (1, 0)
    assert f"(pid {racers[winner].pid}), since " in ends[loser][1], ends[loser][1][-3000:]
    assert "nothing was changed" in ends[loser][1]

    # a run that dies holding the lock (SIGKILL: no finally of it runs)
    dying = start_deploy(inventory)
    try:
        wait_locked(host, dying)
        dying.send_signal(signal.SIGKILL)
    finally:
        dying.communicate(timeout=60)
    assert dying.returncode == -signal.SIGKILL
    refused = run_deploy(inventory)
    assert refused.rc != 0 and f"(pid {dying.pid}, dead: its process is gone)" in refused.stderr, refused.stderr[-3000:]
    assert "llamadeploy lock release INVENTORY" in refused.stderr
    status = cli("lock", "status", str(inventory))
    assert "dead: its process is gone" in status.stdout, status.stdout
    released = cli("lock", "release", str(inventory))
    assert released.returncode == 0 and f"{host.address}: released: deploy by root@" in released.stdout
    last = run_deploy(inventory)
    assert last.rc == 0 and last.changed == 0, last.stderr[-3000:]

    # the audit trail: the runs that held the lock, newest first (the refused ones never did)
    rid = json.loads(host.ssh(f"cat {manifest_path('/etc/llama-server')}").stdout)["release_id"]
    assert rid
    rows = audit_rows(inventory, 5)
    me = f"root@{socket.gethostname()}"

    def cells(r: dict[str, str]) -> list[str]:
        return [r[k] for k in ("host", "operator", "action", "before", "after", "outcome")]

    # the last run, the race's winner and the waiting third: no change
    assert [cells(r) + [r["changes"]] for r in rows[:3]] == [[host.address, me, "deploy", rid, rid, "ok", "0"]] * 3, rows
    assert cells(rows[3]) == [host.address, me, "deploy", "-", rid, "ok"] and int(rows[3]["changes"]) > 0  # the first
    assert cells(rows[4]) == [host.address, me, "uninstall", "-", "-", "ok"]  # the first test's last uninstall
    assert len({r["run"] for r in rows}) == 5 and len(rows) == 5  # five runs
    lines = host.ssh(f"cat {AUDIT_PATH}").stdout.splitlines()
    assert all(json.loads(line)["outcome"] in ("ok",) for line in lines[-3:])
    assert host.ssh(f"stat -c '%a %U' {AUDIT_PATH}").stdout.split() == ["640", "root"]
