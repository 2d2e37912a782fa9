"""A native Debian 13 (trixie) server beside a bookworm one, deployed in one pyinfra run: in
every run (marker ``trixie_build``: ``./scripts/test -m trixie_build`` runs it alone).

The trixie server compiles llama.cpp with trixie's GCC 14 (no cache holds a trixie release);
the bookworm server receives the bookworm release that test_native put in the controller's
cache. Then: the hardened unit on systemd 257, the shipped testinfra suite, a rollout of a
broken release rolled back on the trixie canary, README's first command with ``--distro
trixie``, test_native's systemd-sensitive checks (tests/e2e/native_checks.py), a trixie RPC
worker fenced to its head, and ``systemd-analyze verify`` of every unit the deploy writes.

Its cold llama.cpp compile is about 8 minutes of both CPUs of the CI machine: the suite's
scheduler (tests/conftest.py MODULE_MINUTES) hands it out first, so that it compiles while the
other modules boot their hosts and wait on gates. test_trixie covers the rest of trixie
(front, monitor, docker, fan-out, a trixie controller) without a compile.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    LOCAL_TIMEOUT,
    PYINFRA,
    REPO,
    SUBPROCESS_TIMEOUT,
    broken_rollout_rolled_back,
    merged_data,
    package_versions,
    printed_curl,
    run_deploy,
    run_testinfra,
)
from tests.e2e import native_checks

pytestmark = [pytest.mark.e2e, pytest.mark.trixie_build]


@pytest.fixture(scope="module")
def hosts(testhosts):
    return {"tn": testhosts("tn", 97, lan="trixieb", distro="trixie"), "tb": testhosts("tb", 98, lan="trixieb")}


def write(path: Path, hosts, **server) -> Path:
    """The trixie server as the ``canary`` group, the bookworm one in ``servers``."""
    def entry(h, **data):
        name, conn = h.inventory_entry()
        return (name, {**conn, **data})

    sections = merged_data(**server)
    path.write_text(f"canary = {[entry(hosts['tn'], **sections)]!r}\nservers = {[entry(hosts['tb'], **sections)]!r}\n")
    return path


@pytest.fixture(scope="module")
def fleet(hosts, tmp_path_factory):
    """Both hosts in one run, with bookworm's release in the controller's cache and no trixie one:
    a trixie release cached by an earlier run on this machine is removed, so that the trixie host
    compiles. Run alone on a cold machine (``-m trixie_build`` runs no test_native), the cache has
    no bookworm release either: the bookworm host builds it first, in a run of its own, and its
    deploy is removed again, so that the mixed run shows it receiving the release."""
    from llamadeploy import ctlcache
    from llamadeploy.sandbox.inventory import write_inventory

    releases = ctlcache.cache_dir() / "releases"
    for old in releases.glob("*/debian13-*"):
        old.unlink()
    tmp = tmp_path_factory.mktemp("trixie")
    if not list(releases.glob("*/debian12-*")):
        alone = write_inventory(tmp / "bookworm.py", [hosts["tb"]], merged_data())
        warm = run_deploy(alone)
        assert warm.rc == 0, (warm.stdout + warm.stderr)[-5000:]
        gone = subprocess.run([PYINFRA, "-y", str(alone), "llamadeploy.deploy.llama_server_removed"], cwd=REPO,
                              capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert gone.returncode == 0, (gone.stdout + gone.stderr)[-4000:]
    inv = write(tmp / "inv.py", hosts)
    result = run_deploy(inv)
    assert result.rc == 0, (result.stdout + result.stderr)[-5000:]
    return inv, result


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
    for h in (tn, tb):
        assert chat(f"http://{h.address}:8080").status_code == 200
    # the mixed fleet again, unchanged: nothing built, sent or restarted on either release
    inv, _ = fleet
    again = run_deploy(inv)
    assert again.rc == 0 and again.changed == 0, json.dumps(again.report["results"], indent=1)[:4000]
    print("trixie:", package_versions(tn, "gcc-14", "systemd", "libc6"), "bookworm:", package_versions(tb, "systemd", "libc6"))


def test_hardened_unit_on_systemd_257(hosts, fleet):
    """Every directive of the unit is known to trixie's systemd (verify prints none unknown) and
    the live exposure score is the same as on bookworm (docs/platforms.md says so, without a number)."""
    tn = hosts["tn"]
    assert package_versions(tn, "systemd")["systemd"].startswith("257")
    verify = tn.ssh("systemd-analyze verify /etc/systemd/system/llama-server.service 2>&1", check=False)
    assert verify.returncode == 0 and "Unknown" not in verify.stdout, verify.stdout
    # systemd (PID 1) logs "FILE:LINE: Unknown key name ..., ignoring." for a directive it does not know
    journal = tn.ssh("journalctl -b _PID=1 --no-pager -o cat | grep -F 'llama-server.service:' || true").stdout
    assert not journal.strip(), journal
    exposure = tn.ssh("systemd-analyze security llama-server --no-pager | tail -n 1").stdout
    bookworm = hosts["tb"].ssh("systemd-analyze security llama-server --no-pager | tail -n 1").stdout
    print(f"trixie: {exposure.strip()}; bookworm: {bookworm.strip()}")  # shown, not recorded: the docs give offline scores (benchmarks/PLATFORMS.md)
    def score(line: str) -> float:
        return float(line.split("exposure level for llama-server.service:")[1].split()[0])

    assert score(exposure) == score(bookworm) <= 2.0, (exposure, bookworm)
    assert tn.ssh("systemctl show -p NRestarts --value llama-server").stdout.strip() == "0"


def test_shipped_testinfra_suite_passes_on_trixie(hosts, fleet):
    proc = run_testinfra(hosts["tn"].address)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout) and " failed" not in proc.stdout, proc.stdout[-2000:]


def test_rollout_of_a_broken_release_rolls_the_trixie_canary_back(hosts, fleet, tmp_path):
    """A release whose server cannot start: the trixie canary fails its gate and is rolled back;
    the bookworm host is never touched."""
    canary, other = hosts["tn"], hosts["tb"]
    broken_rollout_rolled_back(lambda path, **sections: write(path, hosts, **sections), canary, other, tmp_path)




def test_quickstart_on_trixie_serves_what_it_prints_and_goes_down(hosts, fleet):
    """README's first command with ``--distro trixie``, as a user runs it: ``scripts/quickstart``
    boots the demo host from trixie's tree (``llamadeploy sandbox up --distro``), receives the
    trixie release the mixed fleet cached (no second compile), deploys and prints a curl, which
    answers as printed; ``scripts/quickstart down`` leaves no host behind."""
    from llamadeploy.sandbox import DEMO

    run = dict(cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    try:
        up = subprocess.run([str(REPO / "scripts/quickstart"), "--distro", "trixie"], **run)
        assert up.returncode == 0, (up.stdout + up.stderr)[-5000:]
        curl = printed_curl(up.stdout)
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=LOCAL_TIMEOUT)
        body = json.loads(answer.stdout)
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0, answer.stdout
        assert "VERSION_CODENAME=trixie" in DEMO.ssh("cat /etc/os-release").stdout
        assert DEMO.ssh("command -v cmake", check=False).returncode != 0  # it received the release, built nothing
    finally:
        down = subprocess.run([str(REPO / "scripts/quickstart"), "down"], **run)
    assert down.returncode == 0 and "stopped and removed: demo" in down.stdout, down.stdout + down.stderr
    nspawns = subprocess.run(["pgrep", "-af", "systemd-nspawn"], capture_output=True, text=True,
                             timeout=LOCAL_TIMEOUT).stdout
    assert " -M demo " not in nspawns, nspawns


def test_the_fit_sandbox_holds_under_systemd_257(hosts, fleet):
    """The GPU fit's transient sandbox (systemd-run with the unit's hardening and limits) on
    trixie, as test_native checks it on bookworm: systemd-run's properties change between releases."""
    native_checks.fit_sandbox_holds(hosts["tn"])


def test_a_release_that_crashes_at_start_is_rolled_back_on_trixie(hosts, fleet, tmp_path):
    """A plain deploy whose server exits at start, on systemd 257: the gate sees the restart, the
    run reinstates the release that served and fails (test_native's check, on trixie); and one
    whose start systemd refuses (test_native's second check)."""
    tn = hosts["tn"]
    good = native_checks.with_data(tn, tmp_path, "trixie-alone")
    alone = run_deploy(good)  # the fleet's trixie server, in an inventory of its own: same data
    assert alone.rc == 0 and alone.changed == 0, json.dumps(alone.report["results"], indent=1)[:4000]
    native_checks.crash_at_start_rolled_back(tn, tmp_path, good)
    native_checks.refused_start_rolled_back(tn, tmp_path, good)  # its start job refused: the same outcome


def test_a_failed_first_deploy_is_stopped_and_disabled_on_trixie(hosts, fleet, tmp_path):
    """A first deploy whose server cannot start, on systemd 257: stopped and disabled, not
    crash-looping; the next good deploy prunes its model, uninstall leaves nothing (as on bookworm)."""
    native_checks.failed_first_deploy_stopped(hosts["tn"], tmp_path)


@pytest.fixture(scope="module")
def worker(hosts, fleet, testhosts, tmp_path_factory):
    """A third trixie host, an RPC worker for the trixie server (640M, as in test_rpc), deployed
    in one run with its head: booted and deployed by the first test that asks for it."""
    tn, tw = hosts["tn"], testhosts("tw", 99, lan="trixieb", distro="trixie")

    def entry(h, data):
        name, conn = h.inventory_entry()
        return (name, {**conn, **data})

    head = merged_data(llama_rpc={"workers_group": "rpc_workers"}, llama_limits={"memory": "640M"})
    data = {**merged_data(), "llama_role": "rpc_worker", "llama_limits": {"memory": "512M"}}
    inv = tmp_path_factory.mktemp("rpc") / "rpc.py"
    inv.write_text(f"heads = {[entry(tn, head)]!r}\nrpc_workers = {[entry(tw, data)]!r}\n")
    return tw, run_deploy(inv)


def test_rpc_worker_on_trixie_takes_its_share_fenced_to_its_head(hosts, worker):
    """ggml-rpc-server on Debian 13: a trixie worker receives the trixie release from the
    controller's cache (no second compile), holds part of the layers of a head that cannot hold
    the model alone, and its nftables fence admits only the head: the bookworm host on the same
    LAN cannot connect."""
    tn, tb = hosts["tn"], hosts["tb"]
    tw, result = worker
    assert result.rc == 0, (result.stdout + result.stderr)[-5000:]
    assert op_hosts(result, "Build llama-server") == []  # the worker received trixie's release
    unit = tn.ssh("cat /etc/systemd/system/llama-server.service").stdout
    assert f"--rpc {tw.address}:50052" in unit, unit
    assert chat(f"http://{tn.address}:8080").status_code == 200
    assert f"{tn.address}:" in tw.ssh("ss -Htn state established 'sport = :50052'").stdout
    assert compiler(tw) == "14"
    probe = tb.ssh(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{tw.address}/50052'", check=False)
    assert probe.returncode != 0, "the bookworm host reached the worker's port"
    print("trixie worker:", package_versions(tw, "nftables"), tw.ssh("ps -o rss= -C ggml-rpc-server").stdout.strip(), "KiB")


def test_every_unit_the_deploy_writes_verifies_on_systemd_257(hosts, worker):
    """``systemd-analyze verify`` on trixie (257) of every unit the deploy writes: the ones this
    module's hosts run (the server; the RPC worker, its fence guard and the nftables drop-in on the
    worker, which PID 1 loaded without a warning), and the product's renders of the ones they do
    not (CUDA with its pinned fit and device nodes, --numa, a fenced server and its guard, the GPU
    metrics timer). Also records the offline exposure of the CPU and CUDA units on 257, beside the
    live one (docs/platforms.md)."""
    (tw, deployed), tn = worker, hosts["tn"]  # the RPC worker, with its fence
    assert deployed.rc == 0, (deployed.stdout + deployed.stderr)[-3000:]
    native_checks.deployed_units_verify(tn, ["llama-server.service"])
    native_checks.deployed_units_verify(tw, ["ggml-rpc-server.service", "ggml-rpc-server-fence.service"])
    assert tw.ssh("ls /etc/systemd/system/nftables.service.d/").stdout.split()  # the fence's drop-in, loaded
    # the renders, on the worker: it has both the release and nft, which verify finds executable
    scores = native_checks.rendered_units_verify(tw)
    # the deployed unit on each release, scored offline (its file, as the unit tests score
    # renders on the controller) and live: the offline score bounds the live one. 252's offline
    # mode fails PrivateMounts=, which a running unit has through its mount namespace (1.4
    # offline, 1.3 live there; 1.3 both on 257: docs/platforms.md)
    def failed(out: str) -> set[str]:
        return {line.split()[1] for line in out.splitlines() if line.startswith("✗")}

    for h in (tn, hosts["tb"]):
        offline = h.ssh("systemd-analyze security --offline=yes /etc/systemd/system/llama-server.service "
                        "--no-pager").stdout
        running = h.ssh("systemd-analyze security llama-server --no-pager").stdout
        print(h.name, "the deployed unit offline / live:", offline.splitlines()[-1], "/", running.splitlines()[-1])
        assert failed(offline) - failed(running) <= {"PrivateMounts="} and failed(running) <= failed(offline), \
            (h.name, failed(offline) ^ failed(running))
    print("systemd 257 exposure of the renders, offline:", scores)
    assert max(scores.values()) <= 2.0, scores
