"""Debian 13 (trixie) hosts, beside a bookworm one, deployed in one pyinfra run.

Four hosts on one LAN: a trixie server (native mode: it compiles llama.cpp with trixie's
GCC 14, as no cache holds a trixie release), a bookworm server (it receives the bookworm
release that test_native put in the controller's cache), a trixie front (HAProxy 3.0) and a
trixie monitor (Prometheus 2.53). A fifth trixie host runs docker mode on Debian's own
Docker packages. Every claim is checked over a second channel: ssh, HTTP through the front,
Prometheus' API, HAProxy's runtime API.

Why these: the parts that differ between the releases are the toolchain, systemd (the unit's
hardening), HAProxy's and Prometheus' config and runtime API, and Debian's Docker engine and
compose; the rest of the suite covers the same roles on bookworm. docs/platforms.md lists the
versions these tests read off the hosts.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox.inventory import default_data
from tests.conftest import (
    LOCAL_TIMEOUT,
    PYINFRA,
    REPO,
    SUBPROCESS_TIMEOUT,
    cli,
    host_state,
    merged_data,
    run_deploy,
    run_testinfra,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hosts(testhosts):
    return {"tn": testhosts("tn", 91, lan="trixie", distro="trixie"),
            "tb": testhosts("tb", 92, lan="trixie"),
            "tfd": testhosts("tfd", 93, lan="trixie", distro="trixie"),
            "tmon": testhosts("tmon", 94, lan="trixie", distro="trixie")}


def write(path: Path, hosts, **server) -> Path:
    """The trixie server as the ``canary`` group, the bookworm one in ``servers``, a front, a monitor."""
    def entry(h, **data):
        name, conn = h.inventory_entry()
        return (name, {**conn, **data})

    sections = merged_data(**server)
    controller = [f"{hosts['tmon'].gateway}/32"]  # this test reads the exporter and Prometheus
    path.write_text(
        f"canary = {[entry(hosts['tn'], **sections)]!r}\n"
        f"servers = {[entry(hosts['tb'], **sections)]!r}\n"
        f"front = {[entry(hosts['tfd'], **merged_data(), llama_role='front', llama_front={'check_interval': 1, 'metrics_allow_from': controller})]!r}\n"
        f"monitor = {[entry(hosts['tmon'], **merged_data(), llama_role='monitor', llama_monitor={'scrape_interval': '2s', 'allow_from': controller})]!r}\n"
    )
    return path


@pytest.fixture(scope="module")
def fleet(hosts, tmp_path_factory):
    """The four hosts in one run. The controller's cache holds bookworm's release (test_native
    put it there: scripts/test runs this module after it) and no trixie one: a trixie release
    cached by an earlier run on this machine is removed, so that the trixie host compiles."""
    from llamadeploy import ctlcache

    for old in (ctlcache.cache_dir() / "releases").glob("*/debian13-*"):
        old.unlink()
    inv = write(tmp_path_factory.mktemp("trixie") / "inv.py", hosts)
    result = run_deploy(inv)
    assert result.rc == 0, (result.stdout + result.stderr)[-5000:]
    wait_for(lambda: all(server_up(hosts, hosts[n].address) for n in ("tn", "tb")), 90, "both servers up")
    return inv, result


def wait_for(pred, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def exporter(hosts) -> str:
    return httpx.get(f"http://{hosts['tfd'].address}:8405/metrics", timeout=10).text


def server_up(hosts, name: str) -> bool:
    return re.search(rf'^haproxy_server_status\{{proxy="llama_servers",server="{re.escape(name)}",state="UP"\}} 1$',
                     exporter(hosts), re.M) is not None


def served_by(hosts) -> dict[str, int]:
    """2xx responses per backend server, from HAProxy's own exporter."""
    pattern = r'^haproxy_server_http_responses_total\{proxy="llama_servers",server="([^"]+)",code="2xx"\} (\d+)'
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, exporter(hosts), re.M)}


def chat(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})


def op_hosts(result, prefix: str) -> list[str]:
    """Hosts on which an operation named ``prefix...`` changed something."""
    return sorted(h for op in result.report["results"]["operations"]
                  if any(n.split(" | ")[-1].startswith(prefix) for n in op["names"]) for h in op["success"])


def op_names(result, contains: str) -> dict[str, list[str]]:
    """host -> names of the operations containing ``contains`` that changed something on it."""
    out: dict[str, list[str]] = {}
    for op in result.report["results"]["operations"]:
        for n in op["names"]:
            if contains in n:
                for h in op["success"]:
                    out.setdefault(h, []).append(n)
    return out


def ctlcache_releases() -> set[str]:
    """Distribution and architecture of each release in the controller's cache."""
    from llamadeploy import ctlcache

    return {"-".join(p.name.split("-")[:2]) for p in (ctlcache.cache_dir() / "releases").glob("*/*.tar.gz")}


def compiler(host) -> str:
    """The compiler that built the host's llama-server, from its ELF ``.comment`` section (read
    here, in the host's tree: a host that received its release has no binutils)."""
    current = host.root / "opt/llama.cpp/current"
    binary = host.root / Path(str(current.readlink())).relative_to("/") / "bin/llama-server"
    out = subprocess.run(["readelf", "-p", ".comment", str(binary)], capture_output=True, text=True, check=True,
                         timeout=LOCAL_TIMEOUT).stdout
    return re.search(r"GCC: \(Debian [^)]*\) (\d+)\.", out).group(1)


def versions(host, *packages: str) -> dict[str, str]:
    out = host.ssh("dpkg-query -W -f '${Package} ${Version}\\n' " + " ".join(packages)).stdout
    return dict(line.split() for line in out.splitlines())


def test_mixed_fleet_each_release_builds_or_receives_its_own(hosts, fleet):
    """One run: the trixie host compiles with GCC 14 and sends its release to the controller's
    cache under a debian13 kind; the bookworm host receives bookworm's (GCC 12) from there."""
    _, result = fleet
    tn, tb = hosts["tn"], hosts["tb"]
    assert op_hosts(result, "Build llama-server") == [tn.address]
    # one operation per step for all hosts: its names are each host's, its success list who changed
    sent = op_names(result, "sent to the controller's cache")
    assert list(sent) == [tn.address] and any("(debian13-x86_64-" in n for n in sent[tn.address]), sent
    assert list(op_names(result, "from the controller's cache")) == [tb.address]
    assert (compiler(tn), compiler(tb)) == ("14", "12")
    assert tb.ssh("command -v cmake", check=False).returncode != 0  # it compiled nothing
    assert ctlcache_releases() >= {"debian12-x86_64", "debian13-x86_64"}, ctlcache_releases()
    before = served_by(hosts)
    for _ in range(12):
        assert chat(f"http://{hosts['tfd'].address}:8080").status_code == 200
    after = served_by(hosts)
    assert all(after.get(h.address, 0) > before.get(h.address, 0) for h in (tn, tb)), (before, after)
    print("trixie:", versions(tn, "gcc-14", "systemd", "libc6"), "bookworm:", versions(tb, "systemd", "libc6"))


def test_hardened_unit_on_systemd_257(hosts, fleet):
    """Every directive of the unit is known to trixie's systemd (verify prints none unknown) and
    the exposure score is as low as on bookworm."""
    tn = hosts["tn"]
    assert versions(tn, "systemd")["systemd"].startswith("257")
    verify = tn.ssh("systemd-analyze verify /etc/systemd/system/llama-server.service 2>&1", check=False)
    assert verify.returncode == 0 and "Unknown" not in verify.stdout, verify.stdout
    # systemd (PID 1) logs "FILE:LINE: Unknown key name ..., ignoring." for a directive it does not know
    journal = tn.ssh("journalctl -b _PID=1 --no-pager -o cat | grep -F 'llama-server.service:' || true").stdout
    assert not journal.strip(), journal
    exposure = tn.ssh("systemd-analyze security llama-server --no-pager | tail -n 1").stdout
    bookworm = hosts["tb"].ssh("systemd-analyze security llama-server --no-pager | tail -n 1").stdout
    print(f"trixie: {exposure.strip()}; bookworm: {bookworm.strip()}")  # recorded in docs/platforms.md
    assert float(exposure.split("exposure level for llama-server.service:")[1].split()[0]) <= 2.0, exposure
    assert tn.ssh("systemctl show -p NRestarts --value llama-server").stdout.strip() == "0"


def test_shipped_testinfra_suite_passes_on_trixie(hosts, fleet):
    proc = run_testinfra(hosts["tn"].address)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout) and " failed" not in proc.stdout, proc.stdout[-2000:]


def test_front_on_haproxy_30_checks_and_drains(hosts, fleet):
    """The rendered config passes 3.0's own ``haproxy -c``; drain and ready go through 3.0's
    runtime API, and a drained server gets no request."""
    inv, _ = fleet
    fd, tn = hosts["tfd"], hosts["tn"]
    assert versions(fd, "haproxy")["haproxy"].startswith("3.0.")
    check = fd.ssh("haproxy -c -f /etc/haproxy/haproxy.cfg 2>&1", check=False)
    assert check.returncode == 0 and "ALERT" not in check.stdout, check.stdout

    def set_state(state: str) -> None:
        proc = subprocess.run([PYINFRA, "-y", str(inv), "llamadeploy.deploy.llama_front_servers",
                               f"servers={tn.address}", f"set_to={state}", "--limit", fd.address],
                              cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    set_state("drain")
    try:
        state = fd.ssh("echo 'show servers state llama_servers' | socat stdio /run/haproxy/admin.sock").stdout
        assert any(ln.split()[3] == tn.address and ln.split()[6] == "8" for ln in state.splitlines()
                   if len(ln.split()) > 7), state  # srv_admin_state 8: drained
        before = served_by(hosts)
        for _ in range(8):
            assert chat(f"http://{fd.address}:8080").status_code == 200
        assert served_by(hosts).get(tn.address, 0) == before.get(tn.address, 0)
    finally:
        set_state("ready")
    wait_for(lambda: server_up(hosts, tn.address), 30, "tn ready again")


def test_monitor_on_trixie_scrapes_every_target(hosts, fleet):
    mon = hosts["tmon"]
    assert re.match(r"2\.5\d", versions(mon, "prometheus")["prometheus"]), versions(mon, "prometheus")
    api = f"http://{mon.address}:9090/api/v1"

    def all_up() -> bool:
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        return sorted(t["labels"]["job"] for t in targets if t["health"] == "up" and t["labels"]["job"] != "prometheus") \
            == ["haproxy", "llama-server", "llama-server"]

    wait_for(all_up, 90, "every target up in Prometheus")
    assert mon.ssh("promtool check config /etc/prometheus/prometheus.yml").returncode == 0


def test_a_system_no_test_covers_is_refused_and_nothing_changes(hosts, fleet):
    """The bookworm server pretends to be Ubuntu 24.04 (its /etc/os-release): the deploy stops
    before any operation on any host, naming the host and what it runs."""
    inv, _ = fleet
    tb, tn = hosts["tb"], hosts["tn"]
    ubuntu = (Path(__file__).parents[1] / "unit" / "data" / "os-release" / "ubuntu-24.04").read_text()
    before = {h.address: host_state(h) for h in (tb, tn)}
    tb.ssh("mv /etc/os-release /etc/os-release.test-keep")
    try:
        tb.ssh(f"cat > /etc/os-release <<'EOF'\n{ubuntu}EOF")
        result = run_deploy(inv)
    finally:
        tb.ssh("mv -f /etc/os-release.test-keep /etc/os-release")
    assert result.rc != 0
    assert (f"preflight refused host {tb.address}: operating system = 'Ubuntu 24.04.1 LTS'; allowed: "
            "Debian 12 (bookworm) or Debian 13 (trixie)") in result.stderr, result.stderr[-3000:]
    assert "Starting operation" not in result.stderr
    assert {h.address: host_state(h) for h in (tb, tn)} == before


def test_rollout_of_a_broken_release_rolls_the_trixie_canary_back(hosts, fleet, tmp_path):
    """A release whose server cannot start: the trixie canary, drained at the front, fails its
    gate and is rolled back; the bookworm host is never touched."""
    tn, tb = hosts["tn"], hosts["tb"]

    def state(h) -> tuple[str, str]:
        return (Manifest.parse(h.ssh(f"cat {DEFAULT_PATH}").stdout).release_id,
                h.ssh("systemctl show -p MainPID --value llama-server").stdout)

    before = {h.address: state(h) for h in (tn, tb)}
    inv = write(tmp_path / "broken.py", hosts, llama_server={"threads": 1, "extra_args": ["--lora", "/nonexistent.gguf"]},
                llama_health={"timeout": 20})
    result = cli("rollout", str(inv))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    rows = {ln.split()[0]: ln for ln in result.stdout.splitlines()[1:] if ln.strip()}
    assert " rolled back " in rows[tn.address] and "not reached" in rows[tb.address], result.stdout
    assert state(tn)[0] == before[tn.address][0] and state(tb) == before[tb.address]
    assert chat(f"http://{tn.address}:8080").status_code == 200
    wait_for(lambda: server_up(hosts, tn.address), 60, "the canary back in the front")


@pytest.fixture(scope="module")
def docker_host(testhosts, hosts, fleet, tmp_path_factory):
    """A trixie host in docker mode: Debian's docker.io and docker-compose, the test image (made
    from the bookworm server's release, as test_docker makes it) pushed as a tarball."""
    from tests.harness.images import IMAGE_REF, build_image_tarball

    box = testhosts("tdk", 95, docker=True, distro="trixie")
    tmp = tmp_path_factory.mktemp("tdk")
    tarball = build_image_tarball(hosts["tb"].root, out=tmp / "image.tar")
    data = default_data()
    data.update({"llama_mode": "docker", "llama_docker": {"image": IMAGE_REF, "image_tarball": str(tarball)},
                 "llama_limits": {"cpus": 1.5, "memory": "2G", "memory_reserved": "1G"}})
    name, conn = box.inventory_entry()
    inv = tmp / "docker.py"
    inv.write_text(f"hosts = {[(name, {**conn, **data})]!r}\n")
    return box, inv


def test_docker_mode_on_debians_own_engine(docker_host):
    box, inv = docker_host
    result = run_deploy(inv)
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    engine = versions(box, "docker.io")
    print("trixie docker:", engine, box.ssh("docker compose version 2>&1; docker-compose version 2>&1", check=False).stdout)
    assert not engine["docker.io"].startswith("20.10"), engine  # trixie's engine, not bookworm's
    assert chat(f"http://{box.address}:8080").status_code == 200
    proc = run_testinfra(box.address)
    assert proc.returncode == 0, proc.stdout[-4000:]
    again = run_deploy(inv)
    assert again.rc == 0 and again.changed == 0, json.dumps(again.report["results"] if again.report else again.stderr)[:3000]


def test_controller_tools_run_on_trixie(testhosts):
    """A Debian 13 machine as the controller: ``scripts/setup`` installs the tools (apt, the venv
    from PyPI on Python 3.13) and the unit tests pass there. The repository goes over as git
    lists it (tracked and new files, nothing ignored: no .venv, no caches)."""
    box = testhosts("tctl", 96, distro="trixie")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True, timeout=LOCAL_TIMEOUT).stdout
    tree = subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"], input=listed, capture_output=True,
                          check=True, timeout=LOCAL_TIMEOUT).stdout
    subprocess.run([*box.ssh_args(), "mkdir -p /root/llamadeploy && tar -C /root/llamadeploy -xf -"], input=tree,
                   check=True, timeout=LOCAL_TIMEOUT)
    setup = box.ssh("cd /root/llamadeploy && scripts/setup 2>&1", check=False, timeout=SUBPROCESS_TIMEOUT)
    assert setup.returncode == 0, setup.stdout[-3000:]
    assert box.ssh("/root/llamadeploy/.venv/bin/python -V").stdout.startswith("Python 3.13")
    unit = box.ssh("cd /root/llamadeploy && .venv/bin/pytest -q -p no:cacheprovider tests/unit 2>&1", check=False,
                   timeout=SUBPROCESS_TIMEOUT)
    assert unit.returncode == 0, unit.stdout[-4000:]
    assert re.search(r"\b\d{3,} passed\b", unit.stdout), unit.stdout[-1000:]
