"""The front door and the monitor on real hosts: HAProxy (Debian's) over two llama-servers,
Prometheus (Debian's) scraping them; failover, keep-alive through the official OpenAI client,
drain/enable, a reload under a running stream, TLS.

Four hosts booted once for the module (two servers, a front, a monitor), deployed in one
pyinfra run; every test checks over a second channel (HTTP to the front, HAProxy's exporter,
Prometheus' API, ssh).
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import shlex
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from llamadeploy.manifest import DEFAULT_PATH, Manifest
from tests.conftest import (
    LOCAL_TIMEOUT,
    NVIDIA_SMI_DATA,
    PYINFRA,
    REPO,
    SNAPSHOT,
    SUBPROCESS_TIMEOUT,
    DeployResult,
    dashboard_gaps,
    failed_units_text,
    failure_text,
    front_admin_state,
    front_served_by,
    front_server_up,
    front_worker,
    gpu_metrics_file,
    merged_data,
    run_deploy,
    starts_since_boot,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")]


@pytest.fixture(scope="module")
def hosts(testhosts):
    # one LAN: the monitor's scrapes reach the front from the monitor's own address (not NATed
    # by the controller), which is what the exporter's fence admits
    return {"be1": testhosts("be1", 71, lan="front"), "be2": testhosts("be2", 72, lan="front"),
            "fd": testhosts("fd", 73, lan="front"), "mon": testhosts("mon", 74, lan="front")}


def write(path: Path, hosts, front: dict | None = None, server: dict | None = None,
          monitor: dict | None = None, servers_listed: tuple[str, ...] = ("be1", "be2")) -> Path:
    def entry(h, **data):
        name, conn = h.inventory_entry()
        return (name, {**conn, **merged_data(), **data})

    sections = merged_data(**server) if server else {}
    servers = [entry(hosts[name], **sections) for name in servers_listed]
    # the controller (this test) reaches the exporter and Prometheus: listed, as an operator's network would be
    controller = [f"{hosts['mon'].gateway}/32"]
    fronts = [entry(hosts["fd"], llama_role="front",
                    llama_front={"check_interval": 1, "metrics_allow_from": controller, **(front or {})})]
    monitors = [entry(hosts["mon"], llama_role="monitor",
                      llama_monitor={"scrape_interval": "2s", "allow_from": controller, **(monitor or {})})]
    path.write_text(f"servers = {servers!r}\nfront = {fronts!r}\nmonitor = {monitors!r}\n")
    return path


#: the front's and the monitor's hosts as booted, before the module's first deploy (read by the
#: last test: uninstall leaves each as it was)
FRESH: dict[str, str] = {}


def trust_store_aside(snapshot: str) -> str:
    """A host's snapshot without the entries of /etc/ssl/certs (see the uninstall test)."""
    return "".join(line for line in snapshot.splitlines(keepends=True) if not line.startswith("/etc/ssl/certs/"))


@pytest.fixture(scope="module")
def fleet(hosts, tmp_path_factory):
    FRESH.update({name: trust_store_aside(hosts[name].ssh(SNAPSHOT).stdout) for name in ("fd", "mon")})
    inv = write(tmp_path_factory.mktemp("front") / "inv.py", hosts)
    result = run_deploy(inv)  # four hosts at once: each has its own apt lock (its layer over the shared archive)
    assert result.rc == 0, failure_text(result) + "\n" + failed_units_text(*hosts.values())
    # the packages' postinsts started the exporters and Prometheus with the deploy's arguments
    # already in place, and nothing restarted them in the same run (a stop seconds after such a
    # start failed with 219/CGROUP: roles/node_exporter)
    starts = {(name, unit): starts_since_boot(h, unit) for name, h in hosts.items()
              for unit in ["prometheus-node-exporter.service"] + (["prometheus.service"] if name == "mon" else [])}
    assert set(starts.values()) == {1}, starts
    # the deploy waits until one server is up behind the front; the tests want both
    wait_for(lambda: server_up(hosts, hosts["be1"].address) and server_up(hosts, hosts["be2"].address), 60, "both up")
    return inv


def front_url(hosts) -> str:
    return f"http://{hosts['fd'].address}:8080"


def served_by(hosts) -> dict[str, int]:
    return front_served_by(hosts["fd"])


def server_up(hosts, name: str) -> bool:
    return front_server_up(hosts["fd"], name)


def chat(base: str, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60, **kw,
                      json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})


def test_requests_through_the_front_reach_both_backends(hosts, fleet):
    before = served_by(hosts)
    for _ in range(12):
        assert chat(front_url(hosts)).status_code == 200
    after = served_by(hosts)
    names = [hosts["be1"].address, hosts["be2"].address]
    assert all(after.get(n, 0) > before.get(n, 0) for n in names), (before, after)


def openai_run(base: str, n: int) -> tuple[int, list[str]]:
    """``n`` requests through the official client, no retries, one client (reused connections),
    alternating streaming and not; every error counted, none retried."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    errors: list[str] = []
    done = 0
    for i in range(n):
        try:
            if i % 2:
                stream = client.chat.completions.create(model="gemma-3-270m", max_tokens=4, stream=True,
                                                        messages=[{"role": "user", "content": f"Count {i}"}])
                assert sum(1 for _ in stream) > 0
            else:
                r = client.chat.completions.create(model="gemma-3-270m", max_tokens=4,
                                                   messages=[{"role": "user", "content": f"Count {i}"}])
                assert r.usage is not None and r.choices
            done += 1
        except Exception as exc:  # noqa: BLE001 - every error is counted, none retried
            errors.append(f"{i}: {type(exc).__name__}: {exc}")
    return done, errors


@pytest.mark.soak
def test_keepalive_openai_client_500_requests_no_errors(hosts, fleet):
    """Through the front: 0 errors. Straight at one backend, the same client is the baseline
    (llama-server's keep-alive drops after streams), reported, not asserted."""
    done, errors = openai_run(front_url(hosts), 500)
    direct_done, direct_errors = openai_run(f"http://{hosts['be1'].address}:8080", 500)
    print(f"keep-alive, 500 requests: through the front {done} ok, {len(errors)} errors; "
          f"straight at a backend {direct_done} ok, {len(direct_errors)} errors {direct_errors[:3]}")
    assert errors == [] and done == 500


def test_multi_turn_chats_under_load_keep_their_connections(hosts, fleet):
    """8 chats side by side through the front, each turn resending the history as a stream read to
    its end on the same kept-alive connection (httpx, no retries), while both backends share this
    machine's 2 cores, so every stream takes seconds: 0 errors. Before ``option http-server-close``
    HAProxy closed some client connections right after such a stream (a llama-server closing its
    side), and the next turn failed with "Server disconnected without sending a response"
    (8-14 of 48 requests in this setup). The OpenAI client does not show it: it closes a stream's
    connection at ``[DONE]`` instead of reusing it."""
    errors: list[str] = []
    done = [0]

    def chat(cid: int) -> None:
        history = [{"role": "system", "content": f"You are assistant number {cid}. " + "Be brief. " * 40}]
        with httpx.Client(timeout=180) as client:
            for turn in range(6):
                history.append({"role": "user", "content": f"Name a planet ({turn})."})
                try:
                    with client.stream("POST", f"{front_url(hosts)}/v1/chat/completions",
                                       json={"messages": history, "max_tokens": 24, "stream": True}) as r:
                        r.raise_for_status()
                        text = ""
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                text += (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                    history.append({"role": "assistant", "content": text})
                    done[0] += 1
                except httpx.HTTPError as exc:  # every error is counted, none retried
                    errors.append(f"chat {cid} turn {turn}: {type(exc).__name__}: {exc}")
                    history.pop()

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and done[0] == 48, errors


def redispatched(hosts, name: str) -> int:
    """Requests the front redispatched away from ``name`` after failing to connect to it."""
    text = httpx.get(f"http://{hosts['fd'].address}:8405/metrics", timeout=10).text
    m = re.search(rf'^haproxy_server_redispatch_warnings_total\{{proxy="llama_servers",server="{re.escape(name)}"\}} (\d+)$',
                  text, re.M)
    assert m, "the exporter has no redispatch counter for " + name
    return int(m.group(1))


def test_a_backend_that_dies_under_traffic_costs_no_request_and_rejoins(hosts, fleet):
    """Four clients keep sending while be1 stops: through HAProxy's detection window (be1 stopped,
    not yet marked DOWN) the requests the front sends to be1 fail to connect and are redispatched
    to be2 (retry-on conn-failure, option redispatch): the front's own counter shows them, and no
    request sent after be1 was down fails. Only requests be1 was answering at the stop may fail
    (at most one per client), and they are counted. The window is held open for 3 s by pausing
    be1's health checks (HAProxy's runtime API), so that it is exercised on every run: left to
    the checks it lasts about a second, after a stop that takes up to 30 s under load."""
    be1 = hosts["be1"]
    clients = 4
    seen: list[tuple[float, int]] = []  # (time sent, status) of every request
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = chat(front_url(hosts)).status_code
            except httpx.HTTPError:
                status = 0
            seen.append((sent, status))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    redispatched_before = redispatched(hosts, be1.address)
    for t in threads:
        t.start()
    api = "socat stdio /run/haproxy/admin.sock"
    try:
        time.sleep(3)
        hosts["fd"].ssh(f"echo 'disable health llama_servers/{be1.address}' | {api}")
        be1.ssh("systemctl stop llama-server")
        stopped = time.monotonic()  # systemctl returned: the server is gone, nothing of it in flight
        time.sleep(3)  # be1 still UP at the front, its port closed: the detection window
        assert server_up(hosts, be1.address)
        hosts["fd"].ssh(f"echo 'enable health llama_servers/{be1.address}' | {api}")
        wait_for(lambda: not server_up(hosts, be1.address), 30, "be1 out of the backend")
        marked_down = time.monotonic()
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        hosts["fd"].ssh(f"echo 'enable health llama_servers/{be1.address}' | {api}")
        be1.ssh("systemctl start llama-server")
    window = [s for when, s in seen if stopped <= when < marked_down]
    failed_after = [s for when, s in seen if when >= stopped and s != 200]
    lost_at_stop = [s for when, s in seen if when < stopped and s != 200]
    moved = redispatched(hosts, be1.address) - redispatched_before
    print(f"failover: {len(window)} requests sent in the {marked_down - stopped:.1f}s from the stop to be1 "
          f"marked down, {moved} redispatched away from be1, {len(failed_after)} failed after the stop, "
          f"{len(lost_at_stop)} cut at the stop (statuses {lost_at_stop}); {len(seen)} requests in all")
    assert window, "no request was sent between the stop and be1 marked down"
    assert moved >= 1, "no request met the stopped be1 before it was marked down: the window was not exercised"
    assert failed_after == [], failed_after
    # only answers be1 had begun (502, cut mid-answer), at most one per client; a refused
    # connection (503) is what redispatch exists to hide
    assert all(s == 502 for s in lost_at_stop) and len(lost_at_stop) <= clients, lost_at_stop
    wait_for(lambda: server_up(hosts, be1.address), 120, "be1 back in the backend")
    before = served_by(hosts).get(be1.address, 0)
    for _ in range(12):
        assert chat(front_url(hosts)).status_code == 200
    assert served_by(hosts).get(be1.address, 0) > before


def test_drain_and_enable_through_the_runtime_api(hosts, fleet):
    from tests.conftest import PYINFRA, REPO

    def set_state(state: str) -> None:
        proc = subprocess.run([PYINFRA, "-y", str(fleet), "llamadeploy.deploy.llama_front_servers",
                               f"servers={hosts['be1'].address}", f"set_to={state}", "--limit", hosts["fd"].address],
                              cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    set_state("drain")
    try:
        before = served_by(hosts)
        for _ in range(10):
            assert chat(front_url(hosts)).status_code == 200
        after = served_by(hosts)
        assert after.get(hosts["be1"].address, 0) == before.get(hosts["be1"].address, 0)
    finally:
        set_state("ready")
    before = served_by(hosts).get(hosts["be1"].address, 0)
    for _ in range(12):
        assert chat(front_url(hosts)).status_code == 200
    assert served_by(hosts).get(hosts["be1"].address, 0) > before


def test_a_reload_keeps_a_drain_set_by_hand(hosts, fleet, tmp_path):
    """A server the operator drained through HAProxy's runtime API stays drained across a front
    deploy that changes haproxy.cfg: the reload carries the servers' states over (roles/front's
    reloaded_keeping_states; a plain reload forgot the drain, HAProxy 2.6 and 3.0 alike, seen on
    a probe host). It gets no request until enabled, the other server stays ready, and the
    state file is gone afterwards."""
    fd, be1, be2 = hosts["fd"], hosts["be1"].address, hosts["be2"].address
    runtime = "socat stdio /run/haproxy/admin.sock"
    fd.ssh(f"echo 'set server llama_servers/{be2} state drain' | {runtime}")
    try:
        assert admin_state(hosts, be2) == "drain"
        before = front_worker(fd)
        changed = run_deploy(write(tmp_path / "queue.py", hosts, {"timeout_queue": 75}), "--limit", fd.address)
        assert changed.rc == 0 and changed.changed >= 2, changed.stderr[-3000:]  # config + reload
        assert "timeout queue 75s" in fd.ssh("cat /etc/haproxy/haproxy.cfg").stdout
        assert front_worker(fd) not in ("", before)  # reloaded: a new worker answers
        assert (admin_state(hosts, be2), admin_state(hosts, be1)) == ("drain", "ready")
        assert fd.ssh("test -e /run/haproxy/llamadeploy-server-state", check=False).returncode != 0
        wait_for(lambda: server_up(hosts, be1), 30, "be1 up after the reload")
        served = served_by(hosts).get(be2, 0)
        for _ in range(6):
            assert chat(front_url(hosts)).status_code == 200
        assert served_by(hosts).get(be2, 0) == served
    finally:
        fd.ssh(f"echo 'set server llama_servers/{be2} state ready' | {runtime}", check=False)
        back = run_deploy(fleet, "--limit", fd.address)  # the module's own front config again
    assert back.rc == 0, back.stderr[-3000:]
    wait_for(lambda: server_up(hosts, be1) and server_up(hosts, be2), 60, "both up")


def admin_state(hosts, server: str) -> str | None:
    """The front's administrative state of ``server`` (conftest :func:`front_admin_state`)."""
    return front_admin_state(hosts["fd"], server)


def test_a_killed_rollout_leaves_no_host_drained_and_the_operators_drain_stays(hosts, fleet, tmp_path):
    """The controller dies (SIGKILL) while a rollout has be1 drained. Its deploy lock stays on every
    host, and the next rollout is refused, naming the dead run, until ``llamadeploy lock release``.
    That rollout then enables be1 first, and be2, which the operator drained by hand, stays drained
    through the whole rollout."""
    import os
    import signal

    from tests.conftest import LLAMADEPLOY, PYINFRA, REPO, SUBPROCESS_TIMEOUT, cli

    be1, be2, fd = hosts["be1"].address, hosts["be2"].address, hosts["fd"].address

    def operator(server: str, state: str) -> None:
        proc = subprocess.run([PYINFRA, "-y", str(fleet), "llamadeploy.deploy.llama_front_servers",
                               f"servers={server}", f"set_to={state}", "--limit", fd],
                              cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    operator(be2, "drain")
    changed = write(tmp_path / "threads.py", hosts, server={"llama_server": {"threads": 1}})
    try:
        assert admin_state(hosts, be2) == "drain"
        proc = subprocess.Popen([LLAMADEPLOY, "rollout", str(changed)], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: admin_state(hosts, be1) == "drain", 180, "the rollout to drain be1")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the controller dies: no finally of the rollout runs
            proc.wait(timeout=30)
        time.sleep(2)
        assert admin_state(hosts, be1) == "drain"  # what the killed run left
        assert hosts["fd"].ssh(f"test -e /var/lib/llamadeploy-front/drained/{be1}", check=False).returncode == 0
        # the dead rollout's deploy lock is named, never taken over; the operator releases it
        refused = cli("rollout", str(changed))
        assert refused.returncode == 2 and "dead: its process is gone" in refused.stderr, refused.stderr[-3000:]
        assert "rollout by root@" in refused.stderr and f"(pid {proc.pid}, dead" in refused.stderr
        released = cli("lock", "release", str(changed))
        assert released.returncode == 0 and released.stdout.count(": released: rollout by") == len(hosts), \
            released.stdout
        result = cli("rollout", str(changed))
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
        assert admin_state(hosts, be1) == "ready"  # repaired by the next rollout
        assert admin_state(hosts, be2) == "drain"  # the operator's drain outlived the rollout
        assert hosts["fd"].ssh("ls -A /var/lib/llamadeploy-front/drained").stdout == ""
        for h in (hosts["be1"], hosts["be2"]):  # both switched to the rolled-out flags
            args = Manifest.parse(h.ssh(f"cat {DEFAULT_PATH}").stdout).args
            assert args[args.index("--threads") + 1] == "1", args
    finally:
        cli("lock", "release", str(changed), "--force")  # whatever the test stopped at
        operator(be2, "ready")
        back = run_deploy(fleet)
        assert back.rc == 0, back.stderr[-3000:]
        wait_for(lambda: server_up(hosts, be1) and server_up(hosts, be2), 60, "both up again")


def test_a_terminated_rollout_enables_what_it_drained_and_releases_its_lock(hosts, fleet, tmp_path):
    """A supervisor stops the rollout (SIGTERM to the controller's process alone, not its
    pyinfra run) while be1 is drained: before it exits (130) the rollout ends its pyinfra run,
    enables be1 at the front and releases its deploy lock on every host. No operator step."""
    import os
    import signal

    from tests.conftest import LLAMADEPLOY, cli

    be1 = hosts["be1"].address
    changed = write(tmp_path / "threads.py", hosts, server={"llama_server": {"threads": 1}})
    err = tmp_path / "rollout.err"
    try:
        with err.open("w") as stderr:
            proc = subprocess.Popen([LLAMADEPLOY, "rollout", str(changed)], cwd=REPO, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_for(lambda: admin_state(hosts, be1) == "drain", 180, "the rollout to drain be1")
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
        text = err.read_text()
        assert proc.returncode == 130, text[-3000:]
        assert f"==> enabling {be1} at the fronts again" in text and "rollout interrupted" in text, text[-3000:]
        assert admin_state(hosts, be1) == "ready"
        assert hosts["fd"].ssh("ls -A /var/lib/llamadeploy-front/drained").stdout == ""
        status = cli("lock", "status", str(changed))
        assert status.returncode == 0 and status.stdout.count(": free") == len(hosts), status.stdout
    finally:
        cli("lock", "release", str(changed), "--force")  # whatever the test stopped at
        back = run_deploy(fleet)
        assert back.rc == 0, back.stderr[-3000:]
        wait_for(lambda: server_up(hosts, be1) and server_up(hosts, hosts["be2"].address), 60, "both up again")


def test_a_rollout_that_adds_a_server_teaches_the_fronts_before_it_drains_it(hosts, fleet, tmp_path):
    """The fleet grows: the front was deployed from an inventory that lists be1 only, and be2 is
    added to it. The rollout deploys the fronts first, so the front knows be2 before be2's batch:
    be2 is seen drained there during the rollout (a drain of a server HAProxy does not know
    failed, "No such server", and stopped the rollout; skipped, it would switch be2 undrained).
    Both serve behind the front afterwards, and no drain mark is left."""
    from tests.conftest import cli

    fd, be2 = hosts["fd"], hosts["be2"].address
    one = run_deploy(write(tmp_path / "be1-only.py", hosts, servers_listed=("be1",)), "--limit", fd.address)
    try:
        assert one.rc == 0, one.stderr[-3000:]
        assert admin_state(hosts, be2) == "absent"  # the front does not know be2
        seen: set[str | None] = set()
        stop = threading.Event()

        def watch() -> None:  # be2's state at the front, while the rollout runs
            while not stop.is_set():
                seen.add(front_admin_state(fd, be2, tolerant=True))
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = cli("rollout", str(fleet))
        finally:
            stop.set()
            watcher.join(timeout=30)
        out = result.stdout + result.stderr
        assert "drain" in seen, seen  # be2 was drained at the front for its batch
        assert result.returncode == 0, out[-4000:]
        assert f"==> fronts first: {fd.address}" in out, out[-4000:]
        assert out.index("==> fronts first") < out.index(f"==> batch 2/2: {be2}"), out[-4000:]
        assert admin_state(hosts, be2) == "ready"
        wait_for(lambda: server_up(hosts, hosts["be1"].address) and server_up(hosts, be2), 60, "both up")
        assert fd.ssh(f"ls -A {shlex.quote('/var/lib/llamadeploy-front/drained')}").stdout == ""
    finally:
        back = run_deploy(fleet)
        assert back.rc == 0, back.stderr[-3000:]


def test_reload_keeps_a_running_stream(hosts, fleet, tmp_path):
    """A config change is checked (haproxy -c) and reloaded; a stream that was running before the
    reload receives bytes after it (the reload's time from the front's journal) and completes."""
    result: dict[str, object] = {}
    chunks: list[tuple[float, str]] = []  # (arrival time, text) of every piece of the stream

    def stream():
        body = {"messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 1500, "stream": True,
                "ignore_eos": True}  # llama-server's own field: the stream lasts its max_tokens
        with httpx.Client(timeout=300) as c, c.stream("POST", f"{front_url(hosts)}/v1/chat/completions",
                                                      json=body) as r:
            result["status"] = r.status_code
            for text in r.iter_text():
                chunks.append((time.time(), text))

    t = threading.Thread(target=stream)
    t.start()
    wait_for(lambda: len(chunks) > 5, 60, "the stream to run")
    since = hosts["fd"].ssh("date +%s").stdout.strip()
    changed = run_deploy(write(tmp_path / "queue.py", hosts, {"timeout_queue": 90}), "--limit", hosts["fd"].address)
    t.join(timeout=300)
    assert changed.rc == 0 and changed.changed >= 2, changed.stderr[-3000:]  # config + reload
    assert "timeout queue 90s" in hosts["fd"].ssh("cat /etc/haproxy/haproxy.cfg").stdout
    journal = hosts["fd"].ssh(f"journalctl -u haproxy -o short-unix --no-pager --since @{since}").stdout
    reloads = [float(line.split()[0]) for line in journal.splitlines() if "Reloaded" in line]
    assert reloads, journal[-2000:]
    body = "".join(text for _, text in chunks)
    assert result.get("status") == 200 and "[DONE]" in body, (result.get("status"), body[-500:])
    assert chunks[0][0] < reloads[-1] < chunks[-1][0], ("the stream did not span the reload", reloads, chunks[0][0],
                                                        chunks[-1][0])
    after = [text for when, text in chunks if when > reloads[-1] + 0.5]
    assert sum(text.count("data: ") for text in after) >= 5, "too few events arrived after the reload"
    affinity = run_deploy(write(tmp_path / "aff.py", hosts, {"balance": "affinity", "hash_balance_factor": 101}),
                          "--limit", hosts["fd"].address)
    assert affinity.rc == 0, affinity.stderr[-3000:]  # passes haproxy -c, and serves
    assert "balance hdr(X-Session-Id)" in hosts["fd"].ssh("cat /etc/haproxy/haproxy.cfg").stdout
    assert chat(front_url(hosts), headers={"X-Session-Id": "conversation-1"}).status_code == 200


def test_prometheus_scrapes_every_server_and_the_front_with_rules(hosts, fleet):
    api = f"http://{hosts['mon'].address}:9090/api/v1"

    def all_up() -> bool:
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        jobs = [(t["labels"]["job"], t["health"]) for t in targets]
        return (sorted(j for j, h in jobs if h == "up" and j != "prometheus")
                == ["haproxy", "llama-node", "llama-node", "llama-node", "llama-node", "llama-server", "llama-server"])

    try:
        wait_for(all_up, 90, "every target up in Prometheus")
    except AssertionError:
        targets = httpx.get(f"{api}/targets", timeout=10).json()["data"]["activeTargets"]
        raise AssertionError([(t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]) from None
    rules = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {"LlamaTargetDown", "LlamaRequestsDeferred", "LlamaFrontBackendDown"} <= names
    q = httpx.get(f"{api}/query", params={"query": 'count(up{job="llama-server"} == 1)'}, timeout=10).json()
    assert q["data"]["result"][0]["value"][1] == "2"
    # host metrics from every host's node exporter, the deploy's units among them (systemd collector).
    # The scrape is every 2 s and the previous test reloads the front: a scrape during that reload
    # finds haproxy not active (systemd's state is "reloading" while ExecReload runs: CI run of
    # stop 39), so the states are waited for over a few scrapes, and a failure shows each host's.
    wanted = sorted([(hosts["be1"].address, "llama-server.service"), (hosts["be2"].address, "llama-server.service"),
                     (hosts["fd"].address, "haproxy.service"), (hosts["mon"].address, "prometheus.service")])
    unit_states = 'node_systemd_unit_state{name=~"llama-server.service|haproxy.service|prometheus.service"} == 1'

    def states() -> list[tuple[str, str, str]]:
        result = httpx.get(f"{api}/query", timeout=10, params={"query": unit_states}).json()["data"]["result"]
        return sorted((r["metric"]["instance"].rsplit(":", 1)[0], r["metric"]["name"], r["metric"]["state"])
                      for r in result)

    try:
        wait_for(lambda: [(a, n) for a, n, state in states() if state == "active"] == wanted, 30, "the units active")
    except AssertionError:
        raise AssertionError(("want active", wanted, "reported", states())) from None
    restarts = httpx.get(f"{api}/query", params={"query": 'node_systemd_service_restart_total{name="llama-server.service"}'},
                         timeout=10).json()["data"]["result"]
    assert len(restarts) == 2, restarts  # the counter LlamaServiceRestarting watches
    # nothing open by default: the monitor scrapes the front's exporter (up above), a server does
    # not reach it, and the front does not reach Prometheus; both listen on one address only
    fd, mon, be1 = hosts["fd"], hosts["mon"], hosts["be1"]

    def reaches(src, dst, port: int) -> bool:
        probe = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{dst.address}/{port}' && echo open || echo closed"
        return src.ssh(probe).stdout.strip() == "open"

    assert reaches(mon, fd, 8405) and not reaches(be1, fd, 8405)
    assert reaches(mon, be1, 9100) and not reaches(fd, be1, 9100) and not reaches(hosts["be2"], mon, 9100)
    assert be1.ssh("ss -Hltn 'sport = :9100'").stdout.split()[3] == f"{be1.address}:9100"
    assert not reaches(fd, mon, 9090) and not reaches(be1, mon, 9090)
    assert f"{fd.address}:8405" in fd.ssh("ss -Hltn 'sport = :8405'").stdout
    assert mon.ssh("ss -Hltn 'sport = :9090'").stdout.split()[3] == f"{mon.address}:9090"
    # the fences outlive a restart of the hosts' firewall (their guards load them again)
    for h, table in ((fd, "llamadeploy_haproxy_exporter"), (mon, "llamadeploy_prometheus")):
        h.ssh("systemctl restart nftables")
        wait_for(lambda h=h, table=table: h.ssh(f"nft list table inet {table}", check=False).returncode == 0, 15,
                 f"{table} loaded again")
    assert not reaches(be1, fd, 8405) and not reaches(be1, mon, 9090) and reaches(mon, fd, 8405)
    # the rules as deployed fire for a stopped backend: promtool's rule tests on the monitor host
    case = """rule_files: [/etc/prometheus/llamadeploy-rules.yml]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'up{job="llama-server",instance="be1:8080"}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'haproxy_server_status{proxy="llama_servers",server="be1",state="DOWN"}'
        values: '0 0 1 1 1 1 1 1 1 1'
      - series: 'node_systemd_service_restart_total{instance="be1:9100",name="llama-server.service"}'
        values: '0 1 2 3 4 5 6 7 8 9'
      - series: 'node_filesystem_avail_bytes{instance="be1:9100",mountpoint="/var/lib/llama-server",fstype="ext4"}'
        values: '5x60'
      - series: 'node_filesystem_size_bytes{instance="be1:9100",mountpoint="/var/lib/llama-server",fstype="ext4"}'
        values: '100x60'
      - series: 'node_memory_MemAvailable_bytes{instance="be1:9100"}'
        values: '5x60'
      - series: 'node_memory_MemTotal_bytes{instance="be1:9100"}'
        values: '100x60'
      - series: 'node_memory_MemAvailable_bytes{instance="be2:9100"}'
        values: '50x60'
      - series: 'node_memory_MemTotal_bytes{instance="be2:9100"}'
        values: '100x60'
      - series: 'llamadeploy_gpu_up{instance="be1:9100"}'
        values: '1 1 0x20'
      - series: 'node_textfile_mtime_seconds{instance="be1:9100",file="/var/lib/prometheus/node-exporter/llamadeploy_gpu.prom"}'
        values: '0x40'
      - series: 'node_systemd_unit_state{instance="be2:9100",name="llamadeploy-gpu-metrics.service",state="failed"}'
        values: '1x40'
    alert_rule_test:
      - eval_time: 1m
        alertname: LlamaServiceRestarting
        exp_alerts: [{exp_labels: {instance: "be1:9100", name: llama-server.service, severity: critical},
                      exp_annotations: {summary: "llama-server.service on be1:9100 restarted 4 times in 15 minutes"}}]
      - eval_time: 11m
        alertname: LlamaHostDiskFull
        exp_alerts: [{exp_labels: {instance: "be1:9100", mountpoint: /var/lib/llama-server, fstype: ext4, severity: warning},
                      exp_annotations: {summary: "be1:9100: /var/lib/llama-server has under 10% free"}}]
      - eval_time: 11m
        alertname: LlamaHostMemoryLow
        exp_alerts: [{exp_labels: {instance: "be1:9100", severity: warning},
                      exp_annotations: {summary: "be1:9100 has under 10% of its memory available"}}]
      - eval_time: 9m
        alertname: LlamaHostMemoryLow
        exp_alerts: []
      - eval_time: 2m
        alertname: LlamaTargetDown
        exp_alerts: [{exp_labels: {job: llama-server, instance: "be1:8080", severity: critical},
                      exp_annotations: {summary: "llama-server target be1:8080 is down"}}]
      - eval_time: 3m
        alertname: LlamaGpuUnreadable
        exp_alerts: [{exp_labels: {instance: "be1:9100", severity: critical},
                      exp_annotations: {summary: "be1:9100: nvidia-smi fails, the GPU cannot be read"}}]
      - eval_time: 5m
        alertname: LlamaGpuMetricsStale
        exp_alerts: [{exp_labels: {instance: "be1:9100", file: /var/lib/prometheus/node-exporter/llamadeploy_gpu.prom, severity: critical},
                      exp_annotations: {summary: "be1:9100: the GPU metrics have not been refreshed for 2 minutes"}},
                     {exp_labels: {instance: "be2:9100", name: llamadeploy-gpu-metrics.service, state: failed, severity: critical},
                      exp_annotations: {summary: "be2:9100: the GPU metrics have not been refreshed for 2 minutes"}}]
      - eval_time: 2m
        alertname: LlamaFrontBackendDown
        exp_alerts: [{exp_labels: {proxy: llama_servers, server: be1, state: DOWN, severity: critical},
                      exp_annotations: {summary: "the front took be1 out: its /health check fails"}}]
"""
    mon = hosts["mon"]
    mon.ssh(f"cat > /tmp/llamadeploy-rules-test.yml <<'EOF'\n{case}EOF")
    out = mon.ssh("promtool test rules /tmp/llamadeploy-rules-test.yml", check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_fences_of_front_monitor_and_node_exporters_verify_on_systemd_252(hosts, fleet):
    """``systemd-analyze verify`` on bookworm of the guards that fence HAProxy's exporter,
    Prometheus and the node exporter, and of Debian's units with the drop-ins that bind them to
    their guards (test_trixie does the same on 257)."""
    from tests.e2e import native_checks

    node = "prometheus-node-exporter"
    for h, service in ((hosts["fd"], "haproxy"), (hosts["mon"], "prometheus")):
        native_checks.deployed_units_verify(h, [f"{service}-fence.service", f"{node}-fence.service"],
                                            packaged=(f"{service}.service", f"{node}.service"))


def test_every_host_records_what_the_deploy_wrote_there(hosts, fleet):
    """Each host keeps an ownership record (issue 21), the front's and the monitor's too: their
    fences (rules, guard, drop-ins, table), a front's drain marks, a monitor's targets and rules;
    a server's names its node exporter's fence. What these lines name is there: the unit files,
    the files, the tables loaded. A front or a monitor records no server directory and no account
    (uninstall, the module's last test, removes the record with the rest)."""
    record = "/var/lib/llamadeploy/llama-server.owned"
    node = ["file /etc/default/llamadeploy-node-exporter.nft", "table inet llamadeploy_node_exporter",
            "unit prometheus-node-exporter-fence.service",
            "file /etc/systemd/system/prometheus-node-exporter.service.d/llamadeploy-fence.conf"]
    expect = {
        "fd": [*node, "file /etc/haproxy/llamadeploy-exporter.nft", "table inet llamadeploy_haproxy_exporter",
               "unit haproxy-fence.service", "file /etc/systemd/system/haproxy.service.d/llamadeploy-fence.conf",
               "dir /var/lib/llamadeploy-front"],
        "mon": [*node, "file /etc/prometheus/llamadeploy-fence.nft", "table inet llamadeploy_prometheus",
                "unit prometheus-fence.service", "file /etc/prometheus/llamadeploy-servers.json",
                "file /etc/prometheus/llamadeploy-rules.yml"],
        "be1": [*node, "dir /var/lib/llama-server", "account llama"],
    }
    for name, wanted in expect.items():
        h = hosts[name]
        got = h.ssh(f"cat {record}").stdout.splitlines()
        assert set(wanted) <= set(got), (name, sorted(set(wanted) - set(got)), got)
        tables = h.ssh("nft list tables").stdout
        for line in wanted:
            kind, _, rest = line.partition(" ")
            if kind == "table":
                assert f"table {rest}" in tables, (name, line, tables)
            elif kind == "account":
                assert h.ssh(f"id -u {shlex.quote(rest)}", check=False).returncode == 0, (name, line)
            elif rest != "/var/lib/llamadeploy-front":  # made by a rollout's first drain
                path = f"/etc/systemd/system/{rest}" if kind == "unit" else rest
                test = "-d" if kind == "dir" else "-f"
                assert h.ssh(f"test {test} {shlex.quote(path)}", check=False).returncode == 0, (name, line)
        if name != "be1":
            assert not [line for line in got if line.startswith(("account ", "dir /opt", "dir /var/lib/llama-server",
                                                                 "dir /etc/llama-server"))], (name, got)


def test_dashboards_show_data_from_the_real_metrics(hosts, fleet, tmp_path):
    """Every panel of the fleet and per-host dashboards has data in the monitor's Prometheus (the
    host variable as its own query offers it): no panel on a metric nobody exports."""
    from llamadeploy import dashboards

    api = f"http://{hosts['mon'].address}:9090/api/v1"
    for _ in range(4):
        assert chat(front_url(hosts)).status_code == 200
    [var] = dashboards.dashboard("llama-host.json")["templating"]["list"]
    offered = httpx.get(f"{api}/query", params={"query": 'up{job="llama-node"}'}, timeout=10).json()["data"]["result"]
    pattern = re.compile(var["regex"].strip("/"))
    hosts_offered = sorted(pattern.match(r["metric"]["instance"]).group(1) for r in offered)
    assert hosts["be1"].address in hosts_offered, hosts_offered
    # be1 as a CUDA host's collector leaves it: the recorded H200 answer, through the shipped script
    # (as tests/unit/test_gpu_metrics runs it), put where Debian's node exporter reads text files
    be1 = hosts["be1"]
    written = gpu_metrics_file(tmp_path, f"cat {NVIDIA_SMI_DATA / 'h200-metrics-busy.csv'}").read_text()
    be1.ssh(f"cat > /var/lib/prometheus/node-exporter/llamadeploy_gpu.prom <<'EOF'\n{written}EOF")
    try:
        time.sleep(5)  # two scrapes (2 s apart) after the requests: every rate() has its points
        assert dashboard_gaps(api, ["llama-fleet.json", "llama-host.json"], {"host": be1.address}) == []
        # the check's own mutation: one more panel on a name that community dashboards query and
        # b11434 does not export (tests/unit/test_dashboards.LLAMACPP) is the one gap found
        mutated = copy.deepcopy(dashboards.dashboard("llama-fleet.json"))
        mutated["panels"].append({"title": "KV cache used", "targets": [{"expr": "avg(llamacpp:kv_cache_usage_ratio)"}]})
        assert dashboard_gaps(api, ["llama-fleet.json"], {"host": be1.address}, {"llama-fleet.json": mutated}) == [
            ("llama-fleet.json", "KV cache used", "avg(llamacpp:kv_cache_usage_ratio)")]
        # the node exporter took the file whole, and the stale-file alert's series exists
        for query in (f'node_textfile_scrape_error{{instance=~"{be1.address}:.*"}} == 0',
                      'node_textfile_mtime_seconds{file=~"(.*/)?llamadeploy_gpu[.]prom"}',
                      'llamadeploy_gpu_memory_total_bytes == 143771 * 1048576'):
            res = httpx.get(f"{api}/query", params={"query": query}, timeout=10).json()["data"]["result"]
            assert len(res) == 1, (query, res)
    finally:
        be1.ssh("rm -f /var/lib/prometheus/node-exporter/llamadeploy_gpu.prom")


def test_gpu_metrics_timer_runs_under_systemd_and_reports_a_host_without_a_driver(hosts, fleet, tmp_path):
    """The GPU metrics role (roles/node_exporter) as a CUDA host gets it, run on be1, a host with no
    NVIDIA driver: its units pass systemd's checks with their hardening, the timer runs the script,
    and the exporter serves ``llamadeploy_gpu_up 0``, what LlamaGpuUnreadable fires on after a
    driver update gone wrong. Then the role on a host that is no longer a CUDA host removes all of
    it, and a second such run changes nothing. (The figures of a working GPU: the dashboard test.)"""
    be1 = hosts["be1"]
    api = f"http://{hosts['mon'].address}:9090/api/v1"

    def role(on: bool) -> DeployResult:
        deploy = tmp_path / f"gpu-metrics-{on}.py"
        deploy.write_text("from pyinfra import host\nfrom llamadeploy.hostdata import validate_inventory\n"
                          "from llamadeploy.roles import node_exporter\n"
                          f"node_exporter.gpu_metrics(validate_inventory(host.inventory)[host.name], on_gpu_host={on})\n")
        result = run_deploy(fleet, "--limit", be1.address, deploy=str(deploy))
        assert result.rc == 0, (result.stdout + result.stderr)[-3000:]
        return result

    def gpu_up() -> list[str]:
        res = httpx.get(f"{api}/query", params={"query": f'llamadeploy_gpu_up{{instance=~"{be1.address}:.*"}}'},
                        timeout=10).json()["data"]["result"]
        return [r["value"][1] for r in res]

    try:
        assert role(True).changed > 0
        assert be1.ssh("systemctl is-enabled llamadeploy-gpu-metrics.timer").stdout.strip() == "enabled"
        wait_for(lambda: gpu_up() == ["0"], 60, "llamadeploy_gpu_up 0 from be1's timer")
        ran = be1.ssh("systemctl show -p Result -p ExecMainStatus llamadeploy-gpu-metrics.service").stdout
        assert "Result=success" in ran, ran
        assert be1.ssh("systemd-analyze verify /etc/systemd/system/llamadeploy-gpu-metrics.timer "
                       "/etc/systemd/system/llamadeploy-gpu-metrics.service 2>&1").stdout.strip() == ""
        assert role(True).changed == 0
        assert role(False).changed > 0
        gone = be1.ssh("ls /usr/local/sbin/llamadeploy-gpu-metrics /etc/systemd/system/llamadeploy-gpu-metrics.timer "
                       "/etc/systemd/system/llamadeploy-gpu-metrics.service "
                       "/var/lib/prometheus/node-exporter/llamadeploy_gpu.prom 2>&1; "
                       "systemctl is-active llamadeploy-gpu-metrics.timer", check=False).stdout
        assert gone.count("No such file") == 4 and gone.split()[-1] == "inactive", gone
        wait_for(lambda: gpu_up() == [], 30, "no GPU series from be1 once the timer is gone")
        assert role(False).changed == 0
    finally:
        be1.ssh("systemctl disable --now llamadeploy-gpu-metrics.timer 2>/dev/null; rm -f /usr/local/sbin/llamadeploy-gpu-metrics "
                "/etc/systemd/system/llamadeploy-gpu-metrics.* /var/lib/prometheus/node-exporter/llamadeploy_gpu.prom; "
                "systemctl daemon-reload", check=False)


class Receivers:
    """What a person's tools would receive, on this machine at the monitor's LAN gateway: a webhook
    endpoint (http.server) and a mail smarthost (aiosmtpd) as a company's relay runs: STARTTLS
    required, with a certificate from the company's own CA (``ca``, made here), and SMTP AUTH
    required over it. Both record what arrived, and the relay every login it accepted."""

    USER, PASSWORD = "alerts", "smtp-pass-0123456789abcdef"

    def __init__(self, address: str, workdir: Path) -> None:
        import http.server

        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.hooks: list[tuple[str, dict]] = []  # (Authorization header, body)
        self.mails: list[str] = []
        self.logins: list[str] = []
        hooks, logins = self.hooks, self.logins
        self.ca, cert, key = smtp_certificate(workdir, address)

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hooks.append((self.headers.get("Authorization", ""), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer((address, 0), Hook)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        mails = self.mails

        class Relay:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
                mails.append(envelope.content.decode(errors="replace"))
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
            ok = isinstance(auth_data, LoginPassword) and \
                (auth_data.login, auth_data.password) == (self.USER.encode(), self.PASSWORD.encode())
            if ok:
                logins.append(f"{mechanism} {auth_data.login.decode()} tls={session.ssl is not None}")
            return AuthResult(success=ok)

        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        with socket.socket() as probe:  # a free port (aiosmtpd needs one named)
            probe.bind((address, 0))
            port = probe.getsockname()[1]
        # PLAIN only: aiosmtpd's LOGIN prompts ("User Name\\0") are not the "Username:" that
        # mail servers send and Alertmanager's LOGIN expects; it would cancel the login
        self.smtp = Controller(Relay(), hostname=address, port=port, tls_context=tls, require_starttls=True,
                               auth_required=True, auth_require_tls=True, authenticator=authenticator,
                               auth_exclude_mechanism=["LOGIN"])
        self.smtp.start()

    @property
    def webhook_url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/alerts"

    @property
    def smarthost(self) -> str:
        return f"{self.smtp.hostname}:{self.smtp.port}"

    def close(self) -> None:
        self.http.shutdown()
        self.smtp.stop()


def smtp_certificate(workdir: Path, address: str) -> tuple[str, str, str]:
    """A CA and a server certificate for ``address`` (an IP SAN) signed by it: (ca, cert, key)."""
    ca_key, ca, key, csr, cert = (str(workdir / n) for n in ("ca.key", "ca.crt", "smtp.key", "smtp.csr", "smtp.crt"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=LOCAL_TIMEOUT)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=llamadeploy test CA",
            "-keyout", ca_key, "-out", ca)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={address}", "-keyout", key, "-out", csr)
    ext = workdir / "san.ext"
    ext.write_text(f"subjectAltName = IP:{address}\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", cert)
    return ca, cert, key


def test_an_alert_reaches_a_person_by_webhook_and_mail(hosts, fleet, tmp_path):
    """Alertmanager on the monitor, fed by its Prometheus: a stopped server fires LlamaTargetDown,
    which arrives at the webhook (with the bearer token from a 0600 controller file) and as mail
    through a smarthost that requires STARTTLS and SMTP AUTH (the password from a 0600 controller
    file; the relay's certificate from a CA the monitor host trusts, as a company's internal CA);
    its slow-tokens alert on the same host is inhibited; a silence holds back a matching alert;
    Alertmanager listens on the monitor's loopback only. Without receivers, the next deploy stops it again."""
    mon, be2 = hosts["mon"], hosts["be2"]
    rx = Receivers(mon.gateway, tmp_path)
    token = tmp_path / "hook-token"
    token.write_text("hook-token-0123456789abcdef\n")
    token.chmod(0o600)
    password = tmp_path / "smtp-password"
    password.write_text(rx.PASSWORD + "\n")
    password.chmod(0o600)
    # the operator's part: the host trusts the company's CA (Debian's way: ca-certificates)
    trusted = "/usr/local/share/ca-certificates/llamadeploy-test-ca.crt"
    mon.ssh("command -v update-ca-certificates >/dev/null || apt-get install -y -q ca-certificates >/dev/null")
    mon.ssh(f"printf '%s' {shlex.quote(Path(rx.ca).read_text())} > {trusted} && update-ca-certificates >/dev/null")
    try:
        inv = write(tmp_path / "alerts.py", hosts, monitor={"alertmanager": {
            "webhook": {"url": rx.webhook_url, "token_file": str(token)},
            "email": {"to": ["oncall@example.com"], "sender": "alerts@example.com", "smarthost": rx.smarthost,
                      "require_tls": True, "username": rx.USER, "password_file": str(password)},
            "group_wait": "5s", "group_interval": "10s"}})
        result = run_deploy(inv, "--limit", mon.address)
        assert result.rc == 0, (result.stdout + result.stderr)[-4000:]
        assert "0123456789abcdef" not in result.stdout + result.stderr  # neither secret
        # started by its postinst, with the arguments in place; only its config was reloaded
        assert starts_since_boot(mon, "prometheus-alertmanager.service") == 1
        listening = mon.ssh("ss -Hltn 'sport = :9093 or sport = :9094'").stdout.split("\n")
        assert [ln.split()[3] for ln in listening if ln.strip()] == ["127.0.0.1:9093"], listening
        assert mon.ssh("stat -c '%a %U' /etc/prometheus/alertmanager-webhook-token").stdout.split() == ["600", "prometheus"]
        assert "0123456789abcdef" not in mon.ssh("cat /etc/prometheus/alertmanager.yml").stdout
        api = f"http://{mon.address}:9090/api/v1"
        wait_for(lambda: [a["url"] for a in httpx.get(f"{api}/alertmanagers", timeout=10).json()["data"]
                          ["activeAlertmanagers"]] == ["http://127.0.0.1:9093/api/v2/alerts"], 30, "Prometheus -> Alertmanager")

        be2.ssh("systemctl stop llama-server")
        instance = f"{be2.address}:8080"

        def fired() -> list[dict]:
            return [a for _, body in rx.hooks for a in body["alerts"] if a["labels"]["alertname"] == "LlamaTargetDown"
                    and a["labels"]["instance"] == instance and a["status"] == "firing"]

        wait_for(lambda: bool(fired()), 180, "LlamaTargetDown at the webhook")  # for: 1m, group_wait 5s
        auth = {a for a, body in rx.hooks if any(x["labels"]["alertname"] == "LlamaTargetDown" for x in body["alerts"])}
        assert auth == {"Bearer hook-token-0123456789abcdef"}, auth
        wait_for(lambda: any("LlamaTargetDown" in m and "oncall@example.com" in m for m in rx.mails), 60,
                 "the mail at the relay")
        # delivered only after a login over TLS with the password from the controller's file
        assert rx.logins and all(login.endswith(f" {rx.USER} tls=True") for login in rx.logins), rx.logins
        assert "0123456789abcdef" not in mon.ssh("journalctl -u prometheus-alertmanager --no-pager").stdout
        # what follows from the down host on the same host is held back (inhibited), not sent
        mon.ssh("amtool --alertmanager.url=http://127.0.0.1:9093 alert add LlamaTokensPerSecondDropped "
                f"instance={instance} severity=warning")
        time.sleep(15)  # group_wait 5s: it would have been sent by now
        held = mon.ssh("amtool --alertmanager.url=http://127.0.0.1:9093 -o json alert query --inhibited "
                       "alertname=LlamaTokensPerSecondDropped").stdout
        assert json.loads(held)[0]["status"]["inhibitedBy"], held
        assert not [a for _, body in rx.hooks for a in body["alerts"]
                    if a["labels"]["alertname"] == "LlamaTokensPerSecondDropped"], rx.hooks
        # a silence set as docs/front-and-monitor.md shows it, kept through the deploy's reload: a
        # matching alert is silenced, not sent; the silence ends by hand
        am = "amtool --alertmanager.url=http://127.0.0.1:9093"
        silence = mon.ssh(f"{am} silence add {shlex.quote(f'instance=~{be2.address}:.*')} --duration=1h "
                          "--comment='maintenance'").stdout.strip()
        mon.ssh("systemctl reload prometheus-alertmanager")
        assert silence in mon.ssh(f"{am} silence query -q").stdout.split()
        mon.ssh(f"{am} alert add LlamaHostMemoryLow instance={be2.address}:9100 severity=warning")
        time.sleep(15)  # group_wait 5s: it would have been sent by now
        muted = json.loads(mon.ssh(f"{am} -o json alert query --silenced alertname=LlamaHostMemoryLow").stdout)
        assert [a["status"]["silencedBy"] for a in muted] == [[silence]], muted
        assert not [a for _, body in rx.hooks for a in body["alerts"]
                    if a["labels"]["alertname"] == "LlamaHostMemoryLow"], rx.hooks
        mon.ssh(f"{am} silence expire {silence}")
        assert silence not in mon.ssh(f"{am} silence query -q").stdout.split()
    finally:
        be2.ssh("systemctl start llama-server", check=False)
        mon.ssh(f"rm -f {trusted} && update-ca-certificates --fresh >/dev/null", check=False)
        rx.close()
    wait_for(lambda: server_up(hosts, be2.address), 120, "be2 back behind the front")
    # receivers removed: the Alertmanager this deploy installed is stopped, its secret gone
    plain = run_deploy(write(tmp_path / "plain.py", hosts), "--limit", mon.address)
    assert plain.rc == 0, plain.stderr[-3000:]
    assert mon.ssh("systemctl is-active prometheus-alertmanager", check=False).stdout.strip() == "inactive"
    assert mon.ssh("test -e /etc/prometheus/alertmanager-webhook-token", check=False).returncode == 1
    assert mon.ssh("test -e /etc/prometheus/alertmanager-smtp-password", check=False).returncode == 1
    assert "alerting:" not in mon.ssh("cat /etc/prometheus/prometheus.yml").stdout


def test_a_port_another_process_holds_is_refused_on_the_front_and_the_monitor(hosts, fleet, tmp_path):
    """The front's exporter and the monitor's Prometheus set to sshd's port: preflight refuses
    each host naming the field and sshd, before anything changes (their configs and HAProxy's
    worker as they were)."""
    fd, mon = hosts["fd"], hosts["mon"]
    state = "md5sum /etc/haproxy/haproxy.cfg /etc/prometheus/prometheus.yml /etc/default/prometheus 2>/dev/null"
    before = {h.name: h.ssh(state, check=False).stdout for h in (fd, mon)}
    worker = front_worker(fd)
    inv = write(tmp_path / "held.py", hosts, front={"metrics_port": 22}, monitor={"port": 22})
    for h, field in ((fd, "llama_front.metrics_port"), (mon, "llama_monitor.port")):
        result = run_deploy(inv, "--limit", h.address)
        out = result.stdout + result.stderr
        assert result.rc != 0
        assert f"preflight refused host {h.address}: {field} = 22: 0.0.0.0:22 is held by sshd (pid " in out, out[-3000:]
    assert {h.name: h.ssh(state, check=False).stdout for h in (fd, mon)} == before
    assert front_worker(fd) == worker


def test_a_haproxy_or_node_exporter_the_deploy_did_not_install_is_refused(hosts, fleet):
    """A host that has HAProxy (or the node exporter) which no deploy of ours installed, as the
    deploy sees it: the package is there and the role's package record does not list it (moved
    aside here). The run is refused, naming the setting and the package, before anything changes;
    with the record back, the same inventory deploys with no change."""
    fd, be2 = hosts["fd"], hosts["be2"]
    state = "md5sum /etc/haproxy/haproxy.cfg /etc/default/prometheus-node-exporter 2>/dev/null"
    for h, role, setting, package in ((fd, "front", "llama_role = 'front'", "haproxy"),
                                      (be2, "node", "llama_node_exporter.enabled = true", "prometheus-node-exporter")):
        record = f"/var/cache/llama.cpp/installed-packages.{role}"
        settled = run_deploy(fleet, "--limit", h.address)  # as the module's inventory has it (earlier tests vary it)
        assert settled.rc == 0, settled.stderr[-3000:]
        before = h.ssh(state, check=False).stdout
        h.ssh(f"mv {record} {record}.away")
        try:
            result = run_deploy(fleet, "--limit", h.address)
        finally:
            h.ssh(f"mv {record}.away {record}")
        out = result.stdout + result.stderr
        assert result.rc != 0
        assert (f"preflight refused host {h.address}: {setting}: {package} is installed and this deploy did not "
                "install it") in out, out[-3000:]
        assert h.ssh(state, check=False).stdout == before
        again = run_deploy(fleet, "--limit", h.address)
        assert again.rc == 0 and again.changed == 0, again.stderr[-3000:]


def test_a_monitor_whose_record_lost_prometheus_deploys_and_records_it_again(hosts, fleet):
    """The record a release before 2026-12-05 left on a monitor: its first deploy installed
    Prometheus, then Alertmanager, and Alertmanager's record replaced Prometheus'. Made here by
    writing the record as that left it: ``prometheus-alertmanager`` where ``prometheus`` was.
    The host did not have Prometheus before the first deploy (packages-before-deploy), so it is
    ours: the deploy goes ahead and puts it back in the record, and Prometheus keeps
    running (uninstall then purges it: the module's last test). The record without either line
    is not that pattern: refused, as an operator's Prometheus is."""
    mon = hosts["mon"]
    record = "/var/cache/llama.cpp/installed-packages.monitor"
    listed = mon.ssh(f"cat {record}").stdout.split()
    assert "prometheus" in listed and "prometheus" not in mon.ssh("cat /var/cache/llama.cpp/packages-before-deploy").stdout.split()
    pid = mon.ssh("systemctl show -p MainPID --value prometheus").stdout.strip()
    # neither line (an earlier test may have installed and recorded Alertmanager): not the pattern
    mon.ssh(f"cp {record} {record}.kept && sed -i '/^prometheus$/d; /^prometheus-alertmanager$/d' {record}")
    try:
        refused = run_deploy(fleet, "--limit", mon.address)
    finally:
        mon.ssh(f"mv {record}.kept {record}")
    assert refused.rc != 0 and "prometheus is installed and this deploy did not install it" in refused.stderr, \
        failure_text(refused)
    mon.ssh(f"sed -i 's/^prometheus$/prometheus-alertmanager/' {record}")
    assert "prometheus" not in mon.ssh(f"cat {record}").stdout.split()
    result = run_deploy(fleet, "--limit", mon.address)
    assert result.rc == 0, failure_text(result)
    assert set(mon.ssh(f"cat {record}").stdout.split()) == {*listed, "prometheus-alertmanager"}
    assert mon.ssh("systemctl show -p MainPID --value prometheus").stdout.strip() == pid


def test_tls_at_the_front_12_or_later_with_redirect_and_a_bad_pem_replaces_nothing(hosts, fleet, tmp_path):
    """TLS 1.2 or later at the front, HTTP redirected. Then a PEM whose key is not its
    certificate's (an operator's slip when a certificate is renewed) is refused before any host
    changes, naming the field: the front's PEM keeps its hash and HTTPS keeps answering with the
    certificate it had (HAProxy would refuse the bad one at the reload and at every restart)."""
    pem = tmp_path / "front.pem"
    key = tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=front",
                    "-keyout", str(key), "-out", str(pem)], check=True, capture_output=True, timeout=LOCAL_TIMEOUT)
    pem.write_text(pem.read_text() + key.read_text())
    pem.chmod(0o600)
    result = run_deploy(write(tmp_path / "tls.py", hosts, {"tls_pem": str(pem), "redirect_http": True}),
                        "--limit", hosts["fd"].address)
    assert result.rc == 0, result.stderr[-3000:]
    fd = hosts["fd"]
    assert fd.ssh("stat -c '%a %U' /etc/haproxy/llamadeploy.pem").stdout.split() == ["600", "root"]
    r = httpx.post(f"https://{fd.address}:8443/v1/chat/completions", verify=False, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.http_version in ("HTTP/1.1", "HTTP/2")
    assert httpx.get(f"http://{fd.address}:8080/health", timeout=10).status_code == 301
    def client(version: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client speak TLS 1.0/1.1 at all
        ctx.minimum_version = ctx.maximum_version = version
        return ctx

    assert httpx.get(f"https://{fd.address}:8443/health", verify=client(ssl.TLSVersion.TLSv1_2), timeout=10).status_code == 200
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((httpx.ConnectError, ssl.SSLError)) as refused:
            httpx.get(f"https://{fd.address}:8443/health", verify=client(old), timeout=10)
        # refused by the server (protocol version alert), not a client unable to offer it
        assert "no protocols available" not in str(refused.value).lower(), refused.value

    # a renewal gone wrong: the new certificate, with the old key appended
    bad = tmp_path / "renewed.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=front",
                    "-keyout", str(tmp_path / "new-key.pem"), "-out", str(bad)], check=True, capture_output=True,
                   timeout=LOCAL_TIMEOUT)
    bad.write_text(bad.read_text() + key.read_text())
    bad.chmod(0o600)
    sha = "sha256sum /etc/haproxy/llamadeploy.pem"
    before = fd.ssh(sha).stdout
    served = ssl.get_server_certificate((fd.address, 8443), timeout=10)
    refused = run_deploy(write(tmp_path / "bad.py", hosts, {"tls_pem": str(bad), "redirect_http": True}),
                         "--limit", fd.address)
    out = refused.stdout + refused.stderr
    assert refused.rc != 0 and "llama_front.tls_pem" in out and "does not belong to its (first) certificate" in out, \
        out[-3000:]
    assert fd.ssh(sha).stdout == before
    assert ssl.get_server_certificate((fd.address, 8443), timeout=10) == served
    assert httpx.get(f"https://{fd.address}:8443/health", verify=False, timeout=10).status_code == 200


def test_uninstall_takes_the_fences_of_front_and_monitor_away(hosts, fleet):
    """The last test of the module: uninstall on the front and the monitor removes what their
    fences put there (the service's drop-in, the guard, the nftables drop-in, the table, the rules
    file), the services unbound first, and leaves each host as it was before the module's first
    deploy (files, users, groups, units); a second uninstall changes nothing."""
    def remove() -> subprocess.CompletedProcess:
        return subprocess.run([PYINFRA, "-y", "--json", str(fleet), "llamadeploy.deploy.llama_server_removed",
                               "--limit", hosts["fd"].address, "--limit", hosts["mon"].address],
                              cwd=REPO, capture_output=True, text=True, timeout=900)

    gone = remove()
    assert gone.returncode == 0, (gone.stdout + gone.stderr)[-4000:]
    report = json.loads(gone.stdout)
    for name, unit, rules in (("fd", "haproxy", "/etc/haproxy/llamadeploy-exporter.nft"),
                              ("mon", "prometheus", "/etc/prometheus/llamadeploy-fence.nft")):
        h = hosts[name]
        left = h.ssh(f"ls /etc/systemd/system/{unit}-fence.service /etc/systemd/system/{unit}.service.d "
                     f"/etc/systemd/system/nftables.service.d {rules} 2>&1", check=False).stdout
        assert left.count("No such file") == 4, left
        # the table was deleted (before the packages the deploy installed, nftables among them, were purged)
        deleted = [op for op in report["results"]["operations"]
                   if any(f"nftables table of {unit}'s fence removed" in n for n in op["names"])]
        assert deleted and h.address in deleted[0]["success"], deleted
        assert "llamadeploy_" not in h.ssh("if command -v nft >/dev/null; then nft list tables; fi").stdout
        assert h.ssh(f"systemctl is-active {unit}-fence.service", check=False).stdout.strip() != "active"
    # the front's marks of what rollouts drained go too
    assert hosts["fd"].ssh("test -e /var/lib/llamadeploy-front", check=False).returncode != 0
    # nothing else of the deploy's is left, and nothing of the host's went. Except the host's own
    # trust store: a package install runs ca-certificates' trigger, whose update-ca-certificates
    # links the CAs the host already trusts (/usr/local/share/ca-certificates, the sandbox's) into
    # /etc/ssl/certs; a cache of the host's trust, not the deploy's, and never to be removed
    after = {name: trust_store_aside(hosts[name].ssh(SNAPSHOT).stdout) for name in ("fd", "mon")}
    assert after == FRESH, "\n".join(
        f"{name}:\n" + "\n".join(difflib.unified_diff(FRESH[name].splitlines(), after[name].splitlines(), "fresh",
                                                     "after uninstall", lineterm="", n=0))
        for name in after if after[name] != FRESH[name])
    again = remove()
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["results"]["totals"]["success"] == 0, again.stdout[-3000:]
