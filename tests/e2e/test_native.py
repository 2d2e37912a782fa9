"""End to end, for real: build llama.cpp on a booted systemd host, serve Gemma 3 270M.

Checks go through a second channel (ssh, HTTP, the testinfra suite), never
through the deploy code itself. The host is booted once for the module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llamadeploy.bench import PROMPT
from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox.assets import MODEL_SHA256, MODEL_SIZE
from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import cli, host_state, run_deploy, run_testinfra
from tests.e2e import native_checks
from tests.e2e.native_checks import with_data

pytestmark = pytest.mark.e2e

API_KEY = "sk-e2e-" + "7f3a9c" * 5


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("lt1", 1)


@pytest.fixture(scope="module")
def inventory(host, tmp_path_factory) -> Path:
    return write_inventory(tmp_path_factory.mktemp("inv") / "native.py", [host], default_data())




def test_first_deploy_builds_and_serves(host, inventory):
    result = run_deploy(inventory)
    assert result.rc == 0, result.stderr[-4000:]
    assert result.changed > 0
    version = host.ssh("/opt/llama.cpp/current/bin/llama-server --version 2>&1").stdout
    assert "build 11434" in version, version
    assert host.ssh("systemd-analyze verify /etc/systemd/system/llama-server.service").returncode == 0
    assert host.ssh("sha256sum /var/lib/llama-server/models/*.gguf").stdout.split()[0] == MODEL_SHA256


def test_testinfra_suite_passes(host):
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_tuned_flags_and_bench(host, inventory):
    """The unit runs with the memory plan's slots/context; the bench drives it over real HTTP."""
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    args = manifest.args
    plan = manifest.memory_plan
    assert args[args.index("--parallel") + 1] == str(plan.parallel) == "8"
    assert args[args.index("--ctx-size") + 1] == str(plan.ctx_size)
    assert "--kv-unified" in args
    # Gemma 3 has sliding-window layers: --swa-full lets a resent prefix come from the cache
    assert "--swa-full" in args and plan.swa_full is True
    # the test GGUF has no chat template: the Gemma built-in, checked against this binary's list
    assert manifest.chat_template == "gemma"
    assert args[args.index("--chat-template") - 1:args.index("--chat-template") + 2] == [
        "--no-jinja", "--chat-template", "gemma"]
    # the plan leaves most of the 24 GiB free, so mlock is wanted exactly when systemd could
    # grant the unit's LimitMEMLOCK=infinity: read what the running service really got. Under
    # nspawn on a VM whose root lacks CAP_SYS_RESOURCE that is 8 MiB, and no mlock is asked for
    # (llama.cpp would only warn); with it, the testinfra suite checks VmLck covers the model.
    pid = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
    granted = host.ssh(f"grep '^Max locked memory' /proc/{pid}/limits").stdout.split()[3]
    if granted == "unlimited" or int(granted) >= MODEL_SIZE:
        assert args[args.index("--load-mode") + 1] == "mmap+mlock" == plan.load_mode
    else:
        assert plan.load_mode is None and "--load-mode" not in args
    url = f"http://{host.address}:8080/v1/chat/completions"
    timings = [
        httpx.post(url, json={"messages": [{"role": "user", "content": PROMPT.format(n=n)}], "max_tokens": 4},
                   timeout=60).json()["timings"]
        for n in (1, 2)
    ]
    # same ~60-word question, only "Request N." differs: all but the tail is reused (1 without --swa-full)
    assert timings[1]["cache_n"] >= 40, timings
    proc = subprocess.run(
        [sys.executable, "-m", "llamadeploy.bench", "--inventory", str(inventory),
         "--clients", "1,2", "--requests-per-client", "2", "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)[0]
    assert report["model"] == "gemma-3-270m"
    assert report["url"] == f"http://{host.address}:8080" and report["host"] == host.address
    assert report["read_bandwidth"] > 1e8 and report["roofline_1_client"] > 0
    for level in report["levels"]:
        assert level["requests"] == 2 * level["clients"]
        # errors (e.g. a dropped kept-alive connection) are counted, not hidden
        assert level["ok"] + sum(level["errors"].values()) == level["requests"]
        assert level["tokens"] == 8 * level["ok"]
        assert level["ttft_p50"] is not None


def llamadeploy_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("llamadeploy")), *args],
                          capture_output=True, text=True, timeout=300)


def test_status_shows_release_health_and_drift(host, inventory, tmp_path):
    """``llamadeploy status``: what runs (read over SSH through pyinfra) and how it differs."""
    proc = llamadeploy_cli("status", str(inventory), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "host key" not in proc.stderr, proc.stderr  # the sandbox pins each host's own key
    (row,) = json.loads(proc.stdout)
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    assert row["host"] == host.address and row["mode"] == "native"
    assert row["release"] == manifest.release == host.ssh("readlink /opt/llama.cpp/current").stdout.split("/")[-1].strip()
    assert row["model_sha256"] == MODEL_SHA256[:12] and row["flags_digest"] == manifest.flags_digest()
    assert (row["service"], row["health"], row["drift"]) == ("active", "ok", [])
    # an inventory asking for a key and another port: both show as drift, nothing changes on the host
    changed = with_data(host, tmp_path, "drift", llama_server={"api_key": API_KEY, "port": 8081})
    proc = llamadeploy_cli("status", str(changed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "api key none -> set" in proc.stdout and "bind 0.0.0.0:8080 -> 0.0.0.0:8081" in proc.stdout
    assert API_KEY not in proc.stdout + proc.stderr
    # a tuning change shows as flags drift: what a deploy would render now differs from what runs
    tuned = llamadeploy_cli("status", str(with_data(host, tmp_path, "ctx", llama_server={"ctx_size": 4096})), "--json")
    (row,) = json.loads(tuned.stdout)
    assert len(row["drift"]) == 1 and row["drift"][0].startswith(f"flags {manifest.flags_digest()} -> "), row
    # a bad value gets the deploy's one-line message naming host, field and value
    bad = llamadeploy_cli("status", str(with_data(host, tmp_path, "bad", llama_server={"port": 70000})))
    assert bad.returncode == 2 and f"host {host.address}: llama_server.port = 70000" in bad.stderr
    # a --limit naming nothing in the inventory is refused before any host is asked
    nothing = llamadeploy_cli("status", str(inventory), "--limit", "no-such-group")
    assert nothing.returncode == 2 and "--limit no-such-group: no host or group of that name" in nothing.stderr
    # a host that shows another key than the pinned one is refused (strict checking), not trusted
    impostor = tmp_path / "impostor-known-hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True,
                   timeout=60)
    impostor.write_text(f"{host.address} {(tmp_path / 'impostor.pub').read_text().split()[0]} "
                        f"{(tmp_path / 'impostor.pub').read_text().split()[1]}\n")
    pinned_elsewhere = with_data(host, tmp_path, "impostor")
    pinned_elsewhere.write_text(pinned_elsewhere.read_text().replace(str(host.known_hosts), str(impostor)))
    refused = llamadeploy_cli("status", str(pinned_elsewhere), "--json")
    assert refused.returncode == 1 and json.loads(refused.stdout)[0]["error"].startswith("unreachable over SSH")
    # --watch re-draws on the same connections until Ctrl-C, then exits 0
    watcher = subprocess.Popen([str(Path(sys.executable).with_name("llamadeploy")), "status", str(inventory),
                                "--watch", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)
    finally:
        watcher.send_signal(2)
        out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err[-3000:]
    drawn = [line for line in out.splitlines() if line.endswith("every 0.5s, Ctrl-C ends")]
    assert len(drawn) >= 3 and out.count(f"{host.address} ") == len(drawn), out[-3000:]
    assert err.count("==> connecting to 1 host(s)") == 1, err  # connected once, not per draw


def test_second_deploy_changes_nothing(host, inventory):
    before = host_state(host)
    result = run_deploy(inventory)
    assert result.rc == 0, result.stderr[-4000:]
    assert result.changed == 0, json.dumps(result.report["results"], indent=1)[:4000]
    assert result.report["results"]["totals"]["no_change"] > 0
    # second channel: same process, same binary, same model inode, same unit
    assert host_state(host) == before


def test_the_gpu_fit_runs_as_the_service_user_in_the_units_sandbox(host):
    native_checks.fit_sandbox_holds(host)


def test_server_older_than_its_unit_is_restarted_once(host, inventory):
    """A deploy that wrote the unit and failed before its restart leaves a server older than its
    unit (here: the unit's mtime set to now, its content unchanged). The next deploy restarts it
    (a new MainPID), and the one after that changes nothing: the start and the write compared
    to the hundredth of a second, not whole seconds (a server started in the second its unit was
    written is not stale)."""
    pid = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
    host.ssh("touch /etc/systemd/system/llama-server.service")
    result = run_deploy(inventory)
    assert result.rc == 0, result.stderr[-4000:]
    changed = [op["name"] for op in result.report["results"]["operations"] if op["success"]]
    assert any("Restart for changed" in name for name in changed), changed
    assert host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip() not in ("", "0", pid)
    again = run_deploy(inventory)
    assert again.rc == 0 and again.changed == 0, json.dumps(again.report["results"], indent=1)[:4000]


BAD_CONFIGS = {
    "unknown_section": ({"llama_sever": {"port": 1}}, "llama_sever: unknown setting"),
    "unknown_key": ({"llama_server": {"prot": 8080}}, "llama_server.prot: unknown setting"),
    "port_range": ({"llama_server": {"port": 70000}}, "llama_server.port = 70000"),
    "port_type": ({"llama_server": {"port": "8080"}}, "llama_server.port = '8080'"),
    "negative_threads": ({"llama_server": {"threads": -2}}, "llama_server.threads = -2"),
    "unknown_mode": ({"llama_mode": "kubernetes"}, "llama_mode = 'kubernetes'"),
    "tiny_context": ({"llama_server": {"ctx_size": 10}}, "llama_server.ctx_size = 10"),
    "bad_bind": ({"llama_server": {"host": "localhost"}}, "llama_server.host = 'localhost'"),
    "short_key": ({"llama_server": {"api_key": "abc"}}, "llama_server.api_key = <hidden>"),
    "memory_size": ({"llama_limits": {"memory": "8 GB"}}, "llama_limits.memory = '8 GB'"),
    "load_mode": ({"llama_server": {"load_mode": "mlockk"}}, "llama_server.load_mode = 'mlockk'"),
    "sha_mismatch": ({"llama_model": {"sha256": "0" * 64}}, "llama_model.sha256 = '000"),
    "missing_model": ({"llama_model": {"path": "/nonexistent/m.gguf"}}, "llama_model.path = '/nonexistent/m.gguf': no such file"),
    "bad_version": ({"llama_build": {"version": "latest"}}, "llama_build.version = 'latest'"),
}


def test_bad_config_changes_nothing(host, tmp_path):
    """Every malformed input stops the run with a clear message; the host stays as it was."""
    before = host_state(host)
    for case, (sections, message) in BAD_CONFIGS.items():
        inv = with_data(host, tmp_path, case, **sections)
        result = run_deploy(inv)
        assert result.rc != 0, case
        assert f"host {host.address}: {message}" in result.stderr, (case, result.stderr[-2000:])
        assert "nothing was changed on any host" in result.stderr
    assert host_state(host) == before


def test_preflight_refuses_too_little_memory(host, tmp_path):
    """A memory limit that cannot hold model + minimal KV cache is refused before any change."""
    before = host_state(host)
    result = run_deploy(with_data(host, tmp_path, "small", llama_limits={"memory": "300M"}))
    assert result.rc != 0
    assert f"preflight refused host {host.address}: model 241 MiB" in result.stderr
    assert "does not fit the memory limit of 300 MiB; would fit: llama_limits.memory >= " in result.stderr
    assert host_state(host) == before


def test_one_bad_host_stops_all_hosts(host, tmp_path):
    """Two inventory entries on the same machine: a good change and a bad one; neither runs."""
    before = host_state(host)
    good = copy.deepcopy(default_data())
    good["llama_server"] = {**good["llama_server"], "port": 8081}
    bad = copy.deepcopy(default_data())
    bad["llama_server"] = {**bad["llama_server"], "threads": 0}
    name, conn = host.inventory_entry()
    inv = tmp_path / "two.py"
    inv.write_text(
        "hosts = " + repr([
            ("good", {**conn, "ssh_hostname": name, **good}),
            ("bad", {**conn, "ssh_hostname": name, **bad}),
        ]) + "\n"
    )
    result = run_deploy(inv)
    assert result.rc != 0
    assert "host bad: llama_server.threads = 0" in result.stderr
    assert host_state(host) == before


def test_unknown_flag_refused_before_restart(host, tmp_path):
    """A flag the installed binary does not know fails the deploy; the old unit keeps serving."""
    before = host_state(host)
    inv = with_data(host, tmp_path, "flag", llama_server={"extra_args": ["--mlock"]})
    result = run_deploy(inv)
    assert result.rc != 0
    assert "does not accept --mlock" in result.stdout + result.stderr
    assert host_state(host).splitlines()[:2] == before.splitlines()[:2]  # same MainPID, same start
    assert "--mlock" not in host.ssh("cat /etc/systemd/system/llama-server.service").stdout
    assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200


def test_api_key(host, tmp_path, inventory):
    """A key is enforced, lives in a 0600 file, and never shows in output, process list, unit or logs."""
    replaced = ["/etc/systemd/system/llama-server.service", "/etc/llama-server/deploy.json"]
    inodes_before = host.ssh(f"stat -c %i {' '.join(replaced)}").stdout.split()
    inv = with_data(host, tmp_path, "key", llama_server={"api_key": API_KEY})
    result = run_deploy(inv, "-vvv")
    assert result.rc == 0, result.stderr[-4000:]
    assert result.changed > 0
    # unit and manifest were replaced by rename (new inode), not rewritten in place where a
    # restart could read them half-written; no staging file is left behind
    inodes_after = host.ssh(f"stat -c %i {' '.join(replaced)}").stdout.split()
    assert all(a != b for a, b in zip(inodes_before, inodes_after, strict=True)), (inodes_before, inodes_after)
    leftovers = host.ssh("find /etc/llama-server /etc/systemd/system /opt/llama.cpp -maxdepth 1 -name '.*-stage'")
    assert leftovers.stdout == ""
    assert API_KEY not in result.stdout + result.stderr
    # nor any hash of it: pyinfra prints fact commands and outputs at -vvv (a Sha1File of the key did)
    for digest in (hashlib.sha1, hashlib.sha256, hashlib.md5):
        for content in (API_KEY, API_KEY + "\n"):
            assert digest(content.encode()).hexdigest() not in result.stdout + result.stderr, digest
    proc = run_testinfra(host.address)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert httpx.get(f"http://{host.address}:8080/v1/models", timeout=10).status_code == 401
    ok = httpx.get(f"http://{host.address}:8080/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert ok.status_code == 200
    assert host.ssh("stat -c '%a %U' /etc/llama-server/api-key").stdout.split() == ["600", "llama"]
    # back to no key: the file goes away and /v1 is open again
    result = run_deploy(inventory)
    assert result.rc == 0, result.stderr[-4000:]
    assert host.ssh("test -e /etc/llama-server/api-key", check=False).returncode == 1
    assert httpx.get(f"http://{host.address}:8080/v1/models", timeout=10).status_code == 200


def test_rollback_reinstates_the_releases_key(host, inventory):
    """The release before this one ran with a key (test_api_key); this one has none, and its
    deploy removed the key file. A rollback reinstates the key file as that release recorded it
    (0600, the service's), so its unit finds the key and /v1 asks for it again."""
    assert host.ssh("test -e /etc/llama-server/api-key", check=False).returncode == 1

    result = cli("rollback", str(inventory))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert host.ssh("stat -c '%a %U' /etc/llama-server/api-key").stdout.split() == ["600", "llama"]
    assert httpx.get(f"http://{host.address}:8080/v1/models", timeout=10).status_code == 401
    ok = httpx.get(f"http://{host.address}:8080/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=10)
    assert ok.status_code == 200
    assert API_KEY not in result.stdout + result.stderr
    back = run_deploy(inventory)  # the keyless release again, for the tests after this one
    assert back.rc == 0, back.stderr[-4000:]
    assert host.ssh("test -e /etc/llama-server/api-key", check=False).returncode == 1


def test_a_rotated_key_the_server_refuses_leaves_the_old_key_serving(host, tmp_path, inventory):
    """A restart of the release that serves, not a new release: a rotated key keeps the release id
    (the unit names the key file, not the key). A first rotation passes, and the release's record
    now holds that key. A second is refused by a site's own drop-in whose ``ExecStartPre`` rejects
    keys of its prefix: the deploy reinstates the release as recorded when it last deployed, so the
    key of the first rotation serves again, enabled; the key rotated away from stays refused.
    Before, that run stopped at the restart and left the unit failing its start every 5 s (a gate
    failure after a restart that worked stopped and disabled a release that had served), and a
    record kept the key it was first written with."""
    keyed = with_data(host, tmp_path, "key", llama_server={"api_key": API_KEY})
    first = run_deploy(keyed)
    assert first.rc == 0, first.stderr[-4000:]
    rid = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id
    second = "sk-second-" + "a0b1" * 8
    rotated = run_deploy(with_data(host, tmp_path, "second", llama_server={"api_key": second}))
    assert rotated.rc == 0, rotated.stderr[-4000:]
    assert Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id == rid
    assert host.ssh(f"cmp /etc/llama-server/api-key /etc/llama-server/releases/{rid}/api-key",
                    check=False).returncode == 0  # the record holds the key it serves with
    refused = "sk-refused-" + "5e1d" * 8
    policy = "[Service]\nExecStartPre=+/bin/sh -c '! grep -q sk-refused- /etc/llama-server/api-key'\n"
    with native_checks.site_dropin(host, "zz-site-key-policy.conf", policy):
        assert host.ssh("systemctl restart llama-server", check=False).returncode == 0  # the serving key passes it
        result = run_deploy(with_data(host, tmp_path, "refused", llama_server={"api_key": refused}))
        out = result.stdout + result.stderr
        assert result.rc != 0
        assert "llama-server.service did not start; its state and last log lines:" in out, out[-3000:]
        assert (f"release {rid} failed its gate; rolled back to {rid} as recorded when it last deployed"
                in out), out[-3000:]
        assert all(k not in out for k in (API_KEY, second, refused))
        assert Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id == rid
        url = f"http://{host.address}:8080/v1/models"
        answers = {k: httpx.get(url, headers={"Authorization": f"Bearer {k}"}, timeout=10).status_code
                   for k in (API_KEY, second, refused)}
        assert answers == {API_KEY: 401, second: 200, refused: 401}, answers
        state = host.ssh("systemctl show -p ActiveState -p UnitFileState llama-server").stdout
        assert "ActiveState=active" in state and "UnitFileState=enabled" in state, state
        assert host.ssh("stat -c '%a %U' /etc/llama-server/api-key").stdout.split() == ["600", "llama"]
    back = run_deploy(inventory)  # the keyless release again, for the tests after this one
    assert back.rc == 0, back.stderr[-4000:]
    assert host.ssh("test -e /etc/llama-server/api-key", check=False).returncode == 1


def test_testinfra_suite_checks_a_loopback_server_through_the_host(host, tmp_path, inventory):
    """Bound to 127.0.0.1 with a key: the shipped suite's HTTP checks go through the host (curl
    there), not to the controller's own loopback, and pass; nothing answers from outside."""
    inv = with_data(host, tmp_path, "loopback", llama_server={"host": "127.0.0.1", "api_key": API_KEY})
    result = run_deploy(inv)
    assert result.rc == 0, result.stderr[-4000:]
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{host.address}:8080/health", timeout=5)
        proc = run_testinfra(host.address, "-rA")  # -rA: one "PASSED <test>" line per test in the summary
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        for check in ("test_health", "test_chat_completion_streaming", "test_api_key_enforced",
                      "test_metrics_count_completions"):
            assert re.search(rf"^PASSED \S+::{check}\[", proc.stdout, re.M), (check, proc.stdout[-3000:])
    finally:
        back = run_deploy(inventory)
        assert back.rc == 0, back.stderr[-4000:]


def test_release_that_crashes_at_start_is_rolled_back_by_the_deploy_itself(host, tmp_path, inventory):
    native_checks.crash_at_start_rolled_back(host, tmp_path, inventory)


def test_a_start_systemd_refuses_is_rolled_back_too(host, tmp_path, inventory):
    native_checks.refused_start_rolled_back(host, tmp_path, inventory)


def test_failed_first_deploy_is_stopped_not_crash_looping(host, tmp_path):
    native_checks.failed_first_deploy_stopped(host, tmp_path)
