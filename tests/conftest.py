"""Shared fixtures: real test hosts, booted once per session, always torn down."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks import machine
from benchmarks.machine import DeployResult
from benchmarks.machine import failure_text as failure_text  # the test modules take it from here
from llamadeploy.sandbox.inventory import merged_data as merged_data  # the test modules take it from here

REPO = machine.REPO
PYINFRA = machine.PYINFRA
LLAMADEPLOY = str(Path(sys.executable).with_name("llamadeploy"))
#: seconds for one deploy, CLI or testinfra run the tests start: below the per-test timeout
#: (pyproject's ``timeout``), so a hung run fails its test with its own output
SUBPROCESS_TIMEOUT = 1500
#: seconds for a quick command on this machine (tc, iptables, ip, mount, openssl, curl -m): it
#: returns at once or hangs
LOCAL_TIMEOUT = 60

# the controller's cache (built releases, model hashes and headers) for every deploy the tests run:
# beside the other test caches, keyed by release key and host kind, so a run builds llama.cpp once
# and ships it to every other host; a test that needs an empty cache passes its own
os.environ.setdefault("LLAMADEPLOY_CACHE", os.path.join(os.environ.get("LLAMACTL_CACHE", "/var/cache/llamactl-ci"),
                                                        "controller"))


def run_deploy(inventory: Path, *extra: str, env: dict[str, str] | None = None,
               timeout: float = SUBPROCESS_TIMEOUT, deploy: str = "deploy.py") -> DeployResult:
    """:func:`benchmarks.machine.run_deploy` within a test's own time limit."""
    return machine.run_deploy(inventory, *extra, env=env, timeout=timeout, deploy=deploy)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """``llamadeploy ARGS``, as an operator runs it."""
    return subprocess.run([LLAMADEPLOY, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def audit_rows(inv: Path, lines: int = 20) -> list[dict[str, str]]:
    """``llamadeploy audit``'s table as dicts, newest first (its exit code asserted)."""
    trail = cli("audit", str(inv), "-n", str(lines))
    assert trail.returncode == 0, trail.stdout + trail.stderr[-3000:]
    rows = []
    for line in trail.stdout.splitlines()[1:]:
        c = line.split()  # time (2 cells), host, operator, action, before, after, tried, outcome (words), changes, run
        rows.append({"host": c[2], "operator": c[3], "action": c[4], "before": c[5], "after": c[6], "tried": c[7],
                     "outcome": " ".join(c[8:-2]), "changes": c[-2], "run": c[-1]})
    return rows


def dashboard_gaps(api: str, names: list[str], values: dict[str, str],
                   boards: dict[str, dict] | None = None) -> list[tuple[str, str, str]]:
    """(dashboard, panel, query) of every panel query that the real Prometheus answers with no
    data, the variables filled with ``values``; an invalid query fails at once. ``boards`` maps a
    name to a board to check instead of the shipped one (a mutated copy)."""
    from llamadeploy import dashboards

    gaps = []
    for name in names:
        board = (boards or {}).get(name) or dashboards.dashboard(name)
        for title, expr in dashboards.queries(board):
            answer = httpx.get(f"{api}/query", params={"query": dashboards.filled(expr, values)}, timeout=10).json()
            assert answer["status"] == "success", (name, title, answer)
            if not answer["data"]["result"]:
                gaps.append((name, title, expr))
    return gaps


def broken_rollout_rolled_back(inventory_with, canary, other, tmp_path: Path) -> None:
    """``llamadeploy rollout`` of a release whose server cannot start (``--lora`` of a missing
    file): the canary fails its gate and is rolled back to its release, the other host is not
    reached (same release, same process), and the canary answers again. ``inventory_with(path,
    **sections)`` writes the module's inventory with those settings."""
    from llamadeploy.manifest import DEFAULT_PATH, Manifest

    def state(h) -> tuple[str, str]:
        return (Manifest.parse(h.ssh(f"cat {DEFAULT_PATH}").stdout).release_id,
                h.ssh("systemctl show -p MainPID --value llama-server").stdout)

    before = {h.address: state(h) for h in (canary, other)}
    inv = inventory_with(tmp_path / "broken.py", llama_server={"threads": 1, "extra_args": ["--lora", "/nonexistent.gguf"]},
                         llama_health={"timeout": 20})
    result = cli("rollout", str(inv))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    # failed as soon as the server exited, not at the gate's timeout
    assert ("the server restarted (it crashed)" in result.stderr
            or "the server is not running (it exited)" in result.stderr), result.stderr[-3000:]
    rows = {ln.split()[0]: ln for ln in result.stdout.splitlines()[1:] if ln.strip()}
    assert " rolled back " in rows[canary.address] and "not reached" in rows[other.address], result.stdout
    assert state(canary)[0] == before[canary.address][0] and state(other) == before[other.address]
    r = httpx.post(f"http://{canary.address}:8080/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
    assert r.status_code == 200


def tx_bytes(dev: str) -> int:
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())


def nothing_listens(h) -> None:
    """No peer server, port or fence left on the host."""
    out = h.ssh("ss -Htln 'sport = :8090'; nft list tables; systemctl list-units --state=active --plain "
                "--no-legend 'llamadeploy-peer-*'", check=False).stdout
    assert ":8090" not in out and "llamadeploy_peer" not in out and "llamadeploy-peer-" not in out, (h.name, out)
    assert h.ssh("test -e /var/cache/llama.cpp/peer", check=False).returncode == 1, h.name


def failed_units_text(*hosts: Any) -> str:
    """Each host's units that failed since it booted (restarted since, or not), with the end of
    their journals (an ExecStartPre's output included): what a failed fleet deploy's own output
    does not show, for its assertion message."""
    show = ("for u in $(journalctl -b _PID=1 -o cat --no-pager | sed -n 's/^\\([^ ]*\\): Failed with result.*/\\1/p' "
            '| sort -u); do echo "== $u"; journalctl -u "$u" --no-pager -o short-monotonic | '
            "grep -v 'level=info collector=' | tail -n 40; done")
    parts = []
    for h in hosts:
        try:
            parts.append(f"--- {h.name}\n" + h.ssh(show, check=False).stdout[-3000:])
        except subprocess.TimeoutExpired:
            parts.append(f"--- {h.name}: no answer")
    return "\n".join(parts)


# systemd's "unit started" message (sd-messages.h SD_MESSAGE_UNIT_STARTED)
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def starts_since_boot(h: Any, unit: str) -> int:
    """How often systemd started ``unit`` since the host booted: a package that the deploy
    installed and did not restart afterwards was started once, by its postinst."""
    out = h.ssh(f"journalctl -b -q --no-pager -o cat _PID=1 UNIT={shlex.quote(unit)} MESSAGE_ID={UNIT_STARTED}",
                check=False).stdout
    return len([ln for ln in out.splitlines() if ln.strip()])


def changed_hosts(report: dict, *parts: str) -> list[str]:
    """Hosts on which an operation whose name contains every one of ``parts`` ran commands."""
    return sorted(h for op in report["results"]["operations"]
                  if any(all(p in n for p in parts) for n in op["names"]) for h in op["success"])


def printed_curl(output: str) -> str:
    """The ``curl`` command the quickstart prints for its demo host, as printed (three lines)."""
    return output[output.index("curl -s "):].split("\n\n")[0]


#: what a host "is" for "the uninstall leaves it as it was": its files, users, groups and unit
#: files. Left out: apt and dpkg state, logs, systemd's own state, caches (the test host
#: bind-mounts the shared ccache and .deb cache under /var/cache) and the linker cache, which
#: package installs rewrite by design
def stub_deb(directory: Path, package: str, file_name: str | None = None) -> Path:
    """A real .deb built by ``dpkg-deb`` with one file, ``/usr/share/PACKAGE/marker``: a stand-in
    for a package the deploy installs from files (``llama_gpu.packages_dir``), where what is
    checked is that it is recorded by its name and purged again, not what it holds."""
    root = directory / f".{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: tests <tests@example.org>\nDescription: stand-in\n")
    (root / "usr" / "share" / package).mkdir(parents=True)
    (root / "usr" / "share" / package / "marker").write_text("stand-in\n")
    out = directory / (file_name or f"{package}_1.0_all.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", "-Zxz", str(root), str(out)], check=True,
                   capture_output=True, timeout=60)
    subprocess.run(["rm", "-rf", str(root)], check=True, timeout=60)
    return out


SNAPSHOT = (
    "find /etc /opt /srv /usr /var/lib -xdev \\( -path /var/lib/apt -o -path /var/lib/dpkg "
    "-o -path /var/lib/systemd -o -path /var/lib/ucf -o -path /etc/ld.so.cache \\) -prune -o -print | sort; "
    "echo '## users'; getent passwd | cut -d: -f1,3,6,7 | sort; echo '## groups'; getent group | cut -d: -f1 | sort; "
    "echo '## units'; systemctl list-unit-files --no-legend --no-pager | awk '{print $1, $2}' | sort"
)


def wait_for(pred: Any, seconds: float = 60, what: str = "") -> None:
    """Until ``pred()`` is true, polled every half second; fails naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_table(h: Any, table: str, timeout: float = 15) -> None:
    """Until ``table inet TABLE`` is in ``h``'s ruleset (its guard loads it within moments)."""
    deadline = time.monotonic() + timeout
    while h.ssh(f"nft list table inet {table}", check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{h.name}: table {table} was not loaded again within {timeout} s"
        time.sleep(0.5)


def package_versions(host: Any, *packages: str) -> dict[str, str]:
    """Debian package -> installed version on ``host`` (``dpkg-query``)."""
    out = host.ssh("dpkg-query -W -f '${Package} ${Version}\\n' " + " ".join(packages)).stdout
    return dict(line.split() for line in out.splitlines())


def front_metrics(front: Any) -> str:
    """A front's HAProxy exporter, read over HTTP (the test's own channel, not the deploy's)."""
    return httpx.get(f"http://{front.address}:8405/metrics", timeout=10).text


def front_server_up(front: Any, name: str) -> bool:
    """Whether HAProxy at ``front`` has backend server ``name`` UP."""
    return re.search(rf'^haproxy_server_status\{{proxy="llama_servers",server="{re.escape(name)}",state="UP"\}} 1$',
                     front_metrics(front), re.M) is not None


def front_admin_state(front: Any, name: str, tolerant: bool = False) -> str | None:
    """Backend server ``name``'s administrative state at HAProxy ``front``, read over ssh from its
    runtime API: ready, drain, maint, or absent when the front does not know it. ``tolerant``: None
    when the socket did not answer (a reload in progress) instead of raising."""
    command = "echo 'show servers state llama_servers' | socat stdio /run/haproxy/admin.sock"
    if not tolerant:
        out = front.ssh(command).stdout
    else:
        try:
            got = front.ssh(command, check=False)
        except subprocess.TimeoutExpired:
            return None
        if got.returncode != 0 or not got.stdout.strip():
            return None
        out = got.stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 7 and parts[3] == name:
            return {"0": "ready", "8": "drain", "1": "maint"}.get(parts[6], parts[6])
    return "absent"


def front_worker(front: Any) -> str:
    """The PID of the HAProxy worker that answers ``front``'s runtime API: a reload starts another."""
    from llamadeploy.roles.front import ADMIN_SOCKET
    from llamadeploy.roles.front.operations import worker_pid

    return front.ssh(worker_pid(ADMIN_SOCKET)).stdout.strip()


def front_served_by(front: Any) -> dict[str, int]:
    """2xx responses per backend server, from HAProxy's own exporter."""
    pattern = r'^haproxy_server_http_responses_total\{proxy="llama_servers",server="([^"]+)",code="2xx"\} (\d+)'
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, front_metrics(front), re.M)}


def veth_bytes(host) -> int:
    """Bytes both ways over a test host's network link so far (its only way to the controller)."""
    stats = Path(f"/sys/class/net/{host.veth}/statistics")
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


#: what "nothing changed on the host" means in the e2e tests, read over ssh (not via pyinfra):
#: same process and start, same release link, same inode/mtime/size of binary, models
#: (any file, .partial included), unit and manifest, same manifest content, and no deploy lock
#: left behind (a run refused while pyinfra prepares releases the locks it took on other hosts)
HOST_STATE_CMD = (
    "systemctl show -p MainPID -p ActiveEnterTimestampMonotonic -p NRestarts llama-server; "
    "readlink /opt/llama.cpp/current; "
    "stat -c '%n %i %Y %s' /opt/llama.cpp/current/bin/llama-server /var/lib/llama-server/models/* "
    "/etc/systemd/system/llama-server.service /etc/llama-server/deploy.json; "
    "ls /opt/llama.cpp/releases /var/cache/llama.cpp/src; ls -a /etc/llama-server; "
    "ls /run/lock/llamadeploy.lock 2>/dev/null; cat /etc/llama-server/deploy.json"
)


def host_state(host) -> str:
    return host.ssh(HOST_STATE_CMD).stdout


@pytest.fixture(scope="module")
def testhosts():
    """Factory for booted hosts; every host is stopped when its test module ends, pass or fail.

    Per module, not per session: a module boots its hosts once and shares them between its
    tests, and the next module does not find a dozen llama-servers still holding memory.
    """
    if os.geteuid() != 0:
        pytest.skip("test hosts need root (systemd-nspawn, veth, iptables)")
    from llamadeploy.sandbox.host import SandboxHost, reap

    reap()  # hosts left behind by a crashed earlier run
    booted: list[SandboxHost] = []

    def boot(name: str, index: int, **kw) -> SandboxHost:
        from llamadeploy.sandbox.inventory import SHARED_BINDS, SHARED_OVERLAYS

        host = SandboxHost(name, index, binds=dict(SHARED_BINDS), overlays=dict(SHARED_OVERLAYS), **kw)
        booted.append(host)
        return host.boot()

    try:
        yield boot
    finally:
        for host in booted:
            host.stop()


def run_testinfra(address: str, *extra: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """Run the shipped testinfra suite against a host, in its own pytest process."""
    from llamadeploy.sandbox.host import ssh_config

    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/testinfra",
         f"--hosts=ssh://root@{address}", f"--ssh-config={ssh_config()}", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The shipped testinfra suite targets a deployed host: collect it only with --hosts.

    (The e2e tests run it against their hosts in a subprocess.)
    """
    if collection_path.name == "testinfra" and collection_path.parent.name == "tests":
        if not config.getoption("hosts", default=None):
            return True
    return None


HUB_TOKEN = "hf_llamactl_test_token_5c1e"
#: one hub per test process: pytest-xdist workers (gw0, gw1, ...) each serve their own
HUB_PORT = 18090 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def pytest_configure(config: pytest.Config) -> None:
    """Hosts booted by this process's children (molecule's ``llamadeploy sandbox up``) belong to
    this process: a parallel worker's reap() leaves them alone while it runs."""
    os.environ["LLAMADEPLOY_SANDBOX_OWNER"] = str(os.getpid())
TINY = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The local Hugging Face-compatible server with real GGUF files, for the whole session."""
    from llamadeploy.sandbox import assets
    from tests.harness.hfserver import HubServer, Repo

    model = assets.gemma_model()
    parts = assets.split_gguf(model, assets.CACHE / "models" / "split")
    repos = {
        "llamactl-test/gemma-3-270m-GGUF": Repo({TINY: model, "README.md": Path(__file__)}),
        "llamactl-test/gemma-3-270m-gated": Repo({p.name: p for p in parts}, gated=True),
        "llamactl-test/corrupt": Repo({TINY: model}, faults={TINY: "corrupt"}),
        # the same, under a name no other test puts on a host: a host-mode deploy downloads it
        "llamactl-test/corrupt-elsewhere": Repo({"gemma-elsewhere.gguf": model},
                                                faults={"gemma-elsewhere.gguf": "corrupt"}),
        "llamactl-test/flaky": Repo({TINY: model}, faults={TINY: "drop_once"}),
        "llamactl-test/other-name": Repo({"gemma-other.gguf": model}),
        # a listing is third-party input: a name no inventory could give, picked by its quant
        "llamactl-test/hostile-name": Repo({"gemma$(reboot)-Q8_0.gguf": model}),
    }
    server = HubServer(repos, token=HUB_TOKEN, port=HUB_PORT).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A fresh controller Hugging Face cache and the hub endpoint, for one test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token = tmp_path / "hf-token"
    token.write_text(HUB_TOKEN + "\n")
    token.chmod(0o600)
    return {"endpoint": f"http://127.0.0.1:{HUB_PORT}", "token_file": str(token), "cache": tmp_path / "hf-cache"}


#: minutes each e2e module's tests took beside two others on 2 cores, only to hand the longest
#: module left to the next free worker (a module not listed counts as its number of tests): the
#: cold run of 29f9cfb, benchmarks/suite-2026-12-05.json ("phases", summed per module). The
#: longest, test_trixie_build with its trixie compile cold, starts first, so that its compile
#: overlaps the other modules' boots and gates
MODULE_MINUTES = {
    "tests/e2e/test_trixie_build.py": 15.0, "tests/e2e/test_front.py": 13.4, "tests/e2e/test_rollout.py": 9.8,
    "tests/e2e/test_trixie.py": 6.2, "tests/e2e/test_safety.py": 5.6, "tests/e2e/test_faults.py": 5.5,
    "tests/e2e/test_docker.py": 4.6, "tests/e2e/test_fanout.py": 3.6, "tests/e2e/test_router.py": 3.2,
    "tests/e2e/test_hub.py": 2.7, "tests/e2e/test_front_models.py": 2.6, "tests/e2e/test_uninstall.py": 2.1,
    "tests/e2e/test_rpc.py": 2.0, "tests/e2e/test_molecule.py": 1.2,
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's ``--dist loadfile``, two changes: the longest module left goes first
    (longest-processing-time first balances the workers), and a worker gets its next module only
    when it holds one test (xdist's default queues a second module behind two pending tests, which
    may keep a module waiting on a busy worker while another worker idles)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestModuleFirst(LoadFileScheduling):
        def _assign_work_unit(self, node: Any) -> None:
            longest = max(self.workqueue, key=lambda scope: MODULE_MINUTES.get(scope, len(self.workqueue[scope])))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node: Any) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    return LongestModuleFirst(config, log)


#: nvidia-smi's answers recorded on real GPUs (tests/unit/data/nvidia-smi/README.md)
NVIDIA_SMI_DATA = REPO / "tests" / "unit" / "data" / "nvidia-smi"


def gpu_metrics_file(workdir: Path, stand_in: str) -> Path:
    """Run the shipped GPU metrics collector (templates/node_exporter) here, with ``stand_in`` as
    the body of the ``nvidia-smi`` it calls (a recorded answer printed back, or a failure), and
    return the text file it wrote, in its own fresh directory under ``workdir``."""
    from llamadeploy.render import template_text

    bindir, out = workdir / "bin", workdir / "textfile"
    bindir.mkdir(parents=True)
    out.mkdir()
    (bindir / "nvidia-smi").write_text(f"#!/bin/sh\n{stand_in}\n")
    (bindir / "nvidia-smi").chmod(0o755)
    script = workdir / "collector.sh"
    script.write_text(template_text("node_exporter/llamadeploy-gpu-metrics.sh"))
    subprocess.run(["sh", str(script), str(out)], check=True, timeout=LOCAL_TIMEOUT,
                   env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert sorted(p.name for p in out.iterdir()) == ["llamadeploy_gpu.prom"]  # no staging file left
    return out / "llamadeploy_gpu.prom"
