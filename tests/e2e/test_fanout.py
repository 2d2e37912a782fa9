"""Fan-out on four real hosts in one LAN, the controller's link throttled by ``tc``.

The hosts share a bridge (``vz-fanout``), as servers in a rack share a switch: traffic between
them is bridged, and what the controller itself sends leaves through the bridge device, whose
transmit counter measures it and whose qdisc throttles it (200 Mbit/s). One module, hosts
booted once; each test moves the fleet with the real pyinfra CLI and checks it over ssh and
the kernel's counters.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from llamadeploy.sandbox import assets
from llamadeploy.sandbox.host import HOSTS_DIR
from llamadeploy.sandbox.inventory import write_inventory
from tests.conftest import (
    LOCAL_TIMEOUT,
    PYINFRA,
    REPO,
    SUBPROCESS_TIMEOUT,
    changed_hosts,
    merged_data,
    nothing_listens,
    run_deploy,
    tx_bytes,
    wait_for_table,
)

pytestmark = pytest.mark.e2e

LAN = "fanout"
BRIDGE = f"vz-{LAN}"
MODEL = "/var/lib/llama-server/models/gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024
MIB = 1 << 20


@pytest.fixture(scope="module")
def lan(testhosts):
    hosts = [testhosts(f"fo{i}", 120 + i, lan=LAN) for i in range(1, 5)]
    subprocess.run(["tc", "qdisc", "replace", "dev", BRIDGE, "root", "tbf", "rate", "200mbit", "burst", "256kb",
                    "latency", "100ms"], check=True, timeout=LOCAL_TIMEOUT)
    yield hosts
    subprocess.run(["tc", "qdisc", "del", "dev", BRIDGE, "root"], check=False, timeout=LOCAL_TIMEOUT)


def inventory(path: Path, hosts, mode: str = "fanout") -> Path:
    return write_inventory(path, hosts, merged_data(llama_transfer={"mode": mode}))


def staged(inv: Path, *extra: str) -> subprocess.CompletedProcess:
    """``pyinfra -y INVENTORY llamadeploy.deploy.llama_model_staged`` as an operator runs it."""
    return subprocess.run([PYINFRA, "-y", str(inv), "llamadeploy.deploy.llama_model_staged", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def model_sha(h) -> str:
    return h.ssh(f"sha256sum {MODEL} 2>/dev/null | cut -c1-64", check=False).stdout.strip()


def drop_model(h) -> None:
    h.ssh(f"rm -f {MODEL} {MODEL}.partial {MODEL}.partial.aria2 /var/lib/llama-server/models/.*.sha256")


def test_deploy_sends_model_and_release_once_then_nothing_listens(lan, tmp_path):
    """A first deploy of four hosts: the controller sends the model and the release once each,
    the hosts pass them on; every host serves with the right sha256; nothing stays listening;
    the re-run changes nothing."""
    inv = inventory(tmp_path / "fanout.py", lan)
    before = tx_bytes(BRIDGE)
    result = run_deploy(inv)
    sent = tx_bytes(BRIDGE) - before
    assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
    assert result.report is not None
    print(f"controller sent {sent / MIB:.0f} MiB for a {SIZE / MIB:.0f} MiB model to 4 hosts "
          f"({sent / SIZE:.2f}x the model)")
    assert SIZE <= sent <= 2 * SIZE, sent
    # one push per file; the other hosts got it from peers, none from the fallback push
    assert "the controller pushes it" not in result.stdout + result.stderr
    assert changed_hosts(result.report, "Model gemma-3-270m-q4_k_m.gguf") == [], [
        op for op in result.report["results"]["operations"] if any("Model gemma" in n for n in op["names"])]
    # the release's own direct upload (artifact_installed) shows a progress bar "<host> release: ..."
    assert re.search(r"\d+\.\d+\.\d+\.\d+ release:", result.stderr) is None, result.stderr[-3000:]
    others = sorted(h.address for h in lan[1:])
    assert changed_hosts(result.report, "gguf: the controller's one push") == [lan[0].address]
    assert changed_hosts(result.report, "gguf: round", "pull") == others
    # the release: shipped to every host that did not compile it (an empty controller cache
    # makes the first host the builder), one push from the controller, the rest from peers
    compiled = changed_hosts(result.report, "Build llama-server")
    pushed = changed_hosts(result.report, "Fan-out | release", "the controller's one push")
    pulled = changed_hosts(result.report, "Fan-out | release", "round", "pull")
    assert len(pushed) == 1 and sorted(compiled + pushed + pulled) == sorted(h.address for h in lan), \
        (compiled, pushed, pulled)
    for h in lan:
        assert model_sha(h) == assets.MODEL_SHA256, h.name
        assert h.ssh("curl -fsS http://127.0.0.1:8080/health").stdout.strip().startswith("{")
        nothing_listens(h)
    again = run_deploy(inv)
    assert again.rc == 0, again.stderr[-3000:]
    assert again.report is not None
    assert again.changed == 0, [op["names"] for op in again.report["results"]["operations"] if op["success"]]


def test_peer_killed_mid_transfer_others_complete_and_it_resumes(lan, tmp_path):
    """Three hosts need the model; the last one's link is slow and its power is cut while it
    pulls: the others complete, and on the next run it finishes from its partial file, from
    the peers (the controller sends almost nothing). While the peers serve, an address that
    is not a host of the run cannot reach them, also after the firewall was reloaded."""
    inv = inventory(tmp_path / "fanout.py", lan)
    victim = lan[3]
    for h in lan[1:]:
        drop_model(h)
    partial = HOSTS_DIR / victim.name / MODEL.lstrip("/")
    partial = partial.with_name(partial.name + ".partial")
    # the victim's own port on the bridge: 40 Mbit/s, so its pull takes a minute
    subprocess.run(["tc", "qdisc", "replace", "dev", victim.veth, "root", "tbf", "rate", "40mbit", "burst", "64kb",
                    "latency", "100ms"], check=True, timeout=LOCAL_TIMEOUT)
    start = tx_bytes(victim.veth)  # what the bridge sends the victim: what it receives
    proc = subprocess.Popen([PYINFRA, "-y", str(inv), "llamadeploy.deploy.llama_model_staged", "--fail-percent",
                             "50"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (partial.exists() and tx_bytes(victim.veth) - start > 40 * MIB):
            assert proc.poll() is None and time.monotonic() < deadline, "the victim never started its pull"
            time.sleep(0.2)
        # the fence, while peers serve: a host of the run gets a byte, this machine (not in the run) does not
        url = f"http://{lan[0].address}:8090/{assets.MODEL_SHA256}"
        member = lan[1].ssh(f"curl -s -m 5 -r 0-0 -o /dev/null -w '%{{http_code}}' {url}", check=False).stdout
        outsider = subprocess.run(["curl", "-s", "-m", "3", "-r", "0-0", "-o", "/dev/null", "-w", "%{http_code}",
                                   url], capture_output=True, text=True, timeout=LOCAL_TIMEOUT).stdout
        # the fence outlives a firewall reload: Debian's nftables.service flushes the whole ruleset,
        # the peer's guard loads the table again, and this machine still gets nothing
        table = lan[0].ssh("nft list tables | awk '$3 ~ /^llamadeploy_peer/ {print $3}'").stdout.strip()
        assert table and "\n" not in table, f"the serving peer's fences: {table!r}"  # its own, no stale one
        lan[0].ssh("systemctl restart nftables")
        wait_for_table(lan[0], table)
        after_reload = subprocess.run(["curl", "-s", "-m", "3", "-r", "0-0", "-o", "/dev/null", "-w", "%{http_code}",
                                       url], capture_output=True, text=True, timeout=LOCAL_TIMEOUT).stdout
        got = tx_bytes(victim.veth) - start
        victim.power_cut()
        victim.power_on()  # its old connections get a reset: pyinfra fails it at once
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert member == "206" and outsider == "000" and after_reload == "000", (member, outsider, after_reload)
    assert proc.returncode != 0, out[-3000:]
    for h in lan[:3]:
        assert model_sha(h) == assets.MODEL_SHA256, (h.name, out[-3000:])
        nothing_listens(h)
    assert got > 40 * MIB and partial.exists()
    before_ctl, before_victim = tx_bytes(BRIDGE), tx_bytes(victim.veth)
    again = staged(inv)
    ctl, received = tx_bytes(BRIDGE) - before_ctl, tx_bytes(victim.veth) - before_victim
    assert again.returncode == 0, again.stderr[-3000:]
    assert model_sha(victim) == assets.MODEL_SHA256
    print(f"resume: {got / MIB:.0f} MiB had arrived before the power cut, {received / MIB:.0f} MiB of "
          f"{SIZE / MIB:.0f} received after it, {ctl / MIB:.1f} MiB from the controller")
    # resumed, not restarted: what arrived before the cut is not sent again (aria2 records its
    # progress every second: the last second's bytes, 5 MiB at 40 Mbit/s, may come again)
    assert received < SIZE - got + 16 * MIB, (received, got)
    assert ctl < SIZE // 10, ctl  # from the peers
    for h in lan:
        nothing_listens(h)


def test_peers_that_cannot_reach_each_other_fall_back_to_a_direct_push(lan, tmp_path):
    """Bridge ports isolated (hosts reach the controller, not each other): the pull fails,
    says so, and the controller pushes the file; the host ends up verified all the same."""
    inv = inventory(tmp_path / "fanout.py", lan)
    target = lan[2]
    drop_model(target)
    for h in lan:
        subprocess.run(["bridge", "link", "set", "dev", h.veth, "isolated", "on"], check=True, timeout=LOCAL_TIMEOUT)
    try:
        before = tx_bytes(BRIDGE)
        result = staged(inv)
        sent = tx_bytes(BRIDGE) - before
    finally:
        for h in lan:
            subprocess.run(["bridge", "link", "set", "dev", h.veth, "isolated", "off"], check=False,
                           timeout=LOCAL_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the controller pushes it now" in result.stderr + result.stdout
    assert model_sha(target) == assets.MODEL_SHA256
    assert SIZE <= sent <= 2 * SIZE, sent
    for h in lan:
        nothing_listens(h)
    report = json.dumps({"controller_bytes": sent})
    print(report)
