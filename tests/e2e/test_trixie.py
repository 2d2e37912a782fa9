"""Debian 13 (trixie) in every run, without a llama.cpp compile: a trixie front (HAProxy 3.0)
and a trixie monitor (Prometheus 2.53, node exporters on trixie) over two bookworm servers
(they receive the release test_native put in the controller's cache), deployed in one run; a
rollout through the trixie front; fan-out between two trixie hosts; docker mode on Debian 13's
own engine; a trixie controller.

A native trixie server compiles llama.cpp (about 8 minutes of both CPUs of the CI machine): that
and what needs it (the hardened unit on systemd 257, the mixed bookworm/trixie build) are in
test_trixie_build. Every claim is checked over a second channel: ssh,
HTTP through the front, Prometheus' API, HAProxy's runtime API. docs/platforms.md lists the
versions read off the hosts.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llamadeploy.sandbox.inventory import default_data
from tests.conftest import (
    LOCAL_TIMEOUT,
    PYINFRA,
    REPO,
    SUBPROCESS_TIMEOUT,
    broken_rollout_rolled_back,
    changed_hosts,
    failure_text,
    front_admin_state,
    front_served_by,
    front_server_up,
    front_worker,
    host_state,
    merged_data,
    nothing_listens,
    package_versions,
    printed_curl,
    run_deploy,
    run_testinfra,
    tx_bytes,
    wait_for,
)
from tests.e2e import docker_checks, native_checks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hosts(testhosts):
    return {"tb1": testhosts("tb1", 91, lan="trixie"), "tb2": testhosts("tb2", 92, lan="trixie"),
            "tfd": testhosts("tfd", 93, lan="trixie", distro="trixie"),
            "tmon": testhosts("tmon", 94, lan="trixie", distro="trixie")}


def write(path: Path, hosts, monitor: dict | None = None, front: dict | None = None, **server) -> Path:
    """The bookworm servers (``canary`` and ``servers`` groups), the trixie front and monitor
    (``monitor``, ``front``: more of its ``llama_monitor``, ``llama_front``)."""
    def entry(h, **data):
        name, conn = h.inventory_entry()
        return (name, {**conn, **data})

    sections = merged_data(**server)
    controller = [f"{hosts['tmon'].gateway}/32"]  # this test reads the exporter and Prometheus
    path.write_text(
        f"canary = {[entry(hosts['tb1'], **sections)]!r}\n"
        f"servers = {[entry(hosts['tb2'], **sections)]!r}\n"
        f"front = {[entry(hosts['tfd'], **merged_data(), llama_role='front', llama_front={'check_interval': 1, 'metrics_allow_from': controller, **(front or {})})]!r}\n"
        f"monitor = {[entry(hosts['tmon'], **merged_data(), llama_role='monitor', llama_monitor={'scrape_interval': '2s', 'allow_from': controller, **(monitor or {})})]!r}\n"
    )
    return path


@pytest.fixture(scope="module")
def fleet(hosts, tmp_path_factory):
    inv = write(tmp_path_factory.mktemp("trixie") / "inv.py", hosts)
    result = run_deploy(inv)
    assert result.rc == 0, failure_text(result)
    wait_for(lambda: all(front_server_up(hosts["tfd"], hosts[n].address) for n in ("tb1", "tb2")), 90, "both servers up")
    return inv, result


def chat(base: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})


def test_every_front_config_branch_passes_haproxy_30(hosts, fleet):
    """The config branches the fleet above does not render (TLS with the redirect, affinity,
    routing by model with its per-model backends and the 404), rendered by the front role's own
    function, pass 3.0's ``haproxy -c`` on the trixie front (its certificate made there)."""
    from llamadeploy.config import HostConfig
    from llamadeploy.roles.front import Backend, haproxy_config

    fd = hosts["tfd"]
    pem = "/tmp/llamadeploy-check.pem"
    fd.ssh(f"openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=front -keyout {pem}.key -out {pem} "
           f">/dev/null 2>&1 && cat {pem}.key >> {pem}")
    served = [Backend("b1", "10.0.0.1", 8080, 4, ("chat", "embed")), Backend("b2", "10.0.0.2", 8080, 2, ("chat",))]

    def front(**settings) -> HostConfig:
        return HostConfig.model_validate({"server": {"allow_unauthenticated": True}, "front": settings})

    variants = {"tls-redirect": (front(tls_pem="/x.pem", redirect_http=True), False),
                "affinity": (front(balance="affinity"), False),
                "by-model-affinity": (front(balance="affinity"), True)}
    try:
        for name, (cfg, by_model) in variants.items():
            text = haproxy_config(cfg, served, fd.address, by_model=by_model).replace("/etc/haproxy/llamadeploy.pem", pem)
            fd.ssh(f"cat > /tmp/llamadeploy-{name}.cfg <<'EOF'\n{text}EOF")
            check = fd.ssh(f"haproxy -c -f /tmp/llamadeploy-{name}.cfg 2>&1", check=False)
            assert check.returncode == 0 and "ALERT" not in check.stdout, (name, check.stdout)
        assert "backend model_embed" in text, text  # the last one rendered the routing branch
    finally:
        fd.ssh(f"rm -f {pem} {pem}.key /tmp/llamadeploy-*.cfg", check=False)


def test_front_on_haproxy_30_checks_and_drains(hosts, fleet, tmp_path):
    """The rendered config passes 3.0's own ``haproxy -c``; drain and ready go through 3.0's
    runtime API, and a drained server gets no request, also after a front deploy that changed
    the config and reloaded 3.0 (the servers' states carried over, as test_front checks on 2.6)."""
    inv, _ = fleet
    fd, srv = hosts["tfd"], hosts["tb1"]
    assert package_versions(fd, "haproxy")["haproxy"].startswith("3.0.")
    check = fd.ssh("haproxy -c -f /etc/haproxy/haproxy.cfg 2>&1", check=False)
    assert check.returncode == 0 and "ALERT" not in check.stdout, check.stdout

    def set_state(state: str) -> None:
        proc = subprocess.run([PYINFRA, "-y", str(inv), "llamadeploy.deploy.llama_front_servers",
                               f"servers={srv.address}", f"set_to={state}", "--limit", fd.address],
                              cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    set_state("drain")
    try:
        state = fd.ssh("echo 'show servers state llama_servers' | socat stdio /run/haproxy/admin.sock").stdout
        assert any(ln.split()[3] == srv.address and ln.split()[6] == "8" for ln in state.splitlines()
                   if len(ln.split()) > 7), state  # srv_admin_state 8: drained
        before = front_served_by(hosts["tfd"])
        for _ in range(8):
            assert chat(f"http://{fd.address}:8080").status_code == 200
        assert front_served_by(hosts["tfd"]).get(srv.address, 0) == before.get(srv.address, 0)
        worker = front_worker(fd)
        reload = run_deploy(write(tmp_path / "queue.py", hosts, front={"timeout_queue": 75}), "--limit", fd.address)
        assert reload.rc == 0 and "timeout queue 75s" in fd.ssh("cat /etc/haproxy/haproxy.cfg").stdout, \
            reload.stderr[-3000:]
        assert front_worker(fd) not in ("", worker)  # reloaded: a new worker answers
        assert front_admin_state(fd, srv.address) == "drain"
        before = front_served_by(hosts["tfd"])
        for _ in range(8):
            assert chat(f"http://{fd.address}:8080").status_code == 200
        assert front_served_by(hosts["tfd"]).get(srv.address, 0) == before.get(srv.address, 0)
    finally:
        set_state("ready")
        back = run_deploy(inv, "--limit", fd.address)  # the module's own front config again
    assert back.rc == 0, back.stderr[-3000:]
    wait_for(lambda: front_server_up(hosts["tfd"], srv.address), 30, "tb1 ready again")


def test_monitor_on_trixie_scrapes_every_target(hosts, fleet):
    mon = hosts["tmon"]
    assert re.match(r"2\.5\d", package_versions(mon, "prometheus")["prometheus"]), package_versions(mon, "prometheus")
    api = f"http://{mon.address}:9090/api/v1"

    def all_up() -> bool:
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        return sorted(t["labels"]["job"] for t in targets if t["health"] == "up" and t["labels"]["job"] != "prometheus") \
            == ["haproxy", "llama-node", "llama-node", "llama-node", "llama-node", "llama-server", "llama-server"]

    try:
        wait_for(all_up, 90, "every target up in Prometheus")
    except AssertionError:
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        raise AssertionError([(t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]) from None
    assert mon.ssh("promtool check config /etc/prometheus/prometheus.yml").returncode == 0
    # the node exporter on trixie (1.9) with its systemd collector: the front's HAProxy unit
    # (over a few 2 s scrapes: one taken while a reload runs finds it "reloading", as in test_front)
    def active() -> list[str]:
        units = httpx.get(f"{api}/query", timeout=10, params={
            "query": 'node_systemd_unit_state{name="haproxy.service",state="active"} == 1'}).json()["data"]["result"]
        return [r["metric"]["instance"] for r in units]

    try:
        wait_for(lambda: active() == [f"{hosts['tfd'].address}:9100"], 30, "haproxy active")
    except AssertionError:
        raise AssertionError(active()) from None


def test_the_fences_of_front_monitor_and_node_exporters_verify_on_systemd_257(hosts, fleet):
    """``systemd-analyze verify`` on trixie of the guards that fence HAProxy's exporter,
    Prometheus and the node exporter, and of Debian's units with the drop-ins that bind them to
    their guards (loaded by PID 1 without a warning)."""
    node = "prometheus-node-exporter"
    for h, service in ((hosts["tfd"], "haproxy"), (hosts["tmon"], "prometheus")):
        native_checks.deployed_units_verify(h, [f"{service}-fence.service", f"{node}-fence.service"],
                                            packaged=(f"{service}.service", f"{node}.service"))


def test_alertmanager_on_trixie_takes_the_config_and_prometheus_sends_to_it(hosts, fleet, tmp_path):
    """Trixie's Alertmanager (0.28): the rendered config passes its own ``amtool check-config``
    (the deploy runs it before the config replaces the old one, and so does this test), it listens
    on loopback only with the webhook's token in a 0600 file, and Prometheus sends to it. Without
    receivers the next deploy stops it again. (Delivery to a person is proven on bookworm, in
    test_front: the same config, rendered by the same template.)"""
    mon = hosts["tmon"]
    token = tmp_path / "hook-token"
    token.write_text("hook-token-0123456789abcdef\n")
    token.chmod(0o600)
    am = {"alertmanager": {"webhook": {"url": f"http://{mon.gateway}:9/alerts", "token_file": str(token)},
                           "email": {"to": ["oncall@example.com"], "sender": "alerts@example.com",
                                     "smarthost": f"{mon.gateway}:25"}}}
    result = run_deploy(write(tmp_path / "am.py", hosts, monitor=am), "--limit", mon.address)
    assert result.rc == 0, failure_text(result)
    assert "0123456789abcdef" not in result.stdout + result.stderr
    assert package_versions(mon, "prometheus-alertmanager")["prometheus-alertmanager"].startswith("0.28"), \
        package_versions(mon, "prometheus-alertmanager")
    assert mon.ssh("amtool check-config /etc/prometheus/alertmanager.yml").returncode == 0
    listening = mon.ssh("ss -Hltn 'sport = :9093 or sport = :9094'").stdout.split("\n")
    assert [ln.split()[3] for ln in listening if ln.strip()] == ["127.0.0.1:9093"], listening
    assert mon.ssh("stat -c '%a %U' /etc/prometheus/alertmanager-webhook-token").stdout.split() == ["600", "prometheus"]
    api = f"http://{mon.address}:9090/api/v1"
    wait_for(lambda: [a["url"] for a in httpx.get(f"{api}/alertmanagers", timeout=10).json()["data"]
                      ["activeAlertmanagers"]] == ["http://127.0.0.1:9093/api/v2/alerts"], 30, "Prometheus -> Alertmanager")
    plain = run_deploy(write(tmp_path / "plain.py", hosts), "--limit", mon.address)
    assert plain.rc == 0, failure_text(plain)
    assert mon.ssh("systemctl is-active prometheus-alertmanager", check=False).stdout.strip() == "inactive"


def test_a_system_no_test_covers_is_refused_and_nothing_changes(hosts, fleet):
    """A bookworm server pretends to be Ubuntu 24.04 (its /etc/os-release): the deploy stops
    before any operation on any host, naming the host and what it runs."""
    inv, _ = fleet
    tb, tn = hosts["tb1"], hosts["tb2"]
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


def test_rollout_through_the_trixie_front_rolls_a_broken_canary_back(hosts, fleet, tmp_path):
    """A release whose server cannot start: the canary, drained at the trixie front through
    HAProxy 3.0's runtime API, fails its gate and is rolled back, and enabled again; the other
    server is never touched."""
    canary, other = hosts["tb1"], hosts["tb2"]
    started = time.time()
    broken_rollout_rolled_back(lambda path, **sections: write(path, hosts, **sections), canary, other, tmp_path)
    wait_for(lambda: front_server_up(hosts["tfd"], canary.address), 60, "the canary back in the front")
    # the front's own audit trail: the rollout drained the canary there, and enabled it again, each ok
    from llamadeploy.audit import AUDIT_PATH

    lines = [json.loads(line) for line in hosts["tfd"].ssh(f"cat {AUDIT_PATH}").stdout.splitlines()]
    steps = [(e["action"], e["outcome"]) for e in lines if e["time"] >= started and e["action"].startswith("rollout/front")]
    drained = [i for i, (action, outcome) in enumerate(steps)
               if action.startswith("rollout/front: drain") and canary.address in action and outcome == "ok"]
    assert drained and any(action.startswith("rollout/front: ready") and canary.address in action and outcome == "ok"
                           for action, outcome in steps[drained[0] + 1:]), steps
    assert not [a for a, _ in steps if "drain" in a and other.address in a], steps  # the other was never drained


def test_fanout_between_trixie_hosts(hosts, fleet, tmp_path):
    """Fan-out's parts on Debian 13 (busybox httpd serving a peer, aria2c pulling from it, the
    nftables fence between them): a model staged on the two trixie hosts in one run, as before a
    rollout. The controller sends it once, the other host pulls it from its peer, both verify it,
    and nothing stays listening. (They are the front and the monitor of the fleet above, here
    listed as servers: staging needs no build, and a trixie server compiles for 8 minutes.)"""
    from llamadeploy.sandbox.assets import MODEL_SHA256, MODEL_SIZE
    from llamadeploy.sandbox.inventory import write_inventory

    pair = [hosts["tfd"], hosts["tmon"]]
    inv = write_inventory(tmp_path / "stage.py", pair, merged_data(llama_transfer={"mode": "fanout"}))
    try:
        before = tx_bytes("vz-trixie")
        staged = subprocess.run([PYINFRA, "-y", "--json", str(inv), "llamadeploy.deploy.llama_model_staged"],
                                cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        sent = tx_bytes("vz-trixie") - before
        assert staged.returncode == 0, (staged.stdout + staged.stderr)[-4000:]
        print(f"controller sent {sent / MODEL_SIZE:.2f}x the model for two trixie hosts")
        assert MODEL_SIZE <= sent < 1.5 * MODEL_SIZE, sent
        report = json.loads(staged.stdout)
        pushed = changed_hosts(report, "gguf: the controller's one push")
        assert len(pushed) == 1 and changed_hosts(report, "gguf: round", "pull") == \
            [h.address for h in pair if h.address not in pushed], report["results"]["operations"]
        for h in pair:
            path = "/var/lib/llama-server/models/gemma-3-270m-q4_k_m.gguf"
            assert h.ssh(f"sha256sum {path}").stdout.split()[0] == MODEL_SHA256, h.name
            nothing_listens(h)
        print(package_versions(pair[1], "busybox", "aria2", "nftables"))
    finally:
        for h in pair:
            h.ssh("rm -rf /var/lib/llama-server", check=False)


@pytest.fixture(scope="module")
def docker_host(testhosts, hosts, fleet, tmp_path_factory):
    """A trixie host in docker mode: Debian's docker.io and docker-compose, the test image (made
    from the bookworm server's release, as test_docker makes it) pushed as a tarball."""
    from tests.harness.images import IMAGE_REF, build_image_tarball

    box = testhosts("tdk", 95, docker=True, distro="trixie")
    tmp = tmp_path_factory.mktemp("tdk")
    tarball = build_image_tarball(hosts["tb1"].root, out=tmp / "image.tar")
    data = default_data()
    data.update({"llama_mode": "docker", "llama_docker": {"image": IMAGE_REF, "image_tarball": str(tarball)},
                 "llama_limits": {"cpus": 1.5, "memory": "2G", "memory_reserved": "1G"}})
    name, conn = box.inventory_entry()
    inv = tmp / "docker.py"
    inv.write_text(f"hosts = {[(name, {**conn, **data})]!r}\n")
    first = run_deploy(inv)  # the docker tests below each start from it, in any order or alone
    assert first.rc == 0, (first.stdout + first.stderr)[-4000:]
    return box, inv


def test_docker_mode_on_debians_own_engine(docker_host):
    box, inv = docker_host
    # trixie's own engine, its separate CLI package and compose v2, as docs/platforms.md's table says
    engine = package_versions(box, "docker.io", "docker-cli", "docker-compose")
    assert engine["docker.io"].startswith("26.") and engine["docker-cli"].startswith("26."), engine
    assert engine["docker-compose"].startswith("2."), engine
    # Debian's build prints its package version ("Docker Compose version 2.26.1-4"), upstream's a "v"
    assert re.match(r"Docker Compose version v?2\.", box.ssh("docker-compose version").stdout), engine
    assert chat(f"http://{box.address}:8080").status_code == 200
    proc = run_testinfra(box.address)
    assert proc.returncode == 0, proc.stdout[-4000:]
    again = run_deploy(inv)
    assert again.rc == 0 and again.changed == 0, json.dumps(again.report["results"] if again.report else again.stderr)[:3000]


def test_docker_rollback_on_compose_v2_reinstates_the_image_without_transfer(docker_host, hosts, tmp_path):
    """test_docker's rollback check on trixie's engine 26 and compose v2: the container is
    recreated on the earlier image, and nothing large crosses the link."""
    box, inv = docker_host
    docker_checks.rollback_reinstates_without_transfer(box, inv, tmp_path, hosts["tb1"].root)


def test_docker_release_that_crashes_at_start_is_rolled_back_on_compose_v2(docker_host, tmp_path):
    """test_docker's crash-at-start check on trixie: the gate sees compose v2's container
    restart, and the deploy reinstates the release that served."""
    box, inv = docker_host
    docker_checks.crash_at_start_rolled_back(box, inv, tmp_path)


@pytest.fixture(scope="module")
def controller(testhosts):
    """A Debian 13 machine as the controller, with the repository as git lists it (tracked and new
    files, nothing ignored: no .venv, no caches) and ``scripts/setup`` run there (apt, the venv from
    PyPI on Python 3.13).

    The quickstart boots its demo host inside it, so it gets what a nested ``systemd-nspawn``
    needs: every capability and access to character devices. Not the cgroup tree a Docker host
    gets (``--bind=/sys/fs/cgroup``): this machine's is cgroup v1, which trixie's systemd-nspawn
    257 refuses ("Failed to determine supported controllers"); the tree nspawn sets up for its
    own container serves it. The PyPI artifacts (the llama.cpp sdist, the model's part wheels) are
    this machine's, read-only: the same files, not a second 300 MB download."""
    from llamadeploy.sandbox.assets import PYPI

    box = testhosts("tctl", 96, distro="trixie",
                    nspawn_options=["--capability=all", "--property=DeviceAllow=char-* rwm", f"--bind-ro={PYPI}:{PYPI}"])
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True, timeout=LOCAL_TIMEOUT).stdout
    tree = subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"], input=listed, capture_output=True,
                          check=True, timeout=LOCAL_TIMEOUT).stdout
    subprocess.run([*box.ssh_args(), "mkdir -p /root/llamadeploy && tar -C /root/llamadeploy -xf -"], input=tree,
                   check=True, timeout=LOCAL_TIMEOUT)
    setup = box.ssh("cd /root/llamadeploy && scripts/setup 2>&1", check=False, timeout=SUBPROCESS_TIMEOUT)
    assert setup.returncode == 0, setup.stdout[-3000:]
    return box


def test_controller_tools_run_on_trixie(controller):
    """On the trixie controller the venv runs Python 3.13 and the unit tests pass there."""
    box = controller
    assert box.ssh("/root/llamadeploy/.venv/bin/python -V").stdout.startswith("Python 3.13")
    unit = box.ssh("cd /root/llamadeploy && .venv/bin/pytest -q -p no:cacheprovider tests/unit 2>&1", check=False,
                   timeout=SUBPROCESS_TIMEOUT)
    assert unit.returncode == 0, unit.stdout[-4000:]
    assert re.search(r"\b\d{3,} passed\b", unit.stdout), unit.stdout[-1000:]


def test_quickstart_on_a_trixie_controller_serves_what_it_prints_and_goes_down(controller):
    """README's first command, ``./scripts/quickstart``, run on the Debian 13 controller as a user
    runs it: it debootstraps bookworm there, boots the demo host with trixie's systemd-nspawn,
    wires its NAT with trixie's iptables, deploys, and prints a curl that answers as printed from
    that controller; ``scripts/quickstart down`` leaves no host, link or NAT rule there.

    The controller's release cache is seeded with the bookworm release test_native cached (as a
    second run of the quickstart on one machine finds it), so nothing compiles: a release built on
    the demo host going back into a trixie controller's cache is not shown here."""
    from llamadeploy import ctlcache
    from llamadeploy.config import BuildConfig

    box = controller
    key = BuildConfig(**default_data()["llama_build"]).release_key()
    cached = sorted(p.name for p in (ctlcache.cache_dir() / "releases" / key).glob("debian12-*"))
    assert cached, f"no bookworm release {key} in {ctlcache.cache_dir()}: test_native caches it"
    seed = subprocess.run(["tar", "-C", str(ctlcache.cache_dir()), "-cf", "-", *(f"releases/{key}/{n}" for n in cached)],
                          capture_output=True, check=True, timeout=LOCAL_TIMEOUT).stdout
    subprocess.run([*box.ssh_args(), "mkdir -p /root/.cache/llamadeploy && tar -C /root/.cache/llamadeploy -xf -"],
                   input=seed, check=True, timeout=LOCAL_TIMEOUT)
    demo = "ssh -F /var/cache/llamactl-ci/ssh/config 10.231.200.2"
    # what the demo host adds on the controller: its nspawn, its veth, its NAT rule (seen while it
    # runs, so that the check after ``down`` can see them)
    leftovers = "pgrep -ax systemd-nspawn; ip -br link | grep -E '^(ve|vb|vz)-'; iptables -t nat -S | grep 10.231"
    try:
        up = box.ssh("cd /root/llamadeploy && ./scripts/quickstart 2>&1", check=False, timeout=SUBPROCESS_TIMEOUT)
        assert up.returncode == 0, up.stdout[-5000:]
        curl = printed_curl(up.stdout)
        answer = box.ssh(curl, check=False)
        body = json.loads(answer.stdout)
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0, answer.stdout
        running = box.ssh(leftovers, check=False).stdout
        assert all(what in running for what in ("systemd-nspawn", "ve-demo", "10.231.200.0/30")), running
        seen = box.ssh(f"{demo} 'grep ^VERSION_CODENAME= /etc/os-release; command -v cmake || echo no-cmake'").stdout
        assert seen.split() == ["VERSION_CODENAME=bookworm", "no-cmake"], seen  # it received the release
    finally:
        down = box.ssh("cd /root/llamadeploy && ./scripts/quickstart down 2>&1", check=False,
                       timeout=SUBPROCESS_TIMEOUT)
    assert down.returncode == 0 and "stopped and removed: demo" in down.stdout, down.stdout
    left = box.ssh(leftovers, check=False)
    assert left.stdout == "" and left.stderr == "", left
